"""Start a training script on a Slurm allocation: one `torchrun` per node, c10d rendezvous on
the first node of the job.

The sbatch scripts in scripts/slurm/ run this module once per node with `srun`:

    srun --ntasks-per-node=1 python -m megatron_harpe.launch --nproc-per-node 8 -- \\
        pretrain_harpe.py --config configs/llama2_7b_128k_harpe.yaml

Each copy reads the Slurm variables of its node (SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_NNODES,
SLURM_NODEID, SLURM_GPUS_ON_NODE, SLURM_RESTART_COUNT ...), builds

    python -m megatron_harpe.torchrun --nnodes N --nproc-per-node P --rdzv-backend c10d \\
        --rdzv-endpoint <first node>:<port> --rdzv-id <job id> ... pretrain_harpe.py ...

(torchrun, made to let its ranks save when Slurm stops the job: see megatron_harpe/torchrun.py)
and replaces itself with it (signals from Slurm then reach torchrun directly). Every node derives
the same port from the job id, so no node has to tell another anything. Per-rank logs go to
`runs/<run name>/slurm-<job id>/` (the run name is the config file's stem unless --run-name is
given). A requeued job (SLURM_RESTART_COUNT > 0) starts the same command again: the trainer
resumes from the latest complete checkpoint under `checkpoint.save`.

See the command without running it (any shell; the variables can be faked):

    SLURM_JOB_ID=7 SLURM_JOB_NODELIST='gpu[01-04]' SLURM_NNODES=4 SLURM_NODEID=0 \\
        python -m megatron_harpe.launch --nproc-per-node 8 --print-only -- pretrain_harpe.py --config X.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from megatron_harpe import cli, files

_BRACKETS = re.compile(r"\[([^\]]*)\]")
DEFAULT_PORT_BASE = 15000
PORT_SPAN = 15000
"""Ports are drawn from [15000, 30000): below Linux's ephemeral range (32768+), above the
well-known and registered services most clusters run."""
DEFAULT_SHUTDOWN_TIMEOUT = 600
"""Seconds torchrun lets its ranks save and exit after SIGTERM before it kills them (torchrun's
own default, 30 s, can be shorter than a checkpoint save); Slurm's KillWait applies as well."""


# ------------------------------------------------------------------------------------ node lists


def _split_top_level(nodelist: str) -> list[str]:
    """Split on commas that are not inside brackets: `a[1,3],b` -> [`a[1,3]`, `b`]."""
    parts, depth, current = [], 0, []
    for char in nodelist:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm node list {nodelist!r}")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in Slurm node list {nodelist!r}")
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def _expand_range_set(ranges: str, nodelist: str) -> list[str]:
    """`001-003,007` -> ['001', '002', '003', '007'], keeping the zero padding of each bound."""
    values: list[str] = []
    for item in ranges.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty range in Slurm node list {nodelist!r}")
        low, sep, high = item.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"range {item!r} in Slurm node list {nodelist!r} is not numeric (like 001-004)")
        if not sep:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"range {item!r} in Slurm node list {nodelist!r} runs backwards")
        width = len(low)
        values.extend(str(number).zfill(width) for number in range(int(low), int(high) + 1))
    return values


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list syntax, in order.

    `gpu[001-003,007],login1` -> gpu001 gpu002 gpu003 gpu007 login1. Several bracket groups in
    one name expand as a product (`r[1-2]n[1-2]` -> r1n1 r1n2 r2n1 r2n2), as Slurm does."""
    hosts: list[str] = []
    for pattern in _split_top_level(nodelist):
        names = [""]
        position = 0
        for match in _BRACKETS.finditer(pattern):
            literal = pattern[position : match.start()]
            names = [name + literal + value for name in names for value in _expand_range_set(match.group(1), nodelist)]
            position = match.end()
        tail = pattern[position:]
        if "[" in tail or "]" in tail:
            raise ValueError(f"malformed brackets in Slurm node list {nodelist!r}")
        hosts.extend(name + tail for name in names)
    if not hosts:
        raise ValueError(f"Slurm node list {nodelist!r} names no hosts")
    return hosts


def hostnames(nodelist: str) -> list[str]:
    """Hosts of a node list: `scontrol show hostnames` when Slurm's tools are installed (it also
    knows site-specific syntax), our own parser otherwise."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        result = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True)
        names = result.stdout.split()
        if result.returncode == 0 and names:
            return names
    return expand_nodelist(nodelist)


# ----------------------------------------------------------------------------------- the job


@dataclasses.dataclass(frozen=True)
class SlurmJob:
    """What one node of a Slurm job needs to start its share of the processes."""

    job_id: str
    job_name: str
    nodes: tuple[str, ...]
    node_rank: int
    procs_per_node: int
    restart_count: int = 0

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def first_node(self) -> str:
        return self.nodes[0]

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.procs_per_node

    @classmethod
    def from_environment(
        cls,
        env: Mapping[str, str],
        procs_per_node: int | None = None,
        resolve_hosts: Callable[[str], list[str]] = hostnames,
    ) -> "SlurmJob":
        job_id = _required(env, "SLURM_JOB_ID")
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ValueError(_missing("SLURM_JOB_NODELIST"))
        nodes = tuple(resolve_hosts(nodelist))
        num_nodes = _integer(env, "SLURM_NNODES", default=len(nodes))
        if num_nodes != len(nodes):
            raise ValueError(
                f"SLURM_NNODES={num_nodes} but SLURM_JOB_NODELIST={nodelist!r} names {len(nodes)} hosts: "
                "run the launcher inside the allocation it was submitted with"
            )
        node_rank = _integer(env, "SLURM_NODEID", default=0 if num_nodes == 1 else None)
        if not 0 <= node_rank < num_nodes:
            raise ValueError(f"SLURM_NODEID={node_rank} is outside the job's {num_nodes} node(s)")
        procs = procs_per_node if procs_per_node is not None else processes_per_node(env)
        if procs < 1:
            raise ValueError(f"--nproc-per-node must be >= 1, got {procs}")
        return cls(
            job_id=job_id,
            job_name=env.get("SLURM_JOB_NAME", "job"),
            nodes=nodes,
            node_rank=node_rank,
            procs_per_node=procs,
            restart_count=_integer(env, "SLURM_RESTART_COUNT", default=0),
        )


def processes_per_node(env: Mapping[str, str]) -> int:
    """One process per GPU of this node (SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE such as
    `8` or `a100:8`), else SLURM_NTASKS_PER_NODE for CPU-only allocations."""
    if env.get("SLURM_GPUS_ON_NODE"):
        return _integer(env, "SLURM_GPUS_ON_NODE")
    per_node = env.get("SLURM_GPUS_PER_NODE")
    if per_node:
        # "8", "a100:8", "gpu:a100:8(S:0-1)": the count follows the last colon of the first entry.
        first_entry = re.sub(r"\(.*?\)", "", per_node).split(",")[0]
        count = first_entry.rsplit(":", 1)[-1]
        if not count.isdigit():
            raise ValueError(f"cannot read a GPU count from SLURM_GPUS_PER_NODE={per_node!r}: pass --nproc-per-node")
        return int(count)
    if env.get("SLURM_NTASKS_PER_NODE"):
        return _integer(env, "SLURM_NTASKS_PER_NODE")
    raise ValueError(
        "cannot tell how many processes to start per node: request GPUs (#SBATCH --gpus-per-node=8) "
        "or pass --nproc-per-node"
    )


def _missing(name: str) -> str:
    return f"{name} is not set: run this inside a Slurm job (sbatch/srun), or set it yourself to test"


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name)
    if not value:
        raise ValueError(_missing(name))
    return value


def _integer(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise ValueError(_missing(name))
        return default
    # Slurm writes counts of heterogeneous allocations as e.g. "8(x4)": the first number is ours.
    match = re.match(r"^\s*(\d+)", value)
    if match is None:
        raise ValueError(f"{name}={value!r} is not an integer")
    return int(match.group(1))


# ---------------------------------------------------------------------------- the command


def rendezvous_port(job_id: str) -> int:
    """The same port on every node of a job, from the job id alone."""
    return DEFAULT_PORT_BASE + zlib.crc32(job_id.encode()) % PORT_SPAN


def run_name(program_args: Sequence[str], job: SlurmJob) -> str:
    """The config file's stem (`--config configs/x.yaml` -> x), else the Slurm job name."""
    for index, arg in enumerate(program_args):
        if arg == "--config" and index + 1 < len(program_args):
            return Path(program_args[index + 1]).stem
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1]).stem
    return job.job_name


def job_log_dir(runs_dir: str | Path, name: str, job: SlurmJob) -> Path:
    return Path(runs_dir) / name / f"slurm-{job.job_id}"


def torchrun_command(
    job: SlurmJob,
    program_args: Sequence[str],
    *,
    port: int,
    log_dir: Path | None,
    max_restarts: int = 0,
    shutdown_timeout: int = DEFAULT_SHUTDOWN_TIMEOUT,
    python: str = sys.executable,
) -> list[str]:
    """The torchrun invocation for this node; `program_args` is the script and its arguments."""
    if not program_args:
        raise ValueError("nothing to launch: give the training script after '--', e.g. -- pretrain_harpe.py --config X")
    command = [
        python,
        "-m",
        "megatron_harpe.torchrun",
        f"--nnodes={job.num_nodes}",
        f"--nproc-per-node={job.procs_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={job.first_node}:{port}",
        f"--rdzv-id={job.job_id}",
        f"--max-restarts={max_restarts}",
        f"--shutdown-timeout={shutdown_timeout}",
    ]
    if log_dir is not None:
        # Per-rank stdout/stderr files under the job's log dir, still echoed to the Slurm log.
        command += [f"--log-dir={log_dir / f'restart-{job.restart_count}' / f'node-{job.node_rank}'}", "--tee=3"]
    return command + list(program_args)


def write_launch_record(log_dir: Path, job: SlurmJob, command: Sequence[str]) -> Path:
    """`launch-restart<k>-node<r>.json`: the job as this node saw it and the exact command."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"launch-restart{job.restart_count}-node{job.node_rank}.json"
    record = dataclasses.asdict(job) | {"world_size": job.world_size, "command": list(command)}
    return files.write_json(path, record)


# ----------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_harpe.launch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--nproc-per-node", type=int, default=None, help="processes per node (default: GPUs on the node)"
    )
    parser.add_argument(
        "--rdzv-port", type=int, default=None, help="rendezvous port (default: derived from the job id)"
    )
    parser.add_argument("--run-name", default=None, help="log directory name (default: the config file's stem)")
    parser.add_argument("--runs-dir", default="runs", help="parent of the per-run log directories")
    parser.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts inside one allocation")
    parser.add_argument("--shutdown-timeout", type=int, default=DEFAULT_SHUTDOWN_TIMEOUT,
                        help="seconds the ranks get to save and exit after SIGTERM "
                             "before torchrun kills them")  # fmt: skip
    parser.add_argument("--no-rank-logs", action="store_true", help="do not write per-rank log files")
    parser.add_argument("--print-only", action="store_true", help="print the torchrun command and exit")
    cli.add_common_flags(parser)  # before the '--': they reach the ranks through the environment
    parser.add_argument("program", nargs=argparse.REMAINDER, help="-- script.py [its arguments]")
    args = parser.parse_args(argv)
    if args.program and args.program[0] == "--":
        args.program = args.program[1:]
    return args


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    try:
        job = SlurmJob.from_environment(env, procs_per_node=args.nproc_per_node)
        port = args.rdzv_port or rendezvous_port(job.job_id)
        log_dir = job_log_dir(args.runs_dir, args.run_name or run_name(args.program, job), job)
        command = torchrun_command(
            job,
            args.program,
            port=port,
            log_dir=None if args.no_rank_logs else log_dir,
            max_restarts=args.max_restarts,
            shutdown_timeout=args.shutdown_timeout,
        )
    except ValueError as error:
        return cli.report_user_error(error)
    if args.print_only:
        print(shlex.join(command))
        return 0
    write_launch_record(log_dir, job, command)
    state = f"requeued run, restart {job.restart_count}: resuming" if job.restart_count else "starting"
    print(
        f"[launch] job {job.job_id} node {job.node_rank}/{job.num_nodes} ({env.get('SLURMD_NODENAME', '?')}): "
        f"{state}; {job.procs_per_node} processes here, world size {job.world_size}, "
        f"rendezvous {job.first_node}:{port}, logs {log_dir}\n[launch] {shlex.join(command)}",
        flush=True,
    )
    os.execvpe(command[0], command, dict(env))
    return 0  # not reached: exec replaces this process


if __name__ == "__main__":
    sys.exit(cli.run(main))
