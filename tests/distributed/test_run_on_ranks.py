"""The local multi-process launcher the tests and tools rely on."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from megatron_harpe.parallel import run_on_ranks

pytestmark = pytest.mark.distributed


def _sum_of_ranks():
    dist.init_process_group("gloo")
    value = torch.tensor(float(dist.get_rank()))
    dist.all_reduce(value)
    return dist.get_rank(), value.item(), torch.ones(3) * dist.get_rank()


def _fails():
    raise KeyError("missing piece")


def _dies():
    os._exit(3)


def test_results_come_back_by_rank_with_tensors():
    results = run_on_ranks(_sum_of_ranks, 2)
    assert [r[0] for r in results] == [0, 1]
    assert all(r[1] == 1.0 for r in results)
    torch.testing.assert_close(results[1][2], torch.ones(3))


def test_a_failing_rank_raises_its_traceback():
    with pytest.raises(RuntimeError, match="KeyError: 'missing piece'"):
        run_on_ranks(_fails, 1)


def test_a_rank_that_dies_silently_is_reported():
    with pytest.raises(RuntimeError, match="died without reporting"):
        run_on_ranks(_dies, 1, timeout=60)
