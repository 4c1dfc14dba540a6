"""A process killed while writing a checkpoint leaves the previous one as the loadable latest.

    python -m pytest tests/distributed/test_checkpoint_crash.py -q -m slow

A subprocess saves iteration 1, then dies (os._exit, no cleanup) after its tensor files of
iteration 2 are written but before the checkpoint metadata is. A fresh process then loads the
latest checkpoint and saves again over the debris.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_checkpoint_io import CONFIG, _build, _snapshot, _train

from megatron_harpe import parallel
from megatron_harpe.checkpointing import checkpoint
from megatron_harpe.checkpointing.checkpoint import load_checkpoint, save_checkpoint

# slow: the default suite covers crash points with raised exceptions (test_checkpoint_io.py)
pytestmark = [pytest.mark.distributed, pytest.mark.slow]
KILLED = 17


def save_then_die(save_dir: str, expected_path: str) -> None:
    """Runs in the subprocess: world of one, killed in the middle of the second save."""
    gpt, optimizer = _build(1, seed=21)
    _train(gpt, optimizer, steps=1)
    save_checkpoint(save_dir, 1, model=gpt, config=CONFIG, train_state={"n": 1}, optimizer=optimizer)
    torch.save(_snapshot(gpt, optimizer), expected_path)
    _train(gpt, optimizer, steps=1)
    checkpoint._finalize_on_host = lambda *args: os._exit(KILLED)
    save_checkpoint(save_dir, 2, model=gpt, config=CONFIG, train_state={"n": 2}, optimizer=optimizer)


def _load_and_save_again(save_dir: str) -> tuple:
    gpt, optimizer = _build(1, seed=22)
    state = load_checkpoint(save_dir, model=gpt, optimizer=optimizer)
    snapshot = _snapshot(gpt, optimizer)
    save_checkpoint(save_dir, 2, model=gpt, config=CONFIG, train_state={"n": 2}, optimizer=optimizer)
    return state, snapshot, sorted(p.name for p in Path(save_dir).iterdir())


def test_killed_save_keeps_previous_latest(tmp_path: Path) -> None:
    save_dir, expected_path = tmp_path / "ckpt", tmp_path / "expected.pt"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_checkpoint_crash import save_then_die
        save_then_die({str(save_dir)!r}, {str(expected_path)!r})
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log_path = tmp_path / "subprocess.log"
    with open(log_path, "w") as log:
        # own session: the helper processes dist_checkpointing started outlive the killed
        # process, and are ended with it below
        process = subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode = process.wait(timeout=600)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert returncode == KILLED, log_path.read_text()[-3000:]

    assert (save_dir / checkpoint.LATEST_FILE).read_text().strip() == "1"
    debris = save_dir / "iter_0000002.tmp"
    assert any(debris.glob("dist/*.distcp")) and not (debris / "dist" / ".metadata").exists()
    assert not (save_dir / "iter_0000002").exists()

    ((state, restored, listing),) = parallel.run_on_ranks(_load_and_save_again, 1, str(save_dir))
    assert state["n"] == 1 and state["iteration"] == 1
    expected = torch.load(expected_path)
    assert restored.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(restored[key], tensor), key
    assert listing == ["iter_0000001", "iter_0000002", checkpoint.LATEST_FILE]
