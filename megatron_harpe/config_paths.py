"""Paths in a run config: where a relative path points, decided once, recorded absolute.

    tree = resolve_paths(yaml_tree, base=Path("configs"))        # written in configs/x.yaml
    tree = resolve_paths(tree_with_overrides, base=Path.cwd())   # typed as --section.key overrides

The rule: a relative path written in a config file is relative to the directory of that
file; a relative path given on the command line is relative to the current directory (where
it was typed). Every path key ends up absolute (`~` expanded), and that absolute path is what
the trainer prints, saves with each checkpoint, and uses.

Why the config file's directory, not the current directory: a config names the same
checkpoints and data wherever it is launched from. With paths relative to the current
directory, a relative `checkpoint.save` launched from another directory started a new run
at step 0 beside an unfinished one (and data or tokenizer paths broke the same way). Configs
in this repository therefore write `../runs/...` for outputs at the repository root.

Configs written for the earlier rule keep working or fail loudly, never silently: when a
relative path means another place under the new rule and only the old place holds what the
run needs (a dataset, a tokenizer, pretrained weights, or checkpoints to resume), loading the
config stops with one line naming both places.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PATH_KEYS = (
    ("data", "prefixes"), ("data", "loss_mask_prefixes"), ("data", "tokenizer"), ("data", "demo_workdir"),
    ("data", "cache_dir"), ("checkpoint", "save"), ("checkpoint", "pretrained"), ("checkpoint", "stop_file"),
    ("logging", "tensorboard_dir"),
)  # fmt: skip
"""(section, key) of every config value that is a filesystem path (or a list of them)."""
_INPUTS = {("data", "prefixes"), ("data", "loss_mask_prefixes"), ("data", "tokenizer"), ("checkpoint", "pretrained")}


def absolute(path: str, base: Path) -> str:
    """`path` made absolute against `base` (after `~` expansion), normalised, as a string."""
    expanded = Path(os.path.expanduser(path))
    return os.path.normpath(expanded if expanded.is_absolute() else base / expanded)


def _map(value: Any, convert) -> Any:
    if isinstance(value, str) and value:
        return convert(value)
    if isinstance(value, list):
        return [convert(item) if isinstance(item, str) and item else item for item in value]
    return value


def resolve_paths(
    tree: dict[str, Any], base: Path, *, source: str | None = None, overridden: set[str] = frozenset()
) -> dict[str, Any]:
    """Make every path key of a config tree absolute against `base` (in place; returns it).
    `source`: the config file the tree was read from, to refuse a relative path whose meaning
    changed with the rule (see module docstring), except for keys the command line replaces
    (`overridden`, dotted); None for command-line overrides."""
    base = Path(os.path.abspath(base))
    for section, key in PATH_KEYS:
        values = tree.get(section)
        if not isinstance(values, dict) or key not in values:
            continue
        if source is not None and f"{section}.{key}" not in overridden:
            _map(values[key], lambda path, section=section, key=key: _refuse_moved(section, key, path, base, source))
        values[key] = _map(values[key], lambda path: absolute(path, base))
    return tree


def _refuse_moved(section: str, key: str, path: str, base: Path, source: str) -> str:
    """Raise if `path` (relative, from `source`) means something else than it did when
    relative paths followed the current directory, and only the old place holds the data."""
    new, old = Path(absolute(path, base)), Path(absolute(path, Path.cwd()))
    if new == old or Path(os.path.expanduser(path)).is_absolute():
        return path
    if (section, key) in _INPUTS:
        moved = _present(old, key) and not _present(new, key)
        what = "the file it names"
    elif (section, key) == ("checkpoint", "save"):
        moved = _holds_checkpoints(old) and not _holds_checkpoints(new)
        what = "checkpoints of an earlier run"
    else:
        moved = False
    if moved:
        raise ValueError(
            f"{section}.{key}: {path!r} in {source} means {new} (relative paths in a config file resolve against "
            f"its directory), but {old} (relative to the current directory, the rule before) holds {what}: write "
            f"{section}.{key} as {old} in the config, or as a path relative to {base}"
        )
    return path


def _present(path: Path, key: str) -> bool:
    if key.endswith("prefixes"):
        return Path(f"{path}.bin").is_file() or Path(f"{path}.idx").is_file()
    return path.exists()


def _holds_checkpoints(path: Path) -> bool:
    if not path.is_dir():
        return False
    return (path / "latest_checkpointed_iteration.txt").is_file() or any(path.glob("iter_*"))
