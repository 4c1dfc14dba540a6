"""Stop signals on 2 gloo ranks (training/preemption.py): a SIGTERM that reaches one rank only
stops both after the same step, with one checkpoint; a SIGUSR1 during a checkpoint save stops the
run right after that save instead of training and saving another step; the run exits with
128 + the signal's number. (That the next launch continues exactly: tests/faults/test_preemption.py.)

    python -m pytest -q tests/distributed/test_preemption_ranks.py
"""

from __future__ import annotations

import os
import signal

import pytest
from test_training import tiny_config

from megatron_harpe.checkpointing.checkpoint import find_latest_checkpoint

pytestmark = pytest.mark.distributed


def _train_signalled(tree: dict, where: str, at: int, rank: int, signum: int):
    """Train, sending `signum` to this process when `where` ("train_step" or "_save") starts
    step `at` on global rank `rank`. Returns ("done", history) or ("stopped", signum, exit code)."""
    import torch.distributed as dist

    from megatron_harpe.config import Config, from_dict
    from megatron_harpe.training import loop, preemption

    original = getattr(loop, where)

    def signalled(*args, **kwargs):
        step = args[7] if where == "train_step" else args[4].iteration
        if step == at and dist.get_rank() == rank:
            os.kill(os.getpid(), signum)  # handled at once: in the middle of the step / the save
        return original(*args, **kwargs)

    setattr(loop, where, signalled)
    try:
        return "done", loop.train(from_dict(Config, tree))
    except preemption.Preempted as stop:
        return "stopped", stop.signum, stop.code


def test_sigterm_on_one_rank_stops_both_after_the_same_step(demo_data, tmp_path):
    tree = tiny_config(demo_data, checkpoint={"save": str(tmp_path / "ckpt"), "save_interval": 100})
    stopped = run_signalled(2, tree, "train_step", at=3, rank=1, signum=signal.SIGTERM)
    assert stopped == [("stopped", signal.SIGTERM, 143)] * 2
    assert [p.name for p in sorted((tmp_path / "ckpt").glob("iter_*"))] == ["iter_0000003"]


def test_a_signal_during_a_save_stops_right_after_it(demo_data, tmp_path):
    tree = tiny_config(demo_data, checkpoint={"save": str(tmp_path / "ckpt"), "save_interval": 2})
    stopped = run_signalled(2, tree, "_save", at=2, rank=0, signum=signal.SIGUSR1)
    assert stopped == [("stopped", signal.SIGUSR1, 138)] * 2
    assert find_latest_checkpoint(tmp_path / "ckpt").name == "iter_0000002"
    assert not list((tmp_path / "ckpt").glob("iter_0000003*")), "no step after the save it interrupted"


def run_signalled(world_size: int, tree: dict, where: str, at: int, rank: int, signum: int) -> list:
    from megatron_harpe import parallel

    return parallel.run_on_ranks(_train_signalled, world_size, tree, where, at, rank, signum)
