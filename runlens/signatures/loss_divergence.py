"""Training loss rising persistently or blowing up."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens import series as S
from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.signatures._curves import TINY, confidence, finite_points, loss_view
from runlens.signatures.base import NotChecked, Param, Params, Signature


class LossDivergence(Signature):
    """The training loss climbs away from the best level it reached and stays up.

    What it detects:
        After the warm-up transient, the late training loss (median of the last
        ``late_fraction`` of the points) is far above the best level reached before (the
        lowest rolling median, or the initial loss if the run never got below it): the run
        has diverged or is diverging, or it ended far above its best (a transformer whose
        loss rose 3× over its last 60 of 400 steps). A loss that blows up in the first
        steps and stays up counts too: the initial loss is taken before the blow-up. Needs
        ``min_points`` points after the warm-up (on 10–19 points the late level is the
        median of the last third, at most 5).
        While the run is still being written (``ctx.final`` False: ``runlens watch``), the
        late level is the lower quartile of the late points instead of their median, so the
        rise must hold for three quarters of them: a noisy run's short excursion at the end
        of the data so far is not a divergence.

    Why it matters:
        Training is supposed to lower the loss. A persistent rise means every further step
        makes the model worse; it usually ends in NaN or in a collapsed model that predicts
        a constant. The steps are wasted compute.

    Evidence:
        ``rise`` = (late level − best level) / loss scale, where loss scale is the larger
        of |best level| and the improvement made from the start to the best level, compared
        with ``min_rise``; the best and late levels and the step where the rise began
        (the level first up by half of ``min_rise`` × loss scale).

    How to fix:
        Lower the learning rate (often 3–10×), add or lengthen warm-up, clip gradients
        (``clip_grad_norm_(…, 1.0)``), and check that the loss is minimised (sign) and the
        data/labels do not change mid-run. Resume from a checkpoint before the rise.

    References:
        Goodfellow et al., Deep Learning (2016), §8.2 (ill-conditioning, cliffs);
        Zhang et al., AUTOTRAINER (ICSE 2021), "unstable training" symptoms;
        Schoop et al., UMLAUT (CHI 2021), learning-rate heuristics.
    """

    name = "loss-divergence"
    summary = "training loss rising persistently or blowing up"
    category = "curve"
    severity = "error"
    requires = ("train/loss",)
    params = (
        Param(
            "min_rise",
            0.5,
            "late level above the best level by this fraction of the loss scale",
            "runlens calibration on the sample runs (healthy runs stay below 0.1)",
        ),
        Param(
            "late_fraction",
            0.1,
            "fraction of the post-transient points whose median is the late level",
            "runlens default: long enough that a spike near the end does not count",
        ),
        Param(
            "min_points",
            10,
            "finite training-loss points after the warm-up needed (an epoch-level log of "
            "10 epochs is checked)",
            "runlens default (was 20, the shared minimum of the curve signatures)",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        v = loss_view(ctx, min_points=int(p.min_points))
        n = len(v)
        k = max(min(5, n // 3), int(p.late_fraction * n))
        tail = v.raw[-k:]
        # While the run goes on, the end of the data is not the end of the run: a noisy
        # loss wanders up for a few dozen steps and comes back, a divergence stays up. Live,
        # the late level is the lower quartile of the late points (3/4 of them high).
        late = float(np.median(tail) if ctx.final else np.percentile(tail, 25))
        before = v.level[: n - k]
        if before.size == 0 or not np.isfinite(before).any():
            # late_fraction near 1 leaves no "before" to rise from
            raise NotChecked.too_few(n, "points after the warm-up", k + 1)
        i_best = int(np.nanargmin(before))
        best = float(before[i_best])
        best_step = int(v.steps[i_best])
        from_start = v.start < best
        if from_start:  # never improved on its initial loss: the start is the best level
            best, best_step = v.start, v.start_step
        scale = max(abs(best), v.start - best, TINY)
        rise = (late - best) / scale
        if not np.isfinite(rise) or rise < p.min_rise:
            return []
        # Where it started: the first point after the best where the level is up by half
        # the least rise that counts. Not half-way to the late level: that moves later as
        # an accelerating divergence goes on, so a live report and the final one of the
        # same run would name different onsets.
        half = best + 0.5 * p.min_rise * scale
        if from_start:
            # The rise may lie inside the transient (a blow-up at step 1): search the
            # whole curve, with a short window since a blow-up is abrupt.
            steps, raw = finite_points(ctx.train_loss)
            level = S.rolling_median(raw, 5)
        else:
            steps, level = v.steps, v.level
        after = np.flatnonzero((steps > best_step) & (level >= half))
        began = int(steps[after[0]]) if after.size else best_step
        unit = ctx.x_unit
        return [
            Finding(
                signature=self.name,
                severity="error",
                confidence=confidence(rise, p.min_rise),
                summary=(
                    f"training loss rose from {fmt_num(best)} ({unit} {best_step}) to "
                    f"{fmt_num(late)} at the end ({rise:.1f}× the loss scale): the run ended "
                    f"far above its best; the rise began around {unit} {began}"
                ),
                steps=(began, v.last_step),
                evidence=(
                    Evidence("rise / loss scale", rise, p.min_rise, ">"),
                    Evidence("best level", best),
                    Evidence("late level", late),
                    Evidence("initial loss", v.start),
                    Evidence(f"rise began at {unit}", began),
                ),
                causes=(
                    "learning rate too high for this model/batch size",
                    "no warm-up, or warm-up too short",
                    "exploding gradients without clipping",
                    "a data or loss bug that changes the objective mid-run",
                ),
                fix="Lower the learning rate 3–10× or add warm-up, clip gradients "
                "(clip_grad_norm_ 1.0), and restart from a checkpoint before the rise.",
                series=(fmt.TRAIN_LOSS,),
            )
        ]
