"""Checkpoint directory logic that needs no process group: finding the latest complete
checkpoint, pruning old iterations, cleaning crash debris.

    python -m pytest tests/unit/test_checkpoint_layout.py -q

Saving and loading real weights is tested in tests/distributed/test_checkpoint*.py.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import Metadata

from megatron_harpe.checkpointing import checkpoint
from megatron_harpe.checkpointing.checkpoint import (
    find_latest_checkpoint,
    iteration_dir,
    read_checkpoint_config,
    read_train_state,
)


def _fake_iteration(root: Path, iteration: int, suffix: str = "") -> Path:
    """An iteration dir that passes checkpoint_check (no tensors: empty dist metadata)."""
    path = root / (iteration_dir(root, iteration).name + suffix)
    (path / "dist").mkdir(parents=True)
    (path / "dist" / "metadata.json").write_text("{}")
    (path / "dist" / "common.pt").write_bytes(b"")
    with open(path / "dist" / ".metadata", "wb") as handle:
        pickle.dump(Metadata(state_dict_metadata={}, storage_data={}), handle)
    (path / checkpoint.TRAIN_STATE_FILE).write_text(json.dumps({"iteration": iteration}))
    (path / checkpoint.CONFIG_FILE).write_text(f"model:\n  num_layers: {iteration}\n")
    return path


def test_no_checkpoint(tmp_path: Path) -> None:
    assert find_latest_checkpoint(tmp_path / "missing") is None
    assert find_latest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        read_checkpoint_config(tmp_path)


def test_latest_file_wins_over_newer_dirs(tmp_path: Path) -> None:
    for iteration in (3, 10, 12):
        _fake_iteration(tmp_path, iteration)
    _fake_iteration(tmp_path, 20, suffix=".tmp")  # an unfinished save
    (tmp_path / checkpoint.LATEST_FILE).write_text("10\n")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "iter_0000010"
    assert read_train_state(tmp_path)["iteration"] == 10
    assert read_checkpoint_config(tmp_path) == {"model": {"num_layers": 10}}


def test_iteration_dir_is_its_own_checkpoint(tmp_path: Path) -> None:
    path = _fake_iteration(tmp_path, 7)
    assert find_latest_checkpoint(path) == path


def test_falls_back_to_newest_complete_dir(tmp_path: Path) -> None:
    _fake_iteration(tmp_path, 4)
    _fake_iteration(tmp_path, 8)
    _fake_iteration(tmp_path, 9, suffix=".tmp")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "iter_0000008"  # no latest file
    (tmp_path / checkpoint.LATEST_FILE).write_text("99\n")  # names a dir that is gone
    assert find_latest_checkpoint(tmp_path) == tmp_path / "iter_0000008"


def test_garbage_latest_file_is_an_error(tmp_path: Path) -> None:
    _fake_iteration(tmp_path, 1)
    (tmp_path / checkpoint.LATEST_FILE).write_text("release\n")
    with pytest.raises(ValueError, match="iteration number"):
        find_latest_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "existing, current, keep_last, remaining",
    [
        ([1, 2, 3, 4, 5], 5, 2, [4, 5]),
        ([1, 2, 3, 4, 5], 5, 1, [5]),
        ([1, 2, 3], 3, 5, [1, 2, 3]),
        ([1, 2, 6, 7], 3, 2, [2, 6, 7]),  # newer dirs from an abandoned run are not touched
    ],
)
def test_keep_last(tmp_path: Path, existing: list[int], current: int, keep_last: int, remaining: list[int]) -> None:
    for iteration in existing + ([current] if current not in existing else []):
        _fake_iteration(tmp_path, iteration)
    checkpoint._delete_old_iterations(tmp_path, current, keep_last)
    expected = sorted(set(remaining) | {current})
    assert sorted(int(p.name[5:]) for p in tmp_path.iterdir()) == expected


def test_crash_debris_is_removed_but_complete_dirs_stay(tmp_path: Path) -> None:
    _fake_iteration(tmp_path, 1)
    _fake_iteration(tmp_path, 2, suffix=".tmp")
    _fake_iteration(tmp_path, 3, suffix=".deleting")
    _fake_iteration(tmp_path, 4, suffix=".tmp")  # maybe another run's save: the run lock's business
    (tmp_path / "notes.tmp").write_text("not ours")
    checkpoint._remove_incomplete(tmp_path, iteration_dir(tmp_path, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "iter_0000004.tmp", "notes.tmp"]


def test_saving_needs_a_process_group(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="parallel.initialize"):
        checkpoint.save_checkpoint(tmp_path, 1, model=torch.nn.Linear(2, 2), config={}, train_state={})
