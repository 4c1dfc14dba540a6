"""Checkpoint entries of an FSDP2-sharded model and its AdamW, as the global tensors an unsharded
model saves (training/sharding.py shards; checkpointing/checkpoint.py writes and reads).

    entries = model_entries(model)  # {"decoder.layers.0...weight": [ShardedTensor, ...]}
    moments = optimizer_entries(model, optimizer, placeholders=None)  # optimizer.state.exp_avg.<key> ...

megatron's `sharded_state_dict()` of a TP-only model says where each TP-local tensor sits in the
TP-global tensor (keys, global shapes and offsets, replica ids, the SwiGLU fc1 factory that puts
the gate half and the up half of every TP rank in two separate blocks). It is asked here with
every FSDP2 parameter swapped for a meta tensor of its TP-local shape, so its answer is exactly
the unsharded model's. Each entry is then cut to this rank's FSDP2 rows [r*c, min((r+1)*c, n)):
a piece of the TP-local rows [p0, p1) that global offset o describes becomes the rows
[max(p0, r*c), min(p1, (r+1)*c)) at offset o + (start - p0), described as a ShardedTensor with
`axis_fragmentations=None` (megatron-core >= 0.14 saves such irregular shards through
`CheckpointableShardedTensor`; torch's DCP reshards them by overlap when loading). A shard
crossing fc1's gate/up boundary becomes two pieces; an empty shard is left out. The DP x CP
part of the replica id is 0 (every rank writes its own rows); the TP part stays (a norm weight,
identical over TP, is written by TP rank 0). Layer-stacked tensors (megatron's prepend axis)
are described with that axis as a real dimension of size 1, as DCP stores them.

So a checkpoint written sharded loads unsharded (the converter, the evaluator) and under any
TP x DP x CP layout, and a checkpoint written by an unsharded model or by the replaced
sharded optimizer (which saved the same global tensors) loads here. Loading fills the
parameters' and moments' own shards in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedTensor, ShardedTensorFactory
from torch.distributed.tensor import DTensor

from megatron_harpe.sharded_params import MEGATRON_ATTRIBUTES, local, shard_rows

MOMENTS = ("exp_avg", "exp_avg_sq")


@contextlib.contextmanager
def _tp_local_placeholders(model: torch.nn.Module) -> Iterator[None]:
    """Every DTensor parameter replaced by a meta tensor of its TP-local (global to FSDP) shape."""
    swapped = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor):
                placeholder = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                                 requires_grad=param.requires_grad)  # fmt: skip
                for key in MEGATRON_ATTRIBUTES:
                    if hasattr(param, key):
                        setattr(placeholder, key, getattr(param, key))
                module._parameters[name] = placeholder
                swapped.append((module, name, param))
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def unsharded_description(model: torch.nn.Module) -> dict[str, Any]:
    """megatron's sharded_state_dict() as the TP-only model gives it (data: meta placeholders)."""
    with _tp_local_placeholders(model):
        return model.sharded_state_dict()


def _piece_rows(piece: ShardedTensor, base: torch.Tensor) -> tuple[int, int]:
    """Rows [start, end) of `base` (dim 0) that `piece.data`, a view of it, covers."""
    data = piece.data
    whole_rows = data.shape[1:] == base.shape[1:] and data.stride() == base.stride()
    if not whole_rows or data.storage_offset() % max(base.stride(0), 1):
        raise NotImplementedError(f"{piece.key}: a checkpoint factory splits it along a dimension other than rows")
    start = data.storage_offset() // max(base.stride(0), 1)
    return start, start + data.shape[0]


def _pieces(entry: ShardedTensor | ShardedTensorFactory) -> list[tuple[ShardedTensor, int, int]]:
    """The plain ShardedTensors of an entry with the TP-local rows each covers."""
    if isinstance(entry, ShardedTensorFactory):
        built = entry.build_fn(entry.key, entry.data, entry.replica_id, entry.flattened_range)
        return [(piece, *_piece_rows(piece, entry.data)) for piece in built]
    return [(entry, 0, entry.data.shape[0])]


def _data_parallel_replica_0(replica_id, key: str):
    if not (isinstance(replica_id, tuple) and len(replica_id) == 3):
        raise AssertionError(f"{key}: unexpected replica id {replica_id!r} (megatron's (PP, TP, DP) tuple expected)")
    return (*replica_id[:2], 0)


def _cut(piece: ShardedTensor, piece_rows: tuple[int, int], shard_rows_: tuple[int, int],
         shard: torch.Tensor) -> ShardedTensor | None:  # fmt: skip
    """`piece` restricted to the FSDP2 rows `shard_rows_` whose data is `shard`; None if disjoint."""
    (p0, p1), (s0, s1) = piece_rows, shard_rows_
    start, end = max(p0, s0), min(p1, s1)
    if start >= end:
        return None
    data = shard[start - s0 : end - s0]
    axis = piece.prepend_axis_num
    offset = list(piece.global_offset)
    offset[axis] += start - p0
    for _ in range(axis):
        data = data.unsqueeze(0)
    return dataclasses.replace(
        piece, data=data, dtype=data.dtype, local_shape=tuple(data.shape), global_offset=tuple(offset),
        axis_fragmentations=None, prepend_axis_num=0, replica_id=_data_parallel_replica_0(piece.replica_id, piece.key),
    )  # fmt: skip


def _describe(description: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, Any]:
    """Entries of `description` for the parameters named in `tensors` (each this rank's FSDP2
    shard of that parameter, or of a same-shaped optimizer moment), cut to this rank's rows;
    `prefix` is put before every key (the optimizer's)."""
    described: dict[str, Any] = {}
    for name, entry in description.items():
        if name not in tensors:
            continue
        rows = shard_rows(tensors[name])
        pieces = []
        for piece, p0, p1 in _pieces(entry):
            cut = _cut(piece, (p0, p1), rows, local(tensors[name]))
            if cut is not None:
                pieces.append(dataclasses.replace(cut, key=f"{prefix}{cut.key}"))
        if pieces:
            described[name] = pieces
    return described


def model_entries(model: torch.nn.Module) -> dict[str, Any]:
    """The "model" part of a checkpoint: this rank's fp32 parameter shards (the fp32 main
    weights) as pieces of the global tensors, plus the non-tensor entries (`_extra_state`).
    Loading fills the parameters in place."""
    description = unsharded_description(model)
    params = dict(model.named_parameters())
    entries = _describe(description, params)
    for name, entry in description.items():
        if name not in params:
            entries[name] = entry  # TE's _extra_state and other non-parameter entries, as megatron describes them
    return entries


def optimizer_entries(model: torch.nn.Module, optimizer: torch.optim.Optimizer, placeholders: dict | None) -> dict:
    """The "optimizer" part: AdamW's moments (`optimizer.state.exp_avg.<key>`, `...exp_avg_sq`)
    cut like their parameters, its step and hyperparameters as common values. For loading,
    `placeholders` is the saved common part: the moments it lists are created as zeros in the
    optimizer and filled in place."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    names = {id(param): name for name, param in model.named_parameters()}
    description = unsharded_description(model)
    if placeholders is not None:
        _create_states(optimizer, params, placeholders)
    tensor_state: dict[int, dict[str, Any]] = {}
    scalar_state: dict[int, dict[str, Any]] = {}
    for index, param in enumerate(params):
        state = optimizer.state.get(param, {})
        for key, value in state.items():
            if key in MOMENTS:
                name = names[id(param)]
                described = _describe(description, {name: value}, prefix=f"optimizer.state.{key}.")
                tensor_state.setdefault(index, {})[key] = described.get(name, [])
            else:
                scalar_state.setdefault(index, {})[key] = (
                    value.detach().cpu().clone() if torch.is_tensor(value) else value
                )
    ids = iter(range(len(params)))  # as torch's Optimizer.state_dict numbers them (the unsharded path's)
    groups = [{**{k: v for k, v in group.items() if k != "params"},
               "params": LocalNonpersistentObject([next(ids) for _ in group["params"]])}
              for group in optimizer.param_groups]  # fmt: skip
    sharded = {"tensor_state": tensor_state, "param_groups": groups}
    if placeholders is None:
        sharded["tensor_state_keys"] = {index: sorted(keys) for index, keys in tensor_state.items()}
        sharded["scalar_state"] = scalar_state
    return sharded


def _create_states(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], saved: dict) -> None:
    """Zero moments and the saved step for every parameter the checkpoint has moments for."""
    fused = bool(optimizer.defaults.get("fused"))
    for index, keys in saved["tensor_state_keys"].items():
        param = params[index]
        step = torch.as_tensor(saved["scalar_state"][index]["step"], dtype=torch.float32)
        state = {"step": step.to(param.device) if fused else step}
        state.update({key: torch.zeros_like(param) for key in keys if key in MOMENTS})
        optimizer.state[param] = state


def install_loaded(model: torch.nn.Module, requested: dict, loaded: dict, optimizer: torch.optim.Optimizer | None,
                   saved_optimizer: dict | None) -> None:  # fmt: skip
    """After `dist_checkpointing.load`: copy loaded pieces into the shards they describe (a
    no-op where the loader filled them in place), hand `_extra_state` to its modules and set the
    saved hyperparameters."""
    _copy_pieces(requested["model"], loaded["model"])
    extra = {name: value for name, value in loaded["model"].items() if not isinstance(requested["model"][name], list)}
    if extra:
        missing, unexpected = model.load_state_dict(extra, strict=False)
        if unexpected:
            raise ValueError(f"the checkpoint has entries the model does not know: {unexpected}")
    if optimizer is None or saved_optimizer is None:
        return
    for index, moments in requested["optimizer"]["tensor_state"].items():
        for key, pieces in moments.items():
            _copy_pieces({key: pieces}, {key: loaded["optimizer"]["tensor_state"][index][key]})
    if len(loaded["optimizer"]["param_groups"]) != len(optimizer.param_groups) or any(
        len(saved["params"]) != len(current["params"])
        for saved, current in zip(loaded["optimizer"]["param_groups"], optimizer.param_groups)
    ):
        raise ValueError(
            "the optimizer's parameter groups differ from the checkpoint's: build it the same way as when saving"
        )
    for saved, current in zip(loaded["optimizer"]["param_groups"], optimizer.param_groups):
        current.update({k: v for k, v in saved.items() if k != "params"})


@torch.no_grad()
def _copy_pieces(requested: dict, loaded: dict) -> None:
    for name, pieces in requested.items():
        if not isinstance(pieces, list):
            continue
        for piece, value in zip(pieces, loaded[name]):
            if value is not piece.data:
                piece.data.copy_(value)
