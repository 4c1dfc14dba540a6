"""One run per checkpoint directory: a lock file held by the run that writes the checkpoints.

The trainer takes the lock on `checkpoint.save` before it resumes or saves anything:

    with hold_checkpoint_dir(cfg.checkpoint.save, ctx, log):   # rank 0 locks, every rank agrees
        ...train...

`<save_dir>/.run.lock` holds the holder's host, pid, Slurm job id (if any) and start time; a
thread of the holder touches it every HEARTBEAT_SECONDS. A second run on the same directory
refuses with the holder's identity. A lock is stale, and is taken over with a message, when

- it was written on this host and its pid is gone, or
- it was written on another host (a pid there cannot be checked from here) and its heartbeat
  is older than STALE_AFTER_MINUTES, or
- it carries this process's Slurm job id: Slurm runs a job id once at a time, so it is the
  lock of this job before a requeue (possibly on another node).

Taking over renames the stale file to a unique name first (only one contender's rename
succeeds), then creates the new lock with O_EXCL. Once the lock is held, leftovers of killed
saves (`iter_*.tmp`, `iter_*.deleting`) can only be ours and are removed, in one line.
`check_not_locked_by_other` lets `save_checkpoint` refuse to write into a directory another live
run holds, for callers that save without the trainer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from megatron_harpe.leftovers import pid_alive
from megatron_harpe.rank_health import any_rank_failed

LOCK_FILE = ".run.lock"
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_MINUTES = 10.0
"""A lock from another host whose heartbeat is older than this is taken to be a dead run's
(the holder touches it every HEARTBEAT_SECONDS; clocks of a cluster agree far better)."""


class CheckpointDirLocked(ValueError):
    """Another live run holds the checkpoint directory."""


def _identity() -> dict:
    identity = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if os.environ.get("SLURM_JOB_ID"):
        identity["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return identity


def describe_holder(holder: dict) -> str:
    text = f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}"
    if holder.get("slurm_job_id"):
        text += f" (Slurm job {holder['slurm_job_id']})"
    return text + f", started {holder.get('started', '?')}"


def _read_holder(lock_path: Path) -> dict | None:
    """The lock's content, {} if unreadable (a holder killed while writing it), None if absent."""
    try:
        return json.loads(lock_path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def stale_reason(lock_path: Path, holder: dict, stale_after_minutes: float = STALE_AFTER_MINUTES) -> str | None:
    """Why the lock `holder` read from `lock_path` belongs to a dead run; None if it may be alive."""
    try:
        age_minutes = (time.time() - lock_path.stat().st_mtime) / 60
    except FileNotFoundError:
        return "it vanished"
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job_id") == job and holder.get("pid") != os.getpid():
        return f"it is this Slurm job's own lock ({job}), from before a requeue"
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return None if pid_alive(holder["pid"]) else f"process {holder['pid']} on this host is gone"
    if age_minutes > stale_after_minutes:
        return f"its heartbeat is {age_minutes:.0f} min old (> {stale_after_minutes:g} min)"
    return None


def check_not_locked_by_other(save_dir: str | Path) -> None:
    """Raise CheckpointDirLocked if a live run other than this process holds `save_dir`."""
    lock_path = Path(save_dir) / LOCK_FILE
    holder = _read_holder(lock_path)
    if not holder:
        return
    if holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid():
        return
    if stale_reason(lock_path, holder) is None:
        raise _locked_error(Path(save_dir), holder)


def _locked_error(save_dir: Path, holder: dict) -> CheckpointDirLocked:
    return CheckpointDirLocked(
        f"checkpoint directory {save_dir} is in use by another run ({describe_holder(holder)}): "
        f"wait for it to finish or stop it, or set another checkpoint.save (if that run is dead, delete "
        f"{save_dir / LOCK_FILE})"
    )


class RunLock:
    """The lock file of one run on one checkpoint directory (acquired by one process)."""

    def __init__(
        self,
        save_dir: str | Path,
        stale_after_minutes: float = STALE_AFTER_MINUTES,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        *,
        lock_path: str | Path | None = None,
        refusal: Callable[[dict], Exception] | None = None,
    ) -> None:
        """`lock_path` and `refusal` (holder -> the error to raise) lock something other than a
        checkpoint directory with the same rules: an output of data preparation (data/output_lock.py)."""
        self.save_dir = Path(save_dir)
        self.path = Path(lock_path) if lock_path is not None else self.save_dir / LOCK_FILE
        self._refusal = refusal or (lambda holder: _locked_error(self.save_dir, holder))
        self.stale_after_minutes = stale_after_minutes
        self.heartbeat_seconds = heartbeat_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.messages: list[str] = []
        """What acquiring did that a user should hear about (a stale lock taken over ...)."""

    def acquire(self) -> "RunLock":
        self.save_dir.mkdir(parents=True, exist_ok=True)
        content = json.dumps(_identity())
        for _ in range(3):  # a contender may take the stale lock between our look and our create
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_holder(self.path)
                if holder is None:
                    continue
                reason = stale_reason(self.path, holder, self.stale_after_minutes)
                if reason is None:
                    raise self._refusal(holder) from None
                self._take_over(holder, reason)
                continue
            with os.fdopen(descriptor, "w") as handle:
                handle.write(content)
            self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return self
        raise CheckpointDirLocked(f"could not lock {self.path}: other runs keep taking it; is another run starting?")

    def _take_over(self, holder: dict, reason: str) -> None:
        # the rename is atomic: of several runs seeing the same stale lock, one moves it away
        parked = self.path.with_name(f"{self.path.name}.stale-{socket.gethostname()}-{os.getpid()}")
        try:
            os.rename(self.path, parked)
        except FileNotFoundError:
            return
        parked.unlink(missing_ok=True)
        who = describe_holder(holder) if holder else "an unreadable lock"
        locked = self.save_dir if self.path.name == LOCK_FILE else self.path.with_suffix("")
        self.messages.append(f"took over the stale lock of {locked} from {who}: {reason}")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            holder = _read_holder(self.path)
            if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)


def remove_save_leftovers(save_dir: str | Path) -> list[str]:
    """Remove the work dirs of interrupted saves (`iter_*.tmp`, `iter_*.deleting`): call only
    while holding the directory's lock. Returns the names removed."""
    save_dir = Path(save_dir)
    removed = []
    if not save_dir.is_dir():
        return removed
    for leftover in sorted(save_dir.iterdir()):
        if leftover.is_dir() and leftover.name.startswith("iter_") and leftover.suffix in (".tmp", ".deleting"):
            shutil.rmtree(leftover)
            removed.append(leftover.name)
    return removed


@contextlib.contextmanager
def hold_checkpoint_dir(save_dir: str | Path | None, ctx, log: Callable[[str], None]) -> Iterator[RunLock | None]:
    """Rank 0 locks `save_dir` for the whole block and clears leftovers of killed saves; all
    ranks raise CheckpointDirLocked if the directory is taken (collective). No-op without a dir."""
    if not save_dir:
        yield None
        return
    lock, error = None, None
    if ctx.rank == 0:
        try:
            lock = RunLock(save_dir).acquire()
        except CheckpointDirLocked as refused:
            error = refused
        except OSError as failed:
            error = ValueError(
                f"cannot lock checkpoint directory {save_dir} ({failed}): check that checkpoint.save "
                "is a writable directory"
            )
    if any_rank_failed(error is not None) and error is None:
        raise CheckpointDirLocked(f"checkpoint directory {save_dir} could not be locked (rank 0 says why)")
    if error is not None:
        raise error
    try:
        if lock is not None:
            for message in lock.messages:
                log(message)
            removed = remove_save_leftovers(save_dir)
            if removed:
                log(f"removed {len(removed)} leftover(s) of an interrupted save in {save_dir}: {', '.join(removed)}")
        yield lock
    finally:
        if lock is not None:
            lock.release()
