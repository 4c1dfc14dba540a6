"""Clipping and the token-weighted loss on spawned gloo ranks equal the single-process computation.

- TP=2 (megatron-core ColumnParallelLinear / RowParallelLinear + a replicated norm weight):
  `clip_grad_norm` returns the norm of the unsharded model and clips to the same gradients.
- DP=2 through the sharding engine (FSDP2, gradients summed): the token-weighted loss recipe
  of `grads.py` gives the full-batch gradient although ranks hold different token counts.
  (The engine at DP2 / TP2 / CP2 on the whole model: test_sharding.py.)

Run: OMP_NUM_THREADS=1 pytest tests/distributed/test_grads.py
"""

from __future__ import annotations

import pytest
import torch

from megatron_harpe.parallel import initialize, run_on_ranks, seed_everything
from megatron_harpe.training.grads import clip_grad_norm, global_token_count

pytestmark = pytest.mark.distributed

HIDDEN, FFN, SEQ, BATCH = 8, 12, 5, 2


class ReferenceMlp(torch.nn.Module):
    """Unsharded norm -> linear -> gelu -> linear, the TP=1 twin of `ParallelMlp`."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.RMSNorm(HIDDEN, eps=1e-5)
        self.up = torch.nn.Linear(HIDDEN, FFN)
        self.down = torch.nn.Linear(FFN, HIDDEN)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class ParallelMlp(torch.nn.Module):
    """The same MLP with megatron-core tensor-parallel linears, weights copied from a reference."""

    def __init__(self, reference: ReferenceMlp, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        from megatron.core.model_parallel_config import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        config = ModelParallelConfig(tensor_model_parallel_size=tp_size, use_cpu_initialization=True)
        init = torch.nn.init.zeros_
        self.norm = torch.nn.RMSNorm(HIDDEN, eps=1e-5)
        self.up = ColumnParallelLinear(HIDDEN, FFN, config=config, init_method=init, bias=True, gather_output=False)
        self.down = RowParallelLinear(
            FFN, HIDDEN, config=config, init_method=init, bias=True, input_is_parallel=True, skip_bias_add=False
        )
        rows = slice(tp_rank * FFN // tp_size, (tp_rank + 1) * FFN // tp_size)
        with torch.no_grad():
            self.norm.weight.copy_(reference.norm.weight)
            self.up.weight.copy_(reference.up.weight[rows])
            self.up.bias.copy_(reference.up.bias[rows])
            self.down.weight.copy_(reference.down.weight[:, rows])
            self.down.bias.copy_(reference.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.up(self.norm(x))
        out, _ = self.down(torch.nn.functional.gelu(hidden))
        return out


def _reference_grads(max_norm: float) -> tuple[float, dict[str, torch.Tensor]]:
    """Norm before clipping and clipped gradients of the unsharded model (one process)."""
    seed_everything(7)
    model = ReferenceMlp()
    inputs = torch.randn(SEQ, BATCH, HIDDEN)
    model(inputs).square().sum().backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm), {name: p.grad.clone() for name, p in model.named_parameters()}


def _tensor_parallel_clip(max_norm: float) -> tuple[float, dict[str, torch.Tensor]]:
    ctx = initialize(tensor_parallel=2)
    seed_everything(7)
    reference = ReferenceMlp()
    inputs = torch.randn(SEQ, BATCH, HIDDEN)
    model = ParallelMlp(reference, ctx.tp_rank, ctx.tp_size)
    model(inputs).square().sum().backward()
    norm = clip_grad_norm(model, max_norm, ctx.tp_group)
    return norm, {name: p.grad.clone() for name, p in model.named_parameters()}


def _token_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights, inputs [seq, token, 3] and 0/1 loss masks [seq, token] of a toy regression."""
    generator = torch.Generator().manual_seed(3)
    weights = torch.randn(4, 3, generator=generator)
    tokens = torch.randn(5, 7, 3, generator=generator)
    masks = (torch.rand(5, 7, generator=generator) > 0.4).float()
    masks[3, :] = 0.0  # a fully masked sequence; ranks hold very different token counts
    return weights, tokens, masks


def _token_weighted_loss(
    weights: torch.Tensor, tokens: torch.Tensor, masks: torch.Tensor, micro_batches: list[list[slice]]
) -> tuple[float, torch.Tensor]:
    """Rank r trains on the sequence ranges micro_batches[r] (as many micro-batches on every
    rank, of different sizes and token counts), the linear sharded over DP by the engine (each
    backward reduce-scatters, summed)."""
    from megatron_harpe.training.sharding import shard_modules

    ctx = initialize()
    model = torch.nn.Linear(weights.shape[1], weights.shape[0], bias=False)
    with torch.no_grad():
        model.weight.copy_(weights)
    shard_modules(model, [], ctx.dp_cp_group, "fp32")
    mine = micro_batches[ctx.dp_rank]
    n_tokens = global_token_count([masks[rows] for rows in mine], ctx.dp_cp_group)
    for rows in mine:
        ((model(tokens[rows]).square().mean(-1) * masks[rows]).sum() / n_tokens).backward()
    return float(n_tokens), model.weight.grad.full_tensor()


def _all_scenarios() -> dict[str, object]:
    """Every scenario in one pair of processes (spawning and importing megatron dominates)."""
    results: dict[str, object] = {}
    for max_norm in (0.5, 0.0):
        results[f"clip_{max_norm}"] = _tensor_parallel_clip(max_norm)
    split = [[slice(0, 1), slice(1, 2)], [slice(2, 4), slice(4, 5)]]  # rank 1 holds the fully masked sequence 3
    results["token_weighted"] = _token_weighted_loss(*_token_problem(), split)
    return results


@pytest.fixture(scope="module")
def rank_results() -> list[dict]:
    return run_on_ranks(_all_scenarios, 2)


@pytest.mark.parametrize("max_norm", [0.5, 0.0])
def test_clip_at_tp2_matches_unsharded_model(max_norm: float, rank_results: list[dict]) -> None:
    expected_norm, expected = _reference_grads(max_norm if max_norm > 0 else float("inf"))
    if max_norm > 0:
        assert expected_norm > 2 * max_norm, "the test must exercise clipping"
    rows = [slice(r * FFN // 2, (r + 1) * FFN // 2) for r in range(2)]
    for rank, by_rank in enumerate(rank_results):
        norm, grads = by_rank[f"clip_{max_norm}"]
        assert norm == pytest.approx(expected_norm, rel=1e-5)
        torch.testing.assert_close(grads["norm.weight"], expected["norm.weight"])
        torch.testing.assert_close(grads["up.weight"], expected["up.weight"][rows[rank]])
        torch.testing.assert_close(grads["up.bias"], expected["up.bias"][rows[rank]])
        torch.testing.assert_close(grads["down.weight"], expected["down.weight"][:, rows[rank]])
        torch.testing.assert_close(grads["down.bias"], expected["down.bias"])


def test_token_weighted_loss_is_split_invariant(rank_results: list[dict]) -> None:
    weights, tokens, masks = _token_problem()
    reference = torch.nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        reference.weight.copy_(weights)
    full_loss = (reference(tokens).square().mean(-1) * masks).sum() / masks.sum()
    full_loss.backward()
    results = [by_rank["token_weighted"] for by_rank in rank_results]
    for n_tokens, grad in results:
        assert n_tokens == float(masks.sum())
        torch.testing.assert_close(grad, reference.weight.grad)
