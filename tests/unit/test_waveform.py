"""The attention waveform A_b(D), its smoothing, the peak/valley rule and the coverage score."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_harpe.position.waveform import (
    attention_waveform,
    attention_waveforms,
    coverage_band,
    coverage_score,
    find_peaks_and_valleys,
    waveform_grid,
)


def direct_sum(base: float, head_dim: int, distance: float) -> float:
    """The HARPE paper's waveform (arXiv 2412.07171) written out term by term."""
    total = sum(2.0 * math.cos(distance * base ** (-2.0 * j / head_dim)) for j in range(head_dim // 2))
    return total / math.sqrt(head_dim)


@pytest.mark.parametrize("head_dim", [2, 16, 64, 128])
@pytest.mark.parametrize("base", [10.0, 1.0e4, 5.0e6])
def test_waveform_at_distance_zero_is_sqrt_head_dim(base: float, head_dim: int) -> None:
    assert attention_waveform(base, head_dim, [0])[0] == pytest.approx(math.sqrt(head_dim), rel=1e-14)


@pytest.mark.parametrize("base", [500.0, 1.0e4, 1.15e6, 4.54e6])
def test_waveform_matches_direct_sum(base: float) -> None:
    distances = [1, 2, 7, 100, 4095, 65536, 131071]
    got = attention_waveform(base, 128, distances)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, [direct_sum(base, 128, d) for d in distances], rtol=1e-10, atol=1e-10)


def test_waveform_keeps_the_shape_of_distances() -> None:
    distances = np.arange(12).reshape(3, 4)
    got = attention_waveform(1.0e4, 32, distances)
    assert got.shape == (3, 4)
    assert got[2, 3] == pytest.approx(direct_sum(1.0e4, 32, 11), rel=1e-12)


def test_uniform_grid_fast_path_equals_pointwise_evaluation() -> None:
    grid = np.arange(5, 5 + 7 * 3000, 7, dtype=np.float64)  # uniform, long enough for the fast path
    bases = [3.0e3, 1.0e6]
    fast = attention_waveforms(bases, 64, grid, smoothing=3.0)
    pointwise = np.stack([attention_waveforms(bases, 64, [d], smoothing=3.0)[:, 0] for d in grid], axis=1)
    np.testing.assert_allclose(fast, pointwise, rtol=0, atol=1e-11)


def test_smoothing_is_a_gaussian_convolution_over_distance() -> None:
    sigma, base, head_dim, centre = 6.0, 2.0e4, 32, 3000
    offsets = np.arange(-12 * int(sigma), 12 * int(sigma) + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    convolved = float(attention_waveform(base, head_dim, centre + offsets) @ kernel)
    smoothed = attention_waveforms([base], head_dim, [centre], smoothing=sigma)[0, 0]
    assert smoothed == pytest.approx(convolved, abs=1e-9)
    assert abs(smoothed - attention_waveform(base, head_dim, [centre])[0]) > 0.1  # it did smooth


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: attention_waveform(1.0e4, 7, [1]), "head_dim"),
        (lambda: attention_waveform(0.0, 8, [1]), "positive"),
        (lambda: attention_waveforms([1.0e4, -5.0], 8, [1]), "positive"),
        (lambda: attention_waveforms([1.0e4], 8, [1], smoothing=-1.0), "smoothing"),
    ],
)
def test_bad_arguments_raise_value_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_peaks_and_valleys_of_a_cosine() -> None:
    distances = np.arange(0, 1001, dtype=np.float64)
    peaks, valleys = find_peaks_and_valleys(np.cos(2 * np.pi * distances / 100), distances, window=10)
    np.testing.assert_array_equal(peaks, np.arange(100, 1000, 100))  # 0 and 1000 are ends
    np.testing.assert_array_equal(valleys, np.arange(50, 1000, 100))


def test_window_suppresses_small_bumps_and_flat_tops_count_once() -> None:
    distances = np.arange(11, dtype=np.float64) * 4
    values = np.array([0.0, 1.0, 3.0, 3.0, 2.0, 2.5, 2.0, 1.0, 0.5, 1.0, 0.0])
    peaks, valleys = find_peaks_and_valleys(values, distances, window=4)  # one sample each side
    np.testing.assert_array_equal(peaks, [8.0, 20.0, 36.0])
    np.testing.assert_array_equal(valleys, [16.0, 32.0])
    wide_peaks, wide_valleys = find_peaks_and_valleys(values, distances, window=12)  # three samples
    np.testing.assert_array_equal(wide_peaks, [8.0])
    assert wide_valleys.size == 0  # the dip at 32 has the lower end sample (40) inside its window


def test_peak_rule_rejects_uneven_or_mismatched_grids() -> None:
    with pytest.raises(ValueError, match="uniformly spaced"):
        find_peaks_and_valleys([0.0, 1.0, 0.0, 1.0], [0, 1, 3, 4], window=1)
    with pytest.raises(ValueError, match="samples"):
        find_peaks_and_valleys([0.0, 1.0, 0.0], [0, 1], window=1)
    with pytest.raises(ValueError, match="window"):
        find_peaks_and_valleys([0.0, 1.0, 0.0], [0, 1, 2], window=0)


def test_grid_step_follows_smoothing() -> None:
    assert np.diff(waveform_grid(1000, 64.0))[0] == 16
    assert waveform_grid(10, 0.0).tolist() == list(range(11))
    with pytest.raises(ValueError, match="max_distance"):
        waveform_grid(1, 0.0)


def test_coverage_score_is_the_mean_band_height_over_sqrt_d() -> None:
    bases, head_dim, target, sigma = [1.0e4, 3.0e4, 9.0e4], 64, 8192, 4.0
    grid = waveform_grid(target, sigma)
    waves = attention_waveforms(bases, head_dim, grid, sigma)
    expected = np.mean(waves.max(axis=0) - waves.min(axis=0)) / math.sqrt(head_dim)
    assert coverage_score(bases, head_dim, target, sigma) == pytest.approx(expected, rel=1e-12)
    assert expected > 0.01
    # a set property: order and repeats do not matter, one shared base scores zero
    assert coverage_score(bases[::-1] + bases, head_dim, target, sigma) == pytest.approx(expected, rel=1e-12)
    assert coverage_score([3.0e4] * 8, head_dim, target, sigma) == 0.0
    distances, lowest, highest = coverage_band(bases, head_dim, target, sigma)
    assert distances.shape == lowest.shape == highest.shape and np.all(highest >= lowest)
