"""What tools/evaluate.py checks before it loads a model: the output directory, and the
model's tokenizer (loaded alone, so every prompt can be built and sized first, cells.py).

    from megatron_harpe.eval.preflight import check_output_dir, tokenizer_for
    check_output_dir("eval_out")                   # a writable directory with room, or a ValueError
    tokenizer = tokenizer_for("ckpt/harpe", {"tokenizer": None, "trust_remote_code": False})

A model of 7B parameters takes minutes to load and a 128k evaluation hours to run: a path that
is a file, a read-only mount or a full disk must fail before either, with one line saying so.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from megatron_harpe.eval.backends import is_megatron_checkpoint
from megatron_harpe.eval.backends.base import Tokenizer
from megatron_harpe.eval.backends.tokenizer import load_tokenizer_any
from megatron_harpe.eval.run_store import SAMPLES_FILE, read_log

MINIMUM_FREE_BYTES = 64 << 20  # results, tables, plots and the per-sample log of a large run


def check_output_dir(path: str, minimum_free: int = MINIMUM_FREE_BYTES) -> None:
    """`path` is (or can be made) a directory we can write, with `minimum_free` bytes free."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--output-dir {path!r} is a file, not a directory: choose a directory for the results")
    try:
        os.makedirs(path, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write_check_", dir=path)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or str(error)
        raise ValueError(f"--output-dir {path!r} cannot be written ({reason}): choose a writable directory") from error
    free = shutil.disk_usage(path).free
    if free < minimum_free:
        raise ValueError(
            f"--output-dir {path!r} has {free >> 20} MiB free, less than the {minimum_free >> 20} MiB the "
            "results need: free space or choose another directory"
        )


def check_unfinished_run(path: str, resume: bool, overwrite: bool) -> None:
    """Refuse to start over a run that did not finish unless told what to do with it (the same
    rule run_store.RunStore applies once the model is loaded, checked here before)."""
    if resume and not os.path.exists(os.path.join(path, SAMPLES_FILE)):
        raise ValueError(f"--resume: {path} holds no earlier run ({SAMPLES_FILE}) to continue")
    if resume or overwrite:
        return
    settings, records, finished = read_log(os.path.join(path, SAMPLES_FILE))
    if settings is not None and records and not finished:
        raise ValueError(
            f"{path} holds an unfinished evaluation ({len(records)} samples scored): pass --resume to "
            "continue it, --overwrite to start again, or another --output-dir"
        )
    if os.path.isdir(path) and any(os.scandir(path)):  # earlier results are never replaced silently
        raise ValueError(
            f"--output-dir {path} is not empty: pass --overwrite to replace its results, --resume to "
            "continue the run in it, or choose another --output-dir"
        )


def tokenizer_for(model: str, options: dict[str, Any]) -> Tokenizer:
    """The tokenizer the backend of `model` will use, without loading the model: `--tokenizer`,
    else a megatron checkpoint's (its HF source's, or its config's), else the HF directory's."""
    trust = bool(options.get("trust_remote_code", False))
    explicit = options.get("tokenizer")
    if model in ("oracle", "random"):
        if not explicit:
            raise ValueError(f"the {model} backend needs a tokenizer: pass --tokenizer PATH")
        return load_tokenizer_any(explicit, trust_remote_code=trust)
    if not os.path.isdir(model):
        raise ValueError(
            f"model path {model!r} is not a directory: pass a Hugging Face model "
            "directory, a megatron_harpe checkpoint directory, 'oracle' or 'random'"
        )
    if explicit:
        return load_tokenizer_any(explicit, trust_remote_code=trust)
    if is_megatron_checkpoint(model):
        from megatron_harpe.convert.megatron_side import read_checkpoint_spec
        from megatron_harpe.eval.backends.megatron import checkpoint_tokenizer

        path = checkpoint_tokenizer(model, read_checkpoint_spec(model))
        if not path or not os.path.exists(path):
            raise ValueError(
                f"no tokenizer for {model}: it keeps no hf_source/ and its config names none that "
                "exists; pass --tokenizer PATH"
            )
        return load_tokenizer_any(path, trust_remote_code=trust)
    if not os.path.exists(os.path.join(model, "config.json")):
        raise ValueError(
            f"{model!r} holds neither config.json (Hugging Face model) nor "
            "latest_checkpointed_iteration.txt / config.yaml (megatron_harpe checkpoint)"
        )
    from megatron_harpe.eval.backends.hf import needs_remote_code

    if not trust and needs_remote_code(model):  # transformers would otherwise ask on the terminal
        raise ValueError(
            f"{model!r} ships its own modeling code (our HARPE export does): rerun with --trust-remote-code"
        )
    return load_tokenizer_any(model, trust_remote_code=trust)
