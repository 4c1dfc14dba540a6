"""What a dataset was made from, recorded by content, and checked before training reads it.

Data preparation records in `<prefix>.summary.json` the tokenizer's identity (the SHA-256 of
its file, vocabulary size, special ids) and the largest token id written; training compares
them with `data.tokenizer` and `model.vocab_size` before any process group starts:

    identity = tokenizer_identity(load_tokenizer("tok.model"))   # {"sha256", "vocab_size", "bos_id", ...}
    summary["tokenizer_identity"] = identity; summary["max_token_id"] = writer.max_token_id
    check_training_data(cfg)    # ValueError naming both tokenizers, or the id beyond the vocabulary

A tokenizer's path says nothing about its content (`train-tokenizer --overwrite` writes new
content to the same path), so only the hash counts. A summary is trusted only when its document
and token counts match the files (a dataset replaced without its summary is not described by
it). Datasets written before identities were recorded still train, with a one-line note; their
largest token id is then measured from the `.bin` (numpy over a memory map, about a second per
GB, remembered in the index cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from megatron_harpe import files
from megatron_harpe.data.integrity import validate_indexed_dataset
from megatron_harpe.data.tokenizer import Tokenizer, load_tokenizer

_IDENTITY_KEYS = ("sha256", "vocab_size", "bos_id", "eos_id", "pad_id")
_SCAN_CHUNK_TOKENS = 1 << 26


@lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    status = os.stat(path)
    return _file_sha256(str(path), status.st_size, status.st_mtime_ns)


def tokenizer_identity(tokenizer: Tokenizer) -> dict[str, Any]:
    """The tokenizer by content: SHA-256 of its file, vocabulary size and special ids (path and
    kind are recorded for the reader, not compared)."""
    return {
        "sha256": file_sha256(tokenizer.path),
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "kind": tokenizer.kind,
        "path": os.path.abspath(tokenizer.path),
    }


def same_tokenizer(first: dict[str, Any], second: dict[str, Any]) -> bool:
    return all(first.get(key) == second.get(key) for key in _IDENTITY_KEYS)


def describe_tokenizer(identity: dict[str, Any]) -> str:
    return (
        f"{identity.get('path', '?')} (sha256 {str(identity.get('sha256', '?'))[:12]}, "
        f"{identity.get('vocab_size', '?')} tokens)"
    )


def file_identity(prefix: str | Path) -> dict[str, int]:
    """Sizes and modification times of `prefix.bin/.idx`: what megatron's index cache is keyed by."""
    identity = {}
    for suffix in ("bin", "idx"):
        status = os.stat(f"{prefix}.{suffix}")
        identity[f"{suffix}_bytes"], identity[f"{suffix}_mtime_ns"] = status.st_size, status.st_mtime_ns
    return identity


def read_summary(prefix: str | Path) -> dict[str, Any] | None:
    """`prefix.summary.json`, if it exists and describes the dataset now at `prefix` (same
    document and token counts); None otherwise."""
    path = Path(f"{prefix}.summary.json")
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    documents, tokens = validate_indexed_dataset(str(prefix))
    if summary.get("documents") != documents or summary.get("tokens") != tokens:
        return None
    return summary


def largest_token_id(prefix: str | Path, cache_dir: Path | None = None, summary: dict | None = None) -> int:
    """The largest token id in `prefix.bin`: from its summary (`read_summary`, read here unless
    given), else measured (and remembered in `cache_dir`, keyed by the file's size and time)."""
    summary = summary if summary is not None else read_summary(prefix)
    if summary is not None and isinstance(summary.get("max_token_id"), int):
        return summary["max_token_id"]
    identity = file_identity(prefix)
    key = hashlib.md5(json.dumps([os.path.abspath(prefix), identity]).encode(), usedforsecurity=False).hexdigest()
    remembered = cache_dir / f"{key}-max_token_id.json" if cache_dir is not None else None
    if remembered is not None and remembered.is_file():
        return int(json.loads(remembered.read_text())["max_token_id"])
    largest = scan_largest_token_id(prefix)
    if remembered is not None:
        try:
            files.write_json(remembered, {"prefix": os.path.abspath(prefix), **identity, "max_token_id": largest})
        except OSError:
            pass  # remembering is an optimisation
    return largest


def scan_largest_token_id(prefix: str | Path) -> int:
    from megatron.core.datasets.indexed_dataset import DType

    with open(f"{prefix}.idx", "rb") as handle:
        handle.seek(9 + 8)
        dtype = np.dtype(DType.dtype_from_code(handle.read(1)[0]))
    size = os.path.getsize(f"{prefix}.bin")
    if size >= 1 << 30:
        print(
            f"note: measuring the largest token id of {prefix}.bin ({size / 2**30:.1f} GiB; its summary does not "
            "record it) ...",
            file=sys.stderr,
            flush=True,
        )
    tokens = np.memmap(f"{prefix}.bin", dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
    largest = -1
    for start in range(0, tokens.size, _SCAN_CHUNK_TOKENS):
        largest = max(largest, int(tokens[start : start + _SCAN_CHUNK_TOKENS].max()))
    del tokens
    return largest


def check_training_data(
    prefixes: list[str],
    tokenizer_path: str | None,
    vocab_size: int,
    cache_dir: Path | None = None,
    measure: bool = True,
) -> list[str]:
    """Refuse (ValueError, one line) a dataset made with a tokenizer other than `tokenizer_path`
    or holding a token id >= `vocab_size`. Returns notes for datasets that record no tokenizer.
    `measure=False` skips measuring the largest id of datasets whose summary lacks it (ranks
    other than 0 leave it to rank 0)."""
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
    expected = tokenizer_identity(tokenizer) if tokenizer is not None else None
    notes = []
    for index, prefix in enumerate(prefixes):
        summary = read_summary(prefix)
        recorded = (summary or {}).get("tokenizer_identity")
        if expected is not None and isinstance(recorded, dict) and not same_tokenizer(recorded, expected):
            raise ValueError(
                f"data.prefixes[{index}]={prefix} was tokenized with {describe_tokenizer(recorded)}, "
                f"but data.tokenizer is {describe_tokenizer(expected)}: tokenize the data again with "
                "data.tokenizer, or set data.tokenizer to the tokenizer that made it"
            )
        if expected is not None and not isinstance(recorded, dict):
            notes.append(
                f"note: data.prefixes[{index}]={prefix} records no tokenizer hash (prepared before "
                "megatron_harpe recorded one): that it was made with data.tokenizer is not checked"
            )
        if summary is None or not isinstance(summary.get("max_token_id"), int):
            if not measure:
                continue
        largest = largest_token_id(prefix, cache_dir, summary)
        if largest >= vocab_size:
            raise ValueError(
                f"data.prefixes[{index}]={prefix} holds token id {largest}, beyond model.vocab_size={vocab_size}: "
                "the data was made with a larger vocabulary; tokenize it with the model's tokenizer, or train a model "
                f"with model.vocab_size > {largest}"
            )
    return notes
