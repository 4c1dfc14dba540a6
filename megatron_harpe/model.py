"""The one place our config meets megatron-core: a Llama-style GPTModel with per-head RoPE.

    ctx = parallel.initialize(tensor_parallel=2, context_parallel=1)
    model = build_model(cfg.model, cfg.position)           # cfg.position.resolve(cfg.model) first
    logits = model(tokens, position_ids, attention_mask=None)   # [b, s_local, vocab / tp]

What is swapped in megatron-core's GPTModel, and why:
- core attention: `SdpaCoreAttention` (attention.py) instead of the CUDA-only local
  `DotProductAttention`; it also carries context parallelism without Transformer Engine.
  With `model.attention_backend: te` the Transformer Engine layer spec is used instead.
- `rotary_pos_emb`: `HeadwiseRotaryEmbedding` (position/rotary.py) returning per-head (q, k)
  angle tables for this rank's heads and positions; RoPE fusion stays off because TE's fused
  kernel takes one frequency row for all heads.
- activation recomputation: torch.utils.checkpoint around whole layers (`full`) or core
  attention (`selective`); megatron's own recompute saves CUDA RNG states and so cannot run
  on CPU, and with dropout off there is no RNG to track.
- self attention: under `gqa_bases: per_query_head`, keys and values are expanded to one head
  per query head before rotation (`KeyExpandingSelfAttention`).

Packed documents (`data.reset_position_ids` / `reset_attention_mask`): `forward_micro_batch`
hands the batch's per-token positions to the rotary tables and its documents to attention
(a `documents.DocumentMask` for sdpa, a THD `PackedSeqParams` for Transformer Engine).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_harpe.attention import SdpaCoreAttention
from megatron_harpe.config import ModelConfig, ParallelConfig
from megatron_harpe.documents import DocumentMask
from megatron_harpe.position.config import PositionConfig
from megatron_harpe.position.rotary import HeadwiseRotaryEmbedding


class KeyExpandingSelfAttention(SelfAttention):
    """Self attention whose keys/values are repeated per query head before RoPE, so each query
    head can rotate its own copy of a shared key with its own base (GQA + per-query-head bases)."""

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True):
        outputs = super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate, split_qkv)
        query, key, value, *rest = outputs
        repeats = query.size(2) // key.size(2)
        key = key.repeat_interleave(repeats, dim=2)  # [s, b, groups, d] -> [s, b, heads, d]
        value = value.repeat_interleave(repeats, dim=2)
        return (query, key, value, *rest)


def transformer_config(
    model: ModelConfig,
    position: PositionConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    initialize: bool = True,
    parallel: ParallelConfig | None = None,
) -> TransformerConfig:
    parallel = parallel or ParallelConfig(tensor=parallel_state.get_tensor_model_parallel_world_size(),
                                          context=parallel_state.get_context_parallel_world_size())
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    on_gpu = torch.cuda.is_available()
    config = TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.kv_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=initialize,
        tensor_model_parallel_size=tp,
        context_parallel_size=cp,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cp_comm_type=parallel.resolved_cp_comm_type(model) if model.attention_backend == "te" and cp > 1 else None,
        sequence_parallel=parallel.sequence_parallel and tp > 1,  # validated: te backend only
    )
    return config


def layer_spec(model: ModelConfig, position: PositionConfig) -> ModuleSpec:
    if model.attention_backend == "te":
        from megatron_harpe.te_backend import te_layer_spec

        spec = te_layer_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        spec.submodules.self_attention.submodules.core_attention = SdpaCoreAttention
    if position.expands_keys(model):
        spec.submodules.self_attention.module = KeyExpandingSelfAttention
    return spec


def build_model(
    model: ModelConfig,
    position: PositionConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    initialize: bool = True,
    recompute: str = "none",
    parallel: ParallelConfig | None = None,
    on_meta_device: bool = False,
) -> GPTModel:
    """Build this rank's shard of the model. Needs `parallel.initialize()` first and a
    resolved `position` (explicit bases). `on_meta_device`: parameters with shapes and no data
    (the converter's streaming save describes the checkpoint with them; the model cannot run)."""
    config = transformer_config(model, position, params_dtype=params_dtype, initialize=initialize, parallel=parallel)
    with torch.device("meta") if on_meta_device else contextlib.nullcontext():
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(model, position),
            vocab_size=model.vocab_size,
            max_sequence_length=model.max_position_embeddings,
            share_embeddings_and_output_weights=model.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=10000,  # replaced below by the per-head rotary
        )
    set_position_encoding(gpt, model, position)
    apply_recompute(gpt, recompute)
    for param in gpt.parameters():  # megatron's torch norms ignore params_dtype (its Float16Module casts them too)
        if param.dtype != params_dtype:
            param.data = param.data.to(params_dtype)
    if torch.cuda.is_available() and not on_meta_device:
        gpt = gpt.to(torch.cuda.current_device())
    return gpt


def set_position_encoding(gpt: GPTModel, model: ModelConfig, position: PositionConfig) -> None:
    """Install the rotary tables of `position` (at build time, and between the stages of a
    multi-stage schedule, whose bases or scaling change while the weights carry on)."""
    current = getattr(gpt.rotary_pos_emb, "position", None)
    if current == position:
        return
    if current is not None and position.expands_keys(model) != current.expands_keys(model):
        raise ValueError("position.gqa_bases cannot change between stages: it changes the attention layout")
    device = next(gpt.parameters()).device
    gpt.rotary_pos_emb = HeadwiseRotaryEmbedding(
        position,
        query_bases=position.query_head_bases(model),
        key_bases=position.key_head_bases(model),
        head_dim=model.head_dim,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        cp_size=parallel_state.get_context_parallel_world_size(),
    ).to(device)
    # megatron's attention multiplies cos/sin by the YaRN attention factor when this is set
    # (the config object is shared by every layer).
    if position.type == "yarn":
        gpt.config.yarn_rotary_scaling_factor = position.scaling_factor
    elif hasattr(gpt.config, "yarn_rotary_scaling_factor"):
        del gpt.config.yarn_rotary_scaling_factor


def apply_recompute(gpt: GPTModel, mode: str) -> None:
    """Recompute activations in backward: `full` (each transformer layer keeps only its input)
    or `selective` (core attention only)."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"train.recompute={mode!r}: choose none, selective or full")
    for layer in gpt.decoder.layers:
        module = layer if mode == "full" else layer.self_attention.core_attention
        module.forward = _checkpointed(module.forward)


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def forward_micro_batch(gpt: GPTModel, batch: dict[str, torch.Tensor], *, per_token_positions: bool) -> torch.Tensor:
    """Per-token losses of a training micro-batch. With `per_token_positions` (packed documents)
    the rotary tables follow `batch["position_ids"]`, and attention stays inside each document
    when the batch carries them: `document_ids` of the whole sequences (sdpa) or a THD stream's
    `cu_seqlens` (Transformer Engine, see thd.py)."""
    tokens, positions, labels = batch["tokens"], batch["position_ids"], batch.get("labels")
    if not per_token_positions:
        return gpt(tokens, positions, None, labels=labels)
    mask = DocumentMask(batch["document_ids"]) if "document_ids" in batch else None
    packed = None
    if "cu_seqlens" in batch:
        from megatron_harpe.thd import packed_seq_params

        packed = packed_seq_params(batch)
    with gpt.rotary_pos_emb.at_token_positions(positions):
        return gpt(tokens, positions, mask, labels=labels, packed_seq_params=packed)
