"""Validate a Megatron indexed dataset (`prefix.idx` + `prefix.bin`) before training reads it.

    validate_indexed_dataset("data/corpus")    # ValueError naming the file, the problem and the fix

megatron-core trusts the index: a damaged `.idx` trains on garbage (negative lengths, pointers
past the end of `.bin`) or fails deep inside a worker with a traceback naming no file. Here the
header, the file sizes and every sequence length / pointer / document index are checked with
vectorised numpy over a memory map (a 100M-document index takes about a second).
Layout (megatron.core.datasets.indexed_dataset): header `MMIDIDX\\0\\0`, u64 version 1, u8 dtype
code, u64 sequence count, u64 document count, int32 lengths[S], int64 pointers[S] (bytes into
`.bin`), int64 document indices[D] (first 0, last S, non-decreasing).
"""

from __future__ import annotations

import os
import struct

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, get_bin_path, get_idx_path

_HEADER = b"MMIDIDX\x00\x00"
_FIXED_BYTES = len(_HEADER) + 8 + 1 + 8 + 8
_FIX = "re-create it with tools/prepare_data.py (or restore it from a copy)"


def _fail(path: str, problem: str) -> ValueError:
    return ValueError(f"dataset index {path} {problem}: {_FIX}")


def validate_indexed_dataset(prefix: str) -> tuple[int, int]:
    """Check `prefix.idx` against itself and `prefix.bin`; returns (documents, tokens)."""
    idx_path, bin_path = get_idx_path(prefix), get_bin_path(prefix)
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise ValueError(f"dataset file {path} is missing: {_FIX}")
    idx_size, bin_size = os.path.getsize(idx_path), os.path.getsize(bin_path)
    if idx_size < _FIXED_BYTES:
        raise _fail(idx_path, f"is truncated ({idx_size} bytes, shorter than its {_FIXED_BYTES}-byte header)")
    with open(idx_path, "rb") as handle:
        header = handle.read(_FIXED_BYTES)
    if not header.startswith(_HEADER):
        raise _fail(idx_path, "is not a Megatron index (bad magic bytes)")
    version, code, sequences, documents = struct.unpack("<QBQQ", header[len(_HEADER) :])
    if version != 1:
        raise _fail(idx_path, f"has index version {version} (expected 1)")
    try:
        dtype = np.dtype(DType.dtype_from_code(code))
    except (KeyError, ValueError):
        raise _fail(idx_path, f"names an unknown token dtype code {code}") from None
    expected = _FIXED_BYTES + sequences * (4 + 8) + documents * 8
    if idx_size < expected:
        raise _fail(
            idx_path,
            f"is truncated ({idx_size} bytes; its header announces {sequences} sequences and "
            f"{documents - 1} documents, {expected} bytes)",
        )
    if idx_size not in (expected, expected + sequences):  # + one mode byte per sequence if multimodal
        raise _fail(idx_path, f"has {idx_size} bytes where its header announces {expected}")
    if documents < 1:
        raise _fail(idx_path, "holds no document index")

    index = np.memmap(idx_path, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(index, dtype=np.int32, count=sequences, offset=_FIXED_BYTES)
    pointers = np.frombuffer(index, dtype=np.int64, count=sequences, offset=_FIXED_BYTES + 4 * sequences)
    document_indices = np.frombuffer(index, dtype=np.int64, count=documents, offset=_FIXED_BYTES + 12 * sequences)
    try:
        if sequences:
            negative = np.flatnonzero(lengths < 0)
            if negative.size:
                raise _fail(
                    idx_path,
                    f"gives sequence {int(negative[0])} a negative length {int(lengths[negative[0]])} "
                    f"({negative.size} negative lengths in all)",
                )
            ends = pointers + lengths.astype(np.int64) * dtype.itemsize
            if pointers[0] != 0 or np.any(pointers[1:] != ends[:-1]):
                first = 0 if pointers[0] != 0 else int(np.flatnonzero(pointers[1:] != ends[:-1])[0]) + 1
                raise _fail(
                    idx_path,
                    f"has a sequence pointer that does not follow the lengths (sequence {first}: "
                    f"{int(pointers[first])})",
                )
            tokens = int(ends[-1] // dtype.itemsize)
        else:
            tokens = 0
        if tokens * dtype.itemsize != bin_size:
            state = "is truncated" if tokens * dtype.itemsize > bin_size else "is longer than its index says"
            raise ValueError(
                f"dataset file {bin_path} {state}: {bin_size} bytes, its index {idx_path} describes "
                f"{tokens * dtype.itemsize} ({tokens} {dtype.name} tokens): {_FIX}"
            )
        if document_indices[0] != 0 or document_indices[-1] != sequences or np.any(np.diff(document_indices) < 0):
            raise _fail(idx_path, f"has document indices that do not run from 0 to {sequences} in order")
    finally:
        del index
    return documents - 1, tokens
