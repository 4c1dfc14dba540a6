"""Preemption: on SIGTERM or SIGUSR1 every rank finishes its step, saves, and the run exits.

Slurm sends SIGTERM to every process of a job it stops (a preemption, `scontrol requeue`,
`scancel`, the time limit) and SIGKILL KillWait seconds later (30 s unless the cluster says
otherwise); with `#SBATCH --signal=USR1@N` it sends SIGUSR1 N seconds before the time limit.
torchrun forwards SIGTERM to its ranks (SIGUSR1 too when started by `megatron_harpe.launch`) and
kills them after its `--shutdown-timeout`. What the trainer does with either signal:

1. the handler only records the first signal (a repeated one changes nothing, so a save in
   progress completes; checkpoints are written to a temporary name and renamed anyway), and
   from then on the rank outlives its launcher (rank_health.outlive_launcher: stock torchrun
   exits without waiting for its ranks when SIGTERMs keep coming);
2. after the step it is in, each rank reports what it received in the step's stop check (an
   all-reduce, `loop._stop_requested`), so all ranks stop after the same step even when the
   signal reaches them at different moments;
3. they save a checkpoint and exit with 128 + the signal's number (143 for SIGTERM, 138 for
   SIGUSR1: the code of a process ended by that signal, so nothing mistakes the stop for the end
   of training); the next launch resumes from that checkpoint, with the losses of a run that
   was never stopped.

A signal that arrives before the first step stops the run after it; one that arrives during a
checkpoint save stops it right after that save. The trainer installs the handlers itself
(`stop_signals()` in training.loop.train): nothing to configure. docs/slurm.md says what each
kind of Slurm stop does with this.

Helper processes must survive the signal too: Slurm signals every process of the job step,
and megatron-core's checkpoint writer hands its results back through a multiprocessing Manager
it spawns on the first save and keeps; killed by the SIGTERM, the save it is needed for fails.
`start_checkpoint_writer_helper` starts it before training, with the stop signals blocked in it
(it still ends with the trainer: when the trainer exits, or by the kernel when it is killed).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import signal
import sys
import threading
from collections.abc import Iterator
from multiprocessing.managers import SyncManager

from megatron_harpe import rank_health

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_PR_SET_PDEATHSIG = 1


def exit_code(signum: int) -> int:
    """The exit code of a run stopped by `signum` (after saving): 128 + its number."""
    return 128 + int(signum)


class Preempted(SystemExit):
    """Raised by the trainer after it saved on a stop signal; exits with `exit_code(signum)`."""

    def __init__(self, signum: int) -> None:
        super().__init__(exit_code(signum))
        self.signum = int(signum)


class StopSignals:
    """Records the first SIGTERM / SIGUSR1 this process receives (`received`: its number, or 0)."""

    def __init__(self) -> None:
        self.received = 0

    def _record(self, signum: int, frame) -> None:
        if not self.received:
            self.received = signum
            rank_health.outlive_launcher()  # the rank saves, then exits by itself

    def name(self, signum: int | None = None) -> str:
        return signal.Signals(signum or self.received).name


@contextlib.contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """Install the recording handlers for the duration of the block (main thread only), then
    restore the previous ones."""
    signals = StopSignals()
    if threading.current_thread() is not threading.main_thread():  # Python delivers signals to the main thread only
        yield signals
        return
    previous = {signum: signal.signal(signum, signals._record) for signum in STOP_SIGNALS}
    try:
        yield signals
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def start_checkpoint_writer_helper() -> None:
    """Start megatron-core's checkpoint-writer Manager process now, deaf to the stop signals and
    ended by the kernel if this process dies (see the module docstring). Once per process."""
    global _writer_manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _writer_manager is not None or getattr(filesystem_async, "_results_queue", None) is not None:
        return
    # what filesystem_async._get_write_results_queue() would create on the first save, plus the initializer
    _writer_manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    _writer_manager.start(initializer=_ignore_stop_signals_while_parent_lives)
    filesystem_async._results_queue = _writer_manager.Queue()


_writer_manager: SyncManager | None = None


def _ignore_stop_signals_while_parent_lives() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
