"""First, final and best level of a curve, and the step of the best: the one definition
that the report header, the findings citing them, the curve table, ``compare`` and the
HTML report all use (docs/report-schema.md, "Levels").

The level at a logged point is the median of the finite raw values within ``h`` points on
either side of it (the window is cut at the ends of the curve, not padded), with
``window = 2h + 1`` from :func:`level_window`. Then

* ``final`` is the level at the last finite point, ``first`` at the first one;
* ``best`` is the lowest level (highest for accuracy-like metrics) and ``best_step`` the
  logged step where it is centred: a step the run really logged, so "keep checkpoint N"
  names a checkpoint that can exist;
* ``best`` is never worse than ``final`` (the final level is one of the levels).

Why a median and not the EMA: the EMA's last value carries a late spike for many steps
and, on a falling curve, lags behind it, so its "final" is neither the last value nor
the level; a median over a few points follows the curve without lag and ignores one
odd batch. Schedules (learning rate, momentum...) are set, not measured: their window is
1, the raw values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np
from scipy import ndimage

from runlens.metrics import Mode

if TYPE_CHECKING:
    from runlens.layerscan import LayerMatrix

LEVEL_SPAN: Final = 10
"""Largest window before rounding to odd (11 points): the time constant of the EMA at the
default smoothing 0.9, so levels and the smoothed curves react on the same scale."""


@dataclass(frozen=True)
class Levels:
    """The levels of one curve (see the module docstring for the definition)."""

    first: float
    final: float
    final_step: int
    best: float | None
    """Lowest (``mode='min'``) or highest (``'max'``) level; None when ``mode`` is None."""
    best_step: int | None
    window: int
    """Points per median: 1 means the raw values."""
    mode: Mode | None


FEW_POINTS: Final = 10
"""Below this many finite points every point is its own level (window 1): such curves are
epoch-level logs and sparse evaluations, where each point already averages a whole epoch
or validation pass, and a median over 3 of 5 points would mix the last evaluation with
the one before it (a +12% rise at the last of 3 epochs would read as +6%)."""


def level_window(n: int) -> int:
    """Odd window for a curve of ``n`` finite points: a tenth of the points, at least 3
    (1 below ``FEW_POINTS`` points), at most ``LEVEL_SPAN`` rounded up to odd."""
    if n < FEW_POINTS:
        return 1
    return max(3, min(LEVEL_SPAN, n // 10) | 1)


def level_curve(values: np.ndarray, window: int) -> np.ndarray:
    """Centred median of ``window`` (odd) points, cut at the ends; finite input only."""
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    h = max(0, int(window) // 2)
    if n == 0 or h == 0:
        return x.copy()
    h = min(h, (n - 1) // 2) if n > 1 else 0
    if h == 0:
        return x.copy()
    out = ndimage.median_filter(x, size=2 * h + 1, mode="nearest")
    for i in range(min(h, n)):  # the ends: the window is cut, not padded
        out[i] = np.median(x[: i + h + 1])
        out[n - 1 - i] = np.median(x[n - 1 - i - h :])
    return out


def levels(
    steps: np.ndarray, raw: np.ndarray, mode: Mode | None, window: int | None = None
) -> Levels | None:
    """The levels of a curve given as logged steps and raw values (non-finite points are
    left out); None when no value is finite. ``window`` None: :func:`level_window`."""
    x = np.asarray(raw, dtype=np.float64)
    ok = np.isfinite(x)
    if not ok.any():
        return None
    s, x = np.asarray(steps)[ok], x[ok]
    w = level_window(x.size) if window is None else max(1, int(window) | 1)
    level = level_curve(x, w)
    best = best_step = None
    if mode is not None:
        i = int(np.argmin(level) if mode == "min" else np.argmax(level))  # first on ties
        best, best_step = float(level[i]), int(s[i])
    return Levels(
        first=float(level[0]),
        final=float(level[-1]),
        final_step=int(s[-1]),
        best=best,
        best_step=best_step,
        window=w,
        mode=mode,
    )


# -- layer tail levels ------------------------------------------------------------------------


def tail_levels(m: LayerMatrix | None, fraction: float) -> dict[str, float]:
    """Per layer of ``m``: the median of its finite values over the last ``fraction`` of
    the recorded steps (at least one step), or NaN when fewer than half of them are finite
    (a layer gone NaN/Inf is reported as non-finite, not by the few values it had left).

    The one definition behind the layer health table of ``analyze`` (``fraction``
    runlens.health.TAIL_FRACTION) and compare's per-layer differences
    (``CompareOptions.layer_tail``)."""
    if m is None or m.values.size == 0:
        return {}
    tail = m.values[-max(1, round(fraction * len(m.steps))) :]
    out = {}
    for j, name in enumerate(m.layers):
        col = tail[:, j]
        fin = col[np.isfinite(col)]
        out[name] = float(np.median(fin)) if fin.size and fin.size * 2 >= col.size else math.nan
    return out
