"""Under sequence parallelism each TP rank sees part of the sequence, so the gradients of the
parameters megatron marks `sequence_parallel` (TE's norm weights) are partial sums: the trainer
adds them over TP, other gradients stay as they are.

    python -m pytest tests/distributed/test_sequence_parallel_grads.py -q
"""

from __future__ import annotations

import pytest
import torch

from megatron_harpe import parallel
from megatron_harpe.training.grads import allreduce_sequence_parallel_gradients

pytestmark = pytest.mark.distributed


def _reduce_on_tp2() -> dict:
    ctx = parallel.initialize(2, 1)
    module = torch.nn.Module()
    module.norm = torch.nn.Parameter(torch.zeros(3))
    module.norm.sequence_parallel = True
    module.column = torch.nn.Parameter(torch.zeros(2, 3))
    module.norm.grad = torch.full((3,), float(ctx.tp_rank + 1))
    module.column.grad = torch.full((2, 3), float(ctx.tp_rank + 1))
    allreduce_sequence_parallel_gradients(module, ctx.tp_group)
    return {"norm": module.norm.grad.tolist(), "column": module.column.grad.tolist()}


def test_sequence_parallel_gradients_are_summed_over_tp():
    results = parallel.run_on_ranks(_reduce_on_tp2, 2)
    for rank, result in enumerate(results):
        assert result["norm"] == [3.0, 3.0, 3.0]
        assert result["column"] == [[float(rank + 1)] * 3] * 2
