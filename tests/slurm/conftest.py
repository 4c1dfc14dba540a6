"""Which Slurm the tests in tests/slurm/ submit to (they are marked `slurm`: `-m slurm` selects them):

- by default a private single-node cluster started for the session (local_slurm.py), where the
  Slurm and munge daemons are installed and the tests run as root; skipped, with the reason,
  elsewhere. `.ci/run` installs them with apt when it can.
- MEGATRON_HARPE_SLURM=site: the cluster this machine's `sbatch` submits to (a login node), with
  MEGATRON_HARPE_SLURM_OPTIONS added to every sbatch (e.g. "--partition=debug --account=me"),
  and MEGATRON_HARPE_SLURM_TOLERANCE (default 1e-3) as the relative difference of losses and
  gradient norms allowed between a resumed and an uninterrupted job (GPU kernels are not bitwise
  deterministic; on the private cluster's CPUs they must be equal).
  The tests' temporary directories must then be on a filesystem the compute nodes see:

      MEGATRON_HARPE_SLURM=site python -m pytest -m slurm tests/slurm --basetemp=$PWD/.slurm-tests
"""

from __future__ import annotations

import os
import shlex
import shutil

import local_slurm
import pytest
from slurm_jobs import Finished, Slurm, logged_steps, submit_dir, tiny_demo_args

SITE_ENV = "MEGATRON_HARPE_SLURM"
SITE_OPTIONS_ENV = "MEGATRON_HARPE_SLURM_OPTIONS"
SITE_TOLERANCE_ENV = "MEGATRON_HARPE_SLURM_TOLERANCE"


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    if os.environ.get(SITE_ENV) == "site":
        if shutil.which("sbatch") is None:
            pytest.skip(f"{SITE_ENV}=site but sbatch is not on PATH")
        env = {key: value for key, value in os.environ.items() if key != SITE_ENV}
        tolerance = float(os.environ.get(SITE_TOLERANCE_ENV, "1e-3"))
        yield Slurm(env=env, sbatch_options=shlex.split(os.environ.get(SITE_OPTIONS_ENV, "")), tolerance=tolerance)
        return
    reason = local_slurm.unavailable_reason()
    if reason:
        pytest.skip(f"{reason}; or run on a login node with {SITE_ENV}=site (tests/slurm/conftest.py)")
    cluster = local_slurm.start(tmp_path_factory.mktemp("slurm"))
    try:
        yield Slurm(env=cluster.env, sbatch_options=[], describe=cluster.logs)
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def uninterrupted(slurm, demo_data, tmp_path_factory) -> Finished:
    """`sbatch scripts/slurm/train.sbatch configs/demo_cpu.yaml` (made tiny), never stopped: the
    losses every stopped and resumed job must reproduce."""
    workdir = submit_dir(tmp_path_factory.mktemp("uninterrupted"))
    job = slurm.submit(workdir, "scripts/slurm/train.sbatch",
                       ["configs/demo_cpu.yaml", *tiny_demo_args(demo_data, workdir / "ckpt")])  # fmt: skip
    log = f"slurm-harpe-{job.id}.out"
    info = job.wait_until_finished(log)
    return Finished(job, log, info, logged_steps(job.output(log)))
