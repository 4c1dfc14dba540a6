"""Starting from pretrained weights (`checkpoint.pretrained`): the checkpoint must hold the model
the config builds, checked from its saved config and tensor shapes before any weight is read.

    check_pretrained_shapes("ckpt/llama2-7b", cfg.model)      # ValueError, one line, naming both
    load_pretrained("ckpt/llama2-7b", cfg.model, model)   # the check, then the weights

megatron-core loads embeddings and output layers with `allow_shape_mismatch` (for padded
vocabularies), so a checkpoint of another vocabulary size was cut or padded with zero rows
silently, and any other difference (hidden size, layers, heads) ended in hundreds of lines of
`CheckpointException`, a BaseException that `except Exception` misses. Changing the vocabulary
is deliberate: `tools/convert_checkpoint.py resize-vocab` (convert/resize_vocab.py) writes a
copy with the rows added as megatron initialises them (or cut), which the config then matches.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from torch.distributed.checkpoint import CheckpointException

from megatron_harpe.config import ModelConfig, from_dict

SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "kv_groups",
    "ffn_hidden_size",
    "tie_word_embeddings",
)
"""What fixes the shapes of a model's weights (kv_groups: model.num_query_groups)."""
_EMBEDDING = "embedding.word_embeddings.weight"


def _field_key(field: str) -> str:
    return "model.num_query_groups" if field == "kv_groups" else f"model.{field}"


def saved_model_config(path: str | Path) -> tuple[Path, ModelConfig]:
    """The iteration dir of a checkpoint and the model section of its saved config."""
    from megatron_harpe.checkpointing.checkpoint import find_latest_checkpoint, read_checkpoint_config

    found = find_latest_checkpoint(path)
    if found is None:
        raise ValueError(
            f"checkpoint.pretrained={path} holds no checkpoint (no latest_checkpointed_iteration.txt "
            "or iter_*/ dirs): convert one with tools/convert_checkpoint.py hf-to-megatron"
        )
    return found, from_dict(ModelConfig, read_checkpoint_config(found).get("model") or {}, prefix="model")


def saved_vocabulary_rows(iteration_dir: Path) -> int | None:
    """Rows of the saved word embeddings, from the checkpoint's tensor metadata (None if absent)."""
    try:
        with open(iteration_dir / "dist" / ".metadata", "rb") as handle:
            metadata = pickle.load(handle)  # torch.distributed.checkpoint's own format
        return int(metadata.state_dict_metadata[_EMBEDDING].size[0])
    except Exception:  # noqa: BLE001 - an unreadable file is checkpoint_check's to name
        return None


def check_pretrained_shapes(path: str | Path, model: ModelConfig) -> None:
    """Refuse, in one line, pretrained weights whose shapes differ from the model the config builds."""
    found, saved = saved_model_config(path)
    rows = saved_vocabulary_rows(found)
    if rows is not None and rows != saved.vocab_size:
        saved.vocab_size = rows  # the tensors win over a config that does not describe them
    differences = [
        (field, getattr(saved, field), getattr(model, field))
        for field in SHAPE_FIELDS
        if getattr(saved, field) != getattr(model, field)
    ]
    if not differences:
        return
    listed = ", ".join(f"{_field_key(field)}: checkpoint {old}, config {new}" for field, old, new in differences)
    if [field for field, _, _ in differences] == ["vocab_size"]:
        fix = (
            f"to change the vocabulary deliberately, resize the checkpoint first: python tools/convert_checkpoint.py "
            f"resize-vocab --input {path} --output NEW_DIR --vocab-size {model.vocab_size}, then set "
            "checkpoint.pretrained to NEW_DIR; or set model.vocab_size to the checkpoint's"
        )
    else:
        fix = "set these model keys to the checkpoint's values, or start from a checkpoint of this model"
    raise ValueError(
        f"checkpoint.pretrained={path} ({found.name}) holds another model than the config builds ({listed}): {fix}"
    )


def load_pretrained(path: str | Path, model_config: ModelConfig, model) -> None:
    """Check the shapes, then load the weights only (the optimizer and schedule start fresh).
    Every rank calls it."""
    from megatron_harpe.checkpointing.checkpoint import load_checkpoint

    check_pretrained_shapes(path, model_config)
    try:
        load_checkpoint(path, model=model, weights_only=True, load_rng=False)
    except CheckpointException as error:  # a BaseException: one line instead of every rank's traceback
        first = (str(error).strip().splitlines() or [type(error).__name__])[-1][:300]
        raise ValueError(
            f"checkpoint.pretrained={path} could not be loaded into the model built here: {first}"
        ) from None
