"""Document masking gives every packed document the logits, loss and gradients it gets alone.

    python -m pytest tests/distributed/test_document_masking.py -q             # default part
    python -m pytest tests/distributed/test_document_masking.py -q -m slow     # the rest of the matrix

Three packed sequences of 32 tokens -- documents shorter than a CP chunk (at CP 4 a chunk is 4
tokens), one document crossing every chunk boundary, and a sequence that is one document -- go
through the trainer's own path on TP x CP gloo ranks (document_parity.py) and are compared in
fp32 with each document run alone in one process, for HARPE (MHA, GQA with bases per group and
per query head), ABF, PI and YaRN:
- logits, per-token losses and the gradients of the token-mean loss;
- the rotary angle table every token is rotated with, exactly. With attention masked, RoPE sees
  only distances inside a document, so positions running on across documents change the logits
  by rounding alone: this check is what catches them.
Both breakages (attention crossing documents, positions running on) are shown to fail.
"""

from __future__ import annotations

import functools

import pytest
import torch
from document_parity import Case, alone, packed, packed_batch

from megatron_harpe import parallel
from megatron_harpe.config import ModelConfig
from megatron_harpe.position.config import PositionConfig

pytestmark = pytest.mark.distributed

MHA = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=64,
                  max_position_embeddings=8)  # fmt: skip
GQA = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                  vocab_size=64, max_position_embeddings=8)  # fmt: skip
CASES = {
    "harpe_mha": Case(MHA, PositionConfig(type="harpe", bases=[50.0, 500.0, 5000.0, 50000.0])),
    "harpe_gqa": Case(GQA, PositionConfig(type="harpe", bases=[30.0, 3000.0])),
    "harpe_gqa_per_query_head": Case(
        GQA, PositionConfig(type="harpe", bases=[20.0, 200.0, 2000.0, 20000.0], gqa_bases="per_query_head")
    ),
    "abf": Case(GQA, PositionConfig(type="abf", base=500.0)),
    "pi": Case(MHA, PositionConfig(type="pi", base=100.0, scaling_factor=4.0)),
    "yarn": Case(GQA, PositionConfig(type="yarn", base=100.0, scaling_factor=4.0)),
}
for _case in CASES.values():
    _case.position.resolve(_case.model)
ALL = tuple(CASES)
# rows of 32 tokens: short documents (3, 1 < a CP-4 chunk of 4) and crossing ones; a document
# crossing every chunk boundary; one document
LENGTHS = [[3, 9, 1, 12, 7], [1, 30, 1], [32]]
TOLERANCE = dict(atol=2e-5, rtol=1e-4)


@functools.cache
def batch() -> dict[str, torch.Tensor]:
    return packed_batch(LENGTHS, MHA.vocab_size)


@functools.cache
def reference() -> dict[str, dict]:
    results = parallel.run_on_ranks(alone, 1, [CASES[name] for name in ALL], batch())[0]
    return dict(zip(ALL, results))


@functools.cache
def run(
    tp: int, cp: int, names: tuple[str, ...], breakages: tuple[str, ...] = (), sequence_parallel: bool = False
) -> dict[tuple[str, str | None], dict]:
    """Results of one spawn of tp x cp ranks, keyed by (case, breakage): every case as it
    should run, then the first case broken in each of `breakages`."""
    jobs = [(name, None) for name in names] + [(names[0], breakage) for breakage in breakages]
    ranks = parallel.run_on_ranks(packed, tp * cp, tp, cp,
                                  [(CASES[name], reference()[name]["weights"], breakage) for name, breakage in jobs],
                                  batch(), sequence_parallel)  # fmt: skip
    results = dict(zip(jobs, ranks[0]))
    for index, job in enumerate(jobs):  # every rank's rotary tables count
        results[job]["table_error"] = max(rank[index]["table_error"] for rank in ranks)
    return results


def assert_as_alone(results: dict[tuple[str, str | None], dict]) -> None:
    for (name, breakage), result in results.items():
        if breakage is not None:
            continue
        want = reference()[name]
        assert result["table_error"] == 0.0, f"{name}: a token was rotated at another position than alone"
        torch.testing.assert_close(result["logits"], want["logits"], **TOLERANCE, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(result["losses"], want["losses"], **TOLERANCE, msg=lambda m: f"{name}: {m}")
        for param, grad in want["grads"].items():
            torch.testing.assert_close(result["grads"][param], grad, **TOLERANCE, msg=lambda m: f"{name} {param}: {m}")


def test_batch_holds_the_promised_documents():
    from megatron_harpe.documents import document_ids, document_spans

    ids = document_ids(batch()["tokens"], 0)
    assert [[end - start for start, end in document_spans(row)] for row in ids] == LENGTHS
    chunk = 32 // (2 * 4)
    crossing = document_spans(ids[1])[1]
    assert crossing[0] < chunk and crossing[1] > 32 - chunk  # starts in the first chunk, ends in the last


BREAKAGES = ("no_mask", "positions_run_on")


def test_context_parallel_2_matches_alone():
    assert_as_alone(run(1, 2, ALL, BREAKAGES))


def test_tensor_parallel_2_with_sequence_parallelism_matches_alone():
    assert_as_alone(run(2, 1, ALL, sequence_parallel=True))


def test_context_parallel_4_matches_alone():
    assert_as_alone(run(1, 4, ("harpe_gqa", "yarn")))


@pytest.mark.slow
@pytest.mark.parametrize(
    "tp,cp,sequence_parallel", [(1, 1, False), (2, 1, False), (1, 4, False), (2, 2, False), (2, 2, True)]
)
def test_full_matrix(tp, cp, sequence_parallel):
    assert_as_alone(run(tp, cp, ALL, sequence_parallel=sequence_parallel))


def test_attention_crossing_documents_is_caught():
    broken = run(1, 2, ALL, BREAKAGES)[(ALL[0], "no_mask")]
    assert broken["table_error"] == 0.0  # positions still right: only the mask is missing
    assert (broken["logits"] - reference()[ALL[0]]["logits"]).abs().max() > 1e-2


def test_positions_running_on_are_caught():
    broken = run(1, 2, ALL, BREAKAGES)[(ALL[0], "positions_run_on")]
    assert broken["table_error"] > 1.0
    # the logits alone barely notice: RoPE sees distances within a document, equal either way
    torch.testing.assert_close(broken["logits"], reference()[ALL[0]]["logits"], atol=1e-3, rtol=1e-3)
