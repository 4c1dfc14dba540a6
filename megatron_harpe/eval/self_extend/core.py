"""Self-Extend (Jin et al. 2024, "LLM Maybe LongLM", arXiv 2401.01325): training-free grouped
attention at evaluation time, the HARPE paper's training-free baseline. Shared by both backends.

For a query at position i and a key at position j (causal, j <= i):
- neighbour tokens (i - j < W) keep the model's own RoPE relative position i - j;
- distant tokens (i - j >= W) use grouped positions: the key at floor(j / G), the query at
  floor(i / G) + W - floor(W / G), so grouped distances continue where the window ends.
The two score matrices are merged by that distance test before one softmax. The paper uses
W = 1024, G = 32 (`--self-extend window=1024,group=32` in tools/evaluate.py).

This module holds the position rule, RoPE rotation from per-head inverse frequencies (one row
per head, or one row for all heads: HARPE, ABF, PI and YaRN all reduce to that plus a cos/sin
factor) and the blocked attention kernel. The backends only adapt their layers:
`hf.py` (transformers attention forwards) and `megatron.py` (a core
attention swap receiving unrotated q/k).

    settings = SelfExtendSettings.parse("window=1024,group=32")
    out = self_extend_attention(q, k, v, query_inv_freq=qf, key_inv_freq=kf,
                                query_positions=torch.arange(s), settings=settings, softmax_scale=d**-0.5)

Memory: keys are rotated twice (2x the key tensor); queries go through in blocks of rows
sized so one block's score tensor stays under `SCORE_BLOCK_ELEMENTS`, so nothing of size
sequence x sequence is ever held: memory is linear in the sequence.
"""

from __future__ import annotations

import dataclasses
import re

import torch

SCORE_BLOCK_ELEMENTS = 1 << 26  # fp32 scores per query block (256 MiB), split over batch x heads x keys
MAX_BLOCK_ROWS = 2048
ROTATION_CHUNK = 8192  # positions rotated at a time


@dataclasses.dataclass(frozen=True)
class SelfExtendSettings:
    """Neighbour window W and group size G, both positive token counts."""

    window: int
    group: int

    def __post_init__(self) -> None:
        for name in ("window", "group"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"self-extend {name} must be a positive integer, got {value!r}")

    @classmethod
    def parse(cls, text: str) -> "SelfExtendSettings":
        """'window=1024,group=32' (both keys, once each, integers >= 1) -> settings."""
        example = "use e.g. --self-extend window=1024,group=32"
        values: dict[str, int] = {}
        for part in (piece.strip() for piece in text.split(",")):
            match = re.fullmatch(r"(\w+)\s*=\s*(\S+)", part)
            if not match:
                raise ValueError(f"self-extend setting {part!r} is not key=value: {example}")
            key, raw = match.groups()
            if key not in ("window", "group"):
                raise ValueError(f"unknown self-extend setting {key!r} (known: window, group): {example}")
            if key in values:
                raise ValueError(f"self-extend setting {key!r} is given twice: {example}")
            if not re.fullmatch(r"[0-9]+", raw):
                raise ValueError(f"self-extend {key} must be a positive integer, got {raw!r}: {example}")
            values[key] = int(raw)
        missing = [key for key in ("window", "group") if key not in values]
        if missing:
            raise ValueError(f"self-extend needs {' and '.join(missing)}: {example}")
        return cls(window=values["window"], group=values["group"])

    def as_dict(self) -> dict[str, int]:
        return {"window": self.window, "group": self.group}

    def grouped_query_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return torch.div(positions, self.group, rounding_mode="floor") + (self.window - self.window // self.group)

    def grouped_key_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return torch.div(positions, self.group, rounding_mode="floor")


def parse_self_extend_argument(text: str) -> SelfExtendSettings:
    """argparse `type` for --self-extend: a bad value is a usage error naming the problem."""
    import argparse

    try:
        return SelfExtendSettings.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotate(x: torch.Tensor, inv_freq: torch.Tensor, positions: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """RoPE (rotate-half layout, as Llama and megatron) of x [b, heads, n, d] at `positions` [n]
    with inv_freq [heads or 1, d/2]; cos and sin are multiplied by `scale` (YaRN's attention
    factor). Angles in float64, rotation in float32, result in x's dtype; positions go through
    in chunks so the temporary tables stay small at any length."""
    out = torch.empty_like(x)
    frequencies = inv_freq.to(x.device, torch.float64)[:, None, :]
    for start in range(0, x.size(2), ROTATION_CHUNK):
        angles = positions[start : start + ROTATION_CHUNK].to(torch.float64)[None, :, None] * frequencies
        angles = torch.cat((angles, angles), dim=-1)  # [rows, n, d]
        cos, sin = (angles.cos() * scale).float(), (angles.sin() * scale).float()
        part = x[:, :, start : start + ROTATION_CHUNK].float()
        out[:, :, start : start + ROTATION_CHUNK] = part * cos + rotate_half(part) * sin
    return out


def _check_rows(inv_freq: torch.Tensor, heads: int, head_dim: int, what: str) -> None:
    if inv_freq.dim() != 2 or inv_freq.size(0) not in (1, heads) or 2 * inv_freq.size(1) != head_dim:
        raise ValueError(
            f"{what} inverse frequencies have shape {tuple(inv_freq.shape)}; expected [1 or {heads}, {head_dim // 2}]"
        )


def block_rows(batch: int, heads: int, keys: int, budget: int = SCORE_BLOCK_ELEMENTS) -> int:
    """Query rows per block so one block's scores hold about `budget` elements."""
    return max(1, min(MAX_BLOCK_ROWS, budget // max(1, batch * heads * keys)))


def self_extend_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    query_inv_freq: torch.Tensor,
    key_inv_freq: torch.Tensor,
    query_positions: torch.Tensor,
    settings: SelfExtendSettings,
    softmax_scale: float,
    rotary_scale: float = 1.0,
    rows_per_block: int | None = None,
) -> torch.Tensor:
    """Causal Self-Extend attention over UNROTATED q/k.

    query [b, hq, sq, d]; key, value [b, hk, sk, d] with hq a multiple of hk (GQA); key j sits
    at position j; query row r at `query_positions[r]` (any order: context parallelism holds
    two separate chunks). Keys after a query's position are masked. Returns [b, hq, sq, d].
    """
    batch, query_heads, query_len, head_dim = query.shape
    key_heads, key_len = key.size(1), key.size(2)
    if query_heads % key_heads:
        raise ValueError(f"{query_heads} query heads are not a multiple of {key_heads} key heads")
    _check_rows(query_inv_freq, query_heads, head_dim, "query")
    _check_rows(key_inv_freq, key_heads, head_dim, "key")
    if query_positions.shape != (query_len,):
        raise ValueError(f"query_positions has shape {tuple(query_positions.shape)}, expected ({query_len},)")
    window = settings.window
    device = query.device
    query_positions = query_positions.to(device=device, dtype=torch.long)
    key_positions = torch.arange(key_len, device=device)
    # keys in both position systems, once for all query blocks
    key_near = rotate(key, key_inv_freq, key_positions, rotary_scale)
    key_far = rotate(key, key_inv_freq, settings.grouped_key_positions(key_positions), rotary_scale)
    per_group = query_heads // key_heads
    rows = rows_per_block or block_rows(batch, query_heads, key_len)
    outputs = []
    for start in range(0, query_len, rows):
        positions = query_positions[start : start + rows]
        block = query[:, :, start : start + rows]
        low, high = int(positions.min()), int(positions.max())
        visible = min(high + 1, key_len)  # causal: later keys never count
        # Key columns [0, near_start) are distant for every query of the block, [far_end, visible)
        # are neighbours for every query; only [near_start, far_end) (about one block wide) mixes.
        far_end = max(0, min(visible, high - window + 1))
        near_start = min(max(0, low - window + 1), far_end)
        # [b, hk, per_group, n, d]: query heads of one k/v group share its keys without copies
        query_near = rotate(block, query_inv_freq, positions, rotary_scale).unflatten(1, (key_heads, per_group))
        scores = torch.empty((batch, key_heads, per_group, len(positions), visible), device=device)
        if far_end > 0:
            query_far = rotate(block, query_inv_freq, settings.grouped_query_positions(positions), rotary_scale)
            query_far = query_far.unflatten(1, (key_heads, per_group))
            scores[..., :far_end] = (query_far @ key_far[:, :, None, :far_end].transpose(-1, -2)).float()
        near = (query_near @ key_near[:, :, None, near_start:visible].transpose(-1, -2)).float()
        # THE MERGE (one score per query/key pair, before the single softmax below): neighbour
        # scores where i - j < W, grouped scores elsewhere, decided on the mixed columns only.
        mixed = far_end - near_start
        if mixed:
            is_near = positions[:, None] - key_positions[None, near_start:far_end] < window  # [n, mixed]
            region = scores[..., near_start:far_end]
            region.masked_fill_(is_near, 0.0).add_(near[..., :mixed].masked_fill_(~is_near, 0.0))
        scores[..., far_end:] = near[..., mixed:]
        del near
        if low + 1 < visible:  # causal mask: only columns after the block's first query can be future
            scores[..., low + 1 :].masked_fill_(
                positions[:, None] < key_positions[None, low + 1 : visible], float("-inf")
            )
        # softmax in place (every query sees at least its own key, so no row is all -inf)
        scores.mul_(softmax_scale)
        scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
        scores.div_(scores.sum(dim=-1, keepdim=True))
        block_out = scores.to(value.dtype) @ value[:, :, None, :visible]  # [b, hk, per_group, n, d]
        outputs.append(block_out.flatten(1, 2))
    return torch.cat(outputs, dim=2)
