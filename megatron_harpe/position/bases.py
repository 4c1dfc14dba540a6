"""Per-head RoPE bases for HARPE: named selection strategies and their validation.

A strategy turns a head count (query heads, or k/v groups under grouped-query attention)
into one base per head. The registry `STRATEGIES` maps a name to a plain function; adding a
strategy is adding one function to it. `select_bases` is the single entry point used by the
config (`position.strategy`) and by `tools/select_bases.py`:

    paper        the 32 bases published for Llama2-7B (the HARPE paper, arXiv 2412.07171), exactly
    uniform      b_h = b_min + h*(b_max-b_min)/(N-1), ascending or descending over heads
    peak_valley  the paper's greedy waveform search (see `peak_valley_bases`)
    constant     one value for every head (ABF as a degenerate HARPE)
    explicit     a given list, checked for length and positivity

    python -c "from megatron_harpe.position.bases import select_bases; \\
        print(select_bases('uniform', 4, base_min=1e4, base_max=1e5))"
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence

import numpy as np

from megatron_harpe.position.waveform import (
    attention_waveforms,
    coverage_score,
    default_peak_window,
    default_smoothing,
    find_peaks_and_valleys,
    waveform_grid,
)

# Llama2-7B, heads 1..32 (HARPE paper): b_min 1e6, b_max 5e6, stride 3e4, all on the stride grid.
PAPER_LLAMA2_7B_BASES: tuple[float, ...] = (
    1.00e6, 1.15e6, 1.30e6, 1.45e6, 2.17e6, 2.20e6, 2.23e6, 2.47e6,
    2.50e6, 2.65e6, 2.68e6, 2.71e6, 2.74e6, 2.80e6, 2.83e6, 2.92e6,
    3.01e6, 3.04e6, 3.10e6, 3.13e6, 3.16e6, 3.22e6, 3.43e6, 3.46e6,
    3.61e6, 3.88e6, 4.09e6, 4.15e6, 4.39e6, 4.45e6, 4.51e6, 4.54e6,
)  # fmt: skip
PAPER_BASE_MIN, PAPER_BASE_MAX, PAPER_STRIDE = 1.0e6, 5.0e6, 3.0e4
ORDERS = ("ascending", "descending")


def _positive(value: float | None, name: str, example: str) -> float:
    if value is None:
        raise ValueError(f"{name} is required here: set it, e.g. {name}: {example}")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}={value!r} must be a number, e.g. {name}: {example}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value} must be a finite number > 0, e.g. {name}: {example}")
    return float(value)


def _range(base_min: float | None, base_max: float | None, count: int) -> tuple[float, float]:
    low = _positive(base_min, "base_min", "1.0e6")
    high = _positive(base_max, "base_max", "5.0e6")
    if count > 1 and high <= low:
        raise ValueError(
            f"base_max={high} must be greater than base_min={low}: swap them, or use strategy "
            "constant for a single shared base"
        )
    return low, high


def _ordered(bases: list[float], order: str) -> list[float]:
    if order not in ORDERS:
        raise ValueError(f"order={order!r} is not one of {', '.join(ORDERS)}")
    return sorted(bases, reverse=order == "descending")


def validate_bases(
    bases: Sequence[float], expected_count: int, what: str, *, unit: str = "attention heads"
) -> list[float]:
    """Check one finite positive base per head; return them as floats.

    `what` names the option as the user wrote it (e.g. "position.bases"); `unit` says what is
    counted ("attention heads", "k/v groups"). Raises ValueError naming the option and the fix.
    """
    if isinstance(bases, (str, bytes)) or not isinstance(bases, Sequence | np.ndarray):
        raise ValueError(f"{what} must be a list of numbers, one base per head, got {bases!r}")
    values = list(bases)
    if len(values) != expected_count:
        raise ValueError(
            f"{what} has {len(values)} values but the model has {expected_count} {unit}: give exactly "
            f"{expected_count} bases, one per {unit.rstrip('s')} (under grouped-query attention one per "
            "k/v group), or pick a strategy (uniform, peak_valley) that generates them"
        )
    checked = []
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"{what}[{index}]={value!r} is not a number: every base must be a number > 0")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"{what}[{index}]={value} must be a finite number > 0 (RoPE bases are positive), e.g. 1.0e6"
            )
        checked.append(float(value))
    return checked


def paper_bases(count: int) -> list[float]:
    """The 32 published Llama2-7B bases, head 1 first (only valid for 32 heads)."""
    if count != len(PAPER_LLAMA2_7B_BASES):
        raise ValueError(
            f"strategy paper is the {len(PAPER_LLAMA2_7B_BASES)} published Llama2-7B bases, but {count} "
            "bases are needed here (heads, or k/v groups under GQA): use strategy uniform or peak_valley "
            "with base_min/base_max (the paper used 1.0e6 .. 5.0e6), or give an explicit list"
        )
    return list(PAPER_LLAMA2_7B_BASES)


def uniform_bases(
    count: int, *, base_min: float | None = None, base_max: float | None = None, order: str = "ascending"
) -> list[float]:
    """b_h = b_min + h*(b_max - b_min)/(N-1) for h = 0..N-1 (N = 1 gives [b_min])."""
    low, high = _range(base_min, base_max, count)
    if count == 1:
        return [low]
    return _ordered([low + h * (high - low) / (count - 1) for h in range(count)], order)


def constant_bases(count: int, *, value: float | None = None) -> list[float]:
    """`value` for every head."""
    return [_positive(value, "value", "5.0e6")] * count


def explicit_bases(count: int, *, values: Sequence[float] | None = None) -> list[float]:
    """The given list, one base per head, validated."""
    if values is None:
        raise ValueError("strategy explicit needs values: a list with one base per head, e.g. [1.0e6, 2.0e6, ...]")
    return validate_bases(values, count, "values")


def peak_valley_candidates(base_min: float, base_max: float, stride: float) -> np.ndarray:
    """b_min + k*stride for k = 0, 1, ... while <= b_max (a relative 1e-9 of slack)."""
    steps = int(math.floor((base_max - base_min) / stride * (1 + 1e-9) + 1e-9))
    return base_min + stride * np.arange(steps + 1, dtype=np.float64)


def _nearest_distance(points: np.ndarray, sorted_targets: np.ndarray) -> np.ndarray:
    """For each point, the distance to the closest target (targets sorted, non-empty)."""
    right = np.clip(np.searchsorted(sorted_targets, points), 0, sorted_targets.size - 1)
    left = np.clip(right - 1, 0, sorted_targets.size - 1)
    return np.minimum(np.abs(points - sorted_targets[left]), np.abs(points - sorted_targets[right]))


def peak_valley_bases(
    count: int,
    *,
    base_min: float | None = None,
    base_max: float | None = None,
    stride: float | None = None,
    head_dim: int = 128,
    max_distance: int | None = None,
    order: str = "ascending",
    peak_window: float | None = None,
    smoothing: float | None = None,
) -> list[float]:
    """Greedy peak-valley search of the HARPE paper, with an explicit picking rule.

    1. Candidates: b_min + k*stride up to b_max.
    2. Each candidate's waveform A_b(D) over D = 0..max_distance, smoothed by a Gaussian of
       `smoothing` tokens (default max_distance/2048) and sampled every smoothing/4 tokens
       (`megatron_harpe.position.waveform`).
    3. Peaks and valleys: `find_peaks_and_valleys` with half-window `peak_window` tokens
       (default max_distance/128): a sample is a peak if nothing within the window is higher.
    4. Start from {b_min}. Repeatedly add the unselected candidate with the lowest cost: the
       mean, over all its peaks and valleys, of the distance from each peak to the nearest
       valley of any selected base and from each valley to the nearest selected peak. (The paper
       says "sum"; the mean keeps a candidate from winning just by having fewer extrema in
       range; a candidate with none costs +inf.) Ties go to the smaller base, so if nothing
       can be compared (no extrema in range) the next smallest base is taken. Stop at N.
    5. Return the bases sorted (`order`), so they are distinct and within [b_min, b_max].

    At the paper setting (1e6..5e6, stride 3e4, N 32, d 128, 0..131072) this does not recover
    the published list, and no variant we tried did: it picks 11 of the 32 published bases
    exactly and 19 within one stride, where a random 32 of the 134 candidates averages 7.6 and
    17.8 (smoothing 16..256 and window 256..4096 give 6..11 exact, 11..20 within a stride).
    The published list ships as its own preset, `paper`.
    """
    low, high = _range(base_min, base_max, 2)
    step = _positive(stride, "stride", "3.0e4 (the paper's stride)")
    if isinstance(max_distance, bool) or not isinstance(max_distance, (int, np.integer)) or max_distance < 2:
        raise ValueError(
            f"max_distance={max_distance!r}: peak_valley compares waveforms over distances 0..max_distance; "
            "set it to the target sequence length, e.g. max_distance: 131072"
        )
    candidates = peak_valley_candidates(low, high, step)
    if count > candidates.size:
        raise ValueError(
            f"peak_valley needs {count} bases but base_min..base_max with stride {step} gives only "
            f"{candidates.size} candidates: lower stride or widen base_min..base_max"
        )
    sigma = default_smoothing(max_distance) if smoothing is None else float(smoothing)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(
            f"smoothing={smoothing} must be a number of tokens >= 0 (0 = raw waveform), e.g. smoothing: 64"
        )
    window = default_peak_window(max_distance) if peak_window is None else _positive(peak_window, "peak_window", "1024")
    grid = waveform_grid(max_distance, sigma)
    waves = attention_waveforms(candidates, head_dim, grid, sigma)
    extrema = [find_peaks_and_valleys(wave, grid, window) for wave in waves]

    # Flat arrays of every candidate's peaks and valleys, each with the distance to the
    # nearest opposite extremum of the selected set (inf until a selected base has one).
    peak_owner = np.concatenate([np.full(p.size, c) for c, (p, _) in enumerate(extrema)])
    valley_owner = np.concatenate([np.full(v.size, c) for c, (_, v) in enumerate(extrema)])
    peaks = np.concatenate([p for p, _ in extrema])
    valleys = np.concatenate([v for _, v in extrema])
    peak_gap, valley_gap = np.full(peaks.size, np.inf), np.full(valleys.size, np.inf)
    extremum_count = np.bincount(peak_owner, minlength=candidates.size)
    extremum_count += np.bincount(valley_owner, minlength=candidates.size)
    selected = np.zeros(candidates.size, dtype=bool)
    choice = 0  # b_min
    for _ in range(count):
        selected[choice] = True
        chosen_peaks, chosen_valleys = extrema[choice]
        if chosen_valleys.size:
            peak_gap = np.minimum(peak_gap, _nearest_distance(peaks, chosen_valleys))
        if chosen_peaks.size:
            valley_gap = np.minimum(valley_gap, _nearest_distance(valleys, chosen_peaks))
        total = np.bincount(peak_owner, weights=peak_gap, minlength=candidates.size)
        total += np.bincount(valley_owner, weights=valley_gap, minlength=candidates.size)
        cost = np.where(extremum_count > 0, total / np.maximum(extremum_count, 1), np.inf)
        remaining = np.flatnonzero(~selected)
        if remaining.size and selected.sum() < count:
            choice = int(remaining[np.argmin(cost[remaining])])  # first minimum: the smaller base
    return _ordered([float(b) for b in candidates[selected]], order)


STRATEGIES: dict[str, Callable[..., list[float]]] = {
    "paper": paper_bases,
    "uniform": uniform_bases,
    "peak_valley": peak_valley_bases,
    "constant": constant_bases,
    "explicit": explicit_bases,
}

# Options every caller passes (the config always carries them): ignored by strategies that do
# not use them. Any other option given to a strategy that does not take it is an error.
_CONTEXT_OPTIONS = ("order", "value", "head_dim", "max_distance")


def select_bases(
    strategy: str,
    count: int,
    *,
    base_min: float | None = None,
    base_max: float | None = None,
    stride: float | None = None,
    order: str = "ascending",
    value: float | None = None,
    values: Sequence[float] | None = None,
    head_dim: int = 128,
    max_distance: int | None = None,
    peak_window: float | None = None,
    smoothing: float | None = None,
) -> list[float]:
    """One base per head (or per k/v group) from the named strategy; all floats > 0.

    Raises ValueError naming the offending option and the fix: unknown strategy, bad count,
    missing or non-positive range, a list of the wrong length, or an option (base_min,
    base_max, stride, values, peak_window, smoothing) the strategy does not use.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {', '.join(STRATEGIES)} (or give the bases explicitly)")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"count={count!r}: the number of bases (heads or k/v groups) must be an integer >= 1")
    if order not in ORDERS:
        raise ValueError(f"order={order!r} is not one of {', '.join(ORDERS)}")
    options = dict(
        base_min=base_min, base_max=base_max, stride=stride, order=order, value=value, values=values,
        head_dim=head_dim, max_distance=max_distance, peak_window=peak_window, smoothing=smoothing,
    )  # fmt: skip
    function = STRATEGIES[strategy]
    accepted = inspect.signature(function).parameters
    unused = [name for name, given in options.items() if given is not None and name not in accepted]
    stray = [name for name in unused if name not in _CONTEXT_OPTIONS]
    if stray:
        raise ValueError(
            f"strategy {strategy} does not use {', '.join(stray)}: remove it, or choose a strategy that "
            f"takes it (it accepts: {', '.join(n for n in accepted if n != 'count') or 'no options'})"
        )
    bases = function(int(count), **{name: given for name, given in options.items() if name in accepted})
    return validate_bases(bases, int(count), f"strategy {strategy}")


@dataclasses.dataclass(frozen=True)
class StrategyOutcome:
    """One row of `compare_strategies`: the bases and their coverage score, or why it failed."""

    label: str
    bases: list[float] | None
    coverage: float | None
    problem: str = ""


def compare_strategies(
    count: int,
    *,
    base_min: float,
    base_max: float,
    stride: float,
    head_dim: int = 128,
    max_distance: int,
    value: float | None = None,
    values: Sequence[float] | None = None,
    peak_window: float | None = None,
    smoothing: float | None = None,
) -> list[StrategyOutcome]:
    """Run every strategy on the same range and score it with `waveform.coverage_score`.

    Rows: paper, uniform ascending and descending, peak_valley, constant (`value`, default
    b_max: single-stage ABF), and explicit when `values` is given. A strategy that cannot
    serve this head count (paper needs 32) is reported with its error instead of raising.
    """
    runs: list[tuple[str, str, dict]] = [
        ("paper", "paper", {}),
        ("uniform ascending", "uniform", dict(base_min=base_min, base_max=base_max)),
        ("uniform descending", "uniform", dict(base_min=base_min, base_max=base_max, order="descending")),
        ("peak_valley", "peak_valley", dict(base_min=base_min, base_max=base_max, stride=stride,
                                            peak_window=peak_window, smoothing=smoothing)),
        ("constant", "constant", dict(value=base_max if value is None else value)),
    ]  # fmt: skip
    if values is not None:
        runs.append(("explicit", "explicit", dict(values=values)))
    outcomes = []
    for label, strategy, options in runs:
        try:
            bases = select_bases(strategy, count, head_dim=head_dim, max_distance=max_distance, **options)
        except ValueError as error:
            outcomes.append(StrategyOutcome(label, None, None, str(error)))
            continue
        score = coverage_score(bases, head_dim, max_distance, smoothing)
        outcomes.append(StrategyOutcome(label, bases, score))
    return outcomes
