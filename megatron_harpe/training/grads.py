"""The token count of a token-weighted loss, and global-norm clipping of sharded gradients.

These run on any device and any backend (gloo on CPU, NCCL on GPU). megatron-core's clipping
(`megatron.core.optimizer.clip_grads`) type-checks CUDA tensors, so the norm is computed here
with PyTorch's multi-tensor helpers on this rank's gradient shards (training/sharding.py).

Token-weighted loss, identical for every CP / DP split
------------------------------------------------------
The training loss is the mean cross-entropy over every loss-carrying token of the global batch
(all micro-batches, all data-parallel ranks, all context-parallel shards of a sequence)::

    L = sum_over_all_tokens(loss_t * mask_t) / N,   N = sum_over_all_tokens(mask_t)

The loop computes it exactly, whatever the split, in four moves:

1. once per optimizer step, ``N = global_token_count(loss_masks_of_this_step, dp_cp_group)``
   (each rank sums the masks of all its micro-batches; one all-reduce over DP x CP);
2. for each micro-batch, ``(loss * mask).sum() / N`` is back-propagated;
3. the sharding engine (sharding.py) SUM-reduces each backward's gradients over DP x CP into
   this rank's gradient shards, where micro-batches accumulate: the sum over ranks and
   micro-batches of d(local_sum / N) is dL. No division by the number of ranks or
   micro-batches: ``N`` already normalises. Context-parallel ranks hold the same weights and
   each sees part of every sequence, so they belong in the same reduction as DP ranks;
4. ``clip_grad_norm(model, max_norm, tp_group, dp_cp_group)`` measures and clips the global norm.

Averaging per-rank means instead would weight a token by 1 / (tokens on its rank), which
changes with the split whenever masks differ between ranks (padding, document masks).

Usage::

    n_tokens = global_token_count([batch["loss_mask"] for batch in micro_batches], ctx.dp_cp_group)
    for batch in micro_batches:
        ((per_token_loss(batch) * batch["loss_mask"]).sum() / n_tokens).backward()
    grad_norm = clip_grad_norm(model, cfg.train.clip_grad, ctx.tp_group, ctx.dp_cp_group)
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megatron_harpe import collectives


def _group_size(group: dist.ProcessGroup | None) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def local_gradients(model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, this rank's gradient tensor): the local shard of a DTensor gradient."""
    return [(param, param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad)
            for param in model.parameters() if param.grad is not None]  # fmt: skip


def _counts_towards_norm(param: torch.nn.Parameter, tp_rank: int) -> bool:
    """TP shards (megatron marks them ``tensor_model_parallel``) count on every TP rank;
    parameters replicated over TP (norm weights) on TP rank 0 only."""
    return bool(getattr(param, "tensor_model_parallel", False)) or tp_rank == 0


def clip_grad_norm(model: torch.nn.Module, max_norm: float, tp_group: dist.ProcessGroup | None,
                   dp_cp_group: dist.ProcessGroup | None = None) -> float:  # fmt: skip
    """Global L2 norm of the whole (unsharded, TP=1) model's gradients; scale them to `max_norm`
    when the norm exceeds it.

    Squared sums of this rank's gradient tensors (its FSDP2 shards) are added in fp32 and
    all-reduced over `dp_cp_group` (the shards of one TP-local tensor) and over `tp_group` (TP
    shards each count once, parameters replicated over TP once overall). None: no such
    parallelism. `max_norm <= 0` disables clipping but still returns the norm. A NaN/inf norm
    is returned as such and gradients are left untouched: the caller decides to skip or stop.
    """
    grads = [(param, grad) for param, grad in local_gradients(model) if grad.numel()]
    tp_rank = dist.get_rank(tp_group) if _group_size(tp_group) > 1 else 0
    counted = [grad for param, grad in grads if _counts_towards_norm(param, tp_rank)]
    squared = torch.zeros((), dtype=torch.float32, device=next(model.parameters()).device)
    if counted:
        squared = (
            torch.stack([norm.to(squared.device) for norm in torch._foreach_norm(counted, 2, dtype=torch.float32)])
            .square()
            .sum()
        )
    for group in (dp_cp_group, tp_group):
        if _group_size(group) > 1:
            collectives.all_reduce(squared, op=dist.ReduceOp.SUM, group=group)
    total = squared.sqrt()
    norm = float(total)
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for _, grad in grads:
            by_device.setdefault(grad.device, []).append(grad)
        for device, same_device in by_device.items():
            torch._foreach_mul_(same_device, coefficient.to(device))
    return norm


def gradient_bytes(model: torch.nn.Module) -> int:
    """Bytes of gradient storage this rank holds for `model` (its shards under the engine)."""
    return sum(grad.numel() * grad.element_size() for _, grad in local_gradients(model))


def global_token_count(loss_masks: list[torch.Tensor], group: dist.ProcessGroup | None) -> torch.Tensor:
    """Loss-carrying tokens of one optimizer step over all ranks of `group` (DP x CP).

    Sums every mask of this rank's micro-batches (0/1 or fractional weights), all-reduces the
    total over `group` and returns it as a 0-dim fp32 tensor on the masks' device, ready to
    divide each micro-batch's summed loss by (see the module docstring).
    """
    if not loss_masks:
        raise ValueError("global_token_count needs the loss masks of at least one micro-batch")
    device = loss_masks[0].device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for mask in loss_masks:
        total += mask.to(device=device, dtype=torch.float64).sum()
    if _group_size(group) > 1:
        collectives.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    if float(total) <= 0:
        raise ValueError(
            "no loss-carrying tokens in this optimizer step on any rank (every loss mask is 0): "
            "check the data's loss masks, or use longer sequences / a larger global batch"
        )
    return total.to(torch.float32)
