"""Preemption without warning under a real Slurm: the job gets SIGTERM and, KillWait seconds
later, SIGKILL. `scontrol requeue` (what a preempting higher-priority job does to a
`--requeue` job) and `scancel` of a running job: the trainer saves after its current step within
KillWait, and the requeued (or resubmitted) job resumes from that step with the losses of a job
never stopped. The time limit, reached without the early USR1 (`--signal=B:USR1@0` turns it
off): the checkpoint is the last step logged, no step is lost.

    python -m pytest -q tests/slurm/test_preemption_under_slurm.py     # ~4 min, most of it the time limit
"""

from __future__ import annotations

import re

import pytest
from slurm_jobs import assert_same_training, logged_steps, submit_dir, tiny_demo_args

from megatron_harpe.checkpointing.checkpoint import find_latest_checkpoint

pytestmark = pytest.mark.slurm


def _stopped_at(output: str, after: int = 0) -> int:
    """The step the trainer stopped after on SIGTERM (the last such line)."""
    steps = [int(step) for step in re.findall(r"stopping after step (\d+) \(SIGTERM received\)", output)]
    assert steps and steps[-1] > after, output[-3000:]
    return steps[-1]


def test_requeue_and_scancel_without_warning_save_and_resume_exactly(slurm, demo_data, uninterrupted, tmp_path):
    workdir = submit_dir(tmp_path)
    args = ["configs/demo_cpu.yaml", *tiny_demo_args(demo_data, workdir / "ckpt")]
    job = slurm.submit(workdir, "scripts/slurm/train.sbatch", args)
    log = f"slurm-harpe-{job.id}.out"

    # scontrol requeue: SIGTERM now, SIGKILL after KillWait, the job back in the queue
    job.wait_for_line(log, "step 3/")
    slurm.run("scontrol", "requeue", job.id)
    job.wait_until_requeued(log, restarts=1)
    requeued_at = _stopped_at(job.output(log))
    assert find_latest_checkpoint(workdir / "ckpt").name == f"iter_{requeued_at:07d}"
    assert "[launch] SIGTERM: the ranks were asked to save" in job.output(log)

    # the requeued job resumes there; scancel while it runs: saved again, the job is cancelled
    job.release()
    job.wait_for_line(log, f"step {requeued_at + 3}/")
    assert f"resumed from {workdir / 'ckpt'}/iter_{requeued_at:07d} at step {requeued_at}" in job.output(log)
    slurm.run("scancel", job.id)
    info = job.wait_until_finished(log)
    assert info["JobState"] == "CANCELLED"
    cancelled_at = _stopped_at(job.output(log), after=requeued_at)
    assert find_latest_checkpoint(workdir / "ckpt").name == f"iter_{cancelled_at:07d}"

    # submitted again, it finishes from there
    again = slurm.submit(workdir, "scripts/slurm/train.sbatch", args)
    again_log = f"slurm-harpe-{again.id}.out"
    assert again.wait_until_finished(again_log)["JobState"] == "COMPLETED", again.output(again_log)[-3000:]
    assert f"at step {cancelled_at}" in again.output(again_log)
    steps = {**logged_steps(job.output(log)), **logged_steps(again.output(again_log))}
    assert_same_training(steps, uninterrupted.steps, slurm.tolerance)


@pytest.mark.slow  # ~90 s; requeue/scancel and the USR1 warning stay in the default suite
def test_time_limit_without_warning_loses_no_finished_step(slurm, demo_data, tmp_path) -> None:
    workdir = submit_dir(tmp_path)
    args = ["configs/demo_cpu.yaml", *tiny_demo_args(demo_data, workdir / "ckpt", steps=20000)]  # longer than a minute
    job = slurm.submit(workdir, "scripts/slurm/train.sbatch", args, options=["--time=1", "--signal=B:USR1@0"])
    log = f"slurm-harpe-{job.id}.out"
    info = job.wait_until_finished(log, timeout=400)
    output = job.output(log)
    assert info["JobState"] == "TIMEOUT", output[-3000:]
    assert "time limit near" not in output, "no early warning was asked for"
    saved = _stopped_at(output)
    assert max(logged_steps(output)) == saved, "the step running at the time limit finished and was saved"
    assert find_latest_checkpoint(workdir / "ckpt").name == f"iter_{saved:07d}"
