"""Fault: two runs on one checkpoint directory (on main the second deleted the first's save in
progress and both lost steps). Now the directory is locked by the run that writes it.

    python -m pytest tests/faults/test_checkpoint_lock.py -q
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron_harpe.checkpointing import run_lock
from megatron_harpe.checkpointing.run_lock import CheckpointDirLocked, RunLock


@pytest.fixture()
def other_run(tmp_path: Path):
    """A live process on this host holding the lock of `tmp_path / 'ckpt'`."""
    save_dir = tmp_path / "ckpt"
    script = textwrap.dedent(f"""
        import sys, time
        from megatron_harpe.checkpointing.run_lock import RunLock
        RunLock({str(save_dir)!r}).acquire()
        print("locked", flush=True)
        time.sleep(300)
    """)
    env = {**os.environ, "SLURM_JOB_ID": "4242"}
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout.readline().strip() == "locked"
        yield save_dir, process.pid
    finally:
        process.kill()
        process.wait()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_second_run_is_refused_with_the_holders_host_pid_and_job(other_run) -> None:
    save_dir, pid = other_run
    with pytest.raises(
        CheckpointDirLocked,
        match=rf"{save_dir} is in use by another run \(host "
        rf"{socket.gethostname()} pid {pid} \(Slurm job 4242\)",
    ):
        RunLock(save_dir).acquire()
    with pytest.raises(CheckpointDirLocked, match=f"pid {pid}"):
        run_lock.check_not_locked_by_other(save_dir)  # what save_checkpoint asks first


def test_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path: Path) -> None:
    dead = _dead_pid()
    (tmp_path / run_lock.LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead}))
    lock = RunLock(tmp_path).acquire()
    try:
        assert lock.messages == [
            f"took over the stale lock of {tmp_path} from host {socket.gethostname()} pid {dead}, "
            f"started ?: process {dead} on this host is gone"
        ]
        assert json.loads((tmp_path / run_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
        run_lock.check_not_locked_by_other(tmp_path)  # our own lock does not stop our saves
    finally:
        lock.release()
    assert not (tmp_path / run_lock.LOCK_FILE).exists()


def test_lock_from_another_host_is_stale_only_after_its_heartbeat_stops(tmp_path: Path) -> None:
    lock_path = tmp_path / run_lock.LOCK_FILE
    lock_path.write_text(json.dumps({"host": "node-17", "pid": 1234}))
    with pytest.raises(CheckpointDirLocked, match="host node-17 pid 1234"):
        RunLock(tmp_path).acquire()
    old = time.time() - 11 * 60
    os.utime(lock_path, (old, old))
    lock = RunLock(tmp_path).acquire()
    assert lock.messages and "heartbeat is 11 min old" in lock.messages[0]
    lock.release()


def test_a_requeued_slurm_job_takes_over_its_own_lock_from_another_node(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / run_lock.LOCK_FILE).write_text(json.dumps({"host": "node-3", "pid": 99, "slurm_job_id": "777"}))
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    with pytest.raises(CheckpointDirLocked, match=r"host node-3 pid 99 \(Slurm job 777\)"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    lock = RunLock(tmp_path).acquire()
    assert "this Slurm job's own lock (777)" in lock.messages[0]
    lock.release()


def test_heartbeat_keeps_the_lock_fresh(tmp_path: Path) -> None:
    lock = RunLock(tmp_path, heartbeat_seconds=0.05).acquire()
    old = time.time() - 3600
    os.utime(lock.path, (old, old))
    time.sleep(0.5)
    assert time.time() - lock.path.stat().st_mtime < 5
    lock.release()


def test_leftovers_of_killed_saves_are_removed_once_the_lock_is_held(tmp_path: Path) -> None:
    for name in ("iter_0000004", "iter_0000006.tmp", "iter_0000002.deleting"):
        (tmp_path / name / "dist").mkdir(parents=True)

    class Ctx:
        rank, world_size = 0, 1

    lines: list[str] = []
    with run_lock.hold_checkpoint_dir(tmp_path, Ctx(), lines.append):
        assert sorted(p.name for p in tmp_path.iterdir()) == [run_lock.LOCK_FILE, "iter_0000004"]
    assert lines == [
        f"removed 2 leftover(s) of an interrupted save in {tmp_path}: iter_0000002.deleting, iter_0000006.tmp"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000004"]


def _save_into_locked_dir(save_dir: str) -> str:
    from megatron_harpe import parallel
    from megatron_harpe.checkpointing.checkpoint import save_checkpoint
    from megatron_harpe.config import ModelConfig
    from megatron_harpe.model import build_model
    from megatron_harpe.position.config import PositionConfig

    parallel.initialize(1, 1)
    model = build_model(
        ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64, vocab_size=64),
        PositionConfig(),
    )
    try:
        save_checkpoint(save_dir, 7, model=model, config={}, train_state={})
    except CheckpointDirLocked as error:
        return str(error)
    return "saved"


@pytest.mark.distributed
def test_save_into_a_directory_another_run_holds_is_refused_and_its_save_in_progress_kept(other_run) -> None:
    from megatron_harpe import parallel

    save_dir, pid = other_run
    in_progress = save_dir / "iter_0000007.tmp" / "dist"  # the other run is writing step 7
    in_progress.mkdir(parents=True)
    (message,) = parallel.run_on_ranks(_save_into_locked_dir, 1, str(save_dir))
    assert f"pid {pid}" in message and "in use by another run" in message
    assert in_progress.is_dir() and not (save_dir / "iter_0000007").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_a_second_training_run_on_a_live_runs_checkpoint_dir_is_refused(tmp_path: Path, demo_data) -> None:
    """As tried on main: a torchrun training, and a second launch on the same checkpoint.save."""
    import signal as signals

    from test_rank_failures import ROOT, _start_torchrun, _workers

    process, _ = _start_torchrun(tmp_path, demo_data, timeout_minutes=5)
    try:
        holder = json.loads((tmp_path / "ckpt" / run_lock.LOCK_FILE).read_text())["pid"]
        assert holder in _workers(process.pid)  # rank 0 of the live run holds the directory
        second = subprocess.run(
            [sys.executable, str(ROOT / "pretrain_harpe.py"), "--config", str(tmp_path / "run.yaml")],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    finally:
        os.killpg(process.pid, signals.SIGKILL)
        process.wait()
    assert second.returncode != 0
    assert f"is in use by another run (host {socket.gethostname()} pid {holder}" in second.stderr, second.stderr[-3000:]
    assert process.returncode == -signals.SIGKILL  # the first run was still training when the second gave up
