"""What a parameter sharded by the training engine (PyTorch FSDP2, training/sharding.py) looks like
from outside it: the checkpoint code reads and fills these shards without importing the engine.

    if is_sharded(model): ...                  # fully_shard was applied
    start, end = shard_rows(param)             # this rank's rows of dim 0 of the TP-local tensor
    local(param)                               # those rows as a plain tensor
"""

from __future__ import annotations

import math

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

MEGATRON_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel",
                       "shared", "allreduce")  # fmt: skip
"""Attributes megatron-core sets on its Parameters that outlive fully_shard only if copied."""


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (rows [r*c, ...) of dim 0), or a plain tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def shard_rows(param: torch.Tensor) -> tuple[int, int]:
    """[start, end) of dim 0 of the TP-local tensor that this rank's FSDP2 shard holds."""
    if not isinstance(param, DTensor):
        return 0, param.shape[0]
    mesh = param.device_mesh
    rows = param.shape[0]
    chunk = math.ceil(rows / mesh.size())
    start = min(mesh.get_local_rank() * chunk, rows)
    end = min(start + chunk, rows)
    assert param.to_local().shape[0] == end - start, (param.shape, param.to_local().shape, start, end)
    return start, end
