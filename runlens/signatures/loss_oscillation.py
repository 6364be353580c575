"""Large swings of the training loss around a level that does not improve."""

from __future__ import annotations

import numpy as np

from runlens import series as S
from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.signatures._curves import confidence, loss_view, nonzero_start
from runlens.signatures.base import Param, Params, Signature


class LossOscillation(Signature):
    """The training loss swings up and down by a large amount and stops improving.

    What it detects:
        In the second half of the run (after the transient) the training loss swings over
        a wide band — the 10th–90th percentile range of its 5-point rolling median, after
        removing the linear trend, is a large fraction of the initial loss — while its
        median level no longer improves — and the swings are multi-step: the variance ratio
        of the detrended loss (variance of 5-step means × 5 / variance of single steps)
        is well above 1, the value batch-to-batch noise gives. So a noisy plateau (each
        step's loss independent noise around a level: noisy-loss, underfitting) is not
        called an oscillation however wide its band; a loss that overshoots and takes a
        few steps to come back is. The variance ratio needs 20 points in the second half,
        so runs with fewer than 40 finite loss points after the transient are reported as
        not checked (too few points).

    Why it matters:
        A loss that keeps bouncing without progress usually means the optimizer is at or
        past its stability edge: each step overshoots the minimum along the sharpest
        directions, so progress made on one batch is undone on the next. The model ends
        worse than the same setup with a smaller learning rate.

    Evidence:
        ``swing`` = (P90 − P10 of the detrended late rolling median) / initial level, against
        ``min_swing``;
        ``late improvement`` = relative drop of the median from the 3rd to the 4th quarter,
        against ``max_improvement``; ``variance ratio`` (5-step, residuals clipped at 4
        MADs) against ``min_variance_ratio``; the late median level.

    How to fix:
        Lower the learning rate (2–10×) or decay it; with SGD add momentum and lower the
        LR, or switch to Adam/AdamW; increase the batch size; clip gradients. If the swing
        came with a schedule change, check the schedule.

    References:
        Cohen et al., "Gradient Descent on Neural Networks Typically Occurs at the Edge of
        Stability" (ICLR 2021); Zhang et al., AUTOTRAINER (ICSE 2021), "oscillating loss";
        Wardat et al., DeepDiagnosis (ICSE 2022), "loss not decreasing / oscillating";
        Lo & MacKinlay, "Stock Market Prices Do Not Follow Random Walks" (RFS 1988), the
        variance ratio.
    """

    name = "loss-oscillation"
    summary = "large swings around a level that does not improve"
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
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
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
            return []
        ratio = variance_ratio(late - slope * (steps - steps[0]) if np.isfinite(slope) else late)
        if not (np.isfinite(ratio) and ratio >= p.min_variance_ratio):
            return []
        level = float(np.median(late))
        first = int(v.steps[n // 2])
        return [
            Finding(
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
                    Evidence("late median level", level),
                    Evidence("initial loss", v.start),
                ),
                causes=(
                    "learning rate at or past the stability edge",
                    "batch too small for this learning rate",
                    "momentum/β settings that overshoot",
                ),
                fix="Lower the learning rate 2–10× (or decay it), increase the batch size, "
                "or use Adam/AdamW with gradient clipping.",
            )
        ]


VARIANCE_WINDOW = 5


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
