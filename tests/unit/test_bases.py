"""Base-selection strategies: presets exact, formulas, the peak-valley search, GQA counts, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_harpe.position import bases as bases_module
from megatron_harpe.position.bases import (
    PAPER_LLAMA2_7B_BASES,
    STRATEGIES,
    compare_strategies,
    peak_valley_candidates,
    select_bases,
    validate_bases,
)
from megatron_harpe.position.waveform import (
    attention_waveforms,
    coverage_score,
    find_peaks_and_valleys,
    waveform_grid,
)

# The HARPE paper's Llama2-7B bases (arXiv 2412.07171), heads 1..32, in millions, as printed there.
PUBLISHED_MILLIONS = """
    1.00 1.15 1.30 1.45 2.17 2.20 2.23 2.47 2.50 2.65 2.68 2.71 2.74 2.80 2.83 2.92
    3.01 3.04 3.10 3.13 3.16 3.22 3.43 3.46 3.61 3.88 4.09 4.15 4.39 4.45 4.51 4.54
"""
SMALL_SEARCH = dict(base_min=1.0e4, base_max=6.0e4, stride=2.0e3, head_dim=32, max_distance=8192)


def test_paper_preset_is_exactly_the_published_list() -> None:
    published = [float(f"{text}e6") for text in PUBLISHED_MILLIONS.split()]
    assert len(published) == 32
    assert list(PAPER_LLAMA2_7B_BASES) == published
    assert select_bases("paper", 32) == published
    assert all(isinstance(b, float) for b in select_bases("paper", 32))


def test_paper_preset_refuses_other_head_counts_and_suggests_alternatives() -> None:
    with pytest.raises(ValueError, match="32 published.*8 bases.*uniform or peak_valley"):
        select_bases("paper", 8)


@pytest.mark.parametrize("count", [2, 5, 32])
def test_uniform_follows_its_formula_in_both_orders(count: int) -> None:
    low, high = 1.0e6, 5.0e6
    expected = [low + h * (high - low) / (count - 1) for h in range(count)]
    assert select_bases("uniform", count, base_min=low, base_max=high) == pytest.approx(expected, rel=1e-15)
    descending = select_bases("uniform", count, base_min=low, base_max=high, order="descending")
    assert descending == pytest.approx(expected[::-1], rel=1e-15)
    assert descending[0] == high and descending[-1] == low


def test_uniform_with_one_head_is_base_min() -> None:
    assert select_bases("uniform", 1, base_min=2.0e5, base_max=9.0e5) == [2.0e5]


def test_uniform_per_kv_group_under_gqa() -> None:
    # Llama3-8B-like: 32 query heads in 8 k/v groups -> one base per group, 8 values
    per_group = select_bases("uniform", 8, base_min=1.0e6, base_max=5.0e6)
    assert per_group == pytest.approx([1.0e6 + g * 4.0e6 / 7 for g in range(8)])


def test_constant_and_explicit() -> None:
    assert select_bases("constant", 4, value=5.0e6) == [5.0e6] * 4
    assert select_bases("explicit", 3, values=[3, 1.5e4, 2.0e6]) == [3.0, 1.5e4, 2.0e6]


def reference_peak_valley(count: int, base_min, base_max, stride, head_dim, max_distance) -> list[float]:
    """The documented search, written plainly (loops, no incremental bookkeeping)."""
    candidates = list(peak_valley_candidates(base_min, base_max, stride))
    sigma, window = max_distance / 2048, max_distance / 128
    grid = waveform_grid(max_distance, sigma)
    waves = attention_waveforms(candidates, head_dim, grid, sigma)
    extrema = [find_peaks_and_valleys(w, grid, window) for w in waves]
    chosen = [0]
    while len(chosen) < count:
        selected_peaks = np.concatenate([extrema[c][0] for c in chosen])
        selected_valleys = np.concatenate([extrema[c][1] for c in chosen])
        best, best_cost = None, math.inf
        for index in range(len(candidates)):
            if index in chosen:
                continue
            peaks, valleys = extrema[index]
            gaps = [min(abs(p - v) for v in selected_valleys) for p in peaks]
            gaps += [min(abs(v - p) for p in selected_peaks) for v in valleys]
            cost = sum(gaps) / len(gaps)
            if cost < best_cost:  # strict: ties keep the smaller base
                best, best_cost = index, cost
        chosen.append(best)
    return sorted(candidates[i] for i in chosen)


def test_peak_valley_equals_the_documented_greedy_rule() -> None:
    got = select_bases("peak_valley", 6, **SMALL_SEARCH)
    assert got == pytest.approx(reference_peak_valley(6, **SMALL_SEARCH), rel=1e-15)


def test_peak_valley_is_deterministic_sorted_distinct_and_on_the_candidate_grid() -> None:
    first = select_bases("peak_valley", 10, **SMALL_SEARCH)
    assert first == select_bases("peak_valley", 10, **SMALL_SEARCH)
    assert first == sorted(first) and len(set(first)) == 10
    assert first[0] == SMALL_SEARCH["base_min"] and first[-1] <= SMALL_SEARCH["base_max"]
    steps = (np.array(first) - SMALL_SEARCH["base_min"]) / SMALL_SEARCH["stride"]
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-9)
    assert select_bases("peak_valley", 10, order="descending", **SMALL_SEARCH) == first[::-1]


def test_peak_valley_at_the_paper_setting() -> None:
    found = select_bases("peak_valley", 32, base_min=1.0e6, base_max=5.0e6, stride=3.0e4, max_distance=131072)
    assert len(found) == 32 and found == sorted(set(found))
    assert 1.0e6 == found[0] and found[-1] <= 5.0e6
    assert len(peak_valley_candidates(1.0e6, 5.0e6, 3.0e4)) == 134


def test_peak_valley_without_extrema_in_range_takes_the_smallest_bases() -> None:
    # smoothed over 16 tokens, bases this large fall monotonically over 0..64: nothing to compare
    options = dict(base_min=1.0e9, base_max=2.0e9, stride=1.0e8, head_dim=8, max_distance=64, smoothing=16.0)
    grid = waveform_grid(64, 16.0)
    for wave in attention_waveforms([1.0e9, 2.0e9], 8, grid, 16.0):
        assert all(found.size == 0 for found in find_peaks_and_valleys(wave, grid, window=8))
    assert select_bases("peak_valley", 3, peak_window=8, **options) == [1.0e9, 1.1e9, 1.2e9]


def test_peak_valley_accepts_the_raw_unsmoothed_waveform() -> None:
    raw = select_bases("peak_valley", 4, smoothing=0.0, peak_window=64, **SMALL_SEARCH)
    assert len(raw) == 4 and raw == sorted(set(raw)) and raw[0] == SMALL_SEARCH["base_min"]


def test_peak_valley_errors_name_the_option() -> None:
    with pytest.raises(ValueError, match="max_distance"):
        select_bases("peak_valley", 4, base_min=1.0e4, base_max=6.0e4, stride=2.0e3)
    with pytest.raises(ValueError, match="stride"):
        select_bases("peak_valley", 4, base_min=1.0e4, base_max=6.0e4, max_distance=4096)
    with pytest.raises(ValueError, match="only 6 candidates: lower stride"):
        select_bases("peak_valley", 8, base_min=1.0e4, base_max=6.0e4, stride=1.0e4, max_distance=4096)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(strategy="harpe_magic", count=4), "not one of paper, uniform, peak_valley"),
        (dict(strategy="uniform", count=0, base_min=1.0, base_max=2.0), "count"),
        (dict(strategy="uniform", count=4, base_max=2.0), "base_min is required"),
        (dict(strategy="uniform", count=4, base_min=-1.0, base_max=2.0), "base_min=-1.0 must be a finite number > 0"),
        (dict(strategy="uniform", count=4, base_min=5.0, base_max=2.0), "base_max=2.0 must be greater"),
        (dict(strategy="uniform", count=4, base_min=1.0, base_max=2.0, order="random"), "order"),
        (dict(strategy="uniform", count=4, base_min=1.0, base_max=2.0, stride=3.0), "uniform does not use stride"),
        (dict(strategy="paper", count=32, values=[1.0] * 32), "paper does not use values"),
        (dict(strategy="constant", count=4), "value is required"),
        (dict(strategy="constant", count=4, value=0.0), "value=0.0"),
        (dict(strategy="explicit", count=4), "explicit needs values"),
        (dict(strategy="explicit", count=4, values=[1.0, 2.0, 3.0]), "values has 3 values but the model has 4"),
        (dict(strategy="explicit", count=2, values=[1.0, -2.0]), r"values\[1\]=-2.0 must be a finite number > 0"),
    ],
)
def test_bad_strategy_options_raise_clear_value_errors(options: dict, message: str) -> None:
    options = dict(options)
    with pytest.raises(ValueError, match=message):
        select_bases(options.pop("strategy"), options.pop("count"), **options)


def test_options_every_config_carries_are_ignored_where_unused() -> None:
    # the config always passes order, value (position.base), head_dim and max_distance
    got = select_bases("uniform", 2, base_min=1.0, base_max=3.0, value=1.0e4, head_dim=64, max_distance=4096)
    assert got == [1.0, 3.0]


@pytest.mark.parametrize(
    "bases, message",
    [
        ([1.0e6] * 3, "position.bases has 3 values but the model has 4 k/v groups: give exactly 4 bases"),
        ([1.0e6, 0.0, 1.0e6, 1.0e6], r"position.bases\[1\]=0.0 must be a finite number > 0"),
        ([1.0e6, float("nan"), 1.0e6, 1.0e6], r"position.bases\[1\]=nan"),
        ([1.0e6, "big", 1.0e6, 1.0e6], "is not a number"),
        ([True, 1.0e6, 1.0e6, 1.0e6], "is not a number"),
        ("1e6,1e6,1e6,1e6", "must be a list"),
    ],
)
def test_validate_bases_names_the_option_and_the_fix(bases, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_bases(bases, 4, "position.bases", unit="k/v groups")


def test_validate_bases_returns_floats() -> None:
    got = validate_bases(np.array([10, 20]), 2, "position.bases")
    assert got == [10.0, 20.0] and all(type(b) is float for b in got)


def test_a_new_strategy_is_one_function_in_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    def geometric(count: int, *, base_min: float | None = None) -> list[float]:
        return [base_min * 2.0**h for h in range(count)]

    monkeypatch.setitem(STRATEGIES, "geometric", geometric)
    assert select_bases("geometric", 3, base_min=1.0e4) == [1.0e4, 2.0e4, 4.0e4]
    with pytest.raises(ValueError, match="geometric does not use base_max"):
        select_bases("geometric", 3, base_min=1.0e4, base_max=5.0)


def test_compare_strategies_scores_every_strategy() -> None:
    outcomes = compare_strategies(8, base_min=1.0e4, base_max=6.0e4, stride=2.0e3, head_dim=32, max_distance=8192)
    by_label = {o.label: o for o in outcomes}
    assert list(by_label) == ["paper", "uniform ascending", "uniform descending", "peak_valley", "constant"]
    assert by_label["paper"].bases is None and "32 published" in by_label["paper"].problem
    assert by_label["constant"].coverage == 0.0 and by_label["constant"].bases == [6.0e4] * 8
    uniform = by_label["uniform ascending"]
    assert uniform.coverage == pytest.approx(coverage_score(uniform.bases, 32, 8192), rel=1e-12)
    assert uniform.coverage == pytest.approx(by_label["uniform descending"].coverage, rel=1e-12)
    assert by_label["peak_valley"].coverage > 0.0


def test_module_exports_the_required_api() -> None:
    assert set(STRATEGIES) == {"paper", "uniform", "peak_valley", "constant", "explicit"}
    assert callable(bases_module.select_bases) and callable(bases_module.validate_bases)
