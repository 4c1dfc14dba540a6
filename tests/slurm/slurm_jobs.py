"""Submitting the repository's sbatch scripts to a Slurm cluster and watching the jobs, for the
tests in tests/slurm/ (see conftest.py for which cluster).

Jobs are submitted from a fresh directory per test that links the repository's `scripts/`,
`configs/` and `pretrain_harpe.py` (the scripts run from the submit directory, as users submit
from the repository root), so the job logs, per-rank logs and stop files land where the scripts
put them, in that directory and not in the repository.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STEPS = 24
TINY_DEMO = [
    "--model.num_layers", "2", "--model.hidden_size", "64", "--model.num_attention_heads", "4",
    "--model.num_query_groups", "2", "--model.ffn_hidden_size", "128", "--model.max_position_embeddings", "128",
    "--data.seq_length", "128", "--train.global_batch_size", "4", "--train.micro_batch_size", "2",
    "--train.warmup_steps", "0", "--logging.log_interval", "1", "--logging.tensorboard_dir", "null",
]  # fmt: skip
"""configs/demo_cpu.yaml made tiny: 2 ranks (context parallel 2) train a step in well under a second."""
STEP_LINE = re.compile(r"step (\d+)/\d+ \| loss (\S+) \| lr (\S+) \| grad norm (\S+)")
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE")  # fmt: skip


def tiny_demo_args(demo_data, save: Path, steps: int = STEPS, save_interval: int = 1000) -> list[str]:
    """Overrides after `configs/demo_cpu.yaml`: `steps` steps, a checkpoint every `save_interval`."""
    return ["--data.demo_workdir", str(demo_data.corpus.parent), "--checkpoint.save", str(save),
            "--checkpoint.save_interval", str(save_interval), "--train.train_tokens", str(steps * 4 * 128),
            *TINY_DEMO]  # fmt: skip


def logged_steps(text: str) -> dict[int, tuple[str, str, str]]:
    """{step: (loss, lr, grad norm) as printed} of every step line in a job's output."""
    return {int(step): (loss, lr, norm) for step, loss, lr, norm in STEP_LINE.findall(text)}


def assert_same_training(got: dict, want: dict, tolerance: float) -> None:
    """The same steps with the same printed loss, learning rate and gradient norm; `tolerance`
    (relative, for loss and gradient norm) is 0 on CPU, where a resumed run is bitwise the same."""
    assert sorted(got) == sorted(want), f"steps {sorted(got)} != {sorted(want)}"
    for step in sorted(want):
        (loss, lr, norm), (want_loss, want_lr, want_norm) = got[step], want[step]
        same = lr == want_lr and all(abs(float(a) - float(b)) <= tolerance * abs(float(b)) for a, b in
                                     ((loss, want_loss), (norm, want_norm)))  # fmt: skip
        assert same, f"step {step}: loss, lr, grad norm {got[step]} != {want[step]} (uninterrupted)"


@dataclasses.dataclass
class Slurm:
    """The clients of one cluster: `env` reaches it (SLURM_CONF ...), `sbatch_options` go to every
    submission (a site's partition and account)."""

    env: dict[str, str]
    sbatch_options: list[str]
    tolerance: float = 0.0
    """For assert_same_training: 0 on the private cluster (CPU); GPU kernels are not bitwise
    deterministic, so a site's cluster gets MEGATRON_HARPE_SLURM_TOLERANCE (default 1e-3)."""
    describe: Callable[[], str] = lambda: ""
    """The daemons' logs (private cluster), added to failure messages."""

    def run(self, *command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run(list(command), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def job_env(self, **extra: str) -> dict[str, str]:
        """The submitting shell's environment: sbatch exports it to the job."""
        env = {key: value for key, value in self.env.items()
               if not key.startswith(("MEGATRON_HARPE_", "TORCHELASTIC", "PYTEST"))
               and key not in ("RANK", "WORLD_SIZE")}  # fmt: skip
        env.update(PYTHON=sys.executable, GPUS_PER_NODE="2", OMP_NUM_THREADS="1", **extra)
        return env

    def submit(self, workdir: Path, script: str, args: Sequence[str] = (), options: Sequence[str] = (),
               **env: str) -> "Job":  # fmt: skip
        """`sbatch [options] script args` from `workdir`; options after the site's, so they win."""
        command = ["sbatch", "--parsable", *self.sbatch_options, "--gpus-per-node=2", "--cpus-per-task=2", *options,
                   script, *args]  # fmt: skip
        result = subprocess.run(command, cwd=workdir, env=self.job_env(**env), capture_output=True, text=True,
                                timeout=60)  # fmt: skip
        assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
        return Job(self, result.stdout.strip().split(";")[0], workdir)


@dataclasses.dataclass
class Job:
    slurm: Slurm
    id: str
    workdir: Path

    def info(self) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, Reason ...)."""
        result = self.slurm.run("scontrol", "-o", "show", "job", self.id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))

    def output(self, name: str) -> str:
        """The job's log file `name` in the submit directory (empty until it exists)."""
        path = self.workdir / name
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, condition: Callable[["Job"], bool], what: str, log: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"job {self.id}: {what} did not happen within {timeout:g} s; "
                                     f"{self.info()}\n--- {log}\n{self.output(log)[-5000:]}\n"
                                     f"{self.slurm.describe()}")  # fmt: skip
            time.sleep(0.5)

    def wait_for_line(self, log: str, text: str, timeout: float = 300) -> None:
        self.wait(lambda job: text in job.output(log), f"{text!r} in {log}", log, timeout)

    def wait_until_finished(self, log: str, timeout: float = 400) -> dict[str, str]:
        """Until the job has ended and left the node (no COMPLETING); returns its info."""

        def ended(job: Job) -> bool:
            info = job.info()
            return info.get("JobState") in FINISHED and "COMPLETING" not in self.slurm.run(
                "squeue", "-h", "-j", job.id, "-t", "all", "-o", "%T", check=False).stdout  # fmt: skip

        self.wait(ended, "the end of the job", log, timeout)
        return self.info()

    def wait_until_requeued(self, log: str, restarts: int, timeout: float = 300) -> None:
        """Until the job is pending again after its restart number `restarts`, its processes gone."""
        self.wait(lambda job: job.info().get("Restarts") == str(restarts) and job.info().get("JobState") == "PENDING",
                  f"requeue number {restarts}", log, timeout)  # fmt: skip

    def release(self) -> None:
        """A requeued job waits for its begin time (about two minutes): start it now. Not in the
        second its previous run ended: slurmd (22.05) refused such a job, "Job credential revoked"."""
        time.sleep(2)
        self.slurm.run("scontrol", "update", f"jobid={self.id}", "starttime=now")


@dataclasses.dataclass
class Finished:
    job: Job
    log: str
    """The job's output file, in its submit directory."""
    info: dict[str, str]
    steps: dict[int, str]
    """logged_steps() of its output."""


def submit_dir(path: Path) -> Path:
    """A directory to submit from, linking what the sbatch scripts run (see the module docstring)."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("scripts", "configs", "pretrain_harpe.py"):
        os.symlink(REPO / name, path / name)
    return path
