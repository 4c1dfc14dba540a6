"""Tensor and context parallelism give the single-process logits, loss and gradients.

Each case runs one forward/backward on spawned gloo ranks (see model_parity.py) and compares
with the TP=1, CP=1 run of the same weights, with distinct per-head bases.
"""

from __future__ import annotations

import functools

import pytest
import torch
from model_parity import make_full_weights, run_step

from megatron_harpe.config import ModelConfig
from megatron_harpe.position.config import PositionConfig

pytestmark = pytest.mark.distributed

MHA = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=64)
GQA = ModelConfig(
    num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96, vocab_size=64
)
CASES = {
    "mha": (MHA, PositionConfig(type="harpe", bases=[50.0, 500.0, 5000.0, 50000.0])),
    "gqa": (GQA, PositionConfig(type="harpe", bases=[30.0, 3000.0])),
    "gqa_per_query_head": (
        GQA,
        PositionConfig(type="harpe", bases=[20.0, 200.0, 2000.0, 20000.0], gqa_bases="per_query_head"),
    ),
}


@functools.cache
def case(name: str):
    model, position = CASES[name]
    position.resolve(model)
    weights = make_full_weights(model, position, seed=7)
    tokens = torch.randint(0, model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(3))
    reference = run_step(1, 1, model, position, weights, tokens)
    return model, position, weights, tokens, reference


def assert_same(result: dict, reference: dict, atol: float = 2e-5) -> None:
    assert result["loss"] == pytest.approx(reference["loss"], abs=atol)
    torch.testing.assert_close(result["logits"], reference["logits"], atol=atol, rtol=1e-4)
    assert result["grads"].keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(result["grads"][name], grad, atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("name", [pytest.param("mha", marks=pytest.mark.slow), "gqa", "gqa_per_query_head"])
def test_tensor_parallel_matches_single_process(name):
    model, position, weights, tokens, reference = case(name)
    assert_same(run_step(2, 1, model, position, weights, tokens), reference)


@pytest.mark.parametrize("name,cp", [("gqa", 2), ("mha", 4)])
def test_context_parallel_matches_single_process(name, cp):
    model, position, weights, tokens, reference = case(name)
    assert_same(run_step(1, cp, model, position, weights, tokens), reference)


def test_tensor_and_context_parallel_together_match_single_process():
    model, position, weights, tokens, reference = case("gqa")
    assert_same(run_step(2, 2, model, position, weights, tokens), reference)


def test_comparison_is_sensitive_to_which_head_gets_which_base():
    model, position, weights, tokens, reference = case("mha")
    permuted = PositionConfig(type="harpe", bases=list(reversed(position.bases))).resolve(model)
    result = run_step(2, 1, model, permuted, weights, tokens)
    assert (result["logits"] - reference["logits"]).abs().max() > 1e-3
