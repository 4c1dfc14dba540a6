"""Evaluation never crashes on a TP / SP / CP layout: prompts of any length are padded to what
the layout needs, and one-token KV-cache decode works under sequence parallelism. Logits and
generated tokens equal one process's, at prompt lengths that are not multiples of anything.
Sequence parallelism runs megatron's own path on CPU (tests/distributed/sequence_parallel_cpu.py).

    python -m pytest tests/distributed/test_eval_layouts.py -q
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_harpe import parallel
from megatron_harpe.config import ModelConfig, ParallelConfig
from megatron_harpe.position.config import PositionConfig
from tests.distributed.model_parity import make_full_weights, shard

pytestmark = pytest.mark.distributed

VOCAB = 96
PROMPT_LENGTHS = (13, 30, 37)  # 13 and 37 are odd; 30 is no multiple of 4 or 8
NEW_TOKENS = 4
MODEL = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                    vocab_size=VOCAB, max_position_embeddings=128)  # fmt: skip
POSITION = PositionConfig(type="harpe", bases=[10.0, 5000.0])
LAYOUTS = {"TP2 + SP": (2, 1, True), "CP2": (1, 2, False), "TP2 + SP x CP2": (2, 2, True)}


def _outputs(tp: int, cp: int, sequence_parallel: bool, weights: dict, prompts: list[list[int]]) -> dict:
    from megatron_harpe.eval.backends.kv_cache import IncrementalDecoder
    from megatron_harpe.eval.backends.megatron import MegatronBackend
    from megatron_harpe.model import build_model

    if sequence_parallel:
        from tests.distributed.sequence_parallel_cpu import enable_sequence_parallel_on_cpu

        enable_sequence_parallel_on_cpu()
    ctx = parallel.initialize(tp, cp)
    POSITION.resolve(MODEL)
    gpt = build_model(MODEL, POSITION, initialize=False,
                      parallel=ParallelConfig(tensor=tp, context=cp, sequence_parallel=sequence_parallel))  # fmt: skip
    assert gpt.config.sequence_parallel == sequence_parallel
    gpt.load_state_dict({name: shard(name, full, ctx.tp_rank, tp) for name, full in weights.items()}, strict=False)
    tokenizer = SimpleNamespace(vocab_size=VOCAB, eos_id=None)
    backend = MegatronBackend(gpt, None, tokenizer, "tiny", generation=True)
    results = []
    for prompt in prompts:
        continuation = [(7 * i + 3) % VOCAB for i in range(NEW_TOKENS)]
        with IncrementalDecoder(backend) as decoder:
            steps = [decoder.prefill(prompt)] + [decoder.step(token) for token in continuation]
        results.append({"logits": backend.logits(prompt), "steps": torch.stack(steps),
                        "generated": backend.generate(prompt, NEW_TOKENS)})  # fmt: skip
    return {"multiple": backend.multiple, "results": results}


@pytest.fixture(scope="module")
def reference():
    POSITION.resolve(MODEL)
    weights = make_full_weights(MODEL, POSITION, seed=3)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
    return weights, prompts, parallel.run_on_ranks(_outputs, 1, 1, 1, False, weights, prompts)[0]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_evaluation_on_a_layout_equals_one_process(layout, reference):
    weights, prompts, single = reference
    tp, cp, sequence_parallel = LAYOUTS[layout]
    ranks = parallel.run_on_ranks(_outputs, tp * cp, tp, cp, sequence_parallel, weights, prompts)
    assert ranks[0]["multiple"] == {"TP2 + SP": 2, "CP2": 4, "TP2 + SP x CP2": 4}[layout]
    for rank in ranks:  # every rank sees the same logits and tokens
        for got, want in zip(rank["results"], single["results"]):
            torch.testing.assert_close(got["logits"], want["logits"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got["steps"], want["steps"], atol=1e-5, rtol=1e-5)
            assert got["generated"] == want["generated"]
            assert len(got["generated"]) == NEW_TOKENS
    # the decode steps really move (a cache ignoring the new tokens would repeat the prefill's logits)
    assert not torch.allclose(single["results"][0]["steps"][1], single["results"][0]["steps"][2], atol=1e-3)


def _train_and_record(tree: dict, sequence_parallel: bool) -> dict:
    """train() with evaluation; records every prompt the in-training evaluation generates from."""
    from megatron_harpe.config import Config, from_dict
    from megatron_harpe.eval import in_training
    from megatron_harpe.eval.backends.megatron import MegatronBackend
    from megatron_harpe.training.loop import train

    if sequence_parallel:
        from tests.distributed.sequence_parallel_cpu import enable_sequence_parallel_on_cpu

        enable_sequence_parallel_on_cpu()
    generations, scalars = [], []
    generate = MegatronBackend.generate
    MegatronBackend.generate = lambda self, ids, max_new_tokens: (
        generations.append((len(ids), generate(self, ids, max_new_tokens))) or generations[-1][1]
    )
    evaluate = in_training.evaluate_during_training
    in_training.evaluate_during_training = lambda *args: scalars.append(evaluate(*args)) or scalars[-1]
    history = train(from_dict(Config, tree))
    return {"history": history, "generations": generations, "scalars": scalars}


def test_in_training_evaluation_under_tp_sp_and_cp(demo_data, tmp_path):
    """A training run on TP2 + SP x CP2 evaluates (a needle task by greedy generation, from prompts
    of 116 and 125 tokens) and generates what one process generates from the same weights."""
    model = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                 vocab_size=4096, max_position_embeddings=64)  # fmt: skip
    tree = {
        "model": model,
        "position": {"type": "harpe", "bases": [100.0, 10000.0]},
        "data": {"prefixes": [demo_data.prefix], "tokenizer": str(demo_data.tokenizer), "seq_length": 64},
        "train": {"micro_batch_size": 1, "global_batch_size": 2, "train_tokens": 2 * 64, "lr": 1e-9},
        "checkpoint": {"save": str(tmp_path / "start")},
        "logging": {"log_interval": 1000},
    }
    parallel.run_on_ranks(_train_and_record, 1, tree, False)  # the shared starting weights
    tree["checkpoint"] = {"pretrained": str(tmp_path / "start")}
    tree["eval"] = {"interval": 1, "tasks": ["niah_single_1"], "lengths": [141], "samples": 2, "max_new_tokens": 6}
    single = parallel.run_on_ranks(_train_and_record, 1, tree, False)[0]
    tree["parallel"] = {"tensor": 2, "context": 2, "sequence_parallel": True}
    sharded = parallel.run_on_ranks(_train_and_record, 4, tree, True)
    assert len(single["generations"]) == 2 and single["scalars"] and "niah_single_1/141" in single["scalars"][0]
    assert any(length % 4 for length, _ in single["generations"])  # prompts the layout must pad
    for rank in sharded:
        assert rank["generations"] == single["generations"]
        assert rank["scalars"] == single["scalars"]
