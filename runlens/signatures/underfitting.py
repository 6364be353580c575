"""Training and validation loss both plateauing at a high level."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.signatures._curves import (
    TINY,
    confidence,
    finite_points,
    loss_view,
    nonzero_start,
)
from runlens.signatures.base import NotChecked, Param, Params, Signature


class Underfitting(Signature):
    """The model learned a little, then stopped, at a loss still far from good.

    What it detects:
        After dropping at least ``min_progress`` from its start (otherwise see loss-flat),
        the training loss has plateaued — its median changed less than ``max_late_change``
        from the 3rd to the 4th quarter of the run — at a level at least
        ``min_level_ratio`` of the chance level ln(C) of a classification. When a
        validation loss exists it must be high and flat too.

        Without a chance level (task unknown, regression, language modeling) it does not
        run, and the report says so: the initial loss is no reference for "high". A
        fine-tune starts near its final loss and a converged regression keeps much of its
        initial MSE: six healthy logs of the development corpus (hf-text-cls-19k,
        lightning-stellar-regression-v16/v25/v41, lightning-tcc-cnn1d-v4,
        tb-lightning-quantae-plateau) plateaued at 0.49–0.91 of their initial loss.

        While the run is still being written (``ctx.final`` False: ``runlens watch``), the
        median must also have changed less than ``max_late_change`` from the 2nd to the 4th
        quarter of the data so far: a slow descent looks flat over a short last quarter.

    Why it matters:
        The model cannot fit even the training data: more steps will not help. The
        capacity, the features, or the optimization (an LR too low, a schedule that decayed
        too early, too much regularization) limit it.

    Evidence:
        The late training level / reference against ``min_level_ratio``; the late change
        against ``max_late_change``; the same for the validation loss when present; the
        progress made from the start.

    How to fix:
        Use a bigger or better-suited model (width, depth, architecture), better features or
        normalization; raise the learning rate or decay it later; reduce regularization
        (weight decay, dropout); train longer only if the loss is still falling.

    References:
        Goodfellow et al., Deep Learning (2016) §5.2 (capacity, under/overfitting);
        Zhang et al., AUTOTRAINER (ICSE 2021), "slow convergence";
        Wardat et al., DeepDiagnosis (ICSE 2022), "accuracy not increasing".
    """

    name = "underfitting"
    summary = "training and validation both plateau at a high level"
    category = "curve"
    severity = "warning"
    requires = ("train/loss",)
    params = (
        Param(
            "min_level_ratio",
            0.35,
            "late loss / chance level ln(C) above which the plateau counts as high",
            "runlens calibration: healthy sample runs end ≤ 0.15, the linear-model sample ≈ 0.58",
        ),
        Param(
            "max_late_change",
            0.05,
            "relative change of the median loss from the 3rd to the 4th quarter below which "
            "it counts as a plateau",
            "runlens default",
        ),
        Param(
            "min_progress",
            0.05,
            "relative drop from the initial loss below which loss-flat reports instead",
            "matches loss-flat's max_drop default",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        chance = ctx.task.chance_level
        if chance is None:
            kind, why = ctx.task.why_no_chance()
            raise NotChecked(
                f"a plateau counts as high only against the chance level ln(C): {why}",
                kind,  # type: ignore[arg-type]
            )
        v = loss_view(ctx)
        nonzero_start(v)
        ref = chance
        level = v.median(0.75, 1.0)
        progress = (v.start - level) / abs(v.start)
        change = v.late_change()
        ratio = level / ref
        if not (
            np.isfinite(ratio)
            and ratio >= p.min_level_ratio
            and abs(change) <= p.max_late_change
            and progress >= p.min_progress
        ):
            return []
        live: list[Evidence] = []
        if not ctx.final:
            # Live, the last quarter of the data so far may be a slow descent seen over too
            # short a window: the loss must not have moved over the last half either.
            q2 = v.median(0.25, 0.5)
            half = (q2 - level) / max(abs(q2), TINY)
            if not abs(half) <= p.max_late_change:
                return []
            live.append(
                Evidence("train change over the last half", half, p.max_late_change, "|·| <=")
            )
        ref_name = "ln(C)"
        evidence = [
            Evidence(f"late train loss / {ref_name}", ratio, p.min_level_ratio, ">="),
            Evidence("late train change", change, p.max_late_change, "|·| <="),
            *live,
            Evidence("late train loss", level),
            Evidence(ref_name, ref),
            Evidence("progress from start", progress, p.min_progress, ">="),
        ]
        summary = (
            f"training loss plateaued at {fmt_num(level)} ({ratio:.2f}× {ref_name} = "
            f"{fmt_num(ref)}; {change:+.1%} over the last quarter)"
        )
        series: tuple[str, ...] = (fmt.TRAIN_LOSS,)
        if ctx.val_loss is not None:
            vs, vr = finite_points(ctx.val_loss)
            vs, vr = vs[vs > ctx.transient_end], vr[vs > ctx.transient_end]
            if vr.size >= 4:
                m = vr.size
                v3, v4 = np.median(vr[m // 2 : 3 * m // 4]), np.median(vr[3 * m // 4 :])
                v_ratio = float(v4) / ref
                v_change = float((v3 - v4) / max(abs(v3), TINY))
                if v_ratio < p.min_level_ratio or abs(v_change) > p.max_late_change:
                    return []  # validation is fine or still improving: not underfitting
                evidence += [
                    Evidence(f"late val loss / {ref_name}", v_ratio, p.min_level_ratio, ">="),
                    Evidence("late val change", v_change, p.max_late_change, "|·| <="),
                ]
                summary += f"; validation plateaued too at {fmt_num(float(v4))}"
                series = (*series, fmt.VAL_LOSS)
        return [
            Finding(
                signature=self.name,
                severity="warning",
                confidence=confidence(ratio, p.min_level_ratio),
                summary=summary,
                steps=(int(v.steps[len(v) // 2]), v.last_step),
                evidence=tuple(evidence),
                causes=(
                    "model too small or unsuited to the task",
                    "learning rate too low, or decayed too early",
                    "too much regularization (weight decay, dropout)",
                    "uninformative or unnormalized features",
                ),
                fix="Increase model capacity or improve features/normalization; raise the LR "
                "or decay it later; reduce regularization.",
                series=series,
            )
        ]
