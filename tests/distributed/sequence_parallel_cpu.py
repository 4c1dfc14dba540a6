"""megatron-core's sequence parallelism on CPU, for tests (the product runs it on GPUs only).

    from tests.distributed.sequence_parallel_cpu import enable_sequence_parallel_on_cpu
    enable_sequence_parallel_on_cpu()      # in a spawned rank, before building the model

Four things stand between megatron-core 0.16.1's sequence-parallel path and a CPU, and this
replaces exactly those in the calling process (a spawned test rank, never a CUDA one):
- its torch norms refuse it (`WrappedTorchNorm` asserts `not config.sequence_parallel`; on GPUs
  the TE layer spec uses Transformer Engine's norms): a torch RMSNorm stands in, its weight marked
  `sequence_parallel` when the model is (as TE marks its norm weights), so its gradient is a
  partial sum over each TP rank's tokens;
- its all-gather / reduce-scatter buffers are allocated on `torch.cuda.current_device()`
  (tensor_parallel/mappings.py, layers.py): that returns the CPU here;
- its embedding forks the CUDA RNG tracker around dropout under sequence parallelism: every
  tracker's fork is a no-op (dropout is 0);
- our config asks for the TE backend with sequence parallelism (`ParallelConfig.validate`): the
  stand-in norms above replace TE's, so that one requirement is skipped.
Everything else of megatron's path runs for real over gloo: the embedding's scatter, the linears'
all-gather and reduce-scatter along the sequence, the output layer's gather, and megatron's own
assertion that each rank's tokens divide over TP.
"""

from __future__ import annotations

import contextlib

import torch


def _rmsnorm_marked_sequence_parallel(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
    norm = torch.nn.RMSNorm(hidden_size, eps=eps)
    for param in norm.parameters():
        param.sequence_parallel = config.sequence_parallel
    return norm


def enable_sequence_parallel_on_cpu() -> None:
    """Patch this process so megatron's sequence parallelism runs on CPU (idempotent)."""
    assert not torch.cuda.is_available(), "only for CPU test ranks"
    from megatron.core.tensor_parallel import random as megatron_random
    from megatron.core.transformer import torch_norm

    from megatron_harpe.config import ParallelConfig

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch_norm.WrappedTorchNorm.__new__ = _rmsnorm_marked_sequence_parallel
    megatron_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    if getattr(ParallelConfig.validate, "skips_te_requirement", False):
        return
    original = ParallelConfig.validate

    def validate_without_the_te_requirement(self, model):  # the stand-in norms above replace TE's
        sequence_parallel, self.sequence_parallel = self.sequence_parallel, False
        try:
            original(self, model)
        finally:
            self.sequence_parallel = sequence_parallel

    validate_without_the_te_requirement.skips_te_requirement = True
    ParallelConfig.validate = validate_without_the_te_requirement
