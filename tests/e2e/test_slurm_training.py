"""pretrain_harpe.py started by the Slurm launcher under fake Slurm variables (one node, 2 CPU
processes, context parallelism 2): it trains, and a requeued job resumes from its checkpoint.

    python -m pytest tests/e2e/test_slurm_training.py -q            # launch + requeue (~30 s + data)
    python -m pytest tests/e2e/test_slurm_training.py -q -m slow    # preempted mid-run, then requeued

The demo corpus is prepared once per session and shared by the tests.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_harpe.checkpointing.checkpoint import find_latest_checkpoint
from megatron_harpe.parallel import free_port

REPO = Path(__file__).resolve().parents[2]
TOKENS_PER_STEP = 4 * 512  # global batch 4 x demo sequence length 512


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory) -> Path:
    from megatron_harpe.data.demo_corpus import prepare_demo_data

    workdir = tmp_path_factory.mktemp("slurm_demo_data")
    prepare_demo_data(workdir)
    return workdir


def _slurm_env(restart_count: int) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "TORCHELASTIC"))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(
        SLURM_JOB_ID="31337",
        SLURM_JOB_NAME="harpe-demo",
        SLURM_JOB_NODELIST="localhost",
        SLURM_NNODES="1",
        SLURM_NODEID="0",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_RESTART_COUNT=str(restart_count),
        OMP_NUM_THREADS="1",
    )
    return env


def _command(run_dir: Path, demo_workdir: Path, steps: int, save_interval: int) -> list[str]:
    return [
        sys.executable, "-m", "megatron_harpe.launch", "--runs-dir", str(run_dir / "runs"),
        "--rdzv-port", str(free_port()), "--",
        str(REPO / "pretrain_harpe.py"), "--config", str(REPO / "configs" / "demo_cpu.yaml"),
        "--train.train_tokens", str(steps * TOKENS_PER_STEP),
        "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.warmup_steps", "0",
        "--checkpoint.save", str(run_dir / "checkpoints"), "--checkpoint.save_interval", str(save_interval),
        "--data.demo_workdir", str(demo_workdir),
        "--logging.log_interval", "1", "--logging.tensorboard_dir", "null",
    ]  # fmt: skip


def _run(command: list[str], restart_count: int, cwd: Path) -> str:
    result = subprocess.run(
        command, env=_slurm_env(restart_count), cwd=cwd, capture_output=True, text=True, timeout=400
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return log


def _logged_steps(log: str, total: int) -> list[int]:
    return [int(step) for step in re.findall(rf"step (\d+)/{total} \|", log)]


@pytest.mark.slow  # CI time; tests/slurm requeue the real sbatch scripts
def test_launch_trains_then_requeue_resumes(tmp_path: Path, demo_workdir: Path) -> None:
    # a 2-step job that checkpoints at its end (each save starts a writer process: keep them few)
    first = _run(_command(tmp_path, demo_workdir, steps=2, save_interval=0), 0, tmp_path)
    assert "starting; 2 processes here, world size 2" in first
    assert _logged_steps(first, 2) == [1, 2]
    assert find_latest_checkpoint(tmp_path / "checkpoints").name == "iter_0000002"

    # requeue: the same job id with SLURM_RESTART_COUNT=1 and a longer budget continues at step 3
    second = _run(_command(tmp_path, demo_workdir, steps=4, save_interval=0), 1, tmp_path)
    assert "requeued run, restart 1" in second
    assert re.search(r"resumed from \S*iter_0000002 at step 2", second), second[-3000:]
    assert _logged_steps(second, 4) == [3, 4]
    assert find_latest_checkpoint(tmp_path / "checkpoints").name == "iter_0000004"

    job_dir = tmp_path / "runs" / "demo_cpu" / "slurm-31337"
    assert {p.name for p in job_dir.glob("launch-*.json")} == {
        "launch-restart0-node0.json",
        "launch-restart1-node0.json",
    }
    rank_logs = list((job_dir / "restart-1" / "node-0").rglob("stdout.log"))
    assert len(rank_logs) == 2, "one log file per rank"
    assert any("resumed from" in path.read_text() for path in rank_logs)


@pytest.mark.slow
def test_preempted_job_resumes_after_requeue(tmp_path: Path, demo_workdir: Path) -> None:
    total = 40
    command = _command(tmp_path, demo_workdir, steps=total, save_interval=2)
    latest_file = tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt"

    # preemption: Slurm sends SIGTERM to the job step (here: torchrun, which the launcher became)
    job = subprocess.Popen(command, env=_slurm_env(0), cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not latest_file.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.poll() is None, "the job ended before its first checkpoint"
    job.send_signal(signal.SIGTERM)
    log, _ = job.communicate(timeout=120)
    assert job.returncode != 0, "a preempted job must not look successful"
    saved = int(find_latest_checkpoint(tmp_path / "checkpoints").name.removeprefix("iter_"))
    assert 2 <= saved < total, log[-3000:]

    # requeue: the identical command, SLURM_RESTART_COUNT=1
    second = _run(command, 1, tmp_path)
    assert f"at step {saved}" in second and "resumed from" in second
    assert _logged_steps(second, total) == list(range(saved + 1, total + 1))
    assert find_latest_checkpoint(tmp_path / "checkpoints").name == f"iter_{total:07d}"
