"""When one rank or the launcher fails, the others stop in minutes and say why.

- `CollectiveGuard`: the trainer runs inside one; it knows what the rank is doing (`guard.phase
  = "training step 12"`), and turns a collective that times out (parallel.timeout_minutes,
  passed to the process groups by `parallel.initialize`) or loses its peer into one
  `CollectiveFailed` line naming the rank, the phase and the likely cause.
- `exit_when_launcher_dies`: a daemon thread that ends a worker whose launcher (torchrun,
  `run_on_ranks`) is gone, so no orphaned ranks keep training and saving; except a rank that is
  saving after a stop signal (`outlive_launcher`): stock torchrun stops waiting for its ranks
  and exits when SIGTERMs keep coming (at the third), and the rank exits by itself once the
  checkpoint is written.
- `any_rank_failed`: every rank learns whether some rank failed a local step, so all of them
  raise instead of the healthy ones waiting in the next collective.
"""

from __future__ import annotations

import os
import re
import sys
import threading

import torch
import torch.distributed as dist

from megatron_harpe import collectives

_PEER_LOST = re.compile(r"timed out|timeout|connection closed|connection reset|broken pipe|socket closed", re.I)
EXIT_WITH_PARENT_ENV = "MEGATRON_HARPE_EXIT_WITH_PARENT"
"""Set by `run_on_ranks` for its workers; torchrun's workers are recognised by TORCHELASTIC_RUN_ID."""


class CollectiveFailed(RuntimeError):
    """A collective timed out or lost a peer rank."""

    report_on_every_rank = True  # the CLI front door prints it on each rank, without a traceback


class CollectiveGuard:
    """Context manager: re-raise a timed-out or broken collective as CollectiveFailed naming
    this rank and `phase` (what the rank was doing, kept up to date by the caller)."""

    def __init__(self, rank: int, timeout_minutes: float, phase: str = "start-up") -> None:
        self.rank = rank
        self.timeout_minutes = timeout_minutes
        self.phase = phase

    def __enter__(self) -> "CollectiveGuard":
        return self

    def __exit__(self, exc_type, error, traceback) -> bool:
        if error is None or isinstance(error, CollectiveFailed) or not isinstance(error, RuntimeError):
            return False
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        if not _PEER_LOST.search(str(error)):
            return False
        raise CollectiveFailed(
            f"rank {self.rank}: a collective during {self.phase} failed after waiting up to "
            f"{self.timeout_minutes:g} min (parallel.timeout_minutes) for the other ranks: one of them is stuck "
            f"or dead, see the other ranks' logs ({type(error).__name__}: {first_line})"
        ) from error


def any_rank_failed(failed: bool, group: dist.ProcessGroup | None = None) -> bool:
    """Collective: True on every rank if `failed` is True on any rank."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return failed
    flag = torch.tensor([float(failed)])
    collectives.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)  # on the group's device (NCCL: cuda)
    return bool(flag.item())


_watchdog_started = False
_outliving_launcher = False


def outlive_launcher() -> None:
    """From now on the launcher's death does not end this rank (safe in a signal handler)."""
    global _outliving_launcher
    _outliving_launcher = True


def exit_when_launcher_dies(poll_seconds: float = 1.0) -> bool:
    """For a worker started by torchrun or run_on_ranks: exit (code 1, with a message) as soon
    as the launcher process is gone. Returns whether the watchdog runs (once per process)."""
    global _watchdog_started
    launched = "TORCHELASTIC_RUN_ID" in os.environ or os.environ.get(EXIT_WITH_PARENT_ENV) == "1"
    if _watchdog_started or not launched:
        return _watchdog_started
    launcher = os.getppid()

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(poll_seconds):
            if os.getppid() != launcher and not _outliving_launcher:
                rank = os.environ.get("RANK", "?")
                print(f"rank {rank}: the launcher (pid {launcher}) is gone; exiting", file=sys.stderr, flush=True)
                os._exit(1)

    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()
    _watchdog_started = True
    return True
