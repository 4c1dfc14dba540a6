"""megatron-core's sequence parallelism on CPU, for tests (the product runs it on GPUs only).

    from tests.distributed.sequence_parallel_cpu import enable_sequence_parallel_on_cpu
    enable_sequence_parallel_on_cpu()      # in a spawned rank, before building the model

Three things stand between megatron-core 0.16.1's sequence-parallel path and a CPU, and this
replaces exactly those in the calling process:
- its torch norms refuse it (`WrappedTorchNorm` asserts `not config.sequence_parallel`; on GPUs
  the TE layer spec uses Transformer Engine's norms): a torch RMSNorm whose weight is marked
  `sequence_parallel`, as TE marks its norm weights, stands in;
- its all-gather / reduce-scatter buffers are allocated on `torch.cuda.current_device()`
  (tensor_parallel/mappings.py, layers.py): that returns the CPU here;
- its embedding forks the CUDA RNG tracker around dropout under sequence parallelism: a no-op
  (dropout is 0).
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
        param.sequence_parallel = True
    return norm


def enable_sequence_parallel_on_cpu() -> None:
    from megatron.core import tensor_parallel
    from megatron.core.transformer import torch_norm

    from megatron_harpe.config import ParallelConfig

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch_norm.WrappedTorchNorm.__new__ = _rmsnorm_marked_sequence_parallel
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *args, **kwargs: contextlib.nullcontext()
    original = ParallelConfig.validate

    def validate_without_the_te_requirement(self, model):  # the stand-in norms above replace TE's
        sequence_parallel, self.sequence_parallel = self.sequence_parallel, False
        try:
            original(self, model)
        finally:
            self.sequence_parallel = sequence_parallel

    ParallelConfig.validate = validate_without_the_te_requirement
