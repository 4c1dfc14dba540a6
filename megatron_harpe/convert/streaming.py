"""Read safetensors shards one tensor at a time with plain file reads, not a memory map.

    reader = SafetensorsReader("model-00001-of-00004.safetensors")
    reader.keys(); reader.shape("model.norm.weight"); tensor = reader.get_tensor("model.norm.weight")

Why not `safetensors.safe_open`: it memory-maps the file, and every page a conversion touches
stays mapped, and counted in the process's resident memory, for as long as the handle lives, so
converting a model held the whole source in RSS on top of the converted weights (2.3x the
model's size at peak for hf-to-megatron). Reading each tensor into its own buffer keeps only the
tensors still in use: after conversion a source tensor is garbage as soon as its megatron weight
is filled. The format is a little-endian u64 header length, a JSON header
{name: {dtype, shape, data_offsets: [begin, end]}} and the raw data (offsets relative to its start).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class SafetensorsReader:
    """Tensor-by-tensor access to one .safetensors file (the subset of `safe_open`'s API used here)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        damaged = f"{self.path} is damaged or truncated"
        try:
            with open(self.path, "rb") as handle:
                (header_length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(header_length))
            header.pop("__metadata__", None)
            data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
        except (struct.error, ValueError, KeyError, TypeError, IndexError) as error:
            raise ValueError(f"{damaged} (unreadable header: {error}): copy or download it again") from error
        self._entries = header
        self._data_start = 8 + header_length
        if self.path.stat().st_size < self._data_start + data_end:
            raise ValueError(
                f"{damaged} (its header describes {self._data_start + data_end} bytes, the file has "
                f"{self.path.stat().st_size}): copy or download it again"
            )

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        stored = self._entries[name]["dtype"]
        if stored not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has dtype {stored}, which the converter does not read")
        return _DTYPES[stored]

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        dtype = self.dtype(name)
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        with open(self.path, "rb") as handle:
            handle.seek(self._data_start + begin)
            if handle.readinto(buffer) != len(buffer):
                raise ValueError(f"{self.path} is truncated: tensor {name} ends past the end of the file")
        if not buffer:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])
