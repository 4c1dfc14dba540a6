"""Is a checkpoint iteration intact? Which file is missing or damaged? (No weights are loaded.)

    problem = checkpoint_problem(Path("ckpt/iter_0000012"))    # None, or e.g. "dist/__0_0.distcp is truncated ..."

Checked, cheaply: train_state.json and config.yaml parse; megatron's dist_checkpointing files
(`metadata.json`, `common.pt`) exist; torch's `.metadata` unpickles, and every tensor it
records lies inside a `.distcp` file that is at least that long. `checkpoint.find_latest_checkpoint`
uses this to fall back to the newest intact iteration.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import yaml

TRAIN_STATE_FILE = "train_state.json"
CONFIG_FILE = "config.yaml"
_DIST_FILES = ("metadata.json", "common.pt", ".metadata")


def checkpoint_problem(iteration_dir: Path) -> str | None:
    """What is wrong with the iteration dir (the first problem found), or None if it is intact."""
    state_path = iteration_dir / TRAIN_STATE_FILE
    if not state_path.is_file():
        return f"{TRAIN_STATE_FILE} is missing"
    try:
        state = json.loads(state_path.read_text())
        if not isinstance(state, dict) or "iteration" not in state:
            return f"{TRAIN_STATE_FILE} holds no iteration"
    except (OSError, ValueError) as error:
        return f"{TRAIN_STATE_FILE} is damaged ({error})"
    config_path = iteration_dir / CONFIG_FILE
    if not config_path.is_file():
        return f"{CONFIG_FILE} is missing"
    try:
        if not isinstance(yaml.safe_load(config_path.read_text()), dict):
            return f"{CONFIG_FILE} holds no config"
    except (OSError, yaml.YAMLError) as error:
        return f"{CONFIG_FILE} is damaged ({type(error).__name__})"
    dist_dir = iteration_dir / "dist"
    for name in _DIST_FILES:
        if not (dist_dir / name).is_file():
            return f"dist/{name} is missing"
    try:
        with open(dist_dir / ".metadata", "rb") as handle:
            metadata = pickle.load(handle)  # torch's own format (FileSystemReader.read_metadata)
        storage = metadata.storage_data
    except Exception as error:  # unpickling a damaged file can raise almost anything
        return f"dist/.metadata is damaged ({type(error).__name__}: {error})"
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for relative_path, size in sorted(needed.items()):
        path = dist_dir / relative_path
        try:
            actual = os.path.getsize(path)
        except FileNotFoundError:
            return f"dist/{relative_path} is missing"
        if actual < size:
            return f"dist/{relative_path} is truncated ({actual} of at least {size} bytes)"
    return None
