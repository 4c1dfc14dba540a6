"""A tokenizer from any path the tools accept, without loading a model.

    from megatron_harpe.eval.backends.tokenizer import load_tokenizer_any
    tokenizer = load_tokenizer_any("path/to/hf_dir")     # or a sentencepiece / tokenizer file

Kept apart from the backend factory (backends/__init__.py) so the checks that need only a
tokenizer (evaluation during training, the evaluation preflight) import no model backend.
"""

from __future__ import annotations

import os

from megatron_harpe.eval.backends.base import Tokenizer


def load_tokenizer_any(path: str, trust_remote_code: bool = False) -> Tokenizer:
    """A tokenizer from a Hugging Face directory, or anything `megatron_harpe.data.tokenizer`
    understands (a sentencepiece model, ...)."""
    from megatron_harpe.eval.backends.hf import HFTokenizer

    if not os.path.exists(path):
        raise ValueError(
            f"tokenizer path {path!r} does not exist: pass a Hugging Face model directory or a tokenizer file"
        )
    if os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, name))
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        return HFTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    try:
        from megatron_harpe.data.tokenizer import load_tokenizer
    except ImportError as error:
        raise ValueError(
            f"cannot load a tokenizer from {path!r}: it is not a Hugging Face "
            "tokenizer directory and megatron_harpe.data.tokenizer is unavailable"
        ) from error
    return load_tokenizer(path)
