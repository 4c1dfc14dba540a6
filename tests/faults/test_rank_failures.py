"""Faults: a frozen rank, a dead launcher. On main a rank stopped with SIGSTOP left the others
waiting in a collective for gloo's 30 min without a word, and workers of a SIGKILLed torchrun
kept training and saving.

    python -m pytest tests/faults/test_rank_failures.py -q            (add -m slow for torchrun runs)

Now collectives time out after parallel.timeout_minutes with a line naming the rank and what it
was doing, and workers exit when their launcher is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from megatron_harpe import parallel
from megatron_harpe.rank_health import CollectiveFailed, CollectiveGuard

ROOT = Path(__file__).parents[2]


def test_guard_names_rank_and_phase_of_a_timed_out_collective() -> None:
    guard = CollectiveGuard(rank=3, timeout_minutes=2)
    guard.phase = "training step 12"
    with pytest.raises(
        CollectiveFailed,
        match=r"^rank 3: a collective during training step 12 failed after waiting up "
        r"to 2 min \(parallel.timeout_minutes\).*Timed out waiting 120000ms",
    ):
        with guard:
            raise RuntimeError(
                "[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 120000ms for recv operation"
            )
    with pytest.raises(RuntimeError, match="^an unrelated bug$"):  # other errors pass unchanged
        with guard:
            raise RuntimeError("an unrelated bug")


def test_front_door_prints_a_failed_collective_on_every_rank_without_traceback(monkeypatch, capsys) -> None:
    """A stuck peer is seen by whichever rank waited: that rank's log must say it, not rank 0's only."""
    from megatron_harpe import cli

    def failing_main(argv):
        raise CollectiveFailed("rank 1: a collective during training step 7 failed after waiting up to 10 min")

    monkeypatch.setenv("RANK", "1")
    assert cli.run(failing_main, []) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: rank 1: a collective during training step 7 failed after waiting up to 10 min"
    assert "Traceback" not in err


def _stuck_peer(timeout_minutes: float, done_marker: str) -> tuple[str, float]:
    ctx = parallel.initialize(1, 1, timeout_minutes=timeout_minutes)
    if ctx.rank == 1:  # frozen: never joins the barrier (until rank 0 has given up)
        deadline = time.monotonic() + 120
        while not os.path.exists(done_marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        return "slept", 0.0
    guard = CollectiveGuard(ctx.rank, timeout_minutes, phase="the test barrier")
    start = time.monotonic()
    try:
        with guard:
            import torch.distributed as dist

            dist.barrier()
    except CollectiveFailed as error:
        return str(error), time.monotonic() - start
    finally:
        Path(done_marker).touch()
    return "barrier passed", time.monotonic() - start


@pytest.mark.distributed
def test_a_rank_that_never_joins_fails_the_collective_within_the_timeout(tmp_path: Path) -> None:
    (message, waited), (slept, _) = parallel.run_on_ranks(_stuck_peer, 2, 0.1, str(tmp_path / "rank0_gave_up"))
    assert slept == "slept"
    assert message.startswith("rank 0: a collective during the test barrier failed after waiting up to 0.1 min")
    assert 5 < waited < 60  # the 6 s timeout, not gloo's default 30 min


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return children


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_worker_exits_when_its_launcher_is_killed(tmp_path: Path) -> None:
    worker = textwrap.dedent("""
        import os, time
        os.environ["TORCHELASTIC_RUN_ID"] = "test"
        from megatron_harpe.rank_health import exit_when_launcher_dies
        assert exit_when_launcher_dies(poll_seconds=0.2)
        print(os.getpid(), flush=True)
        time.sleep(120)
    """)
    launcher = textwrap.dedent(f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {worker!r}])
        time.sleep(120)
    """)
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-c", launcher], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not log.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.2)
    worker_pid = int(log.read_text().split()[0])
    process.kill()
    process.wait()
    deadline = time.monotonic() + 10
    while _alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker_pid)
    assert f"the launcher (pid {process.pid}) is gone; exiting" in log.read_text()


# ------------------------------------------------------------------------ torchrun runs (slow)


def _start_torchrun(tmp_path: Path, demo_data, timeout_minutes: float) -> tuple[subprocess.Popen, Path]:
    config = {
        "model": dict(
            num_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=128,
            vocab_size=4096,
            max_position_embeddings=64,
        ),
        "position": {"type": "harpe", "bases": [300.0, 30000.0]},
        "parallel": {"timeout_minutes": timeout_minutes},
        "data": {"prefixes": [demo_data.prefix], "tokenizer": str(demo_data.tokenizer), "seq_length": 64},
        "train": {"micro_batch_size": 1, "global_batch_size": 2, "train_tokens": 100_000 * 128, "lr": 1e-3},
        "checkpoint": {"save": str(tmp_path / "ckpt"), "save_interval": 1000},
        "logging": {"log_interval": 1},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    log = tmp_path / "run.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                "2",
                "--master-port",
                str(parallel.free_port()),
                str(ROOT / "pretrain_harpe.py"),
                "--config",
                str(tmp_path / "run.yaml"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + 600
    while "step 3/" not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(1)
    return process, log


def _workers(launcher: int) -> list[int]:
    return [
        pid for pid in _children(launcher) if "pretrain_harpe.py" in (Path("/proc") / str(pid) / "cmdline").read_text()
    ]


@pytest.mark.slow
@pytest.mark.distributed
def test_sigstop_on_one_rank_fails_the_job_in_minutes_with_a_clear_line(tmp_path: Path, demo_data) -> None:
    process, log = _start_torchrun(tmp_path, demo_data, timeout_minutes=0.25)
    workers = _workers(process.pid)
    frozen = max(workers)  # one of the two ranks
    os.kill(frozen, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        returncode = process.wait(timeout=300)
        print(f"job ended {time.monotonic() - stopped:.0f} s after SIGSTOP (timeout 15 s)")
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
    output = log.read_text()
    assert returncode != 0
    assert "a collective during training step" in output and "failed after waiting up to 0.25 min" in output, output[
        -3000:
    ]


@pytest.mark.slow
@pytest.mark.distributed
def test_workers_exit_when_torchrun_is_sigkilled(tmp_path: Path, demo_data) -> None:
    process, log = _start_torchrun(tmp_path, demo_data, timeout_minutes=5)
    workers = _workers(process.pid)
    assert len(workers) == 2
    process.kill()
    process.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.5)
    survivors = [pid for pid in workers if _alive(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, log.read_text()[-3000:]
    assert "the launcher" in log.read_text() and "is gone; exiting" in log.read_text()
