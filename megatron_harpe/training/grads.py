"""Gradient synchronisation, global-norm clipping and the token count of a token-weighted loss.

These run on any device and any backend (gloo on CPU, NCCL on GPU). megatron-core's
`DistributedDataParallel` and its clipping (`megatron.core.optimizer.clip_grads`) allocate
on CUDA unconditionally, so the portable path is written here with torch.distributed and
PyTorch's multi-tensor norm/scale helpers.

Token-weighted loss, identical for every CP / DP split
------------------------------------------------------
The training loss is the mean cross-entropy over every loss-carrying token of the global batch
(all micro-batches, all data-parallel ranks, all context-parallel shards of a sequence)::

    L = sum_over_all_tokens(loss_t * mask_t) / N,   N = sum_over_all_tokens(mask_t)

The loop computes it exactly, whatever the split, in four moves:

1. once per optimizer step, ``N = global_token_count(loss_masks_of_this_step, dp_cp_group)``
   (each rank sums the masks of all its micro-batches; one all-reduce over DP x CP);
2. for each micro-batch, ``(loss * mask).sum() / N`` is back-propagated (gradients accumulate
   in ``.grad`` over micro-batches);
3. ``allreduce_gradients(model, dp_cp_group)`` SUM-reduces the gradients: the sum over ranks
   and micro-batches of d(local_sum / N) is dL. No division by the number of ranks or
   micro-batches: ``N`` already normalises. Context-parallel ranks hold the same weights and
   each sees part of every sequence, so they belong in the same reduction as DP ranks;
4. ``clip_grad_norm(model, max_norm, tp_group)`` measures and clips the global norm.

Averaging per-rank means instead would weight a token by 1 / (tokens on its rank), which
changes with the split whenever masks differ between ranks (padding, document masks).

Usage::

    n_tokens = global_token_count([batch["loss_mask"] for batch in micro_batches], ctx.dp_cp_group)
    for batch in micro_batches:
        ((per_token_loss(batch) * batch["loss_mask"]).sum() / n_tokens).backward()
    allreduce_gradients(model, ctx.dp_cp_group)
    grad_norm = clip_grad_norm(model, cfg.train.clip_grad, ctx.tp_group)
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron_harpe import collectives
from megatron_harpe.training.mixed_precision import gradient_of

DEFAULT_BUCKET_NUMEL = 2**25
"""Elements per all-reduce bucket (128 MiB in fp32): few calls, bounded extra memory."""


def _group_size(group: dist.ProcessGroup | None) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _buckets(grads: list[torch.Tensor], bucket_numel: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of same device/dtype gradients of at most `bucket_numel` elements each
    (a single larger tensor gets its own bucket)."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for grad in grads:
        by_kind[(grad.device, grad.dtype)].append(grad)
    buckets: list[list[torch.Tensor]] = []
    for same_kind in by_kind.values():
        current: list[torch.Tensor] = []
        current_numel = 0
        for grad in same_kind:
            if current and current_numel + grad.numel() > bucket_numel:
                buckets.append(current)
                current, current_numel = [], 0
            current.append(grad)
            current_numel += grad.numel()
        if current:
            buckets.append(current)
    return buckets


def allreduce_gradients(
    model: torch.nn.Module,
    group: dist.ProcessGroup | None,
    *,
    bucket_numel: int = DEFAULT_BUCKET_NUMEL,
    reduce_in_fp32: bool = False,
) -> None:
    """SUM-all-reduce the gradient of every trainable parameter over `group` (DP x CP ranks):
    ``.grad``, or the fp32 ``main_grad`` of bf16 parameters (mixed_precision.py).

    Gradients are flattened into buckets of up to `bucket_numel` elements per device and dtype,
    so the cost is a handful of collectives rather than one per tensor. A trainable parameter
    without a gradient gets a zero one, so that every rank reduces the same bucket layout
    (a rank whose batch skipped a parameter must not desynchronise the others).
    `reduce_in_fp32` sums bf16/fp16 gradients in fp32 (less rounding on large groups).
    No-op when the group has one rank or no process group exists.
    """
    if bucket_numel < 1:
        raise ValueError(f"bucket_numel must be >= 1, got {bucket_numel}")
    if _group_size(group) == 1:
        return
    grads: list[torch.Tensor] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        grad = gradient_of(param)
        if grad is None:
            grad = param.grad = torch.zeros_like(param)
        if grad.is_sparse:
            raise ValueError(
                f"parameter {name} has a sparse gradient; use a dense embedding (sparse=False)"
            )
        grads.append(grad)
    for bucket in _buckets(grads, bucket_numel):
        flat = _flatten_dense_tensors(bucket)
        if reduce_in_fp32 and flat.dtype != torch.float32:
            flat = flat.float()
        collectives.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for grad, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            grad.copy_(reduced)


def allreduce_sequence_parallel_gradients(model: torch.nn.Module, tp_group: dist.ProcessGroup | None) -> None:
    """Sum over TP the gradients of parameters megatron marks ``sequence_parallel`` (norm
    weights under sequence parallelism): each TP rank saw only its part of the sequence, so
    its gradient is a partial sum (what megatron's ``finalize_model_grads`` does for its DDP)."""
    if _group_size(tp_group) == 1:
        return
    grads = [grad for param in model.parameters()
             if getattr(param, "sequence_parallel", False) and param.requires_grad and (grad := gradient_of(param)) is not None]  # fmt: skip
    for bucket in _buckets(grads, DEFAULT_BUCKET_NUMEL):
        flat = _flatten_dense_tensors(bucket)
        collectives.all_reduce(flat, op=dist.ReduceOp.SUM, group=tp_group)
        for grad, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            grad.copy_(reduced)


def _counts_towards_norm(param: torch.nn.Parameter, tp_group: dist.ProcessGroup | None) -> bool:
    """TP shards count on every rank; TP-replicated params (norms) only on TP rank 0."""
    if not param_is_not_shared(param):
        return False
    if tp_group is None or _group_size(tp_group) == 1:
        return True
    return param_is_not_tensor_parallel_duplicate(param, tp_group)


def clip_grad_norm(
    model: torch.nn.Module, max_norm: float, tp_group: dist.ProcessGroup | None
) -> float:
    """Global L2 norm of all gradients; scale them to `max_norm` when the norm exceeds it.

    The norm is that of the full (unsharded) model: tensor-parallel shards (megatron marks
    them ``tensor_model_parallel=True``) each count once, parameters replicated over TP
    (norm weights, row-parallel biases) count once overall; squared sums are added in fp32
    and all-reduced over `tp_group` (None: no tensor parallelism). Call it after
    `allreduce_gradients`, when DP / CP ranks hold identical gradients.

    `max_norm <= 0` disables clipping but still returns the norm. A NaN/inf norm is returned
    as such and gradients are left untouched: the caller decides to skip or stop. Under bf16
    parameters the norm and the clipping are those of the fp32 ``main_grad``.
    """
    with_grad = [param for param in model.parameters() if gradient_of(param) is not None]
    for_norm = [gradient_of(param) for param in with_grad if _counts_towards_norm(param, tp_group)]
    if for_norm:
        per_tensor = torch._foreach_norm(for_norm, 2, dtype=torch.float32)
        device = for_norm[0].device
        squared_sum = torch.stack([norm.to(device) for norm in per_tensor]).square().sum()
    else:
        device = next(model.parameters()).device
        squared_sum = torch.zeros((), dtype=torch.float32, device=device)
    if tp_group is not None and _group_size(tp_group) > 1:
        collectives.all_reduce(squared_sum, op=dist.ReduceOp.SUM, group=tp_group)
    total_norm = squared_sum.sqrt()
    norm = float(total_norm)
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        _scale_to_norm([gradient_of(param) for param in with_grad], max_norm, total_norm)
    return norm


def _scale_to_norm(grads: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """torch.nn.utils.clip_grads_with_norm_'s arithmetic, on gradient tensors rather than on
    parameters' ``.grad`` (a bf16 parameter's fp32 ``main_grad`` is not its ``.grad``)."""
    coefficient = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for grad in grads:
        by_kind[(grad.device, grad.dtype)].append(grad)
    for (device, _), same_kind in by_kind.items():
        torch._foreach_mul_(same_kind, coefficient.to(device))


def global_token_count(
    loss_masks: list[torch.Tensor], group: dist.ProcessGroup | None
) -> torch.Tensor:
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
