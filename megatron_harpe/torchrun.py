"""torchrun for jobs that get preempted: `python -m megatron_harpe.torchrun [torchrun's arguments]`.

`python -m megatron_harpe.launch` (what the sbatch scripts run on each node) replaces itself with
this instead of `python -m torch.distributed.run`. It is torchrun (its own `main`, all its
arguments) with three differences that matter when Slurm stops a job:

- repeated SIGTERMs do not cut the shutdown short. Slurm signals every process of the job step
  and srun forwards the signal again, so torchrun gets it at least twice; stock torchrun starts
  its shutdown again on the second and exits on the third without waiting for its ranks, which
  may be saving a checkpoint. Here the first SIGTERM (or SIGUSR1) is forwarded to the ranks and
  later ones are ignored;
- SIGUSR1 (`#SBATCH --signal=USR1@N`) is forwarded to the ranks like SIGTERM; stock torchrun
  handles it only when asked (--signals-to-handle) and otherwise dies of it;
- after such a signal it prints one line and exits with 128 + the signal's number, the code the
  ranks exit with once they have saved (training/preemption.py), instead of a traceback and 1;
- when a rank fails, it prints one line naming the first rank that failed and exits with that
  rank's code (2 for a config or input error, whose one-line message the rank printed),
  instead of torchrun's ChildFailedError report and 1.

The ranks get torchrun's --shutdown-timeout (the launcher passes 600 s) to save and exit before
torchrun kills them; under Slurm the cluster's KillWait is the limit that counts.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

FORWARDED_ONCE = (signal.SIGTERM, signal.SIGUSR1)
TORCHRUN_HANDLES = "SIGINT,SIGHUP,SIGQUIT"
"""The signals left to torchrun's own handler (it raises on every one of them)."""


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    received: list[int] = []

    def first_one_only(signum: int, frame) -> None:
        if received:
            return  # already stopping the ranks: they are saving, let them finish
        received.append(signum)
        raise SignalException(f"got {signal.Signals(signum).name}", sigval=signal.Signals(signum))

    for signum in FORWARDED_ONCE:
        signal.signal(signum, first_one_only)
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not any(arg.startswith(("--signals-to-handle", "--signals_to_handle")) for arg in arguments):
        arguments.insert(0, f"--signals-to-handle={TORCHRUN_HANDLES}")
    try:
        torchrun_main(arguments)
    except SignalException as error:
        name = signal.Signals(error.sigval).name
        code = 128 + int(error.sigval)
        print(f"[launch] {name}: the ranks were asked to save after their current step and exit; exit code {code}",
              file=sys.stderr, flush=True)  # fmt: skip
        return code
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        code = failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode  # -N: killed by signal N
        how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {code}"
        print(f"[launch] {error.name} failed: rank {rank} {how} first (its messages are above)",
              file=sys.stderr, flush=True)  # fmt: skip
        return code or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
