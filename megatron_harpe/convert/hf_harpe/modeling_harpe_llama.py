"""Hugging Face Llama with one RoPE base per attention head (HARPE), for inference and export.

Only the rotary embedding and the rotation inside attention differ from transformers' Llama:
the rotary module returns cos/sin of shape [batch, heads, seq, head_dim] (stock: [batch, seq,
head_dim], broadcast over heads), queries use their head's row and keys their k/v group's row.
Everything else (MLP, norms, causal mask, attention kernels, KV cache, `generate()`) is the
stock Llama code, so with all bases equal the logits equal `LlamaForCausalLM` with that
`rope_theta` bit for bit.

Self-contained (torch + transformers, plus the sibling configuration file) because exported
model directories carry a copy of it:

    model = AutoModelForCausalLM.from_pretrained("exported_dir", trust_remote_code=True)
    model.generate(input_ids, max_new_tokens=20, do_sample=False)
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    eager_attention_forward,
    repeat_kv,
    rotate_half,
)

from .configuration_harpe_llama import HarpeLlamaConfig


class HarpeLlamaRotaryEmbedding(nn.Module):
    """cos/sin per query head. Named `...RotaryEmbedding` with `rope_type`, `inv_freq`,
    `original_inv_freq` and `compute_default_rope_parameters` like the stock module, so that
    transformers' weight initialisation recomputes the buffers after loading on the meta device."""

    def __init__(self, config: HarpeLlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.rope_type = "default"
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        inv_freq, self.attention_scaling = self.compute_default_rope_parameters(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [heads, head_dim / 2]
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: HarpeLlamaConfig, **kwargs) -> tuple[torch.Tensor, float]:
        dim = config.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.float) / dim
        # the same expression as transformers' default RoPE, once per head, so equal bases give equal bits
        inv_freq = torch.stack([1.0 / (base**exponents) for base in config.rope_bases])
        return inv_freq, 1.0

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float)
        # [b, 1, s, 1] * [1, heads, 1, d/2] -> [b, heads, s, d/2]
        freqs = position_ids[:, None, :, None].float() * inv_freq[None, :, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class HarpeLlamaAttention(LlamaAttention):
    """Llama attention rotating each head with its own base.

    Keys of k/v group g use the base of the group's first query head. When a group's query heads
    have different bases, k and v are expanded to one head per query head before rotation (the
    KV cache then holds one key per query head)."""

    def __init__(self, config: HarpeLlamaConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.query_heads_per_group = config.num_attention_heads // config.num_key_value_heads
        self.keys_per_query_head = config.keys_rotate_per_query_head
        if self.keys_per_query_head:
            self.num_key_value_groups = 1  # the attention kernel sees one k/v head per query head

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [b, heads, s, d]
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [b, kv_heads, s, d]
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings  # [b, heads, s, d]
        if self.keys_per_query_head:
            key_states = repeat_kv(key_states, self.query_heads_per_group)
            value_states = repeat_kv(value_states, self.query_heads_per_group)
            key_cos, key_sin = cos, sin
        else:
            key_cos = cos[:, :: self.query_heads_per_group]
            key_sin = sin[:, :: self.query_heads_per_group]
        query_states = (query_states * cos) + (rotate_half(query_states) * sin)
        key_states = (key_states * key_cos) + (rotate_half(key_states) * key_sin)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class HarpeLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: HarpeLlamaConfig, layer_idx: int) -> None:
        # build the submodules directly rather than via LlamaDecoderLayer.__init__, which would
        # allocate a stock attention only to throw it away
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = HarpeLlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class HarpeLlamaModel(LlamaModel):
    config_class = HarpeLlamaConfig
    _no_split_modules = ["HarpeLlamaDecoderLayer"]

    def __init__(self, config: HarpeLlamaConfig) -> None:
        LlamaPreTrainedModel.__init__(self, config)  # see HarpeLlamaDecoderLayer.__init__
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [HarpeLlamaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = HarpeLlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class HarpeLlamaForCausalLM(LlamaForCausalLM):
    config_class = HarpeLlamaConfig
    _no_split_modules = ["HarpeLlamaDecoderLayer"]

    def __init__(self, config: HarpeLlamaConfig) -> None:
        LlamaPreTrainedModel.__init__(self, config)
        self.model = HarpeLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["HarpeLlamaForCausalLM", "HarpeLlamaModel", "HarpeLlamaRotaryEmbedding"]
