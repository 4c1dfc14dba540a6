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
- activation recomputation: megatron-core's own (`TransformerConfig.recompute_granularity`,
  `recompute_method`, `recompute_num_layers`, `recompute_modules` from `train.recompute*`):
  `TransformerBlock._checkpointed_forward` picks the layers (uniform chunks, or the first N for
  `block`), `tensor_parallel.checkpoint` / `CheckpointWithoutOutput` rerun them in backward. On a
  machine without CUDA those save and restore the CUDA RNG state (`torch.cuda.get_rng_state`:
  "Torch not compiled with CUDA enabled"), so `allow_megatron_recompute_on_cpu` makes that one
  step a no-op there (there is no CUDA RNG, and dropout is off); the rest of megatron's path runs
  unchanged on CPU and is what tests/distributed/test_recompute.py checks. The rotary tables
  reach megatron's block as one tensor (`_one_rotary_table`): its checkpoint saves the block's
  arguments with `save_for_backward`, which refuses the (q, k) tuple ("save_for_backward can only
  save variables, but argument 4 is of type tuple").
- self attention: under `gqa_bases: per_query_head`, keys and values are expanded to one head
  per query head before rotation (`KeyExpandingSelfAttention`).

Packed documents (`data.reset_position_ids` / `reset_attention_mask`): `forward_micro_batch`
hands the batch's per-token positions to the rotary table and its documents to attention (the
ids of a `documents.DocumentMask` for sdpa, a THD `PackedSeqParams` for Transformer Engine).
Both reach the layers as tensors (or, for the THD parameters, outside the checkpointed
arguments), so megatron's recompute reruns them with the same table and mask.
"""

from __future__ import annotations

import contextlib

import megatron.core.tensor_parallel.random as megatron_random
import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_harpe.attention import SdpaCoreAttention
from megatron_harpe.config import ModelConfig, ParallelConfig, TrainConfig
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
    recompute: str | TrainConfig = "none",
) -> TransformerConfig:
    parallel = parallel or ParallelConfig(
        tensor=parallel_state.get_tensor_model_parallel_world_size(),
        context=parallel_state.get_context_parallel_world_size(),
    )
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
        **recompute_settings(recompute, model.num_layers),
    )
    return config


def recompute_settings(recompute: str | TrainConfig, num_layers: int) -> dict:
    """megatron-core's TransformerConfig recompute fields for `train.recompute*` (a bare
    granularity string takes the defaults: full = every layer, selective = core attention)."""
    train = TrainConfig(recompute=recompute) if isinstance(recompute, str) else recompute
    train.validate_recompute(num_layers)
    if train.recompute == "none":
        return {}
    if train.recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": list(train.recompute_modules)}
    return {"recompute_granularity": "full", "recompute_method": train.recompute_method,
            "recompute_num_layers": train.resolved_recompute_num_layers(num_layers)}  # fmt: skip


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
    recompute: str | TrainConfig = "none",
    parallel: ParallelConfig | None = None,
    on_meta_device: bool = False,
) -> GPTModel:
    """Build this rank's shard of the model. Needs `parallel.initialize()` first and a
    resolved `position` (explicit bases). `recompute`: the run's `train` section (its
    `recompute*` keys) or a bare granularity. `on_meta_device`: parameters with shapes and no data
    (the converter's streaming save describes the checkpoint with them; the model cannot run)."""
    config = transformer_config(model, position, params_dtype=params_dtype, initialize=initialize, parallel=parallel,
                                recompute=recompute)  # fmt: skip
    if config.recompute_granularity is not None:
        allow_megatron_recompute_on_cpu()
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
    gpt.decoder.register_forward_pre_hook(_one_rotary_table, with_kwargs=True)
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


def _one_rotary_table(_module, args, kwargs):
    """Hand megatron's TransformerBlock the (table, table) pair of HeadwiseRotaryEmbedding as the
    one tensor its attention expands back to (t, t): its recompute checkpoints tensors only."""
    tables = kwargs.get("rotary_pos_emb")
    if (
        isinstance(tables, tuple)
        and len(tables) == 2
        and isinstance(tables[0], torch.Tensor)
        and tables[0] is tables[1]
    ):
        return args, {**kwargs, "rotary_pos_emb": tables[0]}
    return None


def _no_cuda_rng_state(*_args, **_kwargs) -> None:
    return None


def allow_megatron_recompute_on_cpu() -> None:
    """On a machine without CUDA, make megatron-core's CUDA RNG save/restore (the one step of its
    activation checkpointing that needs CUDA) a no-op; with CUDA nothing changes. Idempotent."""
    if torch.cuda.is_available():
        return
    megatron_random._get_cuda_rng_state = _no_cuda_rng_state
    megatron_random._set_cuda_rng_state = _no_cuda_rng_state


def forward_micro_batch(gpt: GPTModel, batch: dict[str, torch.Tensor], *, per_token_positions: bool) -> torch.Tensor:
    """Per-token losses of a training micro-batch. With `per_token_positions` (packed documents)
    the rotary tables follow `batch["position_ids"]`, and attention stays inside each document
    when the batch carries them: `document_ids` of the whole sequences (sdpa) or a THD stream's
    `cu_seqlens` (Transformer Engine, see thd.py)."""
    tokens, positions, labels = batch["tokens"], batch["position_ids"], batch.get("labels")
    if not per_token_positions:
        return gpt(tokens, positions, None, labels=labels)
    mask = DocumentMask(batch["document_ids"]).as_attention_mask() if "document_ids" in batch else None
    packed = None
    if "cu_seqlens" in batch:
        from megatron_harpe.thd import packed_seq_params

        packed = packed_seq_params(batch)
    with gpt.rotary_pos_emb.at_token_positions(positions):
        return gpt(tokens, positions, mask, labels=labels, packed_seq_params=packed)
