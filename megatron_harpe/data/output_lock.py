"""One writer per output of data preparation, with the rules of the trainer's checkpoint lock.

    with output_lock("work/train"):      # holds work/train.lock for the whole command
        check_output_prefix("work/train", overwrite)
        ...write work/train.bin/.idx and work/train.summary.json...

Two `tokenize` runs started into one output prefix both used to finish with exit code 0, the
later one replacing the other's dataset without `--overwrite` (its check ran only at start).
Now the second refuses at once, naming the holder (host, pid, Slurm job, start time), and the
writers check again at rename time (`DatasetWriter`, `atomic_output`), so a finished output is
only ever replaced with `--overwrite`. A lock left by a killed run is taken over as
checkpointing/run_lock.py describes (its pid gone on this host, a heartbeat older than 10 minutes
from another host, or the same Slurm job after a requeue), in one line.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

from megatron_harpe.checkpointing.run_lock import RunLock, describe_holder


class OutputLocked(ValueError):
    """Another live run is writing the same output."""


@contextlib.contextmanager
def output_lock(output: str | Path, what: str = "output", lock_path: str | Path | None = None) -> Iterator[None]:
    """Hold `<output>.lock` (or `lock_path`) for the block; `what` names the output in the refusal."""
    output = Path(os.path.abspath(output))
    lock_path = Path(lock_path) if lock_path is not None else output.with_name(f"{output.name}.lock")

    def refusal(holder: dict) -> Exception:
        return OutputLocked(
            f"{what} {output} is being written by another run ({describe_holder(holder)}): wait for it to finish or "
            f"stop it, or choose another output (if that run is dead, delete {lock_path})"
        )

    try:
        lock = RunLock(lock_path.parent, lock_path=lock_path, refusal=refusal).acquire()
    except OutputLocked:
        raise
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(lock_path)) from error
    for message in lock.messages:
        print(message, file=sys.stderr)
    try:
        yield
    finally:
        lock.release()
