"""Bucketed gradient reduction during backward equals the reduction after it, and the owner
partition of the sharded optimizer is balanced and the same everywhere.

    python -m pytest tests/distributed/test_grad_overlap.py -q
"""

from __future__ import annotations

import pytest
import torch

from megatron_harpe import parallel
from megatron_harpe.training.grad_overlap import OverlappedGradientReduction
from megatron_harpe.training.grads import allreduce_gradients
from megatron_harpe.training.sharded_optimizer import partition

pytestmark = pytest.mark.distributed


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    net.unused = torch.nn.Parameter(torch.ones(2))  # gets no gradient: reduced as zeros
    return net


def _both_ways() -> dict:
    ctx = parallel.initialize(1, 1)
    inputs = [torch.randn(3, 6, generator=torch.Generator().manual_seed(10 * ctx.rank + i)) for i in range(2)]
    grads = {}
    for overlapped in (False, True):
        net = _net()
        reducer = OverlappedGradientReduction(net, ctx.dp_cp_group, bucket_numel=25) if overlapped else None
        for index, x in enumerate(inputs):  # two accumulated micro-batches
            if reducer is not None and index == len(inputs) - 1:
                reducer.arm()
            net(x).square().sum().backward()
        launched_in_backward = len(reducer.pending) if reducer else 0
        reducer.finish() if reducer else allreduce_gradients(net, ctx.dp_cp_group)
        grads[overlapped] = {name: p.grad.clone() for name, p in net.named_parameters()}
        if reducer:
            grads["buckets"], grads["launched_in_backward"] = len(reducer.buckets), launched_in_backward
    return grads


def test_overlapped_reduction_equals_reduction_after_backward():
    for result in parallel.run_on_ranks(_both_ways, 2):
        assert result["buckets"] > 2 and result["launched_in_backward"] >= 1  # it did overlap
        for name, after in result[False].items():
            assert torch.allclose(result[True][name], after, atol=1e-6), name
        assert torch.equal(result[True]["unused"], torch.zeros(2))


def test_partition_balances_largest_first():
    assert partition([10, 1, 1, 8, 2], 2) == [0, 0, 1, 1, 1]  # 10+1 and 8+2+1
    assert partition([5, 5, 5], 4) == [0, 1, 2]
    assert partition([3, 3], 1) == [0, 0]
