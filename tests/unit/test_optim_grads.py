"""Gradient helpers in one process (no process group): clipping, token count.

The multi-rank behaviour (TP=2 norm, the token-weighted loss over DP) is in
tests/distributed/test_grads.py, the sharded engine's in tests/distributed/test_sharding.py.
Run: pytest tests/unit/test_optim_grads.py
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_harpe.training.grads import clip_grad_norm, global_token_count, gradient_bytes


def _model_with_grads(scale: float = 1.0) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 2))
    (model(torch.randn(3, 5)).sum() * scale).backward()
    return model


@pytest.mark.parametrize("max_norm", [0.1, 1e6])
def test_clip_matches_torch_without_tensor_parallelism(max_norm: float) -> None:
    ours, theirs = _model_with_grads(), _model_with_grads()
    norm = clip_grad_norm(ours, max_norm, tp_group=None)
    expected = float(torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm))
    assert norm == pytest.approx(expected, rel=1e-6)
    for mine, reference in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(mine.grad, reference.grad)
    clipped = math.sqrt(sum(float(p.grad.square().sum()) for p in ours.parameters()))
    assert clipped == pytest.approx(min(norm, max_norm), rel=1e-4)


def test_zero_max_norm_measures_without_clipping() -> None:
    model = _model_with_grads(scale=100.0)
    before = [p.grad.clone() for p in model.parameters()]
    norm = clip_grad_norm(model, 0.0, tp_group=None)
    assert norm > 1.0
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_norm_is_returned_and_grads_untouched(bad: float) -> None:
    model = _model_with_grads()
    next(model.parameters()).grad[0, 0] = bad
    before = [p.grad.clone() for p in model.parameters()]
    norm = clip_grad_norm(model, 1.0, tp_group=None)
    assert math.isnan(norm) if math.isnan(bad) else norm == math.inf
    for old, param in zip(before, model.parameters()):
        torch.testing.assert_close(param.grad, old, rtol=0, atol=0, equal_nan=True)


def test_bf16_gradients_are_normed_in_fp32() -> None:
    grad = torch.full((4096,), 1.0, dtype=torch.bfloat16)
    param = torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))
    param.grad = grad
    holder = torch.nn.Module()
    holder.weight = param
    assert clip_grad_norm(holder, 0.0, tp_group=None) == pytest.approx(64.0)


def test_gradient_bytes_count_the_gradients_held() -> None:
    model = _model_with_grads()
    assert gradient_bytes(model) == sum(p.numel() * 4 for p in model.parameters())
    model[0].weight.grad = None
    assert gradient_bytes(model) == sum(p.numel() * 4 for p in model.parameters()) - 35 * 4


def test_global_token_count_sums_micro_batches() -> None:
    masks = [torch.tensor([[1, 1, 0], [0, 1, 0]]), torch.tensor([[True, False, True]]), torch.tensor([0.5, 0.25])]
    count = global_token_count(masks, group=None)
    assert count.dtype == torch.float32 and count.dim() == 0
    assert float(count) == pytest.approx(5.75)


def test_global_token_count_refuses_empty_steps() -> None:
    with pytest.raises(ValueError, match="every loss mask is 0"):
        global_token_count([torch.zeros(2, 4)], group=None)
    with pytest.raises(ValueError, match="at least one micro-batch"):
        global_token_count([], group=None)
