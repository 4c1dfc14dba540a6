"""The sbatch scripts in scripts/slurm/, run by bash with fake `srun` and `scontrol` on PATH.

    python -m pytest tests/unit/test_launch_sbatch.py -q

Checks what the scripts hand to srun (one launcher per node, the config and overrides passed
through, srun's exit status returned), that a USR1 before the time limit makes the trainer save
and exit through its stop file and then requeues the job (or requeues it anyway after a grace
period), and
that the paper's example asks Slurm for exactly the processes its config's layout needs.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from megatron_harpe.config import load_config

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "scripts" / "slurm"

FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$FAKE_DIR/srun.args"
echo $$ > "$FAKE_DIR/srun.pid"
if [[ -n "${FAKE_SRUN_TRAINER:-}" ]]; then  # a trainer that saves and exits when its stop file appears
    args=("$@")
    for i in "${!args[@]}"; do [[ "${args[$i]}" == --checkpoint.stop_file ]] && stop_file=${args[$((i + 1))]}; done
    while [[ ! -e "$stop_file" ]]; do sleep 0.05; done
    rm "$stop_file"
    echo "fake trainer: saved and exited"
    exit 0
fi
if [[ -n "${FAKE_SRUN_BLOCK:-}" ]]; then
    trap 'kill $SLEEPER 2>/dev/null; exit 143' TERM
    sleep 60 & SLEEPER=$!
    wait $SLEEPER
fi
exit "${FAKE_SRUN_EXIT:-0}"
"""
# Slurm stops the job's steps when it requeues it: the fake does the same to the fake srun.
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$@" >> "$FAKE_DIR/scontrol.log"
kill -TERM "$(cat "$FAKE_DIR/srun.pid")" 2>/dev/null || true
"""


@pytest.fixture()
def fake_slurm(tmp_path: Path) -> dict[str, str]:
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        path = tmp_path / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env.update(
        PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
        FAKE_DIR=str(tmp_path),
        SLURM_SUBMIT_DIR=str(REPO),
        SLURM_JOB_ID="777",
        SLURM_JOB_NAME="harpe",
        SLURM_JOB_NODELIST="gpu[1-2]",
        SLURM_NNODES="2",
        SLURM_GPUS_ON_NODE="4",
        SLURM_CPUS_PER_TASK="16",
    )
    return env


def _srun_args(fake_dir: str) -> list[str]:
    return (Path(fake_dir) / "srun.args").read_text().split("\0")[:-1]


def test_train_sbatch_runs_one_launcher_per_node(fake_slurm: dict[str, str], tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(SLURM_DIR / "train.sbatch"), "configs/demo_cpu.yaml", "--train.lr", "1e-4"],
        env=fake_slurm, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    args = _srun_args(fake_slurm["FAKE_DIR"])
    assert {"--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4", "--cpus-per-task=16"} <= set(args)
    launcher = args.index("-m")
    assert args[launcher : launcher + 5] == ["-m", "megatron_harpe.launch", "--nproc-per-node", "4", "--"]
    assert args[launcher + 5 :] == [
        "pretrain_harpe.py",
        "--config",
        "configs/demo_cpu.yaml",
        "--checkpoint.stop_file",
        str(REPO / ".harpe_stop_777"),
        "--train.lr",
        "1e-4",
    ]
    assert "2 node(s) x 4 GPU(s)" in result.stdout


def test_exit_status_of_srun_is_the_job_status(fake_slurm: dict[str, str], tmp_path: Path) -> None:
    fake_slurm["FAKE_SRUN_EXIT"] = "3"
    result = subprocess.run(
        ["bash", str(SLURM_DIR / "train.sbatch"), "configs/demo_cpu.yaml"],
        env=fake_slurm, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 3


def test_container_image_goes_to_pyxis(fake_slurm: dict[str, str], tmp_path: Path) -> None:
    fake_slurm["CONTAINER_IMAGE"] = "registry#megatron_harpe:gpu"
    subprocess.run(
        ["bash", str(SLURM_DIR / "train.sbatch"), "configs/demo_cpu.yaml"],
        env=fake_slurm, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "--container-image=registry#megatron_harpe:gpu" in _srun_args(fake_slurm["FAKE_DIR"])


def _start_and_signal(fake_slurm: dict[str, str], tmp_path: Path) -> tuple[str, int]:
    """Run the paper's sbatch script, send USR1 once srun runs; (output, exit status)."""
    job = subprocess.Popen(
        ["bash", str(SLURM_DIR / "llama2_7b_128k_harpe.sbatch")],
        env=fake_slurm, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    pid_file = tmp_path / "srun.pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_file.exists(), "srun was never started"
    job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@600` delivers
    output, _ = job.communicate(timeout=30)
    return output, job.returncode


def test_usr1_before_the_time_limit_saves_then_requeues(fake_slurm: dict[str, str], tmp_path: Path) -> None:
    fake_slurm["FAKE_SRUN_TRAINER"] = "1"
    output, status = _start_and_signal(fake_slurm, tmp_path)
    assert "fake trainer: saved and exited" in output and "trainer saved and exited: requeueing job 777" in output
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "777"]
    assert status == 0 and not (REPO / ".harpe_stop_777").exists()


def test_a_trainer_that_does_not_stop_in_time_is_requeued_anyway(fake_slurm: dict[str, str], tmp_path: Path) -> None:
    fake_slurm.update(FAKE_SRUN_BLOCK="1", STOP_GRACE="1")
    output, status = _start_and_signal(fake_slurm, tmp_path)
    assert "still running 1s after USR1: requeueing job 777 now" in output
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "777"]
    assert status == 143, "the batch script ends with the stopped step's status"
    assert not (REPO / ".harpe_stop_777").exists()


def _sbatch_directives(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", path.read_text(), flags=re.MULTILINE))


def test_paper_example_requests_the_configs_layout() -> None:
    directives = _sbatch_directives(SLURM_DIR / "llama2_7b_128k_harpe.sbatch")
    world_size = int(directives["nodes"]) * int(directives["gpus-per-node"])
    config_path = re.search(r"(configs/\S+\.yaml)", (SLURM_DIR / "llama2_7b_128k_harpe.sbatch").read_text().split(
        "run_on_nodes.sh")[-1]).group(1)  # fmt: skip
    cfg = load_config(REPO / config_path).validate(world_size=world_size, require_backend=False)
    data_parallel = world_size // (cfg.parallel.tensor * cfg.parallel.context)
    assert (world_size, cfg.parallel.tensor, cfg.parallel.context, data_parallel) == (32, 4, 4, 2)
    assert cfg.parallel.tensor <= int(directives["gpus-per-node"]), "tensor parallelism stays inside a node"
    assert "signal" in directives and directives["signal"].startswith("B:USR1@")


@pytest.mark.parametrize("script", ["train.sbatch", "llama2_7b_128k_harpe.sbatch"])
def test_sbatch_scripts_are_requeueable_with_per_job_logs(script: str) -> None:
    text = (SLURM_DIR / script).read_text()
    assert "#SBATCH --requeue" in text
    directives = _sbatch_directives(SLURM_DIR / script)
    assert "%j" in directives["output"] and directives["open-mode"] == "append"
