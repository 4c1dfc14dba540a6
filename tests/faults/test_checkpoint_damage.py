"""Faults: damaged checkpoints and a full disk.

    python -m pytest tests/faults/test_checkpoint_damage.py -q       (add -m slow for a real full tmpfs)

On main a missing train_state.json reported "no checkpoint" although an intact earlier iteration
existed, a truncated .distcp gave hundreds of lines of traceback, and a full disk read
"enforce fail at inline_container.cc:672". Now loading names the damaged file and falls back
to the newest intact iteration, and a failed save is one CheckpointWriteError naming the
directory and the fix, with nothing half-written left behind.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_support import unshare_works

from megatron_harpe import parallel
from megatron_harpe.checkpointing import checkpoint
from megatron_harpe.checkpointing.checkpoint import find_latest_checkpoint

pytestmark = pytest.mark.distributed


def _tiny_model():
    from megatron_harpe.config import ModelConfig
    from megatron_harpe.model import build_model
    from megatron_harpe.position.config import PositionConfig

    parallel.initialize(1, 1)
    return build_model(
        ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64, vocab_size=64),
        PositionConfig(),
    )


def _save(model, save_dir: str, iteration: int) -> None:
    checkpoint.save_checkpoint(save_dir, iteration, model=model, config={"n": iteration}, train_state={"n": iteration})


def _damage_and_load(save_dir: str) -> dict:
    model = _tiny_model()
    for iteration in (1, 2, 3):
        _save(model, save_dir, iteration)
    root = Path(save_dir)
    loaded = {}
    (root / "iter_0000003" / checkpoint.TRAIN_STATE_FILE).unlink()
    loaded["no train_state"] = checkpoint.load_checkpoint(save_dir, model=model)["iteration"]
    shard = next((root / "iter_0000002" / "dist").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    loaded["truncated shard"] = checkpoint.load_checkpoint(save_dir, model=model)["iteration"]
    return loaded


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _save_on_full_disk(save_dir: str) -> str:
    model = _tiny_model()
    _save(model, save_dir, 1)
    checkpoint._save_rng_state = _enospc  # the disk fills up in the middle of the save of step 2
    try:
        _save(model, save_dir, 2)
    except checkpoint.CheckpointWriteError as error:
        return str(error)
    return "saved"


def test_damaged_iterations_are_named_and_skipped_for_the_newest_intact_one(tmp_path: Path, caplog) -> None:
    save_dir = tmp_path / "ckpt"
    (loaded,) = parallel.run_on_ranks(_damage_and_load, 1, str(save_dir))
    assert loaded == {"no train_state": 2, "truncated shard": 1}

    with caplog.at_level(logging.WARNING):
        assert find_latest_checkpoint(save_dir) == save_dir / "iter_0000001"
    assert (
        "damaged checkpoint iter_0000003 (train_state.json is missing); iter_0000002 (dist/__0_0.distcp is truncated"
    ) in caplog.text and "falling back to iter_0000001, the newest intact one" in caplog.text

    (save_dir / "iter_0000001" / "dist" / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(
        ValueError,
        match=r"no intact checkpoint in .*: iter_0000003 \(train_state.json is missing\); "
        r"iter_0000002 \(dist/__0_0.distcp is truncated \(100 of at least \d+ bytes\)\); "
        r"iter_0000001 \(dist/.metadata is damaged",
    ):
        find_latest_checkpoint(save_dir)
    shutil.rmtree(save_dir)
    save_dir.mkdir()
    assert find_latest_checkpoint(save_dir) is None  # "no checkpoint" only when there is none


def test_disk_full_during_a_save_is_one_clear_error_and_leaves_nothing_half_written(tmp_path: Path) -> None:
    save_dir = tmp_path / "ckpt"
    (message,) = parallel.run_on_ranks(_save_on_full_disk, 1, str(save_dir))
    assert message.startswith(f"cannot write checkpoint iteration 2 to {save_dir} (")
    assert "the disk is full: free space there or point checkpoint.save to a larger filesystem" in message
    assert message.endswith("Nothing of it was kept; the newest checkpoint is still iter_0000001")
    assert sorted(p.name for p in save_dir.iterdir()) == ["iter_0000001", checkpoint.LATEST_FILE]
    assert find_latest_checkpoint(save_dir) == save_dir / "iter_0000001"


@pytest.mark.slow
@pytest.mark.skipif(not unshare_works(), reason="needs user+mount namespaces to mount a small tmpfs")
def test_a_really_full_and_a_read_only_filesystem(tmp_path: Path) -> None:
    """A 4 MiB tmpfs (in a private mount namespace) filled up after the first save, then
    remounted read-only."""
    mount = tmp_path / "small"
    mount.mkdir()
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from megatron_harpe import parallel
        from test_checkpoint_damage import _fill_then_save
        if __name__ == "__main__":
            print(json.dumps(parallel.run_on_ranks(_fill_then_save, 1, {str(mount / "ckpt")!r})[0]))
    """)
    (tmp_path / "run.py").write_text(script)
    completed = subprocess.run(
        [
            "unshare",
            "-rm",
            "sh",
            "-c",
            f"mount -t tmpfs -o size=4m tmpfs {mount} && {sys.executable} {tmp_path / 'run.py'}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    full, read_only = report["messages"]["full"], report["messages"]["read-only"]
    assert "the disk is full" in full and "the newest checkpoint is still iter_0000001" in full
    assert "the filesystem is read-only: choose another checkpoint.save" in read_only
    assert report["listing"] == ["iter_0000001", checkpoint.LATEST_FILE]


def _fill_then_save(save_dir: str) -> dict:
    model = _tiny_model()
    _save(model, save_dir, 1)
    filler = Path(save_dir).parent / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    messages = {}
    for case, iteration in (("full", 2), ("read-only", 3)):
        if case == "read-only":
            filler.unlink()
            subprocess.run(["mount", "-o", "remount,ro", str(Path(save_dir).parent)], check=True)
        messages[case] = "saved"
        try:
            _save(model, save_dir, iteration)
        except checkpoint.CheckpointWriteError as error:
            messages[case] = str(error)
    return {"messages": messages, "listing": sorted(p.name for p in Path(save_dir).iterdir())}
