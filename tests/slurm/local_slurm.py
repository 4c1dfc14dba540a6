"""A private single-node Slurm cluster for the tests in tests/slurm/, or for trying the sbatch
scripts by hand on a machine where you are root:

    apt-get install -y slurm-wlm munge        # Debian/Ubuntu; nothing here installs anything
    python tests/slurm/local_slurm.py         # starts one, prints `export SLURM_CONF=...`, Ctrl-C stops it

munged, slurmctld and slurmd run as root in the foreground, as children of this process, with
their own key, socket, config, state and logs under one temporary directory and on free ports,
so they touch nothing of a Slurm or munge the machine may already run. The node has the host's
CPUs and two fake GPUs (gres on /dev/null and /dev/zero), so `--gpus-per-node=2` is accepted and
jobs see SLURM_GPUS_ON_NODE=2. `stop()` cancels the cluster's jobs, then ends exactly the daemons
it started (by PID); if the process that started them dies first, the kernel ends them
(PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel")
KILL_WAIT = 30
"""Seconds between SIGTERM and SIGKILL when Slurm stops a job (KillWait; Slurm's default)."""

_PR_SET_PDEATHSIG = 1


def unavailable_reason() -> str | None:
    """Why a private cluster cannot start here (None: it can)."""
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name) is None]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} not found; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "a private Slurm cluster needs root (munged, slurmctld and slurmd run as root)"
    host = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(host)
    except OSError:
        return (
            f"this host's name {host!r} does not resolve (the launcher's rendezvous uses node names): "
            "add it to /etc/hosts"
        )
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the daemon, before exec: the kernel sends SIGTERM when the starting process dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _node_line() -> tuple[str, str]:
    """This host's node name and hardware as slurmd detects them (`slurmd -C`)."""
    detected = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    fields = dict(item.split("=", 1) for item in detected.split())
    hardware = " ".join(f"{key}={fields[key]}"
                        for key in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
                        if key in fields)  # fmt: skip
    return fields["NodeName"], hardware


@dataclasses.dataclass
class LocalSlurm:
    """A running private cluster. `env` is the environment its clients (sbatch, srun ...) need."""

    root: Path
    node: str
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = dataclasses.field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def run(self, *command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a Slurm client (`cluster.run("squeue", "-h")`) against this cluster."""
        result = subprocess.run(list(command), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def wait_until_ready(self, timeout: float = 60) -> None:
        """Until the node accepts jobs (idle), or raise with the daemons' logs."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode} during start-up:\n{self.logs()}")
            result = self.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10)
            state = result.stdout.strip()
            if result.returncode == 0 and state.startswith("idle"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the node is not idle after {timeout:g} s (state {state!r}):\n{self.logs()}")

    def logs(self, lines: int = 30) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel the cluster's jobs, then stop its daemons (these PIDs only)."""
        try:
            if all(process.poll() is None for process in self.processes.values()):
                self.run("scancel", "--full", "--user", "root", check=False, timeout=20)
                deadline = time.monotonic() + KILL_WAIT + 15
                while time.monotonic() < deadline and self.run("squeue", "-h", check=False, timeout=10).stdout.strip():
                    time.sleep(0.5)
        except subprocess.TimeoutExpired:
            pass  # the controller is not answering: stop the daemons all the same
        finally:
            for name in reversed(list(self.processes)):  # slurmd, slurmctld, then munged
                process = self.processes.pop(name)
                if process.poll() is None:
                    process.terminate()
                    try:
                        process.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait(timeout=10)


def write_config(root: Path, node: str, hardware: str, kill_wait: int = KILL_WAIT) -> Path:
    """slurm.conf and gres.conf under root/etc; returns the slurm.conf path."""
    etc = root / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir(exist_ok=True)
    conf = etc / "slurm.conf"
    conf.write_text(f"""\
ClusterName=harpetest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
GresTypes=gpu
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait={kill_wait}
FirstJobId={random.randint(1000, 900000)}
NodeName={node} NodeAddr=127.0.0.1 {hardware} Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    (etc / "gres.conf").write_text(
        f"NodeName={node} Name=gpu File=/dev/null\nNodeName={node} Name=gpu File=/dev/zero\n"
    )
    return conf


def start(root: Path | None = None, kill_wait: int = KILL_WAIT) -> LocalSlurm:
    """Start munged, slurmctld and slurmd under `root` (a new temporary directory by default)."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    root = Path(root or tempfile.mkdtemp(prefix="harpe-slurm-")).resolve()
    node, hardware = _node_line()
    conf = write_config(root, node, hardware, kill_wait)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    env = {key_: value for key_, value in os.environ.items() if not key_.startswith("SLURM_")}
    env["SLURM_CONF"] = str(conf)
    cluster = LocalSlurm(root=root, node=node, env=env)
    commands = {
        "munged": ["munged", "--foreground", "--force", f"--socket={root}/munge/munge.socket", f"--key-file={key}",
                   f"--pid-file={root}/munge/munged.pid", f"--seed-file={root}/munge/munged.seed",
                   f"--log-file={root}/log/munged.log"],
        "slurmctld": ["slurmctld", "-D", "-c", "-f", str(conf)],
        "slurmd": ["slurmd", "-D", "-f", str(conf), "-N", node],
    }  # fmt: skip
    try:
        for name, command in commands.items():
            output = open(root / "log" / f"{name}.stdout", "wb")  # noqa: SIM115 - the daemon keeps it
            cluster.processes[name] = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT,
                                                       stdin=subprocess.DEVNULL,
                                                       preexec_fn=_die_with_parent)  # fmt: skip
            if name == "munged":
                _wait_for(root / "munge" / "munge.socket", cluster)
        cluster.wait_until_ready()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for(path: Path, cluster: LocalSlurm, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in cluster.processes.values()):
            raise RuntimeError(f"{path} did not appear:\n{cluster.logs()}")
        time.sleep(0.1)


def main(argv: Sequence[str] | None = None) -> int:
    reason = unavailable_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    cluster = start()
    print(
        f"a private Slurm runs under {cluster.root} (node {cluster.node}); in another shell:\n"
        f"    export SLURM_CONF={cluster.env['SLURM_CONF']}\n    sinfo; sbatch ...\nCtrl-C stops it",
        flush=True,
    )
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
