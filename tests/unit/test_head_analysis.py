"""The attention-distance measure on hand-built patterns, its chunked computation from q/k, the
base-distance correlation, and capture from running models (a tiny megatron GPTModel in a
spawned process, a tiny HARPE Llama through transformers) against direct references.

Run: pytest tests/unit/test_head_analysis.py
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_harpe.eval.analysis.heads import (
    DistanceAccumulator,
    attention_distance_stats,
    correlations,
)

LENGTH = 40


def uniform_causal(heads: int, length: int) -> torch.Tensor:
    """Query q spreads its mass evenly over keys 0..q."""
    causal = torch.tril(torch.ones(length, length))
    return (causal / causal.sum(-1, keepdim=True)).expand(heads, length, length).clone()


def test_uniform_attention_reaches_half_way_back():
    stats = attention_distance_stats(uniform_causal(3, LENGTH), thresholds=(4, 30))
    # averaged over queries q = 0..L-1 of q/2
    torch.testing.assert_close(stats["mean_distance"], torch.full((3,), (LENGTH - 1) / 4, dtype=torch.float64))
    # min_query_position = L-1 keeps only the last query q
    query = LENGTH - 1
    last = attention_distance_stats(uniform_causal(1, LENGTH), thresholds=(4, 30), min_query_position=query)
    assert last["mean_distance"].item() == pytest.approx(query / 2)
    # distances 0..q are equally likely: q - T of the q + 1 keys lie further back than T
    assert last["share_beyond"][4].item() == pytest.approx((query - 4) / (query + 1))
    assert last["share_beyond"][30].item() == pytest.approx((query - 30) / (query + 1))
    assert last["first_token_mass"].item() == pytest.approx(1 / (query + 1))
    later = attention_distance_stats(uniform_causal(1, LENGTH), thresholds=(), min_query_position=20)
    expected = sum(q / 2 for q in range(20, LENGTH)) / (LENGTH - 20)
    assert later["mean_distance"].item() == pytest.approx(expected)


def test_diagonal_attention_stays_at_distance_zero():
    stats = attention_distance_stats(torch.eye(LENGTH).expand(2, LENGTH, LENGTH), thresholds=(0, 4))
    assert stats["mean_distance"].tolist() == [0.0, 0.0]
    assert stats["share_beyond"][0].tolist() == [0.0, 0.0]
    assert stats["first_token_mass"].tolist() == [1 / LENGTH, 1 / LENGTH]  # only query 0 sits on key 0


def test_first_token_attention_reaches_back_to_the_start():
    pattern = torch.zeros(1, LENGTH, LENGTH)
    pattern[:, :, 0] = 1.0
    stats = attention_distance_stats(pattern, thresholds=(9,), min_query_position=10)
    assert stats["mean_distance"].item() == pytest.approx(sum(range(10, LENGTH)) / (LENGTH - 10))
    assert stats["share_beyond"][9].item() == 1.0  # every query from 10 on sits more than 9 back
    assert stats["first_token_mass"].item() == 1.0


def test_heads_are_kept_apart():
    pattern = torch.stack([torch.eye(LENGTH), uniform_causal(1, LENGTH)[0]])
    stats = attention_distance_stats(pattern, thresholds=(), min_query_position=LENGTH - 1)
    assert stats["mean_distance"].tolist() == pytest.approx([0.0, (LENGTH - 1) / 2])


def test_bad_patterns_are_refused():
    with pytest.raises(ValueError, match="future"):
        attention_distance_stats(torch.full((1, 4, 4), 0.25))
    with pytest.raises(ValueError, match="sum to 1"):
        attention_distance_stats(torch.tril(torch.ones(1, 4, 4)))
    with pytest.raises(ValueError, match=r"\[heads, s, s\]"):
        attention_distance_stats(torch.ones(4, 4))
    with pytest.raises(ValueError, match="min_query_position"):
        attention_distance_stats(uniform_causal(1, 4), min_query_position=4)


def reference_probabilities(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense softmax(q k^T * scale + causal mask), query head h reading key head h // group."""
    key = key.repeat_interleave(query.size(0) // key.size(0), dim=0)
    scores = query @ key.transpose(1, 2) * scale
    future = torch.triu(torch.ones(scores.shape[-2:], dtype=torch.bool), diagonal=1)
    return scores.masked_fill(future, float("-inf")).softmax(-1)


@pytest.mark.parametrize("max_elements", [37, 400, 10**6])
def test_chunked_query_key_equals_the_dense_pattern(max_elements):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(6, LENGTH, 8, generator=generator) * 2
    key = torch.randn(2, LENGTH, 8, generator=generator) * 2  # 3 query heads per k/v head
    reference = attention_distance_stats(reference_probabilities(query, key, 0.35), (3, 20), min_query_position=12)
    accumulator = DistanceAccumulator(2, 6, (3, 20))
    positions = torch.arange(12, LENGTH)
    accumulator.add_query_key(1, query[:, 12:], key, 0.35, positions, max_elements=max_elements)
    means = accumulator.means()
    close = dict(rtol=1e-5, atol=1e-6)  # fp32 scores, summed in a different order
    torch.testing.assert_close(means["mean_distance"][1], reference["mean_distance"], **close)
    torch.testing.assert_close(means["first_token_mass"][1], reference["first_token_mass"], **close)
    for threshold in (3, 20):
        torch.testing.assert_close(means["share_beyond"][threshold][1], reference["share_beyond"][threshold], **close)
    assert torch.isnan(means["mean_distance"][0]).all()  # layer 0 saw no query
    assert accumulator.queries[1].tolist() == [LENGTH - 12] * 6


def test_correlations():
    bases = [1e2, 1e3, 1e4, 1e5]
    exact = correlations(bases, [1.0, 2.0, 3.0, 4.0])  # linear in log10(base)
    assert exact["pearson_log_base"] == pytest.approx(1.0) and exact["spearman"] == pytest.approx(1.0)
    reverse = correlations(bases, [9.0, 4.0, 1.0, 0.5])
    assert reverse["spearman"] == pytest.approx(-1.0) and reverse["pearson_log_base"] < -0.9
    # ties share their mean rank: x ranks [1.5, 1.5, 3, 4], y ranks [1, 2, 3, 4]
    tied = correlations([1e2, 1e2, 1e3, 1e4], [1.0, 2.0, 3.0, 4.0])
    x, y = [1.5, 1.5, 3, 4], [1, 2, 3, 4]
    mean_x, mean_y = sum(x) / 4, sum(y) / 4
    covariance = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y))
    expected = covariance / math.sqrt(sum((a - mean_x) ** 2 for a in x) * sum((b - mean_y) ** 2 for b in y))
    assert tied["spearman"] == pytest.approx(expected)
    assert correlations([1e4] * 4, [1.0, 2.0, 3.0, 4.0]) == {"points": 4, "pearson_log_base": None, "spearman": None}


# ---------------------------------------------------------------- capture from running models


def _megatron_capture_against_reference() -> list[dict]:
    """In a spawned rank (megatron state is process-global), for keys shared per k/v group and
    keys rotated per query head."""
    from megatron_harpe import parallel

    parallel.initialize(1, 1)
    return [_capture_against_reference(gqa_bases) for gqa_bases in ("per_group", "per_query_head")]


def _capture_against_reference(gqa_bases: str) -> dict:
    """Analysis through megatron_capture vs softmax(QK^T) of the q/k the core attention receives;
    the reference probabilities must reproduce the attention output."""
    from megatron_harpe import parallel
    from megatron_harpe.config import ModelConfig
    from megatron_harpe.eval.analysis.heads import _DecoderDone, megatron_capture
    from megatron_harpe.model import build_model
    from megatron_harpe.position.config import PositionConfig

    parallel.seed_everything(0)
    model = ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=96,
        vocab_size=128,
        max_position_embeddings=64,
    )
    bases = [10.0, 1e4] if gqa_bases == "per_group" else [10.0, 100.0, 1e3, 1e4]
    position = PositionConfig(type="harpe", bases=bases, gqa_bases=gqa_bases).resolve(model)
    gpt = build_model(model, position).eval()
    seen: dict[int, tuple] = {}
    for index, layer in enumerate(gpt.decoder.layers):

        def keep(module, args, kwargs, output, index=index):
            seen[index] = (args[0].clone(), args[1].clone(), args[2].clone(), output.clone(), module.softmax_scale)

        layer.self_attention.core_attention.register_forward_hook(keep, with_kwargs=True)
    tokens = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(48)[None]
    with torch.no_grad():
        plain_logits = gpt(tokens, positions, None)
        accumulator = DistanceAccumulator(2, 4, (5, 30))
        with megatron_capture(gpt, accumulator, min_query_position=16, max_elements=150):
            try:
                gpt(tokens, positions, None)
                stopped = False
            except _DecoderDone:
                stopped = True
        logits_after = gpt(tokens, positions, None)
    result = {
        "stopped": stopped,
        "logits_unchanged": torch.equal(plain_logits, logits_after),
        "means": accumulator.means(),
        "reference": [],
        "output_error": [],
    }
    for index in range(2):
        query, key, value, output, scale = seen[index]
        query, key, value = (t[:, 0].transpose(0, 1) for t in (query, key, value))  # [heads, s, d]
        probabilities = reference_probabilities(query, key, scale)
        group = query.size(0) // value.size(0)
        attended = probabilities @ value.repeat_interleave(group, dim=0)  # [heads, s, d]
        result["output_error"].append(float((attended.transpose(0, 1).reshape(48, -1) - output[:, 0]).abs().max()))
        result["reference"].append(attention_distance_stats(probabilities, (5, 30), min_query_position=16))
    return result


@pytest.mark.distributed
def test_megatron_capture_matches_softmax_of_the_layers_queries_and_keys():
    from megatron_harpe import parallel

    for result in parallel.run_on_ranks(_megatron_capture_against_reference, 1)[0]:
        assert result["stopped"] and result["logits_unchanged"]
        assert max(result["output_error"]) < 1e-5, "the reference softmax is not the attention the model runs"
        means = result["means"]
        close = dict(rtol=1e-5, atol=1e-6)
        for layer, reference in enumerate(result["reference"]):
            torch.testing.assert_close(means["mean_distance"][layer], reference["mean_distance"], **close)
            torch.testing.assert_close(means["first_token_mass"][layer], reference["first_token_mass"], **close)
            for threshold in (5, 30):
                torch.testing.assert_close(
                    means["share_beyond"][threshold][layer], reference["share_beyond"][threshold], **close
                )
        # a random model is close to uniform: about (16 + 47) / 4 back, and heads do differ a little
        assert 10 < float(means["mean_distance"].mean()) < 22
        assert float(means["mean_distance"].std()) > 0


@pytest.fixture(scope="module")
def tiny_harpe_dir(tmp_path_factory) -> str:
    from megatron_harpe.eval.testing import save_tiny_harpe_llama, save_tiny_tokenizer

    directory = str(tmp_path_factory.mktemp("tiny_harpe"))
    save_tiny_tokenizer(directory)
    # different bases inside a k/v group: keys are rotated once per query head
    save_tiny_harpe_llama(directory, bases=[10.0, 100.0, 1e4, 1e4], seed=3)
    return directory


def test_hf_capture_matches_eager_attention_weights(tiny_harpe_dir):
    from megatron_harpe.eval.analysis.heads import analyze_heads
    from megatron_harpe.eval.backends import load_backend

    backend = load_backend(tiny_harpe_dir, trust_remote_code=True)
    ids = torch.randint(3, 500, (2, 64), generator=torch.Generator().manual_seed(2))
    analysis = analyze_heads(
        backend, ids.tolist(), length=64, thresholds=(8, 40), min_query_position=24, max_elements=500
    )
    assert backend.model.config._attn_implementation == "sdpa"  # restored after the analysis
    assert analysis.bases == [10.0, 100.0, 1e4, 1e4] and analysis.position == "harpe"
    backend.model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = [backend.model(ids[i : i + 1], output_attentions=True).attentions for i in range(2)]
    for layer in range(2):
        # documents are averaged with equal weight (same number of queries each)
        per_document = [attention_distance_stats(a[layer][0], (8, 40), min_query_position=24) for a in attentions]
        expected = (per_document[0]["mean_distance"] + per_document[1]["mean_distance"]) / 2
        torch.testing.assert_close(analysis.mean_distance[layer], expected, rtol=1e-5, atol=1e-4)
        share = (per_document[0]["share_beyond"][40] + per_document[1]["share_beyond"][40]) / 2
        torch.testing.assert_close(analysis.share_beyond[40][layer], share, rtol=1e-5, atol=1e-5)
    summary = analysis.to_dict()
    assert len(summary["cells"]) == 8 and summary["queries_per_head"] == 2 * 40
    assert [row["heads"] for row in summary["by_base"]] == [1, 1, 2]
