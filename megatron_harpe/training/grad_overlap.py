"""Gradient reduction over DP x CP that overlaps with backward, in buckets (what DDP does).

    reducer = OverlappedGradientReduction(model, ctx.dp_cp_group)
    for index, batch in enumerate(micro_batches):
        if index == len(micro_batches) - 1:
            reducer.arm()                 # only the last micro-batch completes the gradients
        loss(batch).backward()            # each full bucket starts its all-reduce here
    reducer.finish()                      # the rest, then wait: .grad holds the SUM over the group

Under bf16 parameters the buckets reduce the fp32 ``main_grad`` (mixed_precision.py), whose
hooks must be registered before this class's so they run first.

Buckets hold parameters in reverse registration order (backward reaches the last layers first)
up to `bucket_numel` elements; a bucket's SUM all-reduce starts (asynchronously, through
`megatron_harpe.collectives`) when a post-accumulate-grad hook has fired for each of its
parameters. The result equals `grads.allreduce_gradients` (tested on gloo ranks, and on CPU
the same hooks run as on GPU); parameters without a gradient get zeros, as there.
PyTorch's DDP does the same but wraps the module (changing its state-dict keys, which
megatron's sharded checkpoints name) and reduces every micro-batch unless told `no_sync`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron_harpe import collectives
from megatron_harpe.training.grads import DEFAULT_BUCKET_NUMEL, _buckets
from megatron_harpe.training.mixed_precision import gradient_of


class OverlappedGradientReduction:
    def __init__(self, model: torch.nn.Module, group: dist.ProcessGroup | None, bucket_numel: int = DEFAULT_BUCKET_NUMEL) -> None:
        self.group = group
        params = [param for param in model.parameters() if param.requires_grad]
        self.buckets = _buckets(list(reversed(params)), bucket_numel)
        self.bucket_of = {id(param): index for index, bucket in enumerate(self.buckets) for param in bucket}
        self.armed = False
        self.ready = [0] * len(self.buckets)
        self.pending: dict[int, tuple[collectives.PendingReduction, torch.Tensor]] = {}
        self.hooks = [param.register_post_accumulate_grad_hook(self._grad_ready) for param in params]

    def arm(self) -> None:
        """The next backward completes the gradients: reduce buckets as they fill."""
        self.armed, self.ready, self.pending = True, [0] * len(self.buckets), {}

    def _grad_ready(self, param: torch.nn.Parameter) -> None:
        if not self.armed:
            return
        index = self.bucket_of[id(param)]
        self.ready[index] += 1
        if self.ready[index] == len(self.buckets[index]):
            self._launch(index)

    def _launch(self, index: int) -> None:
        bucket = self.buckets[index]
        grads = []
        for param in bucket:
            grad = gradient_of(param)
            if grad is None:
                grad = param.grad = torch.zeros_like(param)
            grads.append(grad)
        flat = _flatten_dense_tensors(grads)
        self.pending[index] = (collectives.all_reduce_async(flat, group=self.group), flat)

    def finish(self) -> None:
        """Start the buckets backward did not complete (in bucket order), wait for all, and
        write the sums back into `.grad`."""
        if not self.armed:
            raise RuntimeError("OverlappedGradientReduction.finish() without arm() before the last backward")
        for index in range(len(self.buckets)):
            if index not in self.pending:
                self._launch(index)
        for index, (reduction, flat) in sorted(self.pending.items()):
            reduction.wait()
            bucket = self.buckets[index]
            grads = [gradient_of(param) for param in bucket]
            for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(reduced)
        self.armed, self.pending = False, {}
