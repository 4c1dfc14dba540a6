"""A copy of a checkpoint with another vocabulary size: the deliberate way to start training with
a vocabulary other than the pretrained model's (a tokenizer with added tokens, or padding to a
multiple of the tensor-parallel size).

    python tools/convert_checkpoint.py resize-vocab --input ckpt/llama2-7b --output ckpt/llama2-7b-v32256 \\
        --vocab-size 32256
    # then: checkpoint.pretrained: ckpt/llama2-7b-v32256 and model.vocab_size: 32256

The word embeddings (and the output layer, when untied) keep their first rows bit for bit;
added rows are drawn as megatron-core initialises embeddings and output layers, from
N(0, model.init_method_std) (never zeros, which would make every new token's logit equal and
its embedding carry no signal); a smaller size drops the last rows. Every other weight is
copied. The copy is a weights-only checkpoint at iteration 0 with the source's config (the
vocabulary changed) and its `hf_source/` files; `train_state.json` records `resized_from`.
Runs as one process: the source model is loaded once, the copy is written weight by weight.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from megatron_harpe.checkpointing.checkpoint import save_checkpoint
from megatron_harpe.convert.hf_files import check_output_directory, staging_directory
from megatron_harpe.convert.hf_to_megatron import HF_SOURCE_DIR, _check_tensor_parallel
from megatron_harpe.convert.megatron_side import load_megatron_model, read_checkpoint_spec, stored_dtype
from megatron_harpe.convert.streaming_save import StreamingSaveStrategy, WeightMaker
from megatron_harpe.model import build_model

VOCABULARY_WEIGHTS = ("embedding.word_embeddings.weight", "output_layer.weight")


class ResizedWeights(WeightMaker):
    """The source model's weights, with the vocabulary rows cut or extended (module docstring)."""

    def __init__(self, target: torch.nn.Module, source: torch.nn.Module, init_std: float, seed: int) -> None:
        super().__init__(target)
        self._source = dict(source.named_parameters())
        self._init_std = init_std
        self._generator = torch.Generator().manual_seed(seed)

    def make_weight(self, name: str, parameter: torch.Tensor) -> torch.Tensor:
        source = self._source[name].detach()
        if name not in VOCABULARY_WEIGHTS or source.shape == parameter.shape:
            return source.to(parameter.dtype).contiguous()
        rows = parameter.shape[0]
        kept = min(rows, source.shape[0])
        resized = torch.empty(parameter.shape, dtype=torch.float32)
        resized[kept:].normal_(0.0, self._init_std, generator=self._generator)  # megatron's init_method_normal
        resized = resized.to(parameter.dtype)
        resized[:kept] = source[:kept].to(parameter.dtype)
        return resized


def resize_vocabulary(
    checkpoint: str | Path, output_dir: str | Path, vocab_size: int, *, seed: int = 1234, overwrite: bool = False
) -> Path:
    """Write the resized copy of `checkpoint` (a save dir: its latest iteration, or an iteration
    dir) to `output_dir`, which appears only when complete (`overwrite`: replacing an earlier one)."""
    spec = read_checkpoint_spec(checkpoint)
    check_output_directory(output_dir, overwrite)
    if vocab_size < 1:
        raise ValueError(f"--vocab-size {vocab_size} must be positive")
    if vocab_size == spec.model.vocab_size:
        raise ValueError(f"{spec.path} already has a vocabulary of {vocab_size}: nothing to resize")
    config = spec.config
    config.model = dataclasses.replace(spec.model, vocab_size=vocab_size)
    _check_tensor_parallel(config.model, config.parallel.tensor)
    dtype = stored_dtype(spec.path)
    source, _ = load_megatron_model(spec.path, dtype=dtype)
    first_stage = config.resolved_stages()[0].position
    target = build_model(config.model, first_stage, params_dtype=dtype, initialize=False, on_meta_device=True)
    train_state = {
        "weights_only": True,
        "stage": 0,
        "consumed_samples": 0,
        "consumed_tokens": 0,
        "resized_from": {"checkpoint": str(spec.path.resolve()), "vocab_size": spec.model.vocab_size},
    }
    with staging_directory(output_dir, overwrite) as staging:
        maker = ResizedWeights(target, source, spec.model.init_method_std, seed)
        save_checkpoint(
            staging,
            0,
            model=target,
            config=config.to_dict(),
            train_state=train_state,
            sharded_strategy=StreamingSaveStrategy(maker),
        )
        for root in (Path(checkpoint), spec.path.parent):
            if (
                root / HF_SOURCE_DIR
            ).is_dir():  # the tokenizer files travel on (pass --tokenizer on export if it changed)
                shutil.copytree(root / HF_SOURCE_DIR, staging / HF_SOURCE_DIR)
                break
    return Path(output_dir)
