"""Hugging Face Llama with one RoPE base per attention head (HARPE), for inference and export.

Self-contained (torch + transformers, plus the sibling configuration file) because exported
model directories carry a copy of it:

    model = AutoModelForCausalLM.from_pretrained("exported_dir", trust_remote_code=True)
    model.generate(input_ids, max_new_tokens=20, do_sample=False)

Design: override as little of transformers' Llama as possible, so that its releases can change
how the cache, masks and attention kernels are called without breaking us. The models are the
stock `LlamaModel` / `LlamaForCausalLM`, built by their own constructors; then

- `rotary_emb` becomes `HarpeLlamaRotaryEmbedding`, whose cos/sin have one row per query head
  ([batch, heads, seq, head_dim]; stock: [batch, seq, head_dim], shared by all heads);
- each layer's attention becomes `HarpeLlamaAttention`, whose q/k projections rotate their output
  per head with those rows (keys with their k/v group's row), and which then runs the stock
  `LlamaAttention.forward` with cos = 1, sin = 0, so the stock rotation is the identity and the
  stock code does everything else (KV cache under whatever keyword that release uses, attention
  kernels, masks). With all bases equal the logits equal `LlamaForCausalLM` bit for bit.

If a future release stops calling `q_proj`/`k_proj` from the attention forward, the rotation
would be skipped silently; the attention checks that both rotations ran and raises otherwise.
"""

import torch
import transformers
from torch import nn
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaForCausalLM, LlamaModel, rotate_half

from .configuration_harpe_llama import HarpeLlamaConfig, check_transformers_version, supported_range


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


class HeadwiseRotatedLinear(nn.Linear):
    """A q/k/v projection whose output heads are first repeated `repeat_heads` times each (keys and
    values that rotate per query head) and then, if `rotate`, rotated with the cos/sin rows
    [batch, heads, seq, head_dim] that the attention sets in `rotation` for one forward call."""

    def __init__(self, linear: nn.Linear, head_dim: int, repeat_heads: int, rotate: bool) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias  # the stock parameters, not copies
        self.head_dim, self.repeat_heads, self.rotate = head_dim, repeat_heads, rotate
        self.rotation: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)  # [b, s, heads * d]
        heads = out.view(*out.shape[:-1], -1, self.head_dim)  # [b, s, heads, d]
        if self.repeat_heads > 1:
            heads = heads.repeat_interleave(self.repeat_heads, dim=-2)
        if self.rotate:
            if self.rotation is None:
                raise RuntimeError("HARPE projection called outside HarpeLlamaAttention.forward: no rotation set")
            cos, sin = (table.transpose(1, 2) for table in self.rotation)  # [b, s, heads, d]
            self.rotation = None
            # the stock expression (apply_rotary_pos_emb), one row per head
            heads = (heads * cos) + (rotate_half(heads) * sin)
        return heads.reshape(*out.shape[:-1], -1)


class HarpeLlamaAttention(LlamaAttention):
    """Llama attention rotating each head with its own base, in its q/k projections.

    Keys of k/v group g use the base of the group's first query head. When a group's query heads
    have different bases, k and v are expanded to one head per query head before rotation (the
    KV cache then holds one key per query head)."""

    def __init__(self, config: HarpeLlamaConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.query_heads_per_group = config.num_attention_heads // config.num_key_value_heads
        self.keys_per_query_head = config.keys_rotate_per_query_head
        kv_repeat = self.query_heads_per_group if self.keys_per_query_head else 1
        if self.keys_per_query_head:
            self.num_key_value_groups = 1  # the attention kernel sees one k/v head per query head
        self.q_proj = HeadwiseRotatedLinear(self.q_proj, self.head_dim, repeat_heads=1, rotate=True)
        self.k_proj = HeadwiseRotatedLinear(self.k_proj, self.head_dim, repeat_heads=kv_repeat, rotate=True)
        self.v_proj = HeadwiseRotatedLinear(self.v_proj, self.head_dim, repeat_heads=kv_repeat, rotate=False)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor], *args, **kwargs
    ):
        cos, sin = position_embeddings  # [b, heads, s, d]
        self.q_proj.rotation = (cos, sin)
        if self.keys_per_query_head:
            self.k_proj.rotation = (cos, sin)
        else:
            self.k_proj.rotation = (cos[:, :: self.query_heads_per_group], sin[:, :: self.query_heads_per_group])
        identity = (torch.ones_like(cos[:, 0]), torch.zeros_like(sin[:, 0]))  # the stock [b, s, d] layout
        try:
            output = super().forward(hidden_states, identity, *args, **kwargs)
            skipped = self.q_proj.rotation is not None or self.k_proj.rotation is not None
        finally:
            self.q_proj.rotation = self.k_proj.rotation = None
        if skipped:
            raise RuntimeError(
                f"transformers {transformers.__version__}'s LlamaAttention no longer computes queries and keys "
                f"through q_proj/k_proj, so the HARPE rotation was not applied; supported: {supported_range()}"
            )
        return output


def use_headwise_rotary(model: LlamaModel, config: HarpeLlamaConfig) -> None:
    """Turn a freshly built stock `LlamaModel` into HARPE: per-head rotary, HARPE attention.
    The attention modules keep the stock parameters (same tensors, same initialisation)."""
    check_transformers_version()
    model.rotary_emb = HarpeLlamaRotaryEmbedding(config)
    for layer in model.layers:
        stock = layer.self_attn
        with torch.device("meta"):  # no allocation: the stock parameters are assigned below
            attention = HarpeLlamaAttention(config, stock.layer_idx)
        attention.load_state_dict(stock.state_dict(), assign=True)
        layer.self_attn = attention


class HarpeLlamaModel(LlamaModel):
    config_class = HarpeLlamaConfig

    def __init__(self, config: HarpeLlamaConfig) -> None:
        super().__init__(config)
        use_headwise_rotary(self, config)


class HarpeLlamaForCausalLM(LlamaForCausalLM):
    config_class = HarpeLlamaConfig

    def __init__(self, config: HarpeLlamaConfig) -> None:
        super().__init__(config)
        use_headwise_rotary(self.model, config)


__all__ = ["HarpeLlamaForCausalLM", "HarpeLlamaModel", "HarpeLlamaRotaryEmbedding"]
