"""Test-only shims that let megatron-core's sequence parallelism run on CPU gloo ranks.

Sequence parallelism needs Transformer Engine's norms (megatron's torch norms refuse it), and
megatron allocates its sequence-parallel gather / reduce-scatter buffers on
`torch.cuda.current_device()` and forks its CUDA RNG tracker around dropout. With three patches,
applied inside spawned test ranks only, the rest is megatron's own code: the embedding scatters
the sequence over TP, every column-parallel linear all-gathers it, every row-parallel linear
reduce-scatters it, and the output layer gathers it again.
- norms: torch RMSNorm whose weight is marked `sequence_parallel` (as TE's are), so its
  gradient is a partial sum over the TP ranks' tokens;
- buffers: `torch.cuda.current_device()` answers the CPU;
- RNG: the tracker's fork is a no-op (dropout is 0 in these models).
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.tensor_parallel import random as megatron_random
from megatron.core.transformer import torch_norm


def _sequence_parallel_rms_norm(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
    norm = torch.nn.RMSNorm(hidden_size, eps=eps)
    for param in norm.parameters():
        param.sequence_parallel = config.sequence_parallel
    return norm


def allow_sequence_parallel_on_cpu() -> None:
    """Patch this process (a spawned test rank) so megatron's sequence parallelism runs on CPU."""
    assert not torch.cuda.is_available(), "only for CPU test ranks"
    torch_norm.WrappedTorchNorm.__new__ = _sequence_parallel_rms_norm
    torch.cuda.current_device = lambda: torch.device("cpu")
    megatron_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
