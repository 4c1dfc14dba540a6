"""Self-Extend on a Hugging Face model: replaces the attention forward of every decoder layer.

    from megatron_harpe.eval.self_extend.hf import install_self_extend
    install_self_extend(model, SelfExtendSettings(window=1024, group=32))

Covers Llama-family models whose attention is q/k/v projections + RoPE + o projection: stock
Llama (ABF, PI = `linear`, YaRN, Llama3 rope types), Mistral without a sliding window, and our
HARPE export (one base per query head; keys of a k/v group use the group's first query head's
base, or are expanded per query head, exactly as `HarpeLlamaAttention` does).

The replacement forward projects q/k/v, stores UNROTATED keys in the KV cache (so cached
generation works: every step re-rotates the cached keys in both position systems) and calls
`self_extend.self_extend_attention` with the model's own inverse frequencies and cos/sin factor,
read from the model's rotary module at call time (`inv_freq`, `attention_scaling`: whatever
rope type the model defines, including per-head rows). The model's own cos/sin
(`position_embeddings`) are not used. One sequence at a time (batch 1, no padding), which is
how `HFBackend` runs; the attention mask is replaced by the causal rule on positions.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from megatron_harpe.eval.self_extend.core import SelfExtendSettings, self_extend_attention

SUPPORTED_MODEL_TYPES = ("llama", "harpe_llama", "mistral")
CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value")  # the name differs between versions


def install_self_extend(model: Any, settings: SelfExtendSettings) -> None:
    """Patch `model` (a *ForCausalLM) in place; raises ValueError for unsupported models."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"--self-extend supports Llama-family models ({', '.join(SUPPORTED_MODEL_TYPES)}), "
            f"not model_type={model_type!r}"
        )
    if getattr(config, "sliding_window", None) is not None:
        raise ValueError(
            "--self-extend cannot combine with the model's sliding-window attention "
            f"(sliding_window={config.sliding_window})"
        )
    decoder = model.get_decoder()
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise ValueError(
            f"{type(model).__name__} has no rotary embedding with `inv_freq`: --self-extend needs a RoPE model"
        )
    for layer in decoder.layers:
        attention = layer.self_attn
        missing = [
            name for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim") if not hasattr(attention, name)
        ]
        if missing or hasattr(attention, "q_norm"):
            raise ValueError(
                f"--self-extend does not know the attention {type(attention).__name__} "
                "(expects Llama-style q/k/v/o projections without q/k norms)"
            )
        attention.forward = types.MethodType(_make_forward(settings, rotary), attention)
    model.self_extend = settings


def _inverse_frequencies(rotary: Any, attention: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(query rows, key rows, expand keys per query head) from the rotary module's inv_freq,
    [d/2] for one base or [query heads, d/2] for HARPE."""
    inv_freq = rotary.inv_freq.float()
    if inv_freq.dim() == 1:
        row = inv_freq[None]
        return row, row, False
    if getattr(attention, "keys_per_query_head", False):
        return inv_freq, inv_freq, True
    key_heads = attention.k_proj.out_features // attention.head_dim
    return inv_freq, inv_freq[:: inv_freq.size(0) // key_heads], False


def _project(linear: torch.nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
    """The projection's plain matmul. Not `linear(...)`: the HARPE export's q/k projections
    (`HeadwiseRotatedLinear`) rotate and repeat heads inside their forward, and Self-Extend
    rotates unrotated q/k twice itself."""
    return torch.nn.functional.linear(hidden_states, linear.weight, linear.bias)


def _make_forward(settings: SelfExtendSettings, rotary: Any):
    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        batch, length = hidden_states.shape[:2]
        if batch != 1:
            raise ValueError("--self-extend evaluates one sequence at a time (batch size 1)")
        hidden_shape = (batch, length, -1, self.head_dim)
        query = _project(self.q_proj, hidden_states).view(hidden_shape).transpose(1, 2)  # [1, heads, s, d]
        key = _project(self.k_proj, hidden_states).view(hidden_shape).transpose(1, 2)  # [1, kv_heads, s, d]
        value = _project(self.v_proj, hidden_states).view(hidden_shape).transpose(1, 2)
        query_inv_freq, key_inv_freq, expand_keys = _inverse_frequencies(rotary, self)
        if expand_keys:  # HARPE with distinct bases inside a k/v group: one key per query head
            repeats = query.size(1) // key.size(1)
            key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
        cache = next((kwargs[name] for name in CACHE_KEYWORDS if kwargs.get(name) is not None), None)
        if cache is not None:  # the cache holds unrotated keys: both rotations happen below
            key, value = cache.update(key, value, self.layer_idx)
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            positions = position_ids[0]
        else:
            positions = torch.arange(key.size(2) - length, key.size(2), device=query.device)
        output = self_extend_attention(
            query, key, value,
            query_inv_freq=query_inv_freq, key_inv_freq=key_inv_freq, query_positions=positions,
            settings=settings, softmax_scale=self.scaling,
            rotary_scale=float(getattr(rotary, "attention_scaling", 1.0)),
        )  # fmt: skip
        output = output.transpose(1, 2).reshape(batch, length, -1).contiguous()
        return self.o_proj(output), None

    return forward
