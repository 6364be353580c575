"""Shared measurements of the curve signatures: robust start/late levels of the training
loss after the warm-up transient, the loss scale, and chance level for classification.

Levels are medians of raw points (or of a rolling median), never single values, so one
bad batch does not swing a verdict.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
from runlens_collect import format as fmt

from runlens import series as S
from runlens.context import Context, Curve
from runlens.signatures.base import NotChecked

TINY = sys.float_info.min
"""Division guard. Absolute floors like 1e-12 would make verdicts depend on the units of
the loss; this one only avoids dividing by zero."""

MIN_POINTS = 20
"""Fewer post-transient finite points than this: too short to judge a trend."""


@dataclass(frozen=True)
class LossView:
    """The finite training loss after ``ctx.transient_end``, plus its robust levels."""

    steps: np.ndarray
    raw: np.ndarray
    level: np.ndarray
    """Centered rolling median of ``raw`` (no lag, robust to single spikes)."""
    start: float
    """Median of the first few finite points of the whole curve (before the transient and
    before any blow-up)."""
    start_step: int
    """First finite step of the whole curve (where ``start`` was measured)."""
    first_step: int
    last_step: int

    def __len__(self) -> int:
        return len(self.steps)

    def median(self, a: float, b: float) -> float:
        """Median of the raw points in the fraction [a, b) of the view (at least 1 point)."""
        n = len(self.raw)
        i, j = int(a * n), max(int(a * n) + 1, int(b * n))
        return float(np.median(self.raw[i:j]))

    def late_change(self) -> float:
        """Relative drop from the 3rd to the 4th quarter: > 0 still improving, < 0 rising."""
        q3, q4 = self.median(0.5, 0.75), self.median(0.75, 1.0)
        return (q3 - q4) / max(abs(q3), TINY)


def finite_points(c: Curve) -> tuple[np.ndarray, np.ndarray]:
    ok = np.isfinite(c.raw)
    return c.steps[ok], c.raw[ok]


BLOWUP_FACTOR = 10.0
"""A point more than this many times the magnitude of the level before it, with the next
points all as high, is a blow-up: it ends the window of the initial level."""


def initial_level(raw: np.ndarray, k: int) -> float | None:
    """Loss at the start of training: median of the first ``k`` finite points, cut before
    a blow-up so that a loss that jumps from 1 to 1e10 at step 1 still starts at 1.

    The cut needs ``k`` points in a row (or all that remain) above the level before them,
    so a single low first batch of a noisy run does not shrink the window to one point.
    """
    x = raw[np.isfinite(raw)]
    if x.size == 0:
        return None
    k = max(1, min(int(k), x.size))
    for i in range(1, k):
        ref = float(np.median(x[:i]))
        nxt = x[i : i + k]
        if float(np.min(nxt)) > ref + BLOWUP_FACTOR * max(abs(ref), TINY):
            return ref
    return float(np.median(x[:k]))


def start_level(c: Curve) -> float | None:
    """Robust initial level: median of the first 2% of finite points (3 to 10 points),
    before any blow-up (see :func:`initial_level`)."""
    _, raw = finite_points(c)
    k = int(min(10, max(3, round(0.02 * raw.size))))
    return initial_level(raw, k)


def loss_view(ctx: Context, min_points: int = MIN_POINTS) -> LossView:
    """The training loss after the transient; raises :class:`NotChecked` when there are
    fewer than ``min_points`` finite points there (or none at all)."""
    c = ctx.train_loss
    if c is None or len(c) == 0:
        raise NotChecked(f"no {fmt.TRAIN_LOSS} recorded", "not-recorded")
    start = start_level(c)
    steps, raw = finite_points(c)
    if start is None or not math.isfinite(start):
        raise NotChecked(f"no finite {fmt.TRAIN_LOSS} value", "not-recorded")
    start_step = int(steps[0])
    keep = steps > ctx.transient_end
    steps, raw = steps[keep], raw[keep]
    if steps.size < min_points:
        what = f"finite {fmt.TRAIN_LOSS} points"
        if keep.size < min_points:
            raise NotChecked.too_few(int(keep.size), what, min_points)
        raise NotChecked(
            f"only {steps.size} {what} after the warm-up (step {ctx.transient_end}), needs "
            f"{min_points} ({keep.size} in all)",
            "too-few-points",
        )
    window = max(5, steps.size // 20) | 1
    return LossView(
        steps=steps,
        raw=raw,
        level=S.rolling_median(raw, window),
        start=start,
        start_step=start_step,
        first_step=int(steps[0]),
        last_step=int(steps[-1]),
    )


def nonzero_start(v: LossView) -> None:
    """Relative measures divide by the initial loss: raise NotChecked when it is 0."""
    if abs(v.start) < TINY:
        raise NotChecked(
            "the initial training loss is 0: changes relative to it are undefined",
            "not-applicable",
        )


def chance_level(ctx: Context) -> float | None:
    """ln(C) for a single-label classification with C classes, else None (regression,
    language modeling, unknown task: see runlens.task; never guessed from shapes)."""
    return ctx.task.chance_level


def require_chance(ctx: Context) -> float:
    """ln(C), or raise NotChecked saying why there is none (task unknown / not a
    classification): for signatures that are nothing but a chance-level comparison."""
    chance = ctx.task.chance_level
    if chance is None:
        kind, reason = ctx.task.why_no_chance()
        raise NotChecked(reason, kind)  # type: ignore[arg-type]
    return chance


def chance_for_part(ctx: Context, part: str) -> float | None:
    """ln(C) for a part of a signature; when there is none because the task is unknown,
    the part is noted as not checked in the report's coverage (a known non-classification
    task is simply not compared with chance)."""
    chance = ctx.task.chance_level
    if chance is None:
        kind, reason = ctx.task.why_no_chance()
        if kind == "task-unknown":
            ctx.not_checked_part(part, reason, "task-unknown")
    return chance


def loss_scale(start: float, level: float) -> float:
    """The size of a loss change worth talking about: the larger of the current level and
    the improvement made since the start (so a converged run near 0 is not judged on
    relative wobbles of a tiny number)."""
    return max(abs(level), start - level, TINY)


def confidence(value: float, threshold: float, lo: float = 0.5) -> float:
    """``lo`` at the threshold, rising to 1 at twice the threshold (ratio-type evidence)."""
    if not (math.isfinite(value) and math.isfinite(threshold)) or threshold == 0:
        return lo
    ratio = abs(value / threshold)
    return float(min(1.0, max(lo, lo + (1 - lo) * (ratio - 1))))
