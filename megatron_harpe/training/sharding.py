"""Sharded data parallelism: PyTorch FSDP2 (`fully_shard`) applied to megatron-core's modules.

    precision = training_precision(cfg.train, ctx.device.type)
    model = build_model(cfg.model, position, parallel=cfg.parallel)      # fp32, TP-local
    shard_model(model, ctx, precision)                                  # in place
    ... loss.backward() per micro-batch ...                            # grads reduce-scattered (SUM)
    reduce_sequence_parallel_gradients(model, ctx.tp_group)             # sequence_parallel=True
    norm = grads.clip_grad_norm(model, cfg.train.clip_grad, ctx.tp_group, ctx.dp_cp_group)

What it does: every TransformerLayer is one FSDP2 unit, the GPTModel root another (embedding,
final norm, output layer, tied or not). The mesh is the DP x CP group (`DeviceMesh.from_group`,
"cuda" with NCCL on GPUs, "cpu" with gloo here): those ranks hold identical weights, so each
keeps rows [r*c, min((r+1)*c, n)) (c = ceil(n / DP x CP)) of every TP-local parameter as a
DTensor. Tensor parallelism stays megatron's: to FSDP a TP shard is a plain tensor.

Per rank (P = parameters of this TP rank, W = DP x CP):
- persistent: fp32 parameter shards (the fp32 main weights) 4P/W bytes, fp32 gradient shards
  4P/W, AdamW moments 8P/W;
- transient, in forward and backward: the unsharded compute weights of the unit running and of
  the next one (prefetch), bf16 under bf16 precision; the root unit (embedding, output layer,
  final norm) stays unsharded from its forward to the end of backward; in backward a unit's
  unsharded gradient in the compute dtype plus its fp32 copy for the reduce-scatter.
- communication per micro-batch: all-gather of the compute weights in forward and again in
  backward ((W-1)/W x P x 2 bytes each under bf16), reduce-scatter of fp32 gradients
  ((W-1)/W x P x 4 bytes), overlapped with compute by FSDP2's prefetching; once per step a
  few scalars (gradient norm) over DP x CP and TP, and under sequence parallelism the norm
  gradients' all-reduce over TP.

Gradients are SUMMED over DP x CP (`set_gradient_divide_factor(1.0)` with sum-only
collectives): the loss is already normalised by the global token count (grads.py), so FSDP2's
default average would divide twice. Every micro-batch's backward reduce-scatters into the fp32
gradient shards, which accumulate there: no unsharded gradient outlives its unit's backward.

Precision (mixed_precision.training_precision): ``bf16`` is `MixedPrecisionPolicy(param_dtype=
bf16, reduce_dtype=fp32)` over fp32 shards (the layers' float arguments left uncast: the rotary
angle table stays fp32); ``fp32`` and ``autocast`` (bf16 autocast, GPU)
gather fp32 weights.

Megatron's parameter attributes (``tensor_model_parallel``, ``sequence_parallel``, ...) live on
the Parameter objects that fully_shard replaces: they are read before wrapping and set again on
the sharded parameters, so megatron's helpers (e.g. `param_is_not_tensor_parallel_duplicate`)
keep working.

Why FSDP2 and not megatron-core's engines (measured with megatron-core 0.16.1, torch 2.13):
- `DistributedDataParallel` + `DistributedOptimizer` allocate on CUDA unconditionally
  (param_and_grad_buffer.py: `torch.cuda.current_device()`; optimizer.py: `found_inf` on
  'cuda'; distrib_optimizer.py and clip_grads.py type-check `torch.cuda.*Tensor`): they cannot
  run in the CPU suite, so the parity tests here would test another engine than a GPU run.
- `TorchFullyShardedDataParallel` (megatron's FSDP2 wrapper) builds its mesh on "cuda"; with
  that patched to "cpu" it fails inside fully_shard on our GPTModel at DP2
  (`_init_sharding_spec_tp`: `TypeError: Invariant encountered: value was None`), and it adds
  nothing but fully_shard calls and the attribute copying done here. Megatron-FSDP
  (megatron/core/distributed/fsdp/src/megatron_fsdp) allocates its buffers on CUDA too.
- megatron's own DTensor support in `sharded_state_dict` assumes even shards: it describes an
  FSDP2 shard as fragment tp_rank x W + r of W x TP equal parts, which is wrong whenever W does
  not divide a dimension, and its SwiGLU fc1 factory chunks the local FSDP shard into halves as
  if it held both halves of the TP shard (it holds a block of rows). Checkpoints therefore go
  through checkpointing/fsdp_entries.py, which describes the irregular shards exactly.
FSDP2 itself runs on gloo and NCCL alike, so the tests in tests/distributed run the engine a
GPU run uses (tests/distributed/test_sharding.py). Transformer Engine's modules run under
fully_shard (TE's own tests/pytorch/distributed/run_fsdp2_model.py wraps te.Linear the same way,
copying parameter attributes across); megatron's `gradient_accumulation_fusion` must stay off
(model.py): it writes into a `main_grad` that FSDP2 parameters do not have. Build the model with
`initialize=True`: megatron sets its TP attributes only when it initializes the weights.

Prefetching is set explicitly (layer i+1's all-gather issued with layer i's forward, layer i-1's
with layer i's backward): FSDP2 would otherwise infer the backward order from the forward, which
activation recomputation calling layers again during backward can disturb (megatron's wrapper
does the same for that reason).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from megatron_harpe import collectives
from megatron_harpe.sharded_params import MEGATRON_ATTRIBUTES
from megatron_harpe.training.grads import local_gradients


def mixed_precision_policy(precision: str, cast_forward_inputs: bool = True) -> MixedPrecisionPolicy:
    """bf16 compute weights over fp32 shards with fp32 reduction, or everything in fp32.
    `cast_forward_inputs`: whether FSDP2 casts the unit's float arguments to bf16 (see shard_modules)."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=cast_forward_inputs)  # fmt: skip
    return MixedPrecisionPolicy()


def data_parallel_mesh(group: dist.ProcessGroup) -> DeviceMesh:
    """The 1-D mesh over `group` on the device type its backend communicates on."""
    return DeviceMesh.from_group(group, collectives.collective_device(group).type)


def shard_modules(model: torch.nn.Module, units: list[torch.nn.Module], group: dist.ProcessGroup,
                  precision: str) -> torch.nn.Module:  # fmt: skip
    """fully_shard each of `units` (inner modules, in forward order), then `model` (the root,
    holding whatever parameters no unit holds), over `group`, gradients summed."""
    attributes = {name: {key: getattr(param, key) for key in MEGATRON_ATTRIBUTES if hasattr(param, key)}
                  for name, param in model.named_parameters()}  # fmt: skip
    for param in model.parameters():
        if param.dtype != torch.float32:
            raise ValueError(f"the sharded engine keeps fp32 weights; got a {param.dtype} parameter: build the model "
                             "in fp32 (bf16 compute comes from train.precision)")  # fmt: skip
    mesh = data_parallel_mesh(group)
    # Inner units keep their float arguments as they come: FSDP2 would cast a layer's fp32 rotary
    # angle table to bf16 (position 1e5 off by up to 256 radians, its cached cos/sin dropped);
    # its hidden states are bf16 already, from the root's bf16 embedding.
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mixed_precision_policy(precision, cast_forward_inputs=False))
    fully_shard(model, mesh=mesh, mp_policy=mixed_precision_policy(precision))
    for previous, following in zip(units, units[1:]):  # explicit, so that recompute cannot reorder it
        previous.set_modules_to_forward_prefetch([following])
        following.set_modules_to_backward_prefetch([previous])
    for unit in (*units, model):  # these setters act on one unit each
        unit.set_gradient_divide_factor(1.0)  # summed: the loss is normalised by the global token count
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM; NCCL's zero-copy path)
    for name, param in model.named_parameters():
        for key, value in attributes[name].items():
            setattr(param, key, value)
    return model


def shard_model(gpt: torch.nn.Module, ctx, precision: str) -> torch.nn.Module:
    """Shard a megatron GPTModel over DP x CP: one unit per transformer layer, then the root."""
    return shard_modules(gpt, list(gpt.decoder.layers), ctx.dp_cp_group, precision)


def reduce_sequence_parallel_gradients(model: torch.nn.Module, tp_group: dist.ProcessGroup | None) -> None:
    """Sum over TP the gradient shards of parameters megatron marks ``sequence_parallel`` (norm
    weights under sequence parallelism: each TP rank saw part of the sequence, so its gradient
    is a partial sum; megatron's `finalize_model_grads` does this for its own DDP). TP ranks
    hold the same FSDP2 rows of these TP-replicated weights, so the shards add up directly."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return
    grads = [grad for param, grad in local_gradients(model) if getattr(param, "sequence_parallel", False)]
    if not grads:
        return
    flat = collectives.all_reduce(_flatten_dense_tensors(grads), group=tp_group)
    for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(reduced)
