"""Device-safe collectives: every torch.distributed call of this package goes through here.

NCCL process groups take CUDA tensors only ("No backend type associated with device type cpu"),
while gloo takes both, so a CPU tensor handed to a collective passes every CPU test and crashes
the first GPU step. These wrappers move their tensors to the device the group communicates on
(`collective_device`) and the results back to where the caller keeps them, so a caller cannot get
the device wrong:

    total = torch.zeros((), dtype=torch.float64)       # a CPU accumulator
    collectives.all_reduce(total, group=ctx.dp_cp_group) # reduced on cuda under NCCL, back in place

`tests/unit/test_collectives.py` fails if any module of the package calls torch.distributed's
tensor collectives directly, and checks the device choice for NCCL groups.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

ReduceOp = dist.ReduceOp


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device `group`'s backend communicates on: this process's CUDA device for NCCL
    (and any group bound to cuda only), the host for gloo."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend or backend.startswith("cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` itself when it already lives on `device` (and is contiguous), else a copy there."""
    if tensor.device == device and tensor.is_contiguous():
        return tensor
    return tensor.to(device).contiguous()


def all_reduce(tensor: torch.Tensor, op=ReduceOp.SUM, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """In-place all-reduce of `tensor` wherever it lives; returns it."""
    work = _on(tensor, collective_device(group))
    dist.all_reduce(work, op=op, group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def broadcast(tensor: torch.Tensor, src: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """In-place broadcast from global rank `src`; returns `tensor`."""
    work = _on(tensor, collective_device(group))
    dist.broadcast(work, src=src, group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_gather(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape on all ranks), in group-rank order, on `tensor`'s device."""
    device = collective_device(group)
    work = _on(tensor, device)
    parts = [torch.empty_like(work) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, work, group=group)
    return [part.to(tensor.device) for part in parts]


def reduce_scatter_sum(stacked: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """`stacked` is [group size, ...]: returns this rank's slice of the sum over ranks, on
    `stacked`'s device (gloo reduce-scatters as NCCL does in torch 2.13: one code path)."""
    work = _on(stacked, collective_device(group))
    local = torch.empty_like(work[0])
    dist.reduce_scatter_single(local.view(-1), work.view(-1), group=group)  # gloo wants flat dim-0 blocks
    return local.to(stacked.device)
