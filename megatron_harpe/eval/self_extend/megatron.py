"""Self-Extend on a megatron_harpe GPTModel shard (TP and CP), for evaluation.

    from megatron_harpe.eval.self_extend.megatron import install_self_extend
    install_self_extend(gpt, SelfExtendSettings(window=1024, group=32))

Two swaps, nothing else in megatron-core changes:
- `gpt.rotary_pos_emb` becomes `UnrotatedTables`, which returns (None, None): megatron's
  `Attention.forward` skips rotation for a None table, so core attention receives UNROTATED q/k.
  The wrapped `HeadwiseRotaryEmbedding` stays reachable for its per-head inverse frequencies
  (this rank's heads, PI/YaRN folded in) and its CP layout.
- every layer's core attention becomes `SelfExtendCoreAttention`, which rotates q and k twice
  (neighbour and grouped positions) and runs `self_extend.self_extend_attention`; YaRN's
  cos/sin factor is megatron's own (`_yarn_get_concentration_factor_from_config`).
Context parallelism: each rank all-gathers the unrotated keys/values of the sequence (as
`SdpaCoreAttention` does), rotates them at their global positions and attends with its local
queries at their global positions (chunks r and 2*CP-1-r).
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)

from megatron_harpe.attention import _gather_chunks
from megatron_harpe.eval.self_extend.core import SelfExtendSettings, self_extend_attention
from megatron_harpe.position.rotary import HeadwiseRotaryEmbedding, context_parallel_positions


class UnrotatedTables(torch.nn.Module):
    """Stands in for GPTModel's rotary module: no tables, so megatron does not rotate q/k."""

    def __init__(self, rotary: HeadwiseRotaryEmbedding) -> None:
        super().__init__()
        self.rotary = rotary

    def forward(self, *_args, **_kwargs) -> tuple[None, None]:
        return None, None

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return self.rotary.get_rotary_seq_len(*args, **kwargs)


class SelfExtendCoreAttention(torch.nn.Module):
    """Core attention over unrotated q/k [s, b, heads, d]; returns [s, b, heads * d]."""

    def __init__(self, config, rotary: HeadwiseRotaryEmbedding, settings: SelfExtendSettings) -> None:
        super().__init__()
        self.config = config
        self.rotary = rotary
        self.settings = settings
        self.softmax_scale = config.softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("--self-extend does not support packed sequences or attention bias")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        cp_size = parallel_state.get_context_parallel_world_size()
        if cp_size > 1:
            group = parallel_state.get_context_parallel_group()
            k, v = _gather_chunks(k, group, cp_size), _gather_chunks(v, group, cp_size)
        positions = context_parallel_positions(k.size(2), self.rotary.cp_rank, cp_size).long()
        out = self_extend_attention(
            q, k, v,
            query_inv_freq=self.rotary.query_inv_freq, key_inv_freq=self.rotary.key_inv_freq,
            query_positions=positions, settings=self.settings, softmax_scale=self.softmax_scale,
            rotary_scale=_yarn_get_concentration_factor_from_config(self.config),
        )  # fmt: skip
        batch, heads, seq, dim = out.shape
        return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * dim)


def install_self_extend(gpt, settings: SelfExtendSettings) -> None:
    """Patch an evaluation model in place (not for training: no backward is provided for)."""
    rotary = gpt.rotary_pos_emb
    if isinstance(rotary, UnrotatedTables):
        rotary = rotary.rotary
    if not isinstance(rotary, HeadwiseRotaryEmbedding):
        raise ValueError(f"--self-extend needs megatron_harpe's rotary module, found {type(rotary).__name__}")
    gpt.rotary_pos_emb = UnrotatedTables(rotary)
    for layer in gpt.decoder.layers:
        layer.self_attention.core_attention = SelfExtendCoreAttention(gpt.config, rotary, settings)
