"""megatron_harpe checkpoint (any TP/CP layout) -> Hugging Face model directory.

    convert_megatron_to_hf("runs/demo_cpu/checkpoints", "runs/demo_cpu/hf")

What the export is depends on the position encoding the checkpoint was trained with (for a
multi-stage schedule: the stage it was saved in):
- abf (plain RoPE with any base): stock `LlamaForCausalLM`, `rope_theta` = the base;
- pi: `rope_parameters: {rope_type: linear, factor}`;
- yarn: `rope_parameters: {rope_type: yarn, factor, original_max_position_embeddings, beta_fast, beta_slow}`
  (transformers' YaRN uses the same ramp and attention factor 0.1 ln(s) + 1 as megatron-core);
- harpe: `HarpeLlamaForCausalLM` with `rope_bases` (one per query head) in config.json and its
  configuration/modeling files in the directory (`auto_map`), loaded with
  `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.

Tokenizer files come from `tokenizer=` (a HF tokenizer dir, a sentencepiece .model or a
tokenizer.json), else from `hf_source/` next to a converted checkpoint, else from the config's
`data.tokenizer` or the demo's `<data.demo_workdir>/tokenizer.model`.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.distributed.checkpoint import CheckpointException
from transformers import GenerationConfig

import megatron_harpe.convert.hf_harpe as hf_harpe_package
from megatron_harpe import cli
from megatron_harpe.checkpointing.integrity import checkpoint_problem
from megatron_harpe.convert.finite import refuse_nonfinite
from megatron_harpe.convert.hf_config import hf_config_for, token_ids_from
from megatron_harpe.convert.hf_files import (
    check_output_directory,
    copy_tokenizer_files,
    staging_directory,
    write_safetensors,
)
from megatron_harpe.convert.hf_to_megatron import HF_SOURCE_DIR
from megatron_harpe.convert.keymap import expected_hf_shapes, megatron_names, megatron_to_hf_tensors
from megatron_harpe.convert.megatron_side import (
    CheckpointSpec,
    load_megatron_model,
    read_checkpoint_spec,
    stored_dtype,
    unfinished_iteration,
)

HARPE_CODE_FILES = ("configuration_harpe_llama.py", "modeling_harpe_llama.py")


def find_tokenizer(checkpoint: str | Path, spec: CheckpointSpec, explicit: str | Path | None) -> Path | None:
    if explicit is not None:
        return Path(explicit)
    for root in (Path(checkpoint), spec.path.parent):
        if (root / HF_SOURCE_DIR).is_dir():
            return root / HF_SOURCE_DIR
    data = spec.config.data
    if data.tokenizer:
        return Path(data.tokenizer)
    if data.demo_workdir and (Path(data.demo_workdir) / "tokenizer.model").is_file():
        return Path(data.demo_workdir) / "tokenizer.model"
    return None


def source_dtype(hf_source: Path | None) -> torch.dtype | None:
    """The dtype of the HF model a checkpoint was converted from (a bf16 Llama exports as bf16
    even though training keeps fp32 weights), if known."""
    if hf_source is None or not (hf_source / "config.json").is_file():
        return None
    source = json.loads((hf_source / "config.json").read_text())
    dtype = getattr(torch, str(source.get("dtype") or source.get("torch_dtype")), None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _hf_tensors(gpt: torch.nn.Module, spec: CheckpointSpec, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    params = dict(gpt.named_parameters())
    for name in megatron_names(spec.model):
        yield from megatron_to_hf_tensors(name, params[name].detach().to(dtype), spec.model)


def _counted(tensors: Iterator[tuple[str, torch.Tensor]], bar) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in tensors:
        yield name, tensor
        bar.update(tensor.numel() * tensor.element_size())


def convert_megatron_to_hf(
    checkpoint: str | Path,
    output_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    tokenizer: str | Path | None = None,
    max_shard_bytes: int = 2 * 2**30,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Export the checkpoint (a save dir: its latest iteration; or an iteration dir) to
    `output_dir`, which appears only when complete; returns the iteration dir exported (a save
    dir whose run is still saving: the newest complete one, see `_load_newest`). `dtype` defaults to the dtype of the HF
    model the checkpoint was converted from, else to the saved dtype. Peak memory: the model in
    its saved dtype plus one shard (`max_shard_bytes`). Weights holding NaN/inf are refused by
    name unless `allow_nonfinite` (convert/finite.py). `overwrite` replaces an earlier model in
    `output_dir` once the new one is complete; `progress` draws a bar with an ETA over the bytes written."""
    spec = read_checkpoint_spec(checkpoint)
    check_output_directory(output_dir, overwrite)
    tokenizer_source = find_tokenizer(checkpoint, spec, tokenizer)
    if tokenizer_source is not None and not tokenizer_source.exists():
        raise FileNotFoundError(f"tokenizer {tokenizer_source} does not exist: pass --tokenizer")
    token_ids = token_ids_from(tokenizer_source if tokenizer_source and tokenizer_source.is_dir() else None)

    model, spec = _load_newest(checkpoint, spec)
    if not allow_nonfinite:
        refuse_nonfinite(model.named_parameters(), f"checkpoint {spec.path}")
    out_dtype = dtype or source_dtype(tokenizer_source) or stored_dtype(spec.path)
    hf_config = hf_config_for(
        spec.model,
        spec.position,
        max_position_embeddings=max(spec.model.max_position_embeddings, spec.trained_length),
        token_ids=token_ids,
        dtype=str(out_dtype).removeprefix("torch."),
    )
    total = sum(math.prod(shape) for shape in expected_hf_shapes(spec.model).values()) * out_dtype.itemsize
    with (
        staging_directory(output_dir, overwrite) as staging,
        cli.progress_bar(total, "megatron-to-hf", enabled=progress, unit="B", unit_scale=True) as bar,
    ):
        write_safetensors(_counted(_hf_tensors(model, spec, out_dtype), bar), staging, max_shard_bytes=max_shard_bytes)
        hf_config.save_pretrained(staging)
        if spec.position.type == "harpe":
            package_dir = Path(hf_harpe_package.__file__).parent
            for name in HARPE_CODE_FILES:
                shutil.copy2(package_dir / name, staging / name)
        if tokenizer_source is not None:
            copy_tokenizer_files(tokenizer_source, staging)
        else:
            warnings.warn(f"no tokenizer found for {checkpoint}: the export has none (pass tokenizer=...)")
        if not (staging / "generation_config.json").is_file():
            GenerationConfig.from_model_config(hf_config).save_pretrained(staging)
    return spec.path


def _load_newest(
    checkpoint: str | Path, spec: CheckpointSpec, attempts: int = 3
) -> tuple[torch.nn.Module, CheckpointSpec]:
    """The weights of `spec`'s iteration. A run still saving into `checkpoint` may delete that
    iteration while it is read (checkpoint.keep_last): then say so and read the newest complete
    one instead; an iteration named explicitly is an error naming the newest."""
    for _ in range(attempts):
        try:
            return load_megatron_model(spec.path, dtype=stored_dtype(spec.path))
        except (OSError, ValueError, RuntimeError, CheckpointException):
            if spec.path.is_dir() and checkpoint_problem(spec.path) is None:
                raise  # the iteration is intact: the error is about something else
            if Path(checkpoint).resolve() == spec.path.resolve():
                raise FileNotFoundError(
                    unfinished_iteration(spec.path) or f"{spec.path} was deleted while it was read"
                ) from None
            newer = read_checkpoint_spec(checkpoint)
            print(
                f"note: {spec.path.name} was deleted while it was read (the run saving into {checkpoint} keeps "
                f"checkpoint.keep_last iterations): exporting {newer.path.name}, the newest complete one",
                file=sys.stderr,
                flush=True,
            )
            spec = newer
    raise FileNotFoundError(
        f"the iterations of {checkpoint} were replaced {attempts} times while being read: export "
        "when its run is not saving, or copy an iteration dir elsewhere first"
    )
