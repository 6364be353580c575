"""Large swings of the training loss around a level that does not improve."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from runlens_collect import format as fmt

from runlens import series as S
from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.signatures._curves import TINY, confidence, finite_points, loss_view, nonzero_start
from runlens.signatures.base import NotChecked, Param, Params, Signature, run_parts


class LossOscillation(Signature):
    """The loss swings up and down by a large amount and stops improving.

    What it detects:
        *Per-step training loss* (step axis). In the second half of the run (after the
        transient) the training loss swings over a wide band — the 10th–90th percentile
        range of its 5-point rolling median, after removing the linear trend, is a large
        fraction of the initial loss — while its median level no longer improves — and the
        swings are multi-step: the variance ratio of the detrended loss (variance of
        5-step means × 5 / variance of single steps) is well above 1, the value
        batch-to-batch noise gives — and they go up and down again: the detrended curve
        crosses its median at least 4 times (a one-off drop at an epoch boundary is a step
        in the level, not an oscillation). So a noisy plateau (each step's loss
        independent noise around a level: noisy-loss, underfitting) is not called an
        oscillation however wide its band; a loss that overshoots and takes a few steps to
        come back is. The variance ratio needs 20 points in the second half, so runs with
        fewer than 40 finite loss points after the transient are reported as not checked
        (too few points).

        *Epoch-level training loss and validation loss*, whose points each average a whole
        epoch or validation pass, so that consecutive points differ by what the model
        learned (or lost) in between, not by batch noise: over the second half of the
        curve after the transient (all but its first quarter on curves of 10–15 points;
        at least 8 points), the median change from one point to the next is at least
        ``min_epoch_swing`` (training loss of an epoch-indexed log) or ``min_val_swing``
        (validation loss: higher, since a validation set's sampling noise moves it too) of
        the median level, the direction reverses at ``MIN_TURNS`` (40%) of the points or
        more, and the level improves from the first to the second half of that window by
        less than ``max_improvement`` or less than half the median change (a slow descent
        under much larger swings still oscillates).

        While the run is still being written (``ctx.final`` False: ``runlens watch``), the
        window is the second half of the data so far, and the final analysis judges a later
        one: a median change of 10–20 points near ``min_val_swing`` can land on either side
        (the noisy-loss sample: 0.23 of the level at step 370, 0.195 at the end). Live, the
        median change is replaced by its distribution-free lower confidence bound (one-sided
        ``LIVE_CONFIDENCE``, the order statistic of the binomial test of the median), in the
        threshold and in "less than half the median change".

    Why it matters:
        A loss that keeps bouncing without progress usually means the optimizer is at or
        past its stability edge: each step overshoots the minimum along the sharpest
        directions, so progress made on one batch is undone on the next. The model ends
        worse than the same setup with a smaller learning rate. A validation loss that
        jumps from one epoch to the next while the training loss falls smoothly means the
        weights still move a lot between evaluations: which checkpoint is kept decides the
        result more than the training does.

    Evidence:
        Per step: ``swing`` = (P90 − P10 of the detrended late rolling median) / initial
        level, against ``min_swing``; ``late improvement`` = relative drop of the median
        from the 3rd to the 4th quarter, against ``max_improvement``; ``variance ratio``
        (5-step, residuals clipped at 4 MADs) against ``min_variance_ratio``; crossings of
        the median; the late median level. Per epoch/evaluation: the median |change| per
        point / level against its threshold (live: its lower confidence bound too), the
        improvement between the halves, the fraction of turns, the median level.

    How to fix:
        Lower the learning rate (2–10×) or decay it; with SGD add momentum and lower the
        LR, or switch to Adam/AdamW; increase the batch size; clip gradients. If the swing
        came with a schedule change, check the schedule. For a jumping validation loss,
        decay the learning rate and average checkpoints (EMA/SWA); enlarge a tiny
        validation set.

    References:
        Cohen et al., "Gradient Descent on Neural Networks Typically Occurs at the Edge of
        Stability" (ICLR 2021); Zhang et al., AUTOTRAINER (ICSE 2021), "oscillating loss";
        Wardat et al., DeepDiagnosis (ICSE 2022), "loss not decreasing / oscillating";
        Lo & MacKinlay, "Stock Market Prices Do Not Follow Random Walks" (RFS 1988), the
        variance ratio; Izmailov et al., "Averaging Weights Leads to Wider Optima and
        Better Generalization" (UAI 2018), SWA.
    """

    name = "loss-oscillation"
    summary = "large swings of the loss around a level that does not improve"
    category = "curve"
    severity = "warning"
    requires = ("train/loss",)
    params = (
        Param(
            "min_swing",
            0.15,
            "P10–P90 band of the detrended 5-point rolling median of the late loss, as a "
            "fraction of the initial loss",
            "runlens calibration: other non-noisy sample runs ≤ 0.095, the unstable-SGD "
            "sample ≈ 0.22",
        ),
        Param(
            "max_improvement",
            0.1,
            "relative drop of the median loss from the 3rd to the 4th quarter below which "
            "the level counts as not improving",
            "runlens default",
        ),
        Param(
            "min_variance_ratio",
            1.4,
            "variance ratio of 5-step means of the detrended late loss (1 for independent "
            "batch noise) at or above which the swings count as multi-step",
            "runlens calibration: unstable-SGD runs 1.55–2.1; noisy plateaus and "
            "healthy runs 0.6–1.5 (white-noise sampling σ ≈ 0.18 at 150 points)",
        ),
        Param(
            "min_epoch_swing",
            0.15,
            "median change between consecutive epochs of an epoch-indexed training loss, "
            "as a fraction of its level",
            "development corpus: keras-ssl-unstable (labelled oscillating) 0.19; healthy "
            "epoch logs ≤ 0.03 when not improving, other-brain-tumor-valbelow 0.095 "
            "(improving)",
        ),
        Param(
            "min_val_swing",
            0.2,
            "median change between consecutive evaluations of the validation loss, as a "
            "fraction of its level",
            "development corpus: lightning-stellar-regression-v35 0.31, -v44 0.21, "
            "keras-ssl-unstable 0.34 (labelled oscillating); other logs whose validation "
            "loss does not improve ≤ 0.094, or 0.16 with uncertain labels (tiny "
            "validation sets: tb-lightning-medical-tinyval)",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        parts: list[tuple[str, Callable[[], Finding | None]]] = []
        if ctx.x_unit == "epoch":
            parts.append((
                "epoch-to-epoch swings of the training loss",
                lambda: self._epoch_swings(ctx, p, fmt.TRAIN_LOSS, p.min_epoch_swing),
            ))  # fmt: skip
        else:
            parts.append(("multi-step swings of the training loss", lambda: self._steps(ctx, p)))
        if ctx.val_loss is not None and len(ctx.val_loss):
            parts.append((
                "evaluation-to-evaluation swings of the validation loss",
                lambda: self._epoch_swings(ctx, p, fmt.VAL_LOSS, p.min_val_swing),
            ))  # fmt: skip
        return [f for f in run_parts(ctx, parts) if f is not None]

    def _steps(self, ctx: Context, p: Params) -> Finding | None:
        # The variance ratio needs 4 windows of 5 points in the second half.
        v = loss_view(ctx, min_points=2 * 4 * VARIANCE_WINDOW)
        nonzero_start(v)
        n = len(v)
        late = v.raw[n // 2 :]
        steps = v.steps[n // 2 :]
        smooth = S.rolling_median(late, 5)
        slope = S.robust_slope(steps, smooth)
        detrended = smooth - (slope if np.isfinite(slope) else 0.0) * (steps - steps[0])
        lo, hi = (float(x) for x in np.percentile(detrended, [10, 90]))
        swing = (hi - lo) / abs(v.start)
        p10, p90 = (float(x) for x in np.percentile(late, [10, 90]))
        improvement = v.late_change()
        if not (np.isfinite(swing) and swing >= p.min_swing and improvement < p.max_improvement):
            return None
        ratio = variance_ratio(late - slope * (steps - steps[0]) if np.isfinite(slope) else late)
        if not (np.isfinite(ratio) and ratio >= p.min_variance_ratio):
            return None
        # Swings go up and down again: a one-off drop (an epoch boundary of a per-step
        # loss) is a step in the level, however wide the band it leaves.
        crossings = median_crossings(detrended)
        if crossings < MIN_CROSSINGS:
            return None
        level = float(np.median(late))
        first = int(v.steps[n // 2])
        return Finding(
            signature=self.name,
            severity="warning",
            confidence=confidence(swing, p.min_swing),
            summary=(
                f"from step {first} the training loss swings between {fmt_num(p10)} and "
                f"{fmt_num(p90)} (P10–P90; multi-step swing {swing:.0%} of the initial "
                f"loss) around "
                f"{fmt_num(level)} without improving ({improvement:+.1%} over the last "
                "quarter)"
            ),
            steps=(first, v.last_step),
            evidence=(
                Evidence("multi-step swing / initial loss", swing, p.min_swing, ">="),
                Evidence("late improvement", improvement, p.max_improvement, "<"),
                Evidence("variance ratio (5-step)", ratio, p.min_variance_ratio, ">="),
                Evidence("crossings of the median level", crossings, MIN_CROSSINGS, ">="),
                Evidence("late median level", level),
                Evidence("initial loss", v.start),
            ),
            causes=_CAUSES,
            fix=_FIX,
            series=(fmt.TRAIN_LOSS,),
        )

    def _epoch_swings(self, ctx: Context, p: Params, name: str, min_swing: float) -> Finding | None:
        """Swings between consecutive points of a curve whose points each average a whole
        epoch or validation pass (see the docstring)."""
        c = ctx.curve(name)
        assert c is not None
        steps, raw = finite_points(c)
        keep = steps > ctx.transient_end
        steps, raw = steps[keep], raw[keep]
        if steps.size >= 2 * MIN_SWING_POINTS:
            steps, raw = steps[steps.size // 2 :], raw[raw.size // 2 :]
        elif steps.size >= MIN_SWING_POINTS + MIN_SWING_POINTS // 4:
            steps, raw = steps[steps.size // 4 :], raw[raw.size // 4 :]
        if steps.size < MIN_SWING_POINTS:
            raise NotChecked.too_few(
                int(steps.size), f"finite {name} points", MIN_SWING_POINTS,
                f"after the warm-up (step {ctx.transient_end})",
            )  # fmt: skip
        level = float(np.median(raw))
        if abs(level) < TINY:
            raise NotChecked(f"the late {name} level is 0: relative swings are undefined",
                             "not-applicable")  # fmt: skip
        d = np.diff(raw)
        changes = np.abs(d) / abs(level)
        swing = float(np.median(changes))
        # Live, the window moves on as the run grows: the median change must clear the
        # threshold by its sampling error (see the docstring).
        judged = swing if ctx.final else median_lower_bound(changes, LIVE_CONFIDENCE)
        m = raw.size // 2
        improvement = float((np.median(raw[:m]) - np.median(raw[m:])) / abs(level))
        turns = float(np.mean(np.sign(d[1:]) != np.sign(d[:-1])))
        # Not improving: less than max_improvement, or less than half a typical jump (a
        # slow descent under much larger swings still oscillates).
        flat = max(p.max_improvement, judged / 2)
        if not (judged >= min_swing and improvement < flat and turns >= MIN_TURNS):
            return None
        unit = ctx.x_unit
        p10, p90 = (float(x) for x in np.percentile(raw, [10, 90]))
        what = "training" if name == fmt.TRAIN_LOSS else "validation"
        per = "epoch" if unit == "epoch" and name == fmt.TRAIN_LOSS else "evaluation"
        live: tuple[Evidence, ...] = ()
        if not ctx.final:
            bound = f"median |change| per {per} / level, {LIVE_CONFIDENCE:.0%} lower bound"
            live = (Evidence(bound, judged, min_swing, ">="),)
        return Finding(
            signature=self.name,
            severity="warning",
            confidence=confidence(swing, min_swing),
            summary=(
                f"from {unit} {int(steps[0])} the {what} loss jumps by {swing:.0%} of its "
                f"level ({fmt_num(level)}) from one {per} to the next (median), between "
                f"{fmt_num(p10)} and {fmt_num(p90)} (P10–P90), without improving "
                f"({improvement:+.1%} from the first to the second half)"
            ),
            steps=(int(steps[0]), int(steps[-1])),
            evidence=(
                Evidence(f"median |change| per {per} / level", swing, min_swing, ">="),
                *live,
                Evidence("improvement (1st → 2nd half)", improvement, flat, "<"),
                Evidence("fraction of turns", turns, MIN_TURNS, ">="),
                Evidence("median level", level),
                Evidence("points", int(raw.size)),
            ),
            causes=_CAUSES if name == fmt.TRAIN_LOSS else _VAL_CAUSES,
            fix=_FIX if name == fmt.TRAIN_LOSS else _VAL_FIX,
            series=(name,),
        )


_CAUSES = (
    "learning rate at or past the stability edge",
    "batch too small for this learning rate",
    "momentum/β settings that overshoot",
)
_FIX = (
    "Lower the learning rate 2–10× (or decay it), increase the batch size, or use "
    "Adam/AdamW with gradient clipping."
)
_VAL_CAUSES = (
    "learning rate too high late in training: each epoch lands the weights somewhere else",
    "no learning-rate decay (a constant LR keeps the model moving between evaluations)",
    "a validation set so small that its loss is mostly sampling noise",
)
_VAL_FIX = (
    "Decay the learning rate (cosine or step) or lower it; average checkpoints (EMA/SWA); "
    "if the validation set is tiny, enlarge it before trusting single evaluations."
)

VARIANCE_WINDOW = 5

MIN_CROSSINGS = 4
"""Crossings of its median by the detrended late curve: two up-and-down swings at least."""

MIN_SWING_POINTS = 8
"""Points needed in the window of the epoch-to-epoch check (the second half of the
post-transient curve, or all but its first quarter on shorter curves)."""

MIN_TURNS = 0.4
"""Fraction of consecutive changes that reverse direction: an oscillation goes up and down
(independent noise gives about 2/3; a steady fall or rise 0)."""


LIVE_CONFIDENCE = 0.75
"""One-sided confidence of the lower bound that a live pass asks of the median change
per epoch or evaluation (a live finding must also be seen in consecutive passes,
``WatchOptions.confirm``). At 0.75 the development logs labelled oscillating whose
validation loss swings by 0.3 of its level (lightning-stellar-regression-v35,
keras-ssl-unstable) are still reported live; the noisy-loss sample's 0.2 is not."""


def median_lower_bound(x: np.ndarray, confidence: float) -> float:
    """Distribution-free lower confidence bound of the median of ``x``: its k-th smallest
    value, k the largest with P(Binomial(n, 1/2) <= k - 1) <= 1 - ``confidence`` (the
    smallest value when no k qualifies)."""
    v = np.sort(np.asarray(x, dtype=np.float64))
    n = int(v.size)
    if n == 0:
        return float("nan")
    cdf, k = 0.0, 1
    for j in range(n):  # cdf = P(Bin(n, 1/2) <= j): k = j + 1 qualifies while it is small
        cdf += math.comb(n, j) / 2.0**n
        if cdf > 1 - confidence:
            break
        k = j + 1
    return float(v[k - 1])


def median_crossings(x: np.ndarray) -> int:
    """How often the finite values cross their median (ties carry the previous side)."""
    r = np.asarray(x, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size < 2:
        return 0
    side = np.sign(r - np.median(r))
    side = side[side != 0]
    return int(np.count_nonzero(side[1:] != side[:-1]))


def variance_ratio(x: np.ndarray, w: int = VARIANCE_WINDOW) -> float:
    """Var of w-point means × w / Var of points: ≈ 1 for independent noise, > 1 when the
    loss stays high (or low) for several steps in a row. Residuals are clipped at 4 MADs
    so one spike does not make a ratio."""
    r = np.asarray(x, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size < 4 * w:
        return float("nan")
    r = r - np.median(r)
    mad = 1.4826 * float(np.median(np.abs(r)))
    if mad <= 0:
        return float("nan")
    r = np.clip(r / mad, -4.0, 4.0)  # in MAD units: no overflow at any loss scale
    var = float(np.var(r))
    means = np.convolve(r, np.ones(w) / w, mode="valid")
    return float(np.var(means)) * w / var if var > 0 else float("nan")
