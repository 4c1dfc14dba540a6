"""What a config will do, computed without building anything (`pretrain_harpe.py --dry-run`).

Parameter counts are exact for the Llama-style model of model.py: they follow megatron-core's
sharding (vocabulary rows, fused QKV rows and SwiGLU columns split over TP; norms replicated).
"""

from __future__ import annotations

import math

from megatron_harpe.config import Config, ModelConfig


def parameters_per_rank(model: ModelConfig, tp: int) -> int:
    h, d = model.hidden_size, model.head_dim
    qkv = (model.num_attention_heads + 2 * model.kv_groups) * d * h
    attention_out = model.num_attention_heads * d * h
    mlp = 3 * model.ffn_hidden_size * h
    per_layer = (qkv + attention_out + mlp) // tp + 2 * h
    embeddings = model.vocab_size * h // tp
    output = 0 if model.tie_word_embeddings else model.vocab_size * h // tp
    return model.num_layers * per_layer + embeddings + output + h


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
