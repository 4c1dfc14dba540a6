"""Resuming with a different config: refuse changes of the model's function or the data order.

The trainer compares the config saved with the checkpoint (`config.yaml`) with the one it runs:

    changes = compare_configs(saved_tree, cfg.to_dict())
    check_resume_config(saved_tree, cfg.to_dict(), allowed="data.seq_length", log=print)

A change of a *protected* key (model shape, position encoding and bases, stages, sequence
length, batch sizes, data prefixes / weights / seed ...) raises a ValueError with the diff,
unless `checkpoint.allow_config_change` names the key (or a section of it). Every other change
(logging, intervals, steps, parallel layout, save dir ...) is listed in one line.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

PROTECTED = (
    "model.num_layers",
    "model.hidden_size",
    "model.num_attention_heads",
    "model.ffn_hidden_size",
    "model.vocab_size",
    "model.num_query_groups",
    "model.max_position_embeddings",
    "model.norm_epsilon",
    "model.tie_word_embeddings",
    "position",
    "stages",
    "data.prefixes",
    "data.weights",
    "data.loss_mask_prefixes",
    "data.seq_length",
    "data.seed",
    "data.reset_position_ids",
    "data.reset_attention_mask",
    "data.eod_mask_loss",
    "train.micro_batch_size",
    "train.global_batch_size",
)
"""Keys (or whole sections) whose change alters what the model computes or which data it sees
in which order. `stages[i].tokens` is left out: a longer stage extends the run."""
_UNPROTECTED_INSIDE_PROTECTED = (".tokens",)
_MISSING = object()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists -> {"a.b": value, "stages[0].seq_length": value}."""
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    if isinstance(tree, list) and tree and all(isinstance(item, dict) for item in tree):
        flat = {f"{prefix}": f"<{len(tree)} entries>"}
        for index, item in enumerate(tree):
            flat.update(flatten(item, f"{prefix}[{index}]"))
        return flat
    return {prefix: tree}


def _section_of(key: str, sections: tuple[str, ...] | list[str]) -> bool:
    return any(key == s or key.startswith(s + ".") or key.startswith(s + "[") for s in sections)


def is_protected(key: str) -> bool:
    return _section_of(key, PROTECTED) and not key.endswith(_UNPROTECTED_INSIDE_PROTECTED)


def _absolute_paths(tree: dict) -> dict:
    """A copy with path keys absolute: checkpoints of older versions recorded relative paths,
    relative to the directory the run was launched from (taken to be this one)."""
    from megatron_harpe.config_paths import resolve_paths

    return resolve_paths(copy.deepcopy(tree), Path.cwd())


def compare_configs(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs: key -> (saved, current); a key missing on one side
    (a config written by an older version) counts only if the other side is not its default."""
    old, new = flatten(_absolute_paths(saved)), flatten(_absolute_paths(current))
    changes = {}
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, _MISSING), new.get(key, _MISSING)
        if before is _MISSING or after is _MISSING:
            if not is_protected(key):
                continue  # a key added since the checkpoint: its default is what the old run did
        if before != after:
            changes[key] = (before, after)
    return changes


def _show(value: Any) -> str:
    return "(absent)" if value is _MISSING else repr(value)


def check_resume_config(
    saved: dict, current: dict, allowed: str = "", log: Callable[[str], None] = print, where: str = "the checkpoint"
) -> None:
    """Raise ValueError listing the protected changes not in `allowed` (comma-separated keys or
    sections); log one line with the changes that are let through."""
    allowed_keys = [key.strip() for key in allowed.split(",") if key.strip()]
    changes = compare_configs(saved, current)
    changes = {key: change for key, change in changes.items() if not key.startswith("checkpoint.allow_config_change")}
    refused = {
        key: change for key, change in changes.items() if is_protected(key) and not _section_of(key, allowed_keys)
    }
    if refused:
        diff = "; ".join(f"{key}: {_show(before)} -> {_show(after)}" for key, (before, after) in refused.items())
        names = ",".join(refused)
        raise ValueError(
            f"resuming {where} with a config that changes the model or the data order: {diff}. "
            f"Restore the saved values, or start a new checkpoint.save, or accept the change with "
            f"--checkpoint.allow_config_change {names}"
        )
    if changes:
        listed = ", ".join(f"{key} {_show(before)} -> {_show(after)}" for key, (before, after) in changes.items())
        log(f"config changes since {where}: {listed}")
