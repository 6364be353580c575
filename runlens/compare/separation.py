"""Where two runs' curves separate beyond their noise."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from runlens import series as S
from runlens.compare.loading import Loaded
from runlens.compare.model import CompareOptions, Separation


def separation(
    name: str, base_label: str, base: Loaded, label: str, other: Loaded, opts: CompareOptions
) -> Separation:
    xa, ra, sa = base.curves[name]
    xb, rb, sb = other.curves[name]
    steps_b = other.curve_steps[name]
    none = Separation(name, base_label, label, None, None, None, None, None, False, 0, None)
    okx_a, okx_b = np.isfinite(xa), np.isfinite(xb)
    if not okx_a.any() or not okx_b.any():
        return none
    lo = max(float(xa[okx_a].min()), float(xb[okx_b].min()))
    hi = min(float(xa[okx_a].max()), float(xb[okx_b].max()))
    if hi < lo:
        return none
    # Compare on the points of the sparser curve inside the overlap: interpolating the
    # sparse one onto the dense grid would invent values between its measurements.
    sparse_is_a = okx_a.sum() <= okx_b.sum()
    gx = xa if sparse_is_a else xb
    grid = np.sort(gx[np.isfinite(gx) & (gx >= lo) & (gx <= hi)])
    if grid.size == 0:
        return none
    va = S.align(xa, sa, grid)
    vb = S.align(xb, sb, grid)
    bad_a = grid >= _first_bad_x(xa, ra)
    bad_b = grid >= _first_bad_x(xb, rb)
    # The question is "does b still behave like a?": under that hypothesis both curves
    # have the quieter one's noise, so combine √2 × min(σ_a, σ_b). A blowing-up curve's
    # growth is trend, not noise, and must not raise the bar for detecting it; for the
    # same reason σ is measured causally (on each curve up to the compared point).
    noise = np.sqrt(2.0) * np.minimum(_causal_noise(xa, ra, grid), _causal_noise(xb, rb, grid))
    level = 0.5 * (np.abs(va) + np.abs(vb))
    with np.errstate(invalid="ignore"):
        thr = np.maximum(opts.separation_k * noise, opts.separation_min_rel * level)
        delta = vb - va
        apart = (bad_a != bad_b) | (~bad_a & ~bad_b & (np.abs(delta) > thr))
    window = max(1, min(opts.separation_window, grid.size // 4))
    wins = S.windows_where(apart, min_len=window)
    overlap = (lo, hi)
    if not wins:
        last = float(noise[-1]) if np.isfinite(noise[-1]) else None
        return dataclasses.replace(
            none, noise=last, compared_points=int(grid.size), overlap=overlap
        )
    i = wins[0][0]
    nonfinite = bool(bad_a[i] != bad_b[i])
    step = _step_at(other.curves[name][0], steps_b, float(grid[i]))
    return Separation(
        curve=name,
        baseline=base_label,
        run=label,
        at=float(grid[i]),
        step=step,
        delta=None if nonfinite else float(delta[i]),
        threshold=None if nonfinite else float(thr[i]),
        noise=float(noise[i]),
        nonfinite=nonfinite,
        compared_points=int(grid.size),
        overlap=overlap,
    )


def _first_bad_x(x: np.ndarray, raw: np.ndarray) -> float:
    bad = ~np.isfinite(raw) & np.isfinite(x)
    return float(x[bad].min()) if bad.any() else math.inf


MIN_NOISE_POINTS = 10
"""The causal noise estimate uses at least this many points (the first ones, early on)."""


def _causal_noise(x: np.ndarray, raw: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Robust step-to-step noise of ``raw`` over its finite points with x <= each grid
    point (at least MIN_NOISE_POINTS). Evaluated at ~log-spaced prefix lengths and held
    constant in between, so it costs O(n log n), not O(n²)."""
    ok = np.isfinite(x) & np.isfinite(raw)
    xs, vs = x[ok], raw[ok]
    n = xs.size
    out = np.zeros(grid.shape)
    if n < 3:
        return out
    lengths = np.unique(
        np.concatenate([np.geomspace(min(MIN_NOISE_POINTS, n), n, num=48).astype(np.int64), [n]])
    )
    noise = np.array([S.robust_noise(vs[:k]) for k in lengths])
    noise = np.nan_to_num(noise, nan=0.0)
    # Prefix length available at each grid point, then the checkpoint at or below it.
    avail = np.searchsorted(xs, grid, side="right")
    j = np.searchsorted(lengths, np.maximum(avail, lengths[0]), side="right") - 1
    return noise[np.clip(j, 0, lengths.size - 1)]


def _step_at(x: np.ndarray, steps: np.ndarray, at: float) -> int | None:
    ok = np.isfinite(x)
    if not ok.any():
        return None
    xs, ss = x[ok], steps[ok]
    i = int(np.searchsorted(xs, at, side="left"))
    return int(ss[min(i, len(ss) - 1)])
