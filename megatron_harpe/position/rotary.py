"""Per-head rotary angles for the heads and positions one rank owns.

HARPE gives head h its own base b_h: theta_{h,i} = b_h ** (-2i/d). megatron-core's unfused
`apply_rotary_pos_emb` already broadcasts an angle table of shape [s, 1, heads, d] against
q/k of shape [s, b, heads, d], so per-head bases need only a different table: this module
replaces GPTModel's `rotary_pos_emb` and returns a (query table, key table) pair, which
megatron's attention applies to q and k respectively.

Memory: a rank builds angles only for
  - its own heads (tensor parallelism gives rank r a contiguous block of k/v groups and their
    query heads), and
  - its own positions (context parallelism gives rank r chunks r and 2*CP-1-r of the sequence),
so for Llama2-7B at 131072 tokens with TP=8, CP=4 a rank holds 1/32 of the full table. Tables
are cached per sequence length, across layers and steps, for the `CACHED_LENGTHS` lengths used
last (the training length stays; evaluation at many lengths does not pile up tables, each
~0.3 GiB at 128k for the 7B preset).

One table serves queries and keys: a k/v group's query heads share its base, so the query table's
distinct rows are the key table (`RotaryCosSin` keeps one row per distinct base and rotates any
number of heads per row). `forward` returns it as the pair (table, table) megatron's attention
takes; model.py hands megatron's block the single tensor, which its activation recomputation
needs (`tensor_parallel.checkpoint` saves tensors only, not a tuple). That recomputation reruns
a layer on a detached alias of the table, without its attributes: tensor_tags.py finds the
cos/sin (and the per-token mark below) again from the alias.

Speed: megatron-core's unfused `apply_rotary_pos_emb` takes angles and recomputes cos and sin
of the whole table in every layer, for q and k, every step; with per-head tables that is `heads`
times the work of a shared row. So each cached angle table also carries its cos and sin
(`RotaryCosSin`, computed once, only for distinct rows: heads sharing a base broadcast one row),
and `install_cached_apply` routes megatron's attention through `apply_rotary_pos_emb` below,
which rotates with them when the table is ours and hands every other case (fused RoPE, packed
sequences, interleaved layout, tables without cos/sin) to megatron's own function unchanged.
The result is bitwise what megatron's unfused path computes (same cos/sin values, same
products); autograd saves the shared cos/sin instead of a copy per layer.

Packed documents (`data.reset_position_ids` / `reset_attention_mask`): inside
`at_token_positions(position_ids)` the table follows the batch's own per-token positions
([s, b, heads, d], restarting in every document; uncached, one table per micro-batch shared by
all layers and by queries and keys as above), and the apply below rotates Transformer Engine's
THD layout token by token with it instead of megatron's per-sequence `cu_seqlens` path, whose
CP positions are wrong for packed sequences before megatron-core 0.18.

PI divides positions by its factor; YaRN blends interpolated and original frequencies per
dimension with megatron-core's own YaRN ramp (its attention applies the YaRN logit scale
when `yarn_rotary_scaling_factor` is set on the TransformerConfig, see model.py).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_find_correction_range,
    _yarn_linear_ramp_mask,
)
from megatron.core.transformer import attention as megatron_attention

from megatron_harpe.parallel import context_parallel_indices
from megatron_harpe.position.config import PositionConfig
from megatron_harpe.tensor_tags import attribute, remember

CACHED_LENGTHS = 4
"""Angle tables kept per rotary module: the training length and the few lengths an evaluation
uses last. An evicted length is rebuilt on its next use (cheap next to a forward at that length)."""


def inverse_frequencies(base: float, head_dim: int) -> torch.Tensor:
    """RoPE inverse frequencies base ** (-2i/d), i = 0 .. d/2-1, in float64 for exactness."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return base ** (-exponents)


def yarn_inverse_frequencies(
    base: float, head_dim: int, factor: float, original_max_position: int, beta_fast: float, beta_slow: float
) -> torch.Tensor:
    """YaRN: interpolate low frequencies by `factor`, keep high ones, ramp in between."""
    original = inverse_frequencies(base, head_dim)
    low, high = _yarn_find_correction_range(beta_fast, beta_slow, head_dim, base, original_max_position)
    keep_original = 1.0 - _yarn_linear_ramp_mask(low, high, head_dim // 2, device="cpu").double()
    return original / factor * (1 - keep_original) + original * keep_original


def head_inverse_frequencies(position: PositionConfig, bases: list[float], head_dim: int) -> torch.Tensor:
    """[heads, d/2] inverse frequencies, with PI's position scaling folded in."""
    rows = []
    for base in bases:
        if position.type == "yarn":
            rows.append(
                yarn_inverse_frequencies(
                    base,
                    head_dim,
                    position.scaling_factor,
                    position.original_max_position,
                    position.yarn_beta_fast,
                    position.yarn_beta_slow,
                )
            )
        elif position.type == "pi":
            rows.append(inverse_frequencies(base, head_dim) / position.scaling_factor)
        else:
            rows.append(inverse_frequencies(base, head_dim))
    return torch.stack(rows)


def context_parallel_positions(seq_length: int, cp_rank: int, cp_size: int, offset: int = 0) -> torch.Tensor:
    """Global positions held by a CP rank (see `parallel.context_parallel_indices`), as float64."""
    return context_parallel_indices(seq_length, cp_rank, cp_size).to(torch.float64) + offset


def local_head_slice(num_heads: int, tp_rank: int, tp_size: int) -> slice:
    per_rank = num_heads // tp_size
    return slice(tp_rank * per_rank, (tp_rank + 1) * per_rank)


def _row_repeat(bases: list[float]) -> int:
    """How many consecutive heads share each base (heads of a GQA group share theirs): the
    largest r with bases == [each distinct base repeated r times]."""
    for repeat in range(len(bases), 0, -1):
        if len(bases) % repeat == 0 and all(bases[i] == bases[i - i % repeat] for i in range(len(bases))):
            return repeat
    return 1


class RotaryCosSin:
    """cos and sin of one angle table, half width (the rotate-half layout repeats them) and one
    row per distinct base, cast per dtype and attention scale on first use."""

    def __init__(self, angles: torch.Tensor, row_repeat: int) -> None:
        half = angles.size(-1) // 2
        rows = slice(None, None, row_repeat)
        # cos/sin of the very tensor megatron would pass them: the same values bit for bit
        self.cos = torch.cos(angles)[:, :, rows, :half].unsqueeze(3).contiguous()  # [s, 1, rows, 1, d/2], own storage
        self.sin = torch.sin(angles)[:, :, rows, :half].unsqueeze(3).contiguous()
        self._cast: dict[tuple[torch.dtype, float], tuple[torch.Tensor, torch.Tensor]] = {}

    def nbytes(self) -> int:
        """Bytes held: the fp32 cos/sin and their casts to other dtypes or attention scales."""
        tensors = {id(x): x for pair in [(self.cos, self.sin), *self._cast.values()] for x in pair}
        return sum(x.untyped_storage().nbytes() for x in tensors.values())

    def rotate(self, t: torch.Tensor, mscale: float = 1.0) -> torch.Tensor:
        """`t` [s, b, heads, d] rotated: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
        key = (t.dtype, float(mscale))
        if key not in self._cast:
            scaled = (self.cos, self.sin) if mscale == 1.0 else (self.cos * mscale, self.sin * mscale)
            self._cast[key] = (scaled[0].to(t.dtype), scaled[1].to(t.dtype))  # no copy for fp32, mscale 1
        cos, sin = self._cast[key]
        grouped = t.unflatten(2, (cos.size(2), -1))  # [s, b, rows, heads per row, d]
        x1, x2 = grouped.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return rotated.flatten(2, 3)


_megatron_apply_rotary_pos_emb = megatron_attention.apply_rotary_pos_emb


def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale: float = 1.0, cp_group=None):
    """megatron-core's `apply_rotary_pos_emb`, using the cos/sin cached on our tables."""
    cached = attribute(freqs, "rotary_cos_sin")  # also on the detached alias megatron's recompute passes
    if cached is not None and attribute(freqs, "per_token", False) and freqs.size(-1) == t.size(-1):
        if t.dim() == 3:  # THD [tokens, heads, d]: one table row per token, whatever the cu_seqlens
            return cached.rotate(t.unsqueeze(1), mscale).squeeze(1)
        return cached.rotate(t, mscale)
    if (
        cached is None
        or cu_seqlens is not None
        or config.apply_rope_fusion
        or config.rotary_interleaved
        or config.multi_latent_attention
        or freqs.size(-1) != t.size(-1)
    ):
        freqs = fit_rows(freqs, t.size(-2))
        return _megatron_apply_rotary_pos_emb(
            t, freqs, config=config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group
        )
    return cached.rotate(t, mscale)


def fit_rows(freqs: torch.Tensor, heads: int) -> torch.Tensor:
    """An angle table [..., rows, d] with one row per head of a tensor with `heads` heads, for
    megatron's own apply (which broadcasts rows 1 or `heads` only): the query table rotates the
    keys of a k/v group with its first row (the query heads of a group share the group's base),
    and a table of one row per group is repeated for the group's query heads."""
    rows = freqs.size(-2)
    if rows in (1, heads):
        return freqs
    if rows > heads:
        return freqs[..., :: rows // heads, :]
    return freqs.repeat_interleave(heads // rows, dim=-2)


def install_cached_apply() -> None:
    """Route megatron's attention through `apply_rotary_pos_emb` above (idempotent)."""
    megatron_attention.apply_rotary_pos_emb = apply_rotary_pos_emb


class HeadwiseRotaryEmbedding(torch.nn.Module):
    """Drop-in for megatron's `RotaryEmbedding` returning per-head angle tables as the pair
    (query table, key table), which is one table (see the module docstring).

    Tables are [s_local, 1, heads_local, d] float32 angles (megatron's `apply_rotary_pos_emb`
    takes angles, not cos/sin), one row per local query head, or one row when all local heads
    share one base. Each table carries its `rotary_cos_sin` (see the module docstring).
    """

    def __init__(
        self,
        position: PositionConfig,
        query_bases: list[float],
        key_bases: list[float],
        head_dim: int,
        tp_rank: int = 0,
        tp_size: int = 1,
        cp_rank: int = 0,
        cp_size: int = 1,
    ) -> None:
        super().__init__()
        self.position = position
        self.head_dim = head_dim
        self.cp_rank, self.cp_size = cp_rank, cp_size
        query_local = query_bases[local_head_slice(len(query_bases), tp_rank, tp_size)]
        key_local = key_bases[local_head_slice(len(key_bases), tp_rank, tp_size)]
        self.query_bases, self.key_bases = query_local, key_local
        # One base for every head (abf, pi, yarn): a single row broadcasts over heads, exactly
        # like megatron's stock [s, 1, 1, d] table.
        query_rows = query_local[:1] if len(set(query_local)) == 1 else query_local
        self.register_buffer(
            "query_inv_freq", head_inverse_frequencies(position, query_rows, head_dim), persistent=False
        )
        # The keys' own rows (self-extend rotates with them); the query table serves the keys too.
        key_rows = key_local[:1] if len(set(key_local)) == 1 else key_local
        self.register_buffer(
            "key_inv_freq",
            self.query_inv_freq if key_rows == query_rows else head_inverse_frequencies(position, key_rows, head_dim),
            persistent=False,
        )
        self._row_repeat = _row_repeat(query_rows)
        self._cache: OrderedDict[tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._token_positions: torch.Tensor | None = None
        install_cached_apply()

    def _angles(self, inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = positions[:, None, None] * inv_freq[None, :, :]  # [s, heads, d/2], float64
        angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout pairs i and i + d/2
        return angles.unsqueeze(1).float()  # [s, 1, heads, d]

    def forward(self, max_seq_len: int, offset: int = 0, **_unused) -> tuple[torch.Tensor, torch.Tensor]:
        """The angle table for this rank's positions of a sequence of `max_seq_len` tokens, as
        (table, table); the `CACHED_LENGTHS` most recently used are kept. Inside
        `at_token_positions`, the uncached table of those per-token positions instead."""
        if self._token_positions is not None:
            return self.token_tables(self._token_positions)
        device = self.query_inv_freq.device
        key = (max_seq_len, offset, device)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        positions = context_parallel_positions(max_seq_len, self.cp_rank, self.cp_size, offset).to(device)
        table = self._angles(self.query_inv_freq, positions)
        table.rotary_cos_sin = RotaryCosSin(table, self._row_repeat)
        remember(table)  # megatron's recompute reruns layers on a detached alias of it
        self._cache[key] = (table, table)
        while len(self._cache) > CACHED_LENGTHS:
            self._cache.popitem(last=False)
        return self._cache[key]

    def cached_lengths(self) -> list[tuple[int, int]]:
        """(sequence length, offset) of the tables held, least recently used first."""
        return [(length, offset) for length, offset, _ in self._cache]

    def tables_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (table, table) pair for explicit absolute positions (float64, not CP-split),
        uncached: the KV-cached decode of eval/backends/kv_cache.py rotates each new token at its own position."""
        positions = positions.to(device=self.query_inv_freq.device, dtype=torch.float64)
        table = self._angles(self.query_inv_freq, positions)
        return table, table

    @contextlib.contextmanager
    def at_token_positions(self, positions: torch.Tensor):
        """Within the block, `forward` returns `token_tables(positions)`: the model's forward
        computes its tables once (in GPTModel's preprocessing) and every layer reuses them."""
        self._token_positions = positions
        try:
            yield
        finally:
            self._token_positions = None

    def token_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The angle table [s, b, heads, d] for per-token positions [b, s] (this rank's tokens, in
        its order) as (table, table), marked `per_token` and carrying its cos/sin."""
        if positions.dim() != 2:
            raise ValueError(f"per-token positions must be [batch, sequence], got shape {tuple(positions.shape)}")
        positions = positions.t().to(device=self.query_inv_freq.device, dtype=torch.float64)  # [s, b]
        angles = positions[:, :, None, None] * self.query_inv_freq[None, None]  # [s, b, heads, d/2], float64
        table = torch.cat([angles, angles], dim=-1).float()
        table.rotary_cos_sin = RotaryCosSin(table, self._row_repeat)
        table.per_token = True
        remember(table)  # found again by the apply below when megatron's recompute detaches it
        return table, table

    def get_rotary_seq_len(
        self, inference_context, transformer, transformer_input, transformer_config, packed_seq_params=None
    ) -> int:
        """Full (pre-CP-split) sequence length, the signature GPTModel calls."""
        if inference_context is not None:
            return inference_context.max_sequence_length
        seq_len = transformer_input.size(0) if transformer_input is not None else transformer.input_tensor.size(0)
        if transformer_config.sequence_parallel:
            seq_len *= transformer_config.tensor_model_parallel_size
        return seq_len * self.cp_size

    def table_bytes(self, seq_length: int) -> int:
        """Bytes of the angle table this rank holds for one sequence length (for the benchmark);
        its cos/sin add at most as much again (half width each, distinct rows only)."""
        local_positions = seq_length // self.cp_size
        return local_positions * self.query_inv_freq.size(0) * self.head_dim * 4

    def cos_sin_bytes(self, seq_length: int, cast_bytes: int = 4) -> int:
        """Bytes of the fp32 cos/sin `RotaryCosSin` caches with the tables (half width, distinct
        rows only), plus one copy cast to `cast_bytes` per element when the activations are not fp32."""
        local_positions = seq_length // self.cp_size
        rows = -(-self.query_inv_freq.size(0) // self._row_repeat)
        per_element = 4 + (cast_bytes if cast_bytes != 4 else 0)
        return 2 * local_positions * rows * (self.head_dim // 2) * per_element
