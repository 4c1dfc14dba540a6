"""Helpers of the command-line fault tests (tests/faults/test_cli_*.py): run an entry point as
the user does, in a subprocess, and pick apart what it printed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY_MODULES = ("torch", "megatron", "transformers", "matplotlib")

# Runs a script or module like `python X`, then reports which heavy modules it imported.
_IMPORT_PROBE = """
import atexit, runpy, sys
atexit.register(lambda: print("HEAVY=" + ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.__stderr__))
target, sys.argv = sys.argv[1], sys.argv[1:]
if target.startswith("-m"):
    runpy.run_module(target[2:], run_name="__main__", alter_sys=True)
else:
    runpy.run_path(target, run_name="__main__")
"""

# Runs a script with every write under a directory failing with the given errno, as a
# read-only or full file system would (portable: no mount, no root).
_FAILING_WRITES = """
import builtins, errno, os, runpy, sys
code, root, target = int(sys.argv[1]), os.path.realpath(sys.argv[2]), sys.argv[3]
sys.argv = sys.argv[3:]

def _fails(path):
    return isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(path)).startswith(root)

def _refuse(path):
    raise OSError(code, os.strerror(code), os.fsdecode(path))

_open, _os_open, _mkdir = builtins.open, os.open, os.mkdir
def open_(file, mode="r", *args, **kwargs):
    if any(flag in mode for flag in "wax+") and _fails(file):
        _refuse(file)
    return _open(file, mode, *args, **kwargs)
def os_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _fails(path):
        _refuse(path)
    return _os_open(path, flags, *args, **kwargs)
def mkdir(path, *args, **kwargs):
    if _fails(path):
        _refuse(path)
    return _mkdir(path, *args, **kwargs)
builtins.open, os.open, os.mkdir = open_, os_open, mkdir
runpy.run_path(target, run_name="__main__")
"""


def environment(**extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MEGATRON_HARPE_", "TORCHELASTIC")) and key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), **extra)
    return env


def run(*args: str, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    """`python <args>` from the repository root."""
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=environment(**env), capture_output=True, text=True, timeout=timeout
    )


def run_probing_imports(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run an entry point and return which of HEAVY_MODULES it imported."""
    completed = run("-c", _IMPORT_PROBE.format(heavy=HEAVY_MODULES), *args)
    line = [text for text in completed.stderr.splitlines() if text.startswith("HEAVY=")][-1]
    return completed, {name for name in line.removeprefix("HEAVY=").split(",") if name}


def run_with_failing_writes(error_number: int, directory: Path, *args: str) -> subprocess.CompletedProcess:
    return run("-c", _FAILING_WRITES, str(error_number), str(directory), *args)


def third_party_lines(stderr: str) -> list[str]:
    """Lines another library printed: warnings (they carry a site-packages path or a
    `...Warning:` category), their source lines, tracebacks, log records of torch/megatron."""
    markers = ("site-packages", "Warning:", "warnings.warn(", "Traceback", "megatron.core", "transformer_engine")
    return [line for line in stderr.splitlines() if any(marker in line for marker in markers)]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def unshare_works() -> bool:
    """Whether user + mount namespaces work here (`unshare -rm`), to mount a small or read-only tmpfs."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0
