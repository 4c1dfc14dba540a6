"""Evaluation backends, and the factory that picks one for a model path.

    from megatron_harpe.eval.backends import load_backend
    backend = load_backend("path/to/hf_dir", trust_remote_code=True)
    backend = load_backend("oracle", tokenizer="path/to/hf_dir")   # reads answers out of prompts

The protocol every backend implements is in base.py; one module per backend: hf.py (a Hugging
Face model directory), megatron.py (a megatron_harpe checkpoint sharded over TP x CP ranks, with
kv_cache.py for its greedy decoding) and synthetic.py (the oracle and random backends that
bracket what the harness can report). `load_backend` routes a megatron_harpe checkpoint
directory (one holding `latest_checkpointed_iteration.txt` or `config.yaml`) to the megatron
backend; each backend module is imported only when it is picked.
"""

from __future__ import annotations

import os
from typing import Any

from megatron_harpe.eval.backends.base import ModelBackend
from megatron_harpe.eval.backends.tokenizer import load_tokenizer_any


def is_megatron_checkpoint(path: str) -> bool:
    """A megatron_harpe checkpoint directory (as opposed to a Hugging Face model directory)."""
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, marker)) for marker in ("latest_checkpointed_iteration.txt", "config.yaml")
    )


def load_backend(path: str, **options: Any) -> ModelBackend:
    """Build the backend for `path`.

    path: a Hugging Face model directory, a megatron_harpe checkpoint directory, or one of the
    synthetic backends "oracle" / "random" (these need `tokenizer=PATH`).
    options: trust_remote_code (bool), device (str, "cpu"), dtype (str, "fp32": megatron_harpe.cli.DTYPES),
    tokenizer (str, overrides the model's own), seed (int, random backend),
    tensor_parallel / context_parallel (int), kv_cache (bool, True): megatron backend;
    self_extend (`self_extend.SelfExtendSettings`): either model backend.
    A megatron checkpoint brings its own tokenizer (the HF source's, kept by hf-to-megatron).
    """
    if path in ("oracle", "random"):
        if options.get("self_extend") is not None:
            raise ValueError(f"--self-extend needs a model; the {path} backend has no attention")
        from megatron_harpe.eval.backends.synthetic import OracleBackend, RandomBackend

        tokenizer_path = options.get("tokenizer")
        if not tokenizer_path:
            raise ValueError(f"the {path} backend needs a tokenizer: pass --tokenizer PATH")
        tokenizer = load_tokenizer_any(tokenizer_path, trust_remote_code=bool(options.get("trust_remote_code", False)))
        if path == "oracle":
            return OracleBackend(tokenizer)
        return RandomBackend(tokenizer, seed=int(options.get("seed", 0)))
    if not os.path.isdir(path):
        raise ValueError(
            f"model path {path!r} is not a directory: pass a Hugging Face model "
            "directory, a megatron_harpe checkpoint directory, 'oracle' or 'random'"
        )
    if is_megatron_checkpoint(path):
        return _load_megatron_backend(path, **options)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(
            f"{path!r} holds neither config.json (Hugging Face model) nor "
            "latest_checkpointed_iteration.txt / config.yaml (megatron_harpe checkpoint)"
        )
    from megatron_harpe.eval.backends.hf import HFBackend

    return HFBackend.from_pretrained(
        path,
        trust_remote_code=bool(options.get("trust_remote_code", False)),
        device=str(options.get("device", "cpu")),
        dtype=str(options.get("dtype", "fp32")),
        tokenizer_path=options.get("tokenizer"),
        self_extend=options.get("self_extend"),
    )


def _load_megatron_backend(path: str, **options: Any) -> ModelBackend:
    try:
        from megatron_harpe.eval.backends.megatron import MegatronBackend
    except ImportError as error:
        raise ValueError(
            f"{path!r} is a megatron_harpe checkpoint, but the megatron backend is not available "
            "in this version: export it with tools/convert_checkpoint.py and evaluate the "
            "Hugging Face directory (--trust-remote-code for HARPE bases)"
        ) from error
    return MegatronBackend.from_checkpoint(path, **options)
