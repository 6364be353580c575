"""The series toolkit: smoothing, robust level/trend/noise, spikes, alignment.

All functions take and return numpy arrays and accept any length, including 0 and 1,
and non-finite values. They never raise on odd data: a statistic that cannot be computed
is NaN.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

DEFAULT_SMOOTHING = 0.9
"""EMA weight used for verdicts (TensorBoard's slider default is 0.6; verdicts need less
noise). Configurable per analysis."""


def ema_debiased(values: np.ndarray, weight: float = DEFAULT_SMOOTHING) -> np.ndarray:
    """TensorBoard's scalar smoothing: a debiased exponential moving average.

    Non-finite points are passed through unchanged and not fed into the state; a constant
    series is returned as is (TensorBoard does the same, avoiding float drift).
    """
    x = np.asarray(values, dtype=np.float64)
    out = x.copy()
    if x.size == 0:
        return out
    if not 0.0 <= weight < 1.0:
        if weight == 1.0:  # TensorBoard: no debiasing, state never moves from 0
            out[np.isfinite(x)] = 0.0
            return out
        raise ValueError(f"smoothing weight must be in [0, 1], got {weight}")
    finite = np.isfinite(x)
    xs = x[finite]
    if xs.size == 0 or np.all(xs == xs[0]):
        return out
    # last_t = w*last_{t-1} + (1-w)*x_t, with last_0 = 0; then divide by 1 - w**t.
    state = _ema_state(xs, weight)
    k = np.arange(1, xs.size + 1, dtype=np.float64)
    debias = 1.0 - np.power(weight, k) if weight > 0 else np.ones_like(k)
    out[finite] = state / debias
    return out


def _ema_state(x: np.ndarray, w: float, block: int = 64) -> np.ndarray:
    """``y[t] = w*y[t-1] + (1-w)*x[t]`` with ``y[-1] = 0`` (what
    ``scipy.signal.lfilter([1-w], [1, -w], x)`` computes), in numpy: importing
    scipy.signal costs seconds at every CLI start. Each block of ``block`` points is a
    product with a lower-triangular matrix of powers of ``w`` (all <= 1, so nothing
    overflows); the state carried between blocks is a short sequential loop."""
    n = x.size
    nb = -(-n // block)
    xp = np.zeros(nb * block)
    xp[:n] = x
    j = np.arange(block)
    lag = j[:, None] - j[None, :]
    tri = np.where(lag >= 0, w ** np.maximum(lag, 0), 0.0)
    local = (1.0 - w) * (xp.reshape(nb, block) @ tri.T)  # each block starting from 0
    carry = np.empty(nb)
    c, w_block = 0.0, w**block
    for b, end in enumerate(local[:, -1].tolist()):
        carry[b] = c
        c = w_block * c + end
    return (local + carry[:, None] * (w ** (j + 1))[None, :]).ravel()[:n]


def rolling_median(values: np.ndarray, window: int) -> np.ndarray:
    """Centered rolling median over the finite points (non-finite points stay NaN)."""
    return _median_over_finite(values, window, trailing=False)


def trailing_median(values: np.ndarray, window: int) -> np.ndarray:
    """Median of each point and the ``window - 1`` finite points before it (the first value
    repeated at the start; the upper middle value for an even window), over the finite
    points (non-finite points stay NaN)."""
    return _median_over_finite(values, window, trailing=True)


def _median_over_finite(values: np.ndarray, window: int, trailing: bool) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    out = np.full(x.shape, np.nan)
    finite = np.isfinite(x)
    if not finite.any():
        return out
    w = max(1, min(int(window), int(finite.sum())))
    # origin (w - 1) // 2 makes the window end at the point itself
    origin = (w - 1) // 2 if trailing else 0
    out[finite] = ndimage.median_filter(x[finite], size=w, mode="nearest", origin=origin)
    return out


def rolling_mad(values: np.ndarray, window: int) -> np.ndarray:
    """Centered rolling median absolute deviation, scaled to σ for Gaussian noise."""
    x = np.asarray(values, dtype=np.float64)
    med = rolling_median(x, window)
    return 1.4826 * rolling_median(np.abs(x - med), window)


def robust_level(values: np.ndarray) -> float:
    """Median of the finite values (NaN if none)."""
    x = _finite(values)
    return float(np.median(x)) if x.size else float("nan")


def robust_noise(values: np.ndarray) -> float:
    """σ of step-to-step noise, robustly: MAD of first differences / √2."""
    x = _finite(values)
    if x.size < 3:
        return float("nan")
    d = np.diff(x)
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def robust_slope(steps: np.ndarray, values: np.ndarray, max_points: int = 2000) -> float:
    """Theil–Sen slope (value per step) over the finite points, subsampled for speed."""
    s = np.asarray(steps, dtype=np.float64)
    x = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(s) & np.isfinite(x)
    s, x = s[ok], x[ok]
    if s.size < 2 or np.ptp(s) == 0:
        return float("nan")
    if s.size > max_points:
        idx = np.linspace(0, s.size - 1, max_points).astype(np.int64)
        s, x = s[idx], x[idx]
    # Pairwise slopes of a random subset keep this O(n) on long series.
    rng = np.random.default_rng(0)
    n = s.size
    m = min(20 * n, n * (n - 1) // 2)
    i = rng.integers(0, n, m)
    j = rng.integers(0, n, m)
    keep = s[i] != s[j]
    if not keep.any():
        return float("nan")
    slopes = (x[j[keep]] - x[i[keep]]) / (s[j[keep]] - s[i[keep]])
    return float(np.median(slopes))


@dataclass(frozen=True)
class Spike:
    index: int
    step: int
    value: float
    baseline: float
    score: float
    """(value - baseline) / robust noise σ."""


def find_spikes(
    steps: np.ndarray,
    values: np.ndarray,
    threshold: float = 6.0,
    window: int = 25,
    min_rel: float = 0.0,
) -> list[Spike]:
    """Points far above the rolling median, measured in robust noise units.

    ``min_rel`` additionally requires ``(value - baseline) / |baseline| >= min_rel``,
    so that a tiny absolute wobble on a very smooth curve is not called a spike.
    """
    x = np.asarray(values, dtype=np.float64)
    st = np.asarray(steps)
    if x.size < 5:
        return []
    # Windows cut at the ends, not padded with the end value: padding would make a spike
    # on the first point (an epoch log's second epoch, after the transient) its own
    # baseline.
    base = _cut_median(x, window)
    noise = 1.4826 * _cut_median(np.abs(x - base), window)
    # Floor the noise so a perfectly smooth curve does not give infinite scores, and never
    # below the log's rounding resolution: a loss written with 4 decimals that steps
    # 1e-4 -> 2e-4 has moved by one rounding step, not by a huge number of σ.
    global_noise = robust_noise(x)
    floor = max(
        np.nanmedian(noise) * 0.25 if np.isfinite(noise).any() else 0.0,
        global_noise if np.isfinite(global_noise) else 0.0,
        resolution(x),
        np.finfo(np.float64).tiny,  # relative floors only: verdicts must not depend on units
    )
    sigma = np.maximum(np.nan_to_num(noise, nan=floor), floor)
    # over: a blow-up to ~1e300 overflows the ratio; it must not warn from a signature.
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        score = (x - base) / sigma
        rel = (x - base) / np.maximum(np.abs(base), np.finfo(np.float64).tiny)
    hit = np.isfinite(score) & (score > threshold) & (rel >= min_rel)
    return [
        Spike(int(i), int(st[i]), float(x[i]), float(base[i]), float(score[i]))
        for i in np.flatnonzero(hit)
    ]


def resolution(values: np.ndarray) -> float:
    """The rounding step of a logged series: the smallest difference between two distinct
    finite values (0 for fewer than 2 distinct values). A loss written with 4 decimals has
    resolution 1e-4; an unrounded float32 loss one far below any change that matters."""
    x = np.unique(_finite(values))
    if x.size < 2:
        return 0.0
    return float(np.min(np.diff(x)))


def _cut_median(x: np.ndarray, window: int) -> np.ndarray:
    """Centred rolling median of finite ``x`` whose window is cut at the ends (the first
    point's median is over itself and the ``window // 2`` points after it)."""
    n = x.size
    h = max(0, min(int(window), n) // 2)
    out = ndimage.median_filter(x, size=2 * h + 1, mode="nearest") if h else x.copy()
    for i in range(min(h, n)):
        out[i] = np.median(x[: i + h + 1])
        out[n - 1 - i] = np.median(x[n - 1 - i - h :])
    return out


def align(
    a_steps: np.ndarray, a_values: np.ndarray, b_steps: np.ndarray, hold: float = 0.0
) -> np.ndarray:
    """Values of series ``a`` at the steps of ``b`` by linear interpolation over finite
    points; NaN outside ``a``'s range (never extrapolated), except within ``hold`` steps
    of either end, where ``a``'s end value holds (an evaluation logged just after the last
    training-loss point of an epoch still pairs with it)."""
    s = np.asarray(a_steps, dtype=np.float64)
    x = np.asarray(a_values, dtype=np.float64)
    q = np.asarray(b_steps, dtype=np.float64)
    ok = np.isfinite(x)
    out = np.full(q.shape, np.nan)
    if ok.sum() == 0:
        return out
    s, x = s[ok], x[ok]
    inside = (q >= s[0] - hold) & (q <= s[-1] + hold)
    out[inside] = np.interp(q[inside], s, x)  # np.interp holds the end values outside
    return out


def typical_gap(steps: np.ndarray) -> float:
    """Median spacing of consecutive distinct steps (0 for fewer than 2)."""
    s = np.unique(np.asarray(steps, dtype=np.float64))
    return float(np.median(np.diff(s))) if s.size >= 2 else 0.0


def windows_where(mask: np.ndarray, min_len: int = 1) -> list[tuple[int, int]]:
    """Index ranges [start, end] (inclusive) of runs of True at least ``min_len`` long."""
    m = np.asarray(mask, dtype=bool)
    if m.size == 0:
        return []
    d = np.diff(np.concatenate([[0], m.astype(np.int8), [0]]))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1) - 1
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True) if b - a + 1 >= min_len]


def downsample_minmax(
    steps: np.ndarray, values: np.ndarray, max_points: int = 400
) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most ~max_points, preserving each bucket's min, max and non-finite points,
    so spikes and NaNs stay visible in plots."""
    s = np.asarray(steps)
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if n <= max_points:
        return s, x
    buckets = max(1, max_points // 2)
    edges = np.linspace(0, n, buckets + 1).astype(np.int64)
    keep = [np.flatnonzero(~np.isfinite(x))]
    for a, b in itertools.pairwise(edges):
        if b <= a:
            continue
        # Extremes over finite points only: ±Inf are kept above anyway, and must not hide
        # the bucket's finite max/min.
        seg = np.where(np.isfinite(x[a:b]), x[a:b], np.nan)
        if np.isfinite(seg).any():
            keep.append(np.array([a + np.nanargmin(seg), a + np.nanargmax(seg)]))
    idx = np.unique(np.concatenate(keep))
    return s[idx], x[idx]


def _finite(values: np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    return x[np.isfinite(x)]
