"""Where megatron-core caches the sample indices of a training run, and what keys them.

megatron's GPTDataset and BlendedDataset save their document / sample / shuffle indices as
`.npy` files named by the MD5 of a description of the dataset (path, sample count, seed,
sequence length and the "tokenizer" object's `unique_identifiers`). That description names
the data's path, not its content, so a dataset rewritten in place (`tokenize --overwrite`)
met the indices of its predecessor: an IndexError, or training on mismatched samples. Here the
description also carries the tokenizer's hash and each dataset's file sizes and modification
times (`cache_identifiers`), so a cache that does not match the data is never found and is
rebuilt, and `tokenize --overwrite` removes the entries of the dataset it replaces.

    directory = cache_directory(cfg.data.cache_dir, cfg.data.prefixes)    # said aloud when moved
    remove_cached_indices("data/train")                                     # on --overwrite

Location: `data.cache_dir` if set; else `index_cache/` beside the first dataset when that
directory is writable; else the per-user cache (`$XDG_CACHE_HOME` or `~/.cache`,
`megatron_harpe/index_cache`). Rank 0 writes the cache and the other ranks read it, so for a
multi-node job it must be on a filesystem every node sees (set `data.cache_dir` when the
per-user cache is not shared).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from megatron_harpe.data.identity import file_identity

CACHE_DIR_NAME = "index_cache"
_LEGACY_CACHE = "cache"  # megatron's own default: <prefix>/cache/<Class>_indices/


def user_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "megatron_harpe" / CACHE_DIR_NAME


def writable(directory: Path) -> bool:
    """Whether a file can be created in `directory` (made if missing): tried, not guessed from
    permission bits (root ignores them, a read-only mount does not show in them)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-"):
            pass
    except OSError:
        return False
    return True


def cache_directory(configured: str | None, prefixes: list[str], say: Callable[[str], None] | None = None) -> Path:
    """The index cache directory of a run (see module docstring); `say` hears why it moved."""
    if configured:
        return Path(configured)
    beside = Path(os.path.abspath(prefixes[0])).parent / CACHE_DIR_NAME
    if writable(beside):
        return beside
    fallback = user_cache_dir()
    if say is not None:
        say(
            f"note: {beside.parent} is not writable: megatron's sample-index cache goes to {fallback} "
            "(set data.cache_dir to choose; a multi-node job needs a directory every node sees)"
        )
    return fallback


def cache_identifiers(prefixes: list[str], tokenizer_sha256: str | None) -> dict[str, Any]:
    """What, besides megatron's own description, a cache entry must match: the tokenizer's
    content and every dataset's files."""
    return {
        "tokenizer_sha256": tokenizer_sha256,
        "data": {os.path.abspath(prefix): file_identity(prefix) for prefix in prefixes},
    }


def remove_cached_indices(prefix: str | Path) -> list[Path]:
    """Remove the cached indices of the dataset at `prefix`: megatron's default location
    (`prefix/cache/`) and entries of `index_cache/` beside it whose description names it."""
    prefix = os.path.abspath(prefix)
    removed = []
    legacy = Path(prefix) / _LEGACY_CACHE
    if legacy.is_dir():
        shutil.rmtree(legacy, ignore_errors=True)
        removed.append(legacy)
        try:
            Path(prefix).rmdir()  # megatron made it for the cache only
        except OSError:
            pass
    cache = Path(prefix).parent / CACHE_DIR_NAME
    if cache.is_dir():
        for description in cache.glob("*-description.txt"):
            try:
                text = description.read_text()
            except OSError:
                continue
            if f'"{prefix}"' not in text:
                continue
            stem = description.name[: -len("description.txt")]
            for entry in cache.glob(f"{stem}*"):
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed
