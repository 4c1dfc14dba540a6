"""The repository's sbatch scripts, unchanged, under a real Slurm (tests/slurm/conftest.py says
which): they train, checkpoint and write their logs where they say; the 7B preset's script
runs the demo through its HARPE_CONFIG knob and survives its early USR1 warning; a wrong config
fails the job with our one-line error; two tasks of one job, each acting as a node, train
together through the launcher's multi-node path.

    python -m pytest -q tests/slurm            # as root with slurm-wlm and munge installed; ~3 min
"""

from __future__ import annotations

import json
import re

import pytest
from slurm_jobs import STEPS, assert_same_training, logged_steps, submit_dir, tiny_demo_args

from megatron_harpe.checkpointing.checkpoint import find_latest_checkpoint

pytestmark = pytest.mark.slurm


def test_train_sbatch_trains_checkpoints_and_logs_where_it_says(uninterrupted) -> None:
    job, log = uninterrupted.job, uninterrupted.log
    output = job.output(log)
    assert uninterrupted.info["JobState"] == "COMPLETED" and uninterrupted.info["ExitCode"] == "0:0", output[-3000:]
    assert sorted(uninterrupted.steps) == list(range(1, STEPS + 1)), output[-3000:]
    assert f"[slurm] job {job.id} (harpe) restart 0: 1 node(s) x 2 GPU(s)" in output
    assert "2 processes here, world size 2" in output
    assert find_latest_checkpoint(job.workdir / "ckpt").name == f"iter_{STEPS:07d}"
    job_logs = job.workdir / "runs" / "demo_cpu" / f"slurm-{job.id}"  # the per-rank logs of train.sbatch
    record = json.loads((job_logs / "launch-restart0-node0.json").read_text())
    assert record["world_size"] == 2 and record["job_id"] == job.id
    rank_logs = sorted((job_logs / "restart-0" / "node-0").rglob("stdout.log"))
    assert len(rank_logs) == 2 and f"step {STEPS}/{STEPS}" in "".join(p.read_text() for p in rank_logs)
    assert not list(job.workdir.glob(".harpe_stop_*")), "the stop file is cleaned up"


def test_a_wrong_config_fails_the_job_with_one_line(slurm, demo_data, tmp_path) -> None:
    workdir = submit_dir(tmp_path)
    job = slurm.submit(workdir, "scripts/slurm/train.sbatch",
                       ["configs/demo_cpu.yaml", *tiny_demo_args(demo_data, workdir / "ckpt"),
                        "--parallel.tensor", "3"])  # fmt: skip
    log = f"slurm-harpe-{job.id}.out"
    info = job.wait_until_finished(log)
    output = job.output(log)
    errors = [line for line in output.splitlines() if "error:" in line and "srun: error" not in line]
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", output
    assert len(errors) == 1 and "parallel.tensor=3 does not divide" in errors[0], output
    assert "Traceback" not in output and "ChildFailedError" not in output, output
    assert "[launch] pretrain_harpe.py failed: rank 0 exited with code 2 first" in output


def test_7b_script_on_the_demo_saves_on_usr1_requeues_and_resumes_exactly(slurm, demo_data, uninterrupted, tmp_path):
    """`#SBATCH --signal=B:USR1@600` sends USR1 to the batch shell; `scancel --signal=USR1 --batch`
    sends the same thing now. The script makes the trainer save through its stop file and requeues
    the job; the requeued job resumes from that step."""
    workdir = submit_dir(tmp_path)
    job = slurm.submit(workdir, "scripts/slurm/llama2_7b_128k_harpe.sbatch",
                       tiny_demo_args(demo_data, workdir / "ckpt"),
                       options=["--nodes=1"], HARPE_CONFIG="configs/demo_cpu.yaml")  # fmt: skip
    log = f"slurm-llama2_7b_128k_harpe-{job.id}.out"  # where the script's --output says
    job.wait_for_line(log, "step 3/")
    slurm.run("scancel", "--signal=USR1", "--batch", job.id)
    job.wait_until_requeued(log, restarts=1)
    stopped = re.search(r"stopping after step (\d+) \(\S*\.harpe_stop_\d+ appeared\)", job.output(log))
    assert stopped and "trainer saved and exited: requeueing job" in job.output(log), job.output(log)[-3000:]
    saved = int(stopped.group(1))
    assert find_latest_checkpoint(workdir / "ckpt").name == f"iter_{saved:07d}"

    job.release()
    info = job.wait_until_finished(log)
    output = job.output(log)  # both attempts (--open-mode=append)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", output[-3000:]
    assert "requeued run, restart 1: resuming" in output and f"at step {saved}" in output
    assert_same_training(logged_steps(output), uninterrupted.steps, slurm.tolerance)
    job_logs = workdir / "runs" / "demo_cpu" / f"slurm-{job.id}"
    assert {p.name for p in job_logs.glob("launch-*.json")} == {
        "launch-restart0-node0.json",
        "launch-restart1-node0.json",
    }


TWO_NODES = """#!/usr/bin/env bash
#SBATCH --ntasks=2
#SBATCH --output=slurm-%x-%j.out
# Two tasks on one host, each told it is a node of a two-node job, as srun tells the tasks of a
# real multi-node job (and given a GPU of its own): the launcher on "node 0" hosts the
# rendezvous, "node 1" joins it.
set -euo pipefail
srun --ntasks=2 --gpus-per-node=2 bash -c 'export SLURM_NNODES=2 SLURM_NODEID=$SLURM_PROCID \\
    SLURM_JOB_NODELIST="$SLURMD_NODENAME,$SLURMD_NODENAME" CUDA_VISIBLE_DEVICES=$SLURM_LOCALID
  exec "$PYTHON" -m megatron_harpe.launch --nproc-per-node 1 -- \
pretrain_harpe.py --config configs/demo_cpu.yaml "$@"' \\
  two-nodes "$@"
"""


def test_two_tasks_acting_as_two_nodes_train_together(slurm, demo_data, uninterrupted, tmp_path) -> None:
    workdir = submit_dir(tmp_path)
    (workdir / "two_nodes.sbatch").write_text(TWO_NODES)
    job = slurm.submit(workdir, "two_nodes.sbatch", tiny_demo_args(demo_data, workdir / "ckpt"),
                       options=["--cpus-per-task=1"])  # fmt: skip
    log = f"slurm-two_nodes.sbatch-{job.id}.out"
    info = job.wait_until_finished(log)
    output = job.output(log)
    assert info["JobState"] == "COMPLETED", output[-3000:]
    assert "node 0/2" in output and "node 1/2" in output and "world size 2" in output
    # one process per "node", context parallel across them: the same losses as 2 processes on 1 node
    assert_same_training(logged_steps(output), uninterrupted.steps, slurm.tolerance)
    job_logs = workdir / "runs" / "demo_cpu" / f"slurm-{job.id}"
    records = [json.loads((job_logs / f"launch-restart0-node{n}.json").read_text()) for n in (0, 1)]
    assert [r["node_rank"] for r in records] == [0, 1] and all(r["world_size"] == 2 for r in records)
    assert len(list((job_logs / "restart-0").rglob("stdout.log"))) == 2
