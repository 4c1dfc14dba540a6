"""What a config will do, computed without building anything (`pretrain_harpe.py --dry-run`).

Parameter counts: parameters.py; bytes per GPU and step time: memory.py.
"""

from __future__ import annotations

import math

from megatron_harpe.config import Config
from megatron_harpe.planner.document_cost import document_masking_lines
from megatron_harpe.planner.parameters import parameters_per_rank


def describe_plan(cfg: Config, world_size: int) -> str:
    tp, cp = cfg.parallel.tensor, cfg.parallel.context
    dp = world_size // (tp * cp)
    train = cfg.train
    accumulation = train.global_batch_size // (train.micro_batch_size * dp)
    total_params = parameters_per_rank(cfg.model, 1)
    lines = [
        f"world size {world_size} = tensor {tp} x context {cp} x data {dp}",
        f"model: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
        f"{cfg.model.num_attention_heads} heads / {cfg.model.kv_groups} k/v groups, "
        f"{total_params / 1e9:.3f}B parameters, {parameters_per_rank(cfg.model, tp) / 1e9:.3f}B per rank",
        f"batch: global {train.global_batch_size} sequences = micro {train.micro_batch_size} x "
        f"accumulation {accumulation} x data-parallel {dp}",
    ]
    lines += execution_lines(cfg, tp, cp, dp)
    lines += document_masking_lines(cfg, cp, tp)
    total_steps = 0
    for index, stage in enumerate(cfg.resolved_stages()):
        tokens_per_step = stage.global_batch_size * stage.seq_length
        steps = math.ceil(stage.tokens / tokens_per_step)
        total_steps += steps
        position = stage.position
        encoding = (
            f"harpe, {len(position.bases)} bases {min(position.bases):.4g}..{max(position.bases):.4g}"
            if position.type == "harpe"
            else f"{position.type}, base {position.base:.4g}"
            + (f", scale {position.scaling_factor:g}" if position.type in ("pi", "yarn") else "")
        )
        lines.append(
            f"stage {index}: seq {stage.seq_length} ({stage.seq_length // cp} tokens per CP rank), {encoding}; "
            f"global batch {stage.global_batch_size}, "
            f"{tokens_per_step:,} tokens/step x {steps:,} steps = {steps * tokens_per_step:,} tokens"
        )
    lines.append(f"total: {total_steps:,} optimizer steps")
    return "\n".join(lines)


def execution_lines(cfg: Config, tp: int, cp: int, dp: int) -> list[str]:
    """How the run executes on its devices: attention backend, CP communication, sequence
    parallelism, precision (what `mixed_precision.training_precision` chooses, as the trainer
    does), the sharding engine, recompute, and the planner's bytes per GPU for that precision."""
    from megatron_harpe.planner.memory import ENGINE, GIB, PRECISIONS, config_layout, estimate_memory
    from megatron_harpe.te_backend import transformer_engine_available
    from megatron_harpe.training.mixed_precision import DESCRIPTIONS, training_precision

    parallel, model = cfg.parallel, cfg.model
    backend = model.attention_backend
    attention = "Transformer Engine attention" if backend == "te" else "torch sdpa attention"
    if cp > 1:
        attention += f", context parallel {parallel.resolved_cp_comm_type(model)}"
    if backend == "te" and not transformer_engine_available():
        attention += " (Transformer Engine is not installed here: train inside the GPU image)"
    on_gpu = training_precision(cfg.train, "cuda")
    try:
        on_cpu = training_precision(cfg.train, "cpu")
    except ValueError:
        on_cpu = None
    precision = f"on GPU {DESCRIPTIONS[on_gpu]}" + (
        "" if on_cpu == on_gpu else f"; on CPU {DESCRIPTIONS[on_cpu]}" if on_cpu else "; refused on CPU"
    )
    layout = config_layout(cfg, tp * cp * dp)
    memory = estimate_memory(cfg, layout, PRECISIONS[on_gpu])
    gathered = "bf16" if memory.precision.unit_bytes == 2 else "fp32"
    return [
        f"attention: {attention}; sequence parallel {'on' if parallel.sequence_parallel else 'off'}",
        f"precision: {precision}",
        f"sharding engine: {ENGINE}, {dp * cp} ranks: fp32 weights, gradients and AdamW moments sharded; "
        f"each layer all-gathered in {gathered} for forward and backward, its gradients reduce-scattered "
        "in fp32 every micro-batch",
        f"recompute: {layout.recompute_label(model.num_layers)} (megatron-core's; train.recompute*)",
        f"per GPU (tools/plan_memory.py for the rest): sharded state {sum(memory.sharded.values()) / GIB:.2f} GiB, "
        f"activations {memory.activations / GIB:.2f} GiB, {memory.total / GIB:.1f} GiB in all with the headroom "
        f"(CUDA context, NCCL, fragmentation)",
    ]
