"""The series toolkit against straightforward reference implementations and invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from runlens import series as S


def tensorboard_ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard's scalar-dashboard smoothing, written as its plain loop: a debiased
    EMA; non-finite points pass through and do not touch the state; a constant series is
    returned unchanged."""
    finite = [v for v in values if math.isfinite(v)]
    if finite and all(v == finite[0] for v in finite):
        return list(values)
    out, last, n = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        last = last * weight + (1 - weight) * v
        n += 1
        debias = 1.0 - weight**n if weight != 1 else 1.0
        out.append(last / debias)
    return out


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.6, 0.9, 0.99])
def test_ema_matches_tensorboard_loop(weight: float) -> None:
    rng = np.random.default_rng(1)
    x = np.cumsum(rng.normal(size=300)) + 10
    x[[5, 50, 51, 200]] = [np.nan, np.inf, np.nan, -np.inf]
    got = S.ema_debiased(x, weight)
    ref = np.array(tensorboard_ema(x.tolist(), weight))
    np.testing.assert_allclose(got, ref, rtol=1e-10, equal_nan=True)
    assert np.isnan(got[5]) and got[50] == np.inf and got[200] == -np.inf


def test_ema_of_constant_is_constant() -> None:
    x = np.full(100, 0.1 + 0.2)  # not exactly representable: drift would show
    np.testing.assert_array_equal(S.ema_debiased(x, 0.9), x)
    y = x.copy()
    y[10] = np.nan
    np.testing.assert_array_equal(S.ema_debiased(y, 0.9), y)


def test_ema_first_point_is_unbiased() -> None:
    assert S.ema_debiased(np.array([5.0, 7.0]), 0.9)[0] == pytest.approx(5.0)


def test_ema_rejects_bad_weight() -> None:
    with pytest.raises(ValueError):
        S.ema_debiased(np.array([1.0, 2.0]), 1.5)


def test_spikes_found_at_injected_positions() -> None:
    rng = np.random.default_rng(0)
    steps = np.arange(1000)
    x = 2.0 * np.exp(-steps / 300) + 0.3 + rng.normal(0, 0.02, steps.size)
    where = [150, 420, 777]
    x[where] += 1.5
    found = S.find_spikes(steps, x, threshold=6.0, window=25, min_rel=0.5)
    assert [s.step for s in found] == where
    assert all(s.score > 6 and s.value > s.baseline for s in found)


def test_no_spikes_in_gaussian_noise() -> None:
    rng = np.random.default_rng(3)
    x = 1.0 + rng.normal(0, 0.05, 2000)
    assert S.find_spikes(np.arange(x.size), x, threshold=6.0) == []


def test_align_interpolates_and_never_extrapolates() -> None:
    a_steps = np.array([10, 20, 30])
    a_vals = np.array([1.0, 3.0, np.nan])
    out = S.align(a_steps, a_vals, np.array([0, 10, 15, 20, 25, 30, 40]))
    # 30 is NaN, so the finite range ends at 20: nothing beyond it is invented
    np.testing.assert_allclose(out, [np.nan, 1.0, 2.0, 3.0, np.nan, np.nan, np.nan])


def test_windows_where() -> None:
    m = np.array([0, 1, 1, 0, 1, 1, 1, 0, 0, 1], dtype=bool)
    assert S.windows_where(m) == [(1, 2), (4, 6), (9, 9)]
    assert S.windows_where(m, min_len=3) == [(4, 6)]
    assert S.windows_where(np.array([], dtype=bool)) == []
    assert S.windows_where(np.ones(4, dtype=bool)) == [(0, 3)]


def test_downsample_keeps_extremes_and_nan() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=10_000)
    x[1234] = 50.0
    x[4321] = -50.0
    x[7777] = np.nan
    steps = np.arange(x.size)
    s, v = S.downsample_minmax(steps, x, max_points=200)
    assert len(s) <= 203
    assert 1234 in s and 4321 in s and 7777 in s
    assert np.all(np.diff(s) > 0)
    np.testing.assert_array_equal(v, x[s])


def test_robust_stats_ignore_one_outlier() -> None:
    x = np.linspace(10, 0, 200)
    noisy = x.copy()
    noisy[100] = 1e6
    assert S.robust_slope(np.arange(200), noisy) == pytest.approx(-10 / 199, rel=1e-6)
    assert S.robust_level(noisy) == pytest.approx(np.median(x), abs=0.06)  # one rank


# -- properties ---------------------------------------------------------------------------

_floats = st.one_of(
    st.floats(min_value=-1e300, max_value=1e300, allow_nan=False, allow_infinity=False),
    st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e-300, -1e-300, 1e300]),
)
_series = arrays(np.float64, st.integers(0, 60), elements=_floats)


@settings(max_examples=150, deadline=None)
@given(x=_series, weight=st.sampled_from([0.0, 0.5, 0.9, 0.999]))
def test_ema_properties(x: np.ndarray, weight: float) -> None:
    out = S.ema_debiased(x, weight)
    assert out.shape == x.shape
    bad = ~np.isfinite(x)
    np.testing.assert_array_equal(out[bad], x[bad])  # non-finite passed through as is
    xf = x[~bad]
    if xf.size:
        tol = 1e-9 * np.max(np.abs(xf))  # rounding of the filter, relative to magnitude
        # a (debiased) EMA is a convex combination of the points seen so far
        with np.errstate(invalid="ignore"):
            assert np.all(out[~bad] >= np.min(xf) - tol)
            assert np.all(out[~bad] <= np.max(xf) + tol)


@settings(max_examples=150, deadline=None)
@given(x=_series)
def test_toolkit_never_raises_on_odd_input(x: np.ndarray) -> None:
    steps = np.arange(x.size) * 3
    with np.errstate(all="ignore"):
        med = S.rolling_median(x, 5)
        S.rolling_mad(x, 5)
        S.robust_level(x)
        S.robust_noise(x)
        S.robust_slope(steps, x)
        spikes = S.find_spikes(steps, x)
        aligned = S.align(steps, x, steps + 1)
        s, v = S.downsample_minmax(steps, x, max_points=10)
    assert med.shape == x.shape
    assert np.all(np.isnan(med[~np.isfinite(x)]))
    xf = x[np.isfinite(x)]
    if xf.size:
        m = med[np.isfinite(med)]
        assert np.all((m >= xf.min()) & (m <= xf.max()))
        a = aligned[np.isfinite(aligned)]
        assert np.all((a >= xf.min()) & (a <= xf.max()))  # interpolation, no extrapolation
    assert all(0 <= sp.index < x.size and np.isfinite(sp.value) for sp in spikes)
    assert set(s.tolist()) <= set(steps.tolist())
    if x.size > 10 and xf.size:
        vf = v[np.isfinite(v)]
        assert vf.max() == xf.max() and vf.min() == xf.min()
        assert np.sum(~np.isfinite(v)) == np.sum(~np.isfinite(x))  # every NaN/Inf kept


@settings(max_examples=100, deadline=None)
@given(m=arrays(np.bool_, st.integers(0, 50)), min_len=st.integers(1, 5))
def test_windows_where_properties(m: np.ndarray, min_len: int) -> None:
    wins = S.windows_where(m, min_len)
    covered = np.zeros(m.size, dtype=bool)
    for a, b in wins:
        assert b - a + 1 >= min_len and m[a : b + 1].all()
        assert (a == 0 or not m[a - 1]) and (b == m.size - 1 or not m[b + 1])  # maximal
        covered[a : b + 1] = True
    # every run of True at least min_len long is reported
    assert sum(b - a + 1 for a, b in wins) == covered.sum()
    long_runs = [w for w in S.windows_where(m, 1) if w[1] - w[0] + 1 >= min_len]
    assert wins == long_runs


def test_trailing_median_is_the_median_of_the_window_ending_at_each_point():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(60)
    x[[5, 17, 40]] = np.nan
    for w in (1, 3, 4, 10):
        got = S.trailing_median(x, w)
        finite = np.flatnonzero(np.isfinite(x))
        assert np.isnan(got[[5, 17, 40]]).all()
        for j, i in enumerate(finite):
            window = x[finite[max(0, j - w + 1) : j + 1]]
            if window.size == w:  # full windows (the start is padded with the first value)
                # even windows: scipy's median filter takes the upper middle value
                assert got[i] == np.sort(window)[w // 2], (w, i)
