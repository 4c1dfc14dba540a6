"""Hugging Face Llama -> megatron_harpe checkpoint, ready for `pretrain_harpe.py` to start from
(`checkpoint.pretrained: <output>`), with the position encoding to train with.

    convert_hf_to_megatron("llama2-7b-hf", "ckpt/llama2-7b", config_path="configs/llama2_7b_128k_harpe.yaml",
                           tensor_parallel=4)

The model shape comes from config.json; the position encoding (and anything else of the run) from
the YAML config and `section.key=value` overrides, defaulting to the HF model's own RoPE. The
megatron checkpoint is TP-agnostic, so the model is built at TP=1, on the meta device (shapes, no
memory), and each weight is made from the HF shards, read tensor by tensor, only when the
checkpoint writer reaches it, then written and dropped (convert/streaming_save.py): peak memory
is about one weight and its HF sources, not the model (benchmarks/conversion_memory.py);
`tensor_parallel` is validated (it must divide the heads) and recorded in the config.

Output layout: the checkpoint of `checkpointing/checkpoint.py` (iteration 0, weights only) plus
`hf_source/` holding the source's config.json and tokenizer files, which the export back to HF
copies along.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from megatron_harpe import cli
from megatron_harpe.checkpointing.checkpoint import save_checkpoint
from megatron_harpe.config import Config, ModelConfig, apply_override, from_dict
from megatron_harpe.convert.finite import FLAG, refuse_nonfinite
from megatron_harpe.convert.hf_config import model_config_from_hf, position_from_hf, read_hf_config
from megatron_harpe.convert.hf_files import (
    HFWeights,
    check_output_directory,
    check_weights_match,
    copy_tokenizer_files,
    staging_directory,
)
from megatron_harpe.convert.keymap import expected_hf_shapes, hf_sources, hf_to_megatron_tensor, megatron_names
from megatron_harpe.convert.megatron_side import ensure_single_process
from megatron_harpe.convert.streaming_save import StreamingSaveStrategy, WeightMaker
from megatron_harpe.model import build_model

HF_SOURCE_DIR = "hf_source"
# Fields of the model section fixed by the HF weights; the others (e.g. max_position_embeddings,
# attention_backend) may be chosen in the YAML config.
_WEIGHT_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size", "kv_groups",
    "norm_epsilon", "tie_word_embeddings",
)  # fmt: skip


def build_conversion_config(
    hf: dict[str, Any],
    *,
    config_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    tensor_parallel: int | None = None,
) -> Config:
    """The run config saved with the converted checkpoint: model from config.json, the rest
    (position encoding first of all) from the YAML file and overrides."""
    hf_model = model_config_from_hf(hf)
    tree: dict[str, Any] = {}
    if config_path is not None:
        tree = yaml.safe_load(Path(config_path).read_text()) or {}
    for override in overrides:
        apply_override(tree, override)
    user_model = tree.get("model") or {}
    merged = from_dict(ModelConfig, {**dataclasses.asdict(hf_model), **user_model}, prefix="model")
    conflicts = [
        f"model.{field}: config {getattr(merged, field)!r} vs HF {getattr(hf_model, field)!r}"
        for field in _WEIGHT_FIELDS
        if getattr(merged, field) != getattr(hf_model, field)
    ]
    if conflicts:
        raise ValueError(
            "the config does not describe the HF model being converted (" + "; ".join(conflicts) + "): "
            "remove these keys from the model section or convert the matching HF model"
        )
    tree["model"] = {**dataclasses.asdict(merged), "num_query_groups": hf_model.kv_groups}
    if "position" not in tree:
        tree["position"] = dataclasses.asdict(position_from_hf(hf, hf_model))
    if tensor_parallel is not None:
        tree.setdefault("parallel", {})["tensor"] = tensor_parallel
    config = from_dict(Config, tree)
    _check_tensor_parallel(config.model, config.parallel.tensor)
    config.position.resolve(config.model, config.data.seq_length)
    for stage in config.stages:
        stage.position.resolve(config.model, stage.seq_length)
    return config


def _check_tensor_parallel(model: ModelConfig, tp: int) -> None:
    if tp < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {tp}")
    for name, count in (
        ("attention heads", model.num_attention_heads),
        ("k/v groups", model.kv_groups),
        ("vocabulary entries", model.vocab_size),
    ):
        if count % tp:
            raise ValueError(
                f"tensor parallel size {tp} does not divide the model's {count} {name}: choose a size that "
                f"divides {model.num_attention_heads} heads, {model.kv_groups} k/v groups and {model.vocab_size} "
                "vocabulary entries"
            )


def load_hf_weights_into(gpt: torch.nn.Module, weights: HFWeights, model: ModelConfig) -> None:
    """Fill a real TP=1 megatron model from HF weights, one megatron weight at a time (the whole
    model in memory; the converter streams instead, see `StreamedHFWeights`)."""
    params = dict(gpt.named_parameters())
    names = megatron_names(model)
    assert set(names) == set(params), sorted(set(names) ^ set(params))
    with torch.no_grad():
        for name in names:
            tensor = hf_to_megatron_tensor(name, [weights.get(source) for source in hf_sources(name)], model)
            assert tensor.shape == params[name].shape, (name, tensor.shape, params[name].shape)
            params[name].copy_(tensor)


class StreamedHFWeights(WeightMaker):
    """Each megatron weight made from its HF weights, in the model's dtype, when the writer asks
    for it (WeightMaker); a weight holding NaN/inf values is refused by name (convert/finite.py)
    unless `allow_nonfinite`."""

    def __init__(
        self, gpt: torch.nn.Module, weights: HFWeights, model: ModelConfig, allow_nonfinite: bool = False, progress=None
    ) -> None:
        super().__init__(gpt)
        names = megatron_names(model)
        found = {name for name, _ in self._parameter_of.values()}
        assert set(names) == found, sorted(set(names) ^ found)
        self._weights, self._model, self._allow_nonfinite = weights, model, allow_nonfinite
        self._progress = progress  # a tqdm bar advanced by the bytes read

    def make_weight(self, name: str, parameter: torch.Tensor) -> torch.Tensor:
        sources = {source: self._weights.get(source) for source in hf_sources(name)}
        if self._progress is not None:
            self._progress.update(sum(tensor.numel() * tensor.element_size() for tensor in sources.values()))
        if not self._allow_nonfinite:
            refuse_nonfinite(sources.items(), f"the HF model {self._weights.directory}", FLAG)
        # the sources are freed once fused, before a change of dtype copies the result
        fused = hf_to_megatron_tensor(name, list(sources.values()), self._model)
        del sources
        tensor = fused.to(parameter.dtype).contiguous()
        del fused
        if tensor.shape != parameter.shape:
            raise RuntimeError(f"{name}: HF weights make {tuple(tensor.shape)}, the model has {tuple(parameter.shape)}")
        return tensor


def convert_hf_to_megatron(
    hf_dir: str | Path,
    output_dir: str | Path,
    *,
    config_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    tensor_parallel: int | None = None,
    dtype: torch.dtype | None = None,
    source_name: str | None = None,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Convert and return the output directory (`source_name`: what `converted_from` records,
    default the resolved `hf_dir`; a GGUF conversion names its file, not its temporary
    directory). Every check (architecture, shards, shapes, TP divisibility, empty output) runs
    before anything is written; a source weight holding NaN/inf stops the conversion by name
    (nothing is kept) unless `allow_nonfinite`. `overwrite` replaces an earlier model in
    `output_dir` once the new one is complete; `progress` draws a bar with an ETA over the bytes
    of the source weights."""
    hf = read_hf_config(hf_dir)
    config = build_conversion_config(hf, config_path=config_path, overrides=overrides, tensor_parallel=tensor_parallel)
    weights = HFWeights(hf_dir)
    check_weights_match(weights, expected_hf_shapes(config.model))
    check_output_directory(output_dir, overwrite)
    params_dtype = dtype or weights.dtype("model.embed_tokens.weight")

    ensure_single_process()
    position = config.resolved_stages()[0].position  # training starts in the first stage
    # shapes only: the weights are made one by one while written
    gpt = build_model(config.model, position, params_dtype=params_dtype, initialize=False, on_meta_device=True)
    total = sum(
        math.prod(shape) * weights.dtype(name).itemsize for name, shape in expected_hf_shapes(config.model).items()
    )
    with (
        staging_directory(output_dir, overwrite) as staging,
        cli.progress_bar(total, "hf-to-megatron", enabled=progress, unit="B", unit_scale=True) as bar,
    ):
        train_state = {
            "weights_only": True,
            "stage": 0,
            "consumed_samples": 0,
            "consumed_tokens": 0,
            "converted_from": source_name or str(Path(hf_dir).resolve()),
        }
        streamed = StreamingSaveStrategy(StreamedHFWeights(gpt, weights, config.model, allow_nonfinite, bar))
        save_checkpoint(
            staging, 0, model=gpt, config=config.to_dict(), train_state=train_state, sharded_strategy=streamed
        )
        source_files = staging / HF_SOURCE_DIR
        source_files.mkdir()
        shutil.copy2(Path(hf_dir) / "config.json", source_files / "config.json")
        copy_tokenizer_files(hf_dir, source_files)
    return Path(output_dir)
