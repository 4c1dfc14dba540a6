"""A GGUF file as the source of hf-to-megatron: dequantized by transformers into a temporary
Hugging Face directory (config.json, generation_config.json, safetensors, every tokenizer file
including the chat template) that the ordinary converter then reads.

    python tools/convert_checkpoint.py hf-to-megatron --input DIR --gguf-file model.Q4_1.gguf --output CKPT

    with gguf_as_hf_directory("DIR", "model.Q4_1.gguf", work_parent="ckpt/") as hf_dir:
        convert_hf_to_megatron(hf_dir, "ckpt/model")

transformers (`from_pretrained(dir, gguf_file=name)`, needs the `gguf` package) dequantizes every
tensor to fp32 in memory, so a GGUF source costs the whole fp32 model in RAM once; safetensors
sources are streamed instead. The weights are written with the project's shard writer because
transformers refuses to `save_pretrained` a model loaded from GGUF.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from megatron_harpe.convert.hf_files import write_safetensors

# keys of a GGUF-loaded config that describe the file, not the model
_SOURCE_ONLY_KEYS = ("quantization_config", "_model_name_or_path", "transformers_version")


@contextlib.contextmanager
def gguf_as_hf_directory(
    directory: str | Path, gguf_file: str, work_parent: str | Path | None = None
) -> Iterator[Path]:
    """A temporary HF model directory holding the dequantized GGUF model; deleted on exit."""
    path = Path(directory) / gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist: --gguf-file names a file inside --input")
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as error:
        raise ValueError("reading a GGUF file needs the `gguf` package: pip install gguf") from error
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    work_parent = Path(work_parent) if work_parent is not None else None
    if work_parent is not None:
        work_parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gguf-source-", dir=work_parent))
    try:
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
            model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file)
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        config = model.config.to_dict()
        for key in _SOURCE_ONLY_KEYS:
            config.pop(key, None)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        GenerationConfig.from_model_config(model.config).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        tied = bool(config.get("tie_word_embeddings"))
        tensors = (
            (name, tensor.detach())
            for name, tensor in model.state_dict().items()
            if not (tied and name == "lm_head.weight")
        )
        write_safetensors(tensors, staging)
        del model
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
