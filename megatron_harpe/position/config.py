"""The `position:` block of a config: which rotary encoding, and its bases.

    position: {type: harpe, strategy: paper}            # the 32 published per-head bases
    position: {type: harpe, strategy: uniform, base_min: 1.0e6, base_max: 5.0e6}
    position: {type: harpe, bases: [1.0e6, 2.0e6, ...]} # explicit
    position: {type: abf, base: 5.0e6}                  # one base for all heads (10000 = Llama2 RoPE)
    position: {type: pi, base: 10000, scaling_factor: 32}
    position: {type: yarn, base: 10000, scaling_factor: 32, original_max_position: 4096}

Grouped-query attention: a key shared by several query heads can carry one rotation, so by
default (`gqa_bases: per_group`) HARPE takes one base per k/v group and the query heads of a
group share it. `gqa_bases: per_query_head` takes one base per query head instead and rotates
a separate copy of each shared key per query head (k/v are expanded to one head per query
head before rotation, costing the memory of multi-head attention for keys and values).

`resolve()` turns a strategy into an explicit `bases` list once; the list is what is saved
with checkpoints and exported, so it is never recomputed from a default.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol


class ModelShape(Protocol):
    """What the position settings read of the model section (config.ModelConfig has it; the
    config module imports this one, so it is named by shape, not imported)."""

    @property
    def num_attention_heads(self) -> int: ...

    @property
    def kv_groups(self) -> int: ...

    @property
    def head_dim(self) -> int: ...

    @property
    def max_position_embeddings(self) -> int: ...


POSITION_TYPES = ("harpe", "abf", "pi", "yarn")
GQA_BASE_MODES = ("per_group", "per_query_head")


@dataclasses.dataclass
class PositionConfig:
    type: str = "abf"
    """harpe (one base per head) | abf (one base) | pi (position interpolation) | yarn"""
    base: float = 10000.0
    """The single RoPE base of abf, pi and yarn."""
    bases: list[float] | None = None
    """harpe: one base per head (MHA) or per k/v group (GQA, default); filled in from `strategy`."""
    strategy: str | None = None
    """harpe base strategy: paper | uniform | peak_valley | constant | explicit."""
    base_min: float | None = None
    """uniform and peak_valley: the smallest base (paper: 1e6)."""
    base_max: float | None = None
    """uniform and peak_valley: the largest base (paper: 5e6)."""
    stride: float | None = None
    """peak_valley candidate stride."""
    order: str = "ascending"
    """uniform: ascending | descending over heads."""
    max_distance: int | None = None
    """peak_valley: distances searched (default: the training sequence length)."""
    peak_window: int | None = None
    """peak_valley: half-width of the peak/valley picking window (see position/waveform.py)."""
    smoothing: float | None = None
    """peak_valley: width of the Gaussian the waveform is smoothed with before picking."""
    gqa_bases: str = "per_group"
    """per_group | per_query_head (see module docstring)."""
    scaling_factor: float = 1.0
    """pi: positions are divided by it; yarn: its scale factor."""
    original_max_position: int | None = None
    """yarn: the pretraining context (default: model.max_position_embeddings)."""
    yarn_beta_fast: float = 32.0
    """yarn: beta_fast of the frequency ramp (high-frequency boundary)."""
    yarn_beta_slow: float = 1.0
    """yarn: beta_slow of the frequency ramp (low-frequency boundary)."""

    def base_count(self, model: ModelShape) -> int:
        """How many bases `bases` must hold for this model."""
        if self.gqa_bases == "per_query_head":
            return model.num_attention_heads
        return model.kv_groups

    def resolve(self, model: ModelShape, seq_length: int | None = None) -> "PositionConfig":
        """Validate, and for harpe turn the strategy into an explicit list of bases (once)."""
        if self.type not in POSITION_TYPES:
            raise ValueError(f"position.type={self.type!r} is not one of {', '.join(POSITION_TYPES)}")
        if self.gqa_bases not in GQA_BASE_MODES:
            raise ValueError(f"position.gqa_bases={self.gqa_bases!r}: choose per_group or per_query_head")
        if self.base <= 0:
            raise ValueError(f"position.base={self.base} must be positive")
        if self.type != "harpe":
            if self.bases is not None or self.strategy is not None:
                raise ValueError(
                    f"position.bases/strategy are for type harpe, but position.type={self.type}: "
                    "use position.base for a single base, or set position.type: harpe"
                )
            if self.type in ("pi", "yarn") and self.scaling_factor < 1:
                raise ValueError(f"position.scaling_factor={self.scaling_factor} must be >= 1 for {self.type}")
            if self.type == "yarn" and self.original_max_position is None:
                self.original_max_position = model.max_position_embeddings
            return self
        from megatron_harpe.position.bases import select_bases, validate_bases

        count = self.base_count(model)
        if self.bases is None:
            if self.strategy is None:
                raise ValueError(
                    "position.type=harpe needs position.bases (a list) or position.strategy "
                    "(paper, uniform, peak_valley, constant)"
                )
            self.bases = select_bases(
                self.strategy,
                count,
                base_min=self.base_min,
                base_max=self.base_max,
                stride=self.stride,
                order=self.order,
                value=self.base,
                head_dim=model.head_dim,
                max_distance=self.max_distance or seq_length,
                peak_window=self.peak_window,
                smoothing=self.smoothing,
            )
        elif (
            self.gqa_bases == "per_group"
            and model.kv_groups != model.num_attention_heads
            and len(self.bases) == model.num_attention_heads
        ):
            raise ValueError(
                f"position.bases has {len(self.bases)} values, one per query head, but the model uses "
                f"grouped-query attention with {model.kv_groups} k/v groups and a shared key can carry "
                f"only one rotation: give one base per k/v group ({model.kv_groups} values), or set "
                "position.gqa_bases: per_query_head to rotate a copy of each key per query head "
                "(costs the k/v memory of multi-head attention)"
            )
        self.bases = [float(b) for b in validate_bases(self.bases, count, "position.bases")]
        return self

    def query_head_bases(self, model: ModelShape) -> list[float]:
        """One base per query head (a k/v group's base repeated for its query heads)."""
        if self.type != "harpe":
            return [self.base] * model.num_attention_heads
        assert self.bases is not None, "call resolve() first"
        if len(self.bases) == model.num_attention_heads:
            return list(self.bases)
        per_group = model.num_attention_heads // model.kv_groups
        return [b for b in self.bases for _ in range(per_group)]

    def key_head_bases(self, model: ModelShape) -> list[float]:
        """One base per key head as the attention sees it (k/v groups, or query heads when
        keys are expanded per query head)."""
        if self.type == "harpe" and self.gqa_bases == "per_query_head":
            return self.query_head_bases(model)
        if self.type != "harpe":
            return [self.base] * model.kv_groups
        assert self.bases is not None, "call resolve() first"
        return list(self.bases)

    def expands_keys(self, model: ModelShape) -> bool:
        return (
            self.type == "harpe" and self.gqa_bases == "per_query_head" and model.kv_groups != model.num_attention_heads
        )
