"""Write a megatron checkpoint whose tensors are made one at a time, while they are written.

    with torch.device("meta"):
        gpt = build_model(...)                         # shapes only, no memory
    strategy = StreamingSaveStrategy(make_tensor)     # make_tensor(meta_view) -> the real tensor
    save_checkpoint(out, 0, model=gpt, config=..., train_state=..., sharded_strategy=strategy)

The model lives on the meta device, so its `sharded_state_dict()` describes every tensor
(keys, global shapes, layer axes, the SwiGLU halves, `_extra_state`) without holding any data.
When the writer reaches a tensor, the planner hands the meta tensor (a parameter or a view of
one) to `make_tensor`, writes what it returns, and drops it before the next one.

Why this approach (and not several DCP save passes merged afterwards, or a staging copy on
disk): everything above the writer is megatron-core's own torch_dist pipeline, unchanged:
`dist_checkpointing.save` (common.pt, metadata.json, sharding validation), the translation to
PyTorch sharded tensors and `MCoreSavePlanner`'s plan, from which DCP's `.metadata` comes. Only
two steps differ: the planner resolves a tensor's data on request, and the writer writes in
this process item by item instead of first copying every tensor into write buckets (what
megatron's FileSystemWriterAsync does, and why it needs the whole model at once). The files are
therefore those megatron writes itself (`__0_0.distcp`, `.metadata`, `common.pt`,
`metadata.json`), and `dist_checkpointing.load` reads them unchanged. Merging the metadata of
several save passes would mean rewriting DCP's private metadata by hand; a staging copy costs a
second write of the whole model.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from megatron.core.dist_checkpointing.strategies.state_dict_saver import save_state_dict_async_plan
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, SerializationFormat, _write_item
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from megatron_harpe.checkpointing.checkpoint import _finalize_on_host  # the host-side (no CUDA) DCP finalisation

TensorMaker = Callable[[torch.Tensor], torch.Tensor]
"""Meta tensor (a parameter of a meta-device model, or a view of one) -> the real tensor, same
shape and dtype, on the CPU."""


class _MakingPlanner(MCoreSavePlanner):
    """megatron's save planner, whose tensors are made when the writer asks for them."""

    def __init__(self, make_tensor: TensorMaker, **kwargs) -> None:
        super().__init__(**kwargs)
        self._make_tensor = make_tensor

    def resolve_data(self, write_item: WriteItem):
        data = super().resolve_data(write_item)
        if write_item.type == WriteItemType.BYTE_IO:
            return data
        if not data.is_meta:  # e.g. a module that put its parameters on a device of its choosing
            raise RuntimeError(
                f"{write_item.index.fqn} is not on the meta device: the streaming writer writes only the "
                "tensors it makes, so the model must be built with build_model(on_meta_device=True)"
            )
        made = self._make_tensor(data)
        if made.shape != data.shape or made.dtype != data.dtype or made.device.type != "cpu":
            raise RuntimeError(
                f"{write_item.index.fqn}: made a {made.dtype} {tuple(made.shape)} tensor on {made.device} "
                f"where the checkpoint needs {data.dtype} {tuple(data.shape)} on the CPU"
            )
        return made


class _OneAtATimeWriter(FileSystemWriterAsync):
    """Writes the plan in this process, each tensor made, written and dropped before the next,
    into the file megatron's own writer would use (one file per rank: thread_count=1)."""

    def prepare_write_data(self, plan: SavePlan, planner: SavePlanner) -> None:
        file_name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        items = [i for i in plan.items if i.type == WriteItemType.BYTE_IO]
        items += [i for i in plan.items if i.type != WriteItemType.BYTE_IO]  # megatron's order: bytes first
        self._results: list[WriteResult] = []
        self.write_buckets = []  # nothing left for a separate write step
        with open(os.path.join(self.checkpoint_dir, file_name), "wb") as stream:
            for item in items:
                data = planner.resolve_data(item)
                if isinstance(data, torch.Tensor):
                    data = _own_storage(data.detach())
                self._results.append(
                    _write_item(
                        self.transforms,
                        stream,
                        data,
                        item,
                        file_name,
                        serialization_format=SerializationFormat.TORCH_SAVE,
                    )
                )
                del data
            stream.flush()
            os.fsync(stream.fileno())

    def retrieve_write_results(self) -> list[WriteResult]:
        return self._results


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """torch.save writes a tensor's whole storage: a view (a SwiGLU half) is copied out first."""
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


class StreamingSaveStrategy(SaveShardedStrategy):
    """megatron-core's torch_dist format (backend "torch_dist", version 1), written with each
    tensor made on request by `make_tensor` (module docstring). One process only."""

    def __init__(self, make_tensor: TensorMaker) -> None:
        super().__init__("torch_dist", 1)
        self.make_tensor = make_tensor

    @property
    def can_handle_sharded_objects(self) -> bool:  # `_extra_state` goes into the DCP files, as with torch_dist
        return True

    def save(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: str | Path) -> None:
        if torch.distributed.get_world_size() != 1:
            raise RuntimeError("the streaming checkpoint writer runs in a world of one process")
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
        writer = _OneAtATimeWriter(checkpoint_dir, thread_count=1)
        planner = _MakingPlanner(self.make_tensor, dedup_replicated_tensors=False, flatten_state_dict=False)
        (storage_writer, metadata, dist_wrapper), *_ = save_state_dict_async_plan(
            pyt_state_dict, writer, None, 0, planner=planner
        )
        _finalize_on_host(storage_writer, metadata, dist_wrapper)


class WeightMaker:
    """A `make_tensor` for a meta-device TP=1 model: the parameter a placeholder views (or is),
    made by `make_weight(name, parameter)` (a subclass's: from HF shards, from another
    checkpoint ...). megatron may ask for a view of a parameter (it saves the SwiGLU fc1 as two
    halves): the last weight made is kept for its other views, so each is made once when the
    writer asks for a weight's views one after the other (it does, in state-dict order)."""

    def __init__(self, gpt: torch.nn.Module) -> None:
        # megatron hands out detached copies and views of the parameters: what they share with
        # their parameter is its storage (on the meta device a storage with no data, but its own)
        self._parameter_of = {_storage_id(param): (name, param) for name, param in gpt.named_parameters()}
        self._current: tuple[str, torch.Tensor] | None = None
        self.made: list[str] = []
        """Names of the weights made, in order (a weight twice here was made twice)."""

    def make_weight(self, name: str, parameter: torch.Tensor) -> torch.Tensor:
        """The whole weight `name`, contiguous, of `parameter`'s shape and dtype, on the CPU."""
        raise NotImplementedError

    def __call__(self, placeholder: torch.Tensor) -> torch.Tensor:
        found = self._parameter_of.get(_storage_id(placeholder))
        if found is None:
            raise RuntimeError(f"a checkpoint tensor {tuple(placeholder.shape)} is not a view of a model parameter")
        name, parameter = found
        if self._current is None or self._current[0] != name:
            self._current = None  # free the previous weight before making the next
            _return_free_memory()
            self._current = (name, self.make_weight(name, parameter))
            self.made.append(name)
        tensor = self._current[1]
        # the placeholder's layout relative to its (contiguous) parameter, applied to the real weight
        offset = tensor.storage_offset() + placeholder.storage_offset() - parameter.storage_offset()
        return tensor.as_strided(placeholder.shape, placeholder.stride(), offset)


def _return_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc). Weights under glibc's mmap threshold
    (at most 32 MiB, raised by every large block freed) come from the heap, where the holes
    they leave stay resident: without this the resident size grew by about a third of the
    model's layers over a conversion of one made of 4-22 MiB weights."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None  # glibc only


_LIBC = _load_libc()


def _storage_id(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata
