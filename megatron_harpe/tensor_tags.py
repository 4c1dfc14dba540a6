"""Python attributes of a tensor argument that megatron-core's activation recomputation must find.

    table.rotary_cos_sin = RotaryCosSin(table, repeat)
    remember(table)                                      # when the tensor is made
    cos_sin = attribute(t, "rotary_cos_sin")            # in a layer: t may be a detached alias

megatron-core's checkpoint (`tensor_parallel.checkpoint`, which `train.recompute: full` runs
around layers and `selective` around core attention) keeps a layer's tensor arguments with
`save_for_backward` and, in backward, reruns the layer on `detach()`ed aliases of them: new
tensor objects, without the Python attributes of the originals. What rides along a tensor
argument -- the cos/sin and per-token mark of a rotary angle table (position/rotary.py), the
attention plan of packed documents (documents.py) -- is found again here from the alias's memory
(same storage, offset, shape, strides, dtype and device as a remembered original). The registry
holds originals weakly: an entry lives exactly as long as its tensor, which megatron's
checkpoint keeps (with its attributes) as a saved tensor until its backward has run.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

_originals: weakref.WeakValueDictionary[tuple, torch.Tensor] = weakref.WeakValueDictionary()


def _memory_key(tensor: torch.Tensor) -> tuple:
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()),
            tensor.dtype, tensor.device)  # fmt: skip


def remember(tensor: torch.Tensor) -> torch.Tensor:
    """Make `tensor`'s attributes findable from its detached aliases while it lives; returns it."""
    _originals[_memory_key(tensor)] = tensor
    return tensor


def attribute(tensor: torch.Tensor, name: str, default: Any = None) -> Any:
    """`tensor.name`, or the attribute of the remembered tensor it aliases, else `default`."""
    if hasattr(tensor, name):
        return getattr(tensor, name)
    original = _originals.get(_memory_key(tensor))
    return default if original is None else getattr(original, name, default)
