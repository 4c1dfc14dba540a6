"""What a results.json must say for its numbers to be reproduced or compared: the versions that
ran, the tokenizer, the prompt template and the haystack (with hashes).

    from megatron_harpe.eval.provenance import run_provenance
    results["provenance"] = run_provenance(backend.tokenizer, prompt_format, haystack_file)
"""

from __future__ import annotations

import functools
import os
import subprocess
from importlib import metadata
from typing import Any

from megatron_harpe.eval.backends.base import Tokenizer
from megatron_harpe.eval.tasks.chat import PromptFormat
from megatron_harpe.eval.tasks.haystack import haystack_info

PACKAGES = ("torch", "transformers", "megatron-core", "tokenizers", "wonderwords")


@functools.lru_cache(maxsize=1)
def git_revision() -> str | None:
    """The megatron_harpe checkout's commit (with "+dirty" for local changes), or None when it is
    not a git checkout (an installed wheel)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        revision = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return revision + ("+dirty" if dirty else "")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def tokenizer_info(tokenizer: Tokenizer) -> dict[str, Any]:
    hf_tokenizer = getattr(tokenizer, "hf_tokenizer", None)
    return {
        "class": type(hf_tokenizer if hf_tokenizer is not None else tokenizer).__name__,
        "name_or_path": getattr(hf_tokenizer, "name_or_path", None),
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "adds_bos": bool(getattr(tokenizer, "add_bos", tokenizer.bos_id is not None)),
    }


def run_provenance(tokenizer: Tokenizer, prompt_format: PromptFormat, haystack_file: str | None) -> dict[str, Any]:
    return {
        "megatron_harpe_git": git_revision(),
        "versions": package_versions(),
        "tokenizer": tokenizer_info(tokenizer),
        "prompt": prompt_format.info,
        "haystack": haystack_info(haystack_file),
    }
