"""The files a training run will read, checked at launch before any process group starts.

    check_training_inputs(cfg)      # pretrain_harpe.py, after cfg.validate(); ValueError naming the key

Kept out of config.py: it reads checkpoints and datasets, whose modules import the config. The
readers are imported only when the config names such inputs.
"""

from __future__ import annotations

from pathlib import Path

from megatron_harpe.config import Config


def check_training_inputs(cfg: Config) -> Config:
    """Check that the files the run will read exist (data prefixes' .bin/.idx, loss masks,
    tokenizer, pretrained weights), that the data was made with data.tokenizer and holds no
    id beyond model.vocab_size: a bad one stops the launch, not a rank mid-run."""
    data = cfg.data
    for key, prefixes in (("data.prefixes", data.prefixes), ("data.loss_mask_prefixes", data.loss_mask_prefixes or [])):
        for index, prefix in enumerate(prefixes):
            missing = [f"{prefix}{suffix}" for suffix in (".bin", ".idx") if not Path(f"{prefix}{suffix}").is_file()]
            if missing:
                raise ValueError(
                    f"{key}[{index}]={prefix!r}: {' and '.join(missing)} not found; give the path without "
                    ".bin/.idx of a dataset written by tools/prepare_data.py"
                )
    for key, path in (("data.tokenizer", data.tokenizer), ("checkpoint.pretrained", cfg.checkpoint.pretrained)):
        if path and not Path(path).exists():
            raise ValueError(f"{key}={path!r} does not exist: fix the path")
    if cfg.checkpoint.pretrained:  # the model the config builds, before any weight is read
        from megatron_harpe.checkpointing.pretrained import check_pretrained_shapes

        check_pretrained_shapes(cfg.checkpoint.pretrained, cfg.model)
    if data.prefixes:  # made with data.tokenizer, ids within the vocabulary (the trainer says notes)
        from megatron_harpe.cli import is_rank_zero
        from megatron_harpe.data.identity import check_training_data
        from megatron_harpe.data.index_cache import cache_directory

        check_training_data(
            data.prefixes,
            data.tokenizer,
            cfg.model.vocab_size,
            cache_directory(data.cache_dir, data.prefixes),
            measure=is_rank_zero(),
        )
    return cfg
