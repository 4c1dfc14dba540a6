"""Parameter counts of the Llama-style model of model.py, per tensor-parallel rank.

    parameters_per_rank(cfg.model, tp=1)      # the whole model

Exact: they follow megatron-core's sharding (vocabulary rows, fused QKV rows and SwiGLU columns
split over TP; norms replicated). The planner's memory model (memory.py) and the dry-run plan
(plan.py) both count with it.
"""

from __future__ import annotations

from megatron_harpe.config import ModelConfig


def parameters_per_rank(model: ModelConfig, tp: int) -> int:
    h, d = model.hidden_size, model.head_dim
    qkv = (model.num_attention_heads + 2 * model.kv_groups) * d * h
    attention_out = model.num_attention_heads * d * h
    mlp = 3 * model.ffn_hidden_size * h
    per_layer = (qkv + attention_out + mlp) // tp + 2 * h
    embeddings = model.vocab_size * h // tp
    output = 0 if model.tie_word_embeddings else model.vocab_size * h // tp
    return model.num_layers * per_layer + embeddings + output + h
