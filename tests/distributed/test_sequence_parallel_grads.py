"""Under sequence parallelism each TP rank sees part of the sequence, so the gradients of the
parameters megatron marks `sequence_parallel` (TE's norm weights) are partial sums: the trainer
adds their FSDP2 shards over TP after the engine summed them over DP x CP; other gradients
stay as they are. Run at TP2 x DP2 (four ranks), as a GPU run shards them.

    python -m pytest tests/distributed/test_sequence_parallel_grads.py -q
"""

from __future__ import annotations

import pytest
import torch

from megatron_harpe import parallel

pytestmark = pytest.mark.distributed


class _Layer(torch.nn.Module):
    """A norm weight replicated over TP (sequence parallel) and a TP-sharded matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.Parameter(torch.ones(6))
        self.norm.sequence_parallel = True
        self.column = torch.nn.Parameter(torch.ones(4, 3))
        self.column.tensor_model_parallel = True

    def forward(self, value: float) -> torch.Tensor:
        return (self.norm * value).sum() + (self.column * value).sum()


def _reduce_on_tp2_dp2() -> dict:
    from megatron_harpe.training.sharding import reduce_sequence_parallel_gradients, shard_modules

    ctx = parallel.initialize(2, 1)
    layer = _Layer()
    shard_modules(layer, [], ctx.dp_cp_group, "fp32")
    assert layer.norm.sequence_parallel and layer.column.tensor_model_parallel  # kept through fully_shard
    layer(float(ctx.tp_rank + 1 + 10 * ctx.dp_rank)).backward()  # the engine sums over DP
    reduce_sequence_parallel_gradients(layer, ctx.tp_group)
    return {"tp_rank": ctx.tp_rank, "norm": layer.norm.grad.full_tensor().tolist(),
            "column": layer.column.grad.full_tensor().tolist()}  # fmt: skip


def test_sequence_parallel_gradients_are_summed_over_tp_after_dp():
    for result in parallel.run_on_ranks(_reduce_on_tp2_dp2, 4):
        assert result["norm"] == [26.0] * 6  # (1 + 11) + (2 + 12): every rank's part
        column = 2 * (result["tp_rank"] + 1) + 10  # its own TP rank's DP sum only
        assert result["column"] == [[float(column)] * 3] * 4
