"""The attention waveform of a RoPE base (the HARPE paper, arXiv 2412.07171) and the peak/valley rule used on it.

The waveform of base `b` for head dimension `d` is the pre-softmax score of an all-ones
query/key pair at distance `D` once RoPE has rotated them:

    A_b(D) = (1/sqrt(d)) * sum_{j=0}^{d/2-1} 2 * cos(D * b**(-2j/d))      (A_b(0) = sqrt(d))

HARPE's peak-valley base search (`megatron_harpe.position.bases`) and the plots of
`tools/select_bases.py` work on this curve. Its fastest term (j = 0) has a period of 2*pi
tokens, so the raw curve jitters on every token and its long-range shape, the thing the
search compares between bases, is hidden under that jitter. We therefore look at the
waveform **smoothed by a Gaussian of standard deviation `smoothing` tokens** over D. The
smoothing is exact, not numerical: convolving `cos(theta*D)` with that Gaussian multiplies it
by `exp(-(theta*smoothing)**2 / 2)`, so each term keeps its phase and fast terms fade out.
A smoothed waveform can then be sampled on a grid of step `smoothing/4` without aliasing,
which is what makes the search over ~134 candidates x 131072 distances take about a second.

Peak/valley picking rule (`find_peaks_and_valleys`): on a uniform grid, a sample other than
the first and last is a *peak* if no sample within `window` tokens on either side is higher
and the sample just before it is strictly lower (a flat top counts once, at its left end);
a *valley* is the same with "lower" and "higher" swapped.

Coverage score (`coverage_score`): where the peaks of some heads meet the valleys of
others, the heads disagree most about how much a distance matters. We measure that as the
mean over distances 0..max_distance (the smoothing grid) of the spread of the smoothed
waveforms across heads, `max_h A_h(D) - min_h A_h(D)`, divided by `A(0) = sqrt(d)`. It is
0 when all heads share one base and grows as heads complement each other at every distance.

    python -c "from megatron_harpe.position.waveform import attention_waveform; \\
        print(attention_waveform(1e6, 128, [0, 1, 4096]))"
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Grid step = smoothing / SAMPLES_PER_SMOOTHING: terms that survive the Gaussian have periods
# of at least ~2*smoothing tokens, so 8 samples per period locate extrema to a few tokens.
SAMPLES_PER_SMOOTHING = 4
# A term damped below this weight contributes nothing visible; skipping it saves time.
NEGLIGIBLE_TERM_WEIGHT = 1e-12
# Rows of distances evaluated at once, to bound the [distances, d/2] cosine table in memory.
_CHUNK = 16384


def _check_head_dim(head_dim: int) -> None:
    if isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer)) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim={head_dim!r} must be a positive even integer (RoPE rotates channel pairs)")


def _check_bases(bases: np.ndarray) -> None:
    if bases.size == 0 or not np.all(np.isfinite(bases)) or np.any(bases <= 0):
        raise ValueError(f"RoPE bases must be finite and positive, got {bases.tolist()}")


def rotary_frequencies(base: float, head_dim: int) -> np.ndarray:
    """theta_j = base**(-2j/d) for j = 0 .. d/2-1, float64."""
    _check_head_dim(head_dim)
    _check_bases(np.asarray([base], dtype=np.float64))
    return float(base) ** (-2.0 * np.arange(head_dim // 2, dtype=np.float64) / head_dim)


def attention_waveforms(
    bases: Sequence[float] | np.ndarray,
    head_dim: int,
    distances: np.ndarray | Sequence[float],
    smoothing: float = 0.0,
) -> np.ndarray:
    """Waveforms of several bases at the given distances, shape [len(bases), len(distances)].

    `smoothing` > 0 returns the waveform convolved with a Gaussian of that standard deviation
    (in tokens) over D, computed exactly term by term (see the module docstring).
    """
    _check_head_dim(head_dim)
    base_array = np.atleast_1d(np.asarray(bases, dtype=np.float64))
    _check_bases(base_array)
    distance_array = np.asarray(distances, dtype=np.float64).reshape(-1)
    if smoothing < 0 or not np.isfinite(smoothing):
        raise ValueError(f"smoothing={smoothing} must be a finite number of tokens >= 0")
    exponents = -2.0 * np.arange(head_dim // 2, dtype=np.float64) / head_dim
    uniform_step = _uniform_step(distance_array)
    result = np.empty((base_array.size, distance_array.size), dtype=np.float64)
    for row, base in enumerate(base_array):
        thetas = base**exponents
        weights = 2.0 * np.exp(-0.5 * (thetas * smoothing) ** 2)
        keep = weights > NEGLIGIBLE_TERM_WEIGHT
        thetas, weights = thetas[keep], weights[keep]
        if uniform_step is None:
            for start in range(0, distance_array.size, _CHUNK):
                chunk = distance_array[start : start + _CHUNK]
                result[row, start : start + chunk.size] = np.cos(np.outer(chunk, thetas)) @ weights
        else:
            result[row] = _sum_on_uniform_grid(thetas, weights, distance_array[0], uniform_step, distance_array.size)
    return result / np.sqrt(head_dim)


def _uniform_step(distances: np.ndarray) -> float | None:
    """The step of an evenly spaced array of at least 64 distances, else None."""
    if distances.size < 64:
        return None
    steps = np.diff(distances)
    return float(steps[0]) if np.allclose(steps, steps[0], rtol=0, atol=1e-9 * max(1.0, abs(steps[0]))) else None


def _sum_on_uniform_grid(thetas: np.ndarray, weights: np.ndarray, start: float, step: float, count: int) -> np.ndarray:
    """sum_j weights_j * cos(thetas_j * (start + k*step)) for k < count, as two matrix products.

    Writing k = q*block + r, cos(a + b) = cos a cos b - sin a sin b turns count x terms
    cosines into (count/block + block) x terms cosines plus BLAS work: ~10x faster, same result
    to ~1e-13.
    """
    block = max(1, int(np.sqrt(count)))
    coarse = start + step * block * np.arange(-(-count // block), dtype=np.float64)  # q*block offsets
    fine = step * np.arange(block, dtype=np.float64)  # r offsets
    coarse_angles, fine_angles = np.outer(coarse, thetas), np.outer(fine, thetas)
    table = (np.cos(coarse_angles) * weights) @ np.cos(fine_angles).T
    table -= (np.sin(coarse_angles) * weights) @ np.sin(fine_angles).T
    return table.reshape(-1)[:count]


def attention_waveform(base: float, head_dim: int, distances: np.ndarray | Sequence[int]) -> np.ndarray:
    """A_b(D) = (1/sqrt(d)) * sum_{j=0}^{d/2-1} 2*cos(D * base**(-2j/d)) at each distance, float64.

    Exact (unsmoothed); the result has the shape of `distances`.
    """
    distance_array = np.asarray(distances, dtype=np.float64)
    return attention_waveforms([base], head_dim, distance_array.reshape(-1))[0].reshape(distance_array.shape)


def default_smoothing(max_distance: int) -> float:
    """Gaussian width used by the search and the coverage score: max_distance/2048 tokens
    (64 at 128k), so the same share of the range is resolved at every target length."""
    return max_distance / 2048.0


def default_peak_window(max_distance: int) -> float:
    """Half-width of the peak/valley window: max_distance/128 tokens (1024 at 128k), which
    leaves about 50 peaks per waveform for bases 1e6..5e6 over 0..128k."""
    return max_distance / 128.0


def waveform_grid(max_distance: int, smoothing: float) -> np.ndarray:
    """Uniform grid 0, h, 2h, ... <= max_distance with step h = max(1, floor(smoothing/4)) tokens."""
    if isinstance(max_distance, bool) or not isinstance(max_distance, (int, np.integer)) or max_distance < 2:
        raise ValueError(f"max_distance={max_distance!r} must be an integer number of tokens >= 2")
    step = max(1, int(smoothing // SAMPLES_PER_SMOOTHING))
    return np.arange(0, max_distance + 1, step, dtype=np.float64)


def find_peaks_and_valleys(
    waveform: np.ndarray | Sequence[float],
    distances: np.ndarray | Sequence[float],
    window: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Distances of the peaks and of the valleys of one sampled waveform.

    `distances` must be uniformly spaced and increasing; `window` is the half-width in tokens
    (at least one sample). Rule: sample i (not the first or the last) is a peak when
    `waveform[i] >= waveform[i-k .. i+k]` (window clipped at the ends, k = round(window/step))
    and `waveform[i] > waveform[i-1]`; a valley likewise with <= and <.
    """
    values = np.asarray(waveform, dtype=np.float64).reshape(-1)
    grid = np.asarray(distances, dtype=np.float64).reshape(-1)
    if values.shape != grid.shape:
        raise ValueError(f"waveform has {values.size} samples but distances has {grid.size}")
    if grid.size < 3:
        return np.empty(0), np.empty(0)
    steps = np.diff(grid)
    if steps[0] <= 0 or not np.allclose(steps, steps[0], rtol=1e-9, atol=1e-9):
        raise ValueError("distances must be increasing and uniformly spaced (use waveform_grid)")
    if not window > 0:
        raise ValueError(f"window={window} must be a positive number of tokens")
    half = max(1, int(round(window / steps[0])))
    interior = np.zeros(values.size, dtype=bool)
    interior[1:-1] = True
    rises = np.zeros(values.size, dtype=bool)
    rises[1:] = values[1:] > values[:-1]
    falls = np.zeros(values.size, dtype=bool)
    falls[1:] = values[1:] < values[:-1]
    windows_high = np.lib.stride_tricks.sliding_window_view(np.pad(values, half, constant_values=-np.inf), 2 * half + 1)
    windows_low = np.lib.stride_tricks.sliding_window_view(np.pad(values, half, constant_values=np.inf), 2 * half + 1)
    peaks = interior & rises & (values >= windows_high.max(axis=1))
    valleys = interior & falls & (values <= windows_low.min(axis=1))
    return grid[peaks], grid[valleys]


def coverage_band(
    bases: Sequence[float], head_dim: int, max_distance: int, smoothing: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distances, lowest, highest) smoothed waveform across the bases at each grid distance."""
    sigma = default_smoothing(max_distance) if smoothing is None else smoothing
    grid = waveform_grid(max_distance, sigma)
    waves = attention_waveforms(sorted(set(float(b) for b in bases)), head_dim, grid, sigma)
    return grid, waves.min(axis=0), waves.max(axis=0)


def coverage_score(bases: Sequence[float], head_dim: int, max_distance: int, smoothing: float | None = None) -> float:
    """Mean over distances 0..max_distance of (max_h - min_h) smoothed waveform, / sqrt(d).

    0 for a single shared base; higher when, at each distance, some heads sit near a peak
    while others sit near a valley (see the module docstring).
    """
    _, lowest, highest = coverage_band(bases, head_dim, max_distance, smoothing)
    return float(np.mean(highest - lowest) / np.sqrt(head_dim))
