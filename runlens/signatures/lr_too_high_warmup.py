"""Loss rising while the learning rate warms up to a peak that is too high."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from runlens_collect import format as fmt

from runlens import levels as L
from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.signatures._curves import TINY, confidence, finite_points
from runlens.signatures.base import NotChecked, Param, Params, Signature, run_parts


class LrTooHighWarmup(Signature):
    """The loss goes up while the learning rate ramps up in its warm-up, then comes back
    down once the learning rate decays: the peak learning rate is too high.

    What it detects:
        The learning rate has a warm-up: it starts below half its peak and rises to 95% of
        it. The training loss's level (a centred median over the points up to the end of
        the high-LR phase: of 5 points, 3 below 50 of them, each point on its own below
        10, as runlens.levels does) turns up during the warm-up: from its lowest level
        inside the warm-up it rises to at least ``1 + min_rise`` times that level before
        the high-LR phase ends (the rate back below 80% of its peak, at most one warm-up
        length after the warm-up), and later the loss recovers: its lowest level after
        that phase gives back at least ``min_recovery`` of the rise. The same check runs
        on the validation loss (a fine-tune's validation loss often shows it first) when
        at least 3 evaluations fall inside the warm-up. A loss that rises and never comes
        back is loss-divergence's.

    Why it matters:
        The warm-up exists to reach a high learning rate without blowing up; a loss that
        climbs as the rate climbs says the peak is past the stability limit for this model
        and batch size. The run then spends its decay undoing the damage, ends worse than
        with a lower peak, and a slightly longer run (or a larger model) diverges outright.

    Evidence:
        The rise (peak level / lowest level before it − 1) against ``min_rise``; the
        learning rate where the loss was lowest and where it peaked, and the warm-up's
        peak learning rate; the share of the rise given back against ``min_recovery``.

    How to fix:
        Lower the peak learning rate (2–3× first), or lengthen the warm-up; clip gradients
        (``clip_grad_norm_(…, 1.0)``); for Adam on transformers, also check β2 and ε.
        Run an LR range test (``runlens_collect.lr_range_test``) to find the largest
        learning rate that still lowers the loss.

    References:
        Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour" (2017),
        gradual warm-up; Liu et al., "On the Variance of the Adaptive Learning Rate and
        Beyond" (RAdam, ICLR 2020); Smith, "Cyclical Learning Rates for Training Neural
        Networks" (WACV 2017), LR range test.
    """

    name = "lr-too-high-warmup"
    summary = "loss rising while the learning rate warms up, recovering after"
    category = "curve"
    severity = "warning"
    requires = ("train/loss|val/loss", "lr/0|lr")
    params = (
        Param(
            "min_rise",
            0.5,
            "rise of the loss level during the warm-up, relative to its lowest level "
            "before the rise",
            "runlens default: a loss 1.5× its earlier level while the LR ramps is no batch "
            "noise (the issue-15 report: 2.8× during warm-up)",
        ),
        Param(
            "min_recovery",
            0.5,
            "share of the rise the loss gives back after the warm-up (else it is loss-divergence)",
            "runlens default",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        warm = _warmup(ctx)
        parts = []
        for name in (fmt.TRAIN_LOSS, fmt.VAL_LOSS):
            if ctx.curve(name) is not None:
                parts.append((f"{name} during the warm-up", _part(ctx, p, warm, name)))
        return [f for f in run_parts(ctx, parts) if f is not None]


@dataclass(frozen=True)
class _Warmup:
    start: int
    end: int
    """Step where the learning rate first reaches 95% of its peak."""
    high_end: int
    """Last step of the high-LR phase: where the rate falls below 80% of its peak after the
    warm-up, at most one warm-up length after it."""
    peak_lr: float
    steps: np.ndarray
    lr: np.ndarray

    def lr_at(self, step: int) -> float:
        return float(np.interp(step, self.steps, self.lr))


def _warmup(ctx: Context) -> _Warmup:
    lr = ctx.lr
    if lr is None:
        raise NotChecked("no learning rate logged", "not-recorded")
    steps, raw = finite_points(lr)
    if raw.size < 3:
        raise NotChecked.too_few(int(raw.size), "finite learning-rate points", 3)
    peak = float(np.max(raw))
    if not (peak > 0 and raw[0] < 0.5 * peak):
        raise NotChecked(
            f"the learning rate has no warm-up (it starts at {fmt_num(float(raw[0]))}, its "
            f"peak is {fmt_num(peak)})",
            "not-applicable",
        )
    i_end = int(np.argmax(raw >= 0.95 * peak))
    end = int(steps[i_end])
    if end >= steps[-1]:
        raise NotChecked(
            "the learning rate is still warming up at the end of the log: a rise there "
            "is loss-divergence's to judge",
            "not-applicable",
        )
    low = np.flatnonzero(raw[i_end:] < 0.8 * peak)
    high_end = int(steps[i_end + low[0]]) if low.size else int(steps[-1])
    high_end = min(high_end, end + (end - int(steps[0])))
    return _Warmup(int(steps[0]), end, high_end, peak, steps, raw)


def _part(ctx: Context, p: Params, warm: _Warmup, name: str) -> Callable[[], Finding | None]:
    """The check of one loss curve, as a part for run_parts."""

    def run() -> Finding | None:
        c = ctx.curve(name)
        assert c is not None
        steps, raw = finite_points(c)
        n_warm = int(np.count_nonzero(steps <= warm.end))
        n_in = int(np.count_nonzero(steps <= warm.high_end))
        if n_warm < MIN_WARMUP_POINTS or n_in >= steps.size:
            raise NotChecked.too_few(
                n_warm, f"finite {name} points", MIN_WARMUP_POINTS,
                f"in the warm-up (to step {warm.end}) with some after it",
            )  # fmt: skip
        level = L.level_curve(raw, min(L.level_window(n_in), MAX_WINDOW))
        w_level = level[:n_in]
        i_peak = int(np.argmax(w_level))
        if i_peak == 0:
            return None  # the loss only fell during the warm-up
        i_low = int(np.argmin(w_level[:i_peak]))
        if i_low >= n_warm:
            return None  # the rise began after the warm-up, at the peak rate
        low, high = float(w_level[i_low]), float(w_level[i_peak])
        rise = (high - low) / max(abs(low), TINY)
        if not (np.isfinite(rise) and rise >= p.min_rise):
            return None
        after = level[n_in:]
        back = (high - float(np.min(after))) / max(high - low, TINY)
        if back < p.min_recovery:
            return None  # still up after the warm-up: loss-divergence reports it
        unit = ctx.x_unit
        s_low, s_peak = int(steps[i_low]), int(steps[i_peak])
        what = "training" if name == fmt.TRAIN_LOSS else "validation"
        lr_low, lr_peak = warm.lr_at(s_low), warm.lr_at(s_peak)
        return Finding(
            signature="lr-too-high-warmup",
            severity="warning",
            confidence=confidence(rise, p.min_rise),
            summary=(
                f"the {what} loss rose {rise + 1:.1f}× ({fmt_num(low)} at {unit} {s_low} → "
                f"{fmt_num(high)} at {unit} {s_peak}) as the learning rate warmed up to its "
                f"peak {fmt_num(warm.peak_lr)} ({unit} {warm.end}; {fmt_num(lr_low)} at the "
                f"low, {fmt_num(lr_peak)} at the loss peak), and came back down after it"
            ),
            steps=(s_low, s_peak),
            evidence=(
                Evidence("rise during the warm-up (peak / low − 1)", rise, p.min_rise, ">="),
                Evidence("learning rate at the low", lr_low),
                Evidence("learning rate at the loss peak", lr_peak),
                Evidence("peak learning rate", warm.peak_lr),
                Evidence("share of the rise given back after", back, p.min_recovery, ">="),
            ),
            causes=(
                "peak learning rate too high for this model and batch size",
                "warm-up too short for the peak learning rate",
                "no gradient clipping",
            ),
            fix="Lower the peak learning rate 2–3× or lengthen the warm-up, clip gradients; "
            "an LR range test finds the largest rate that still lowers the loss.",
            series=(name,),
        )

    return run


MAX_WINDOW = 5
"""Points per median at most: a rise during a warm-up lasts tens of steps, which the
report's 11-point levels would flatten."""

MIN_WARMUP_POINTS = 3
"""Loss points needed inside the warm-up to see a rise (a 3-epoch warm-up of an
epoch-level log has 3)."""
