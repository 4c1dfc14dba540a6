"""What the sharding engine and the GPU itself take, per GPU, beside the model's activations:
the planner's figures for PyTorch FSDP2 and the headroom it keeps (`planner/memory.py` adds them up).

    states = sharded_states(parameters=1_684_803_584, replicas=8)          # {"fp32 weights": ..., ...}
    buffers = unit_buffers(layer_parameters, root_parameters, precision)   # FSDP2's short-lived copies
    room = headroom(Headroom(), layout, tensor_bytes)                      # CUDA context, NCCL, fragmentation

The engine (what a GPU run shards and reduces with): PyTorch FSDP2, `fully_shard` on each
megatron TransformerLayer and on the model, over the DP x CP group (CP ranks hold the same weights):
ZeRO-3. Between steps a rank holds 1/(DP x CP) of the fp32 weights (the main weights), of their
fp32 gradients and of AdamW's two fp32 moments: 16 bytes per parameter, sharded. During forward and
backward each unit (one layer) is all-gathered in the compute dtype (`MixedPrecisionPolicy(param_dtype
=bf16)`), the next unit prefetched, and resharded after use; its gradients come out of backward in the
compute dtype, are cast to fp32 (`reduce_dtype=fp32`) and reduce-scattered into the fp32 shard after
every micro-batch. No full copy of the gradients exists at any time. The root unit (embedding, final
norm, output layer) is not resharded after forward (FSDP2 keeps the root's parameters for backward,
which starts with the output layer), and the output layer's gradient waits in the compute dtype until
the root's reduce-scatter at the end of backward (the embedding's gradient comes last).
Under `autocast` (fp32 weights, bf16 compute) autocast keeps a bf16 copy of every weight it cast
from forward to backward: 2 bytes per parameter of the whole (TP-sharded, DP-unsharded) model.

Headroom (not in PyTorch's allocator's view, or not in the tensors the planner counts); each figure
can be changed on the command line of tools/plan_memory.py:
- CUDA context, kernels and library workspaces: 1.0 GiB. The context alone is ~0.3 GiB with CUDA's
  lazy module loading (CUDA >= 11.7; pytorch/pytorch#107667) and ~1 GiB without it (#28394); cuBLAS
  and Transformer Engine keep workspaces of tens of MiB per stream.
- NCCL: 0.75 GiB per communicator a step uses (TP, CP, DP x CP, and the default group for the
  trainer's small all-reduces). PyTorch process groups on 4 x A100 NVLink measured 544-688 MB each
  (NVIDIA/nccl#964); NCCL's buffers grow with its channels (NVIDIA/nccl#986), H100s use more, and
  all-to-all can take several GiB (NVIDIA/nccl#1685). `NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=ALLOC` shows yours.
- Allocator fragmentation: 10% of the planned tensors, with `PYTORCH_CUDA_ALLOC_CONF=
  expandable_segments:True` (pretrain_harpe.py sets it unless the environment does). Without it the
  caching allocator's reserved-but-unused memory reached 50% of the allocated in reported runs
  (meta-pytorch/torchtune#1185: 16.4 GiB against 10.8 GiB with expandable segments).
"""

from __future__ import annotations

import dataclasses

GIB = 2**30
ENGINE = "PyTorch FSDP2 (fully_shard per transformer layer, ZeRO-3) over DP x CP"

SHARDED_BYTES = {"fp32 weights": 4, "fp32 gradients": 4, "AdamW moments (2 x fp32)": 8}
"""Bytes per parameter the engine keeps between steps, all sharded over DP x CP."""


@dataclasses.dataclass(frozen=True)
class Headroom:
    cuda_context_gib: float = 1.0
    nccl_gib_per_group: float = 0.75
    fragmentation: float = 0.10
    """Fraction of the planned tensors lost to the caching allocator's fragmentation."""


def sharded_states(parameters: int, replicas: int) -> dict[str, int]:
    """Bytes per rank of the engine's sharded fp32 state, by kind (`replicas` = DP x CP)."""
    return {kind: -(-parameters * size // replicas) for kind, size in SHARDED_BYTES.items()}


def unit_buffers(layer_parameters: int, root_parameters: int, unit_bytes: int) -> dict[str, int]:
    """FSDP2's unsharded copies alive at the peak (early in backward, when activations are largest).
    `unit_bytes`: bytes per parameter of the all-gathered weights and of their gradients (the compute
    dtype, or fp32 when the weights are fp32)."""
    buffers = {
        "all-gathered weights: 2 layers (current + prefetched)": 2 * layer_parameters * unit_bytes,
        "all-gathered weights: root (embedding, output layer, final norm)": root_parameters * unit_bytes,
        "unsharded gradients: 1 layer": layer_parameters * unit_bytes,
        "unsharded gradients: root (output layer's, until the root reduce-scatter)": root_parameters * unit_bytes,
    }
    if unit_bytes != 4:  # gradients cast to fp32 for the reduce-scatter (reduce_dtype=fp32)
        buffers["fp32 reduce-scatter input: 1 layer"] = layer_parameters * 4
    return buffers


def nccl_groups(tensor: int, context: int, data: int) -> list[str]:
    """The communicators a training step uses on this layout."""
    groups = [name for name, size in (("TP", tensor), ("CP", context), ("DP x CP", data * context)) if size > 1]
    return groups + (["default"] if tensor * context * data > 1 else [])


def headroom(figures: Headroom, tensor: int, context: int, data: int, tensor_bytes: int) -> dict[str, int]:
    """Bytes per GPU outside the planned tensors, by item (see the module docstring for the sources)."""
    groups = nccl_groups(tensor, context, data)
    return {
        "CUDA context, kernels, library workspaces": int(figures.cuda_context_gib * GIB),
        f"NCCL buffers ({len(groups)} communicators: {', '.join(groups) or 'none'})":
            int(len(groups) * figures.nccl_gib_per_group * GIB),
        f"allocator fragmentation ({figures.fragmentation:.0%} of the tensors)":
            int(figures.fragmentation * tensor_bytes),
    }  # fmt: skip


HEADROOM_SOURCES = (
    "CUDA context ~0.3 GiB with lazy loading (pytorch/pytorch#107667), ~1 GiB without (#28394), plus workspaces",
    "NCCL 544-688 MB per process group on A100 NVLink (NVIDIA/nccl#964), more with more channels (NVIDIA/nccl#986)",
    "fragmentation with expandable_segments:True; without it up to +50% (meta-pytorch/torchtune#1185)",
)
