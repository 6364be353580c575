"""Step-to-step noise of the training loss large relative to its scale."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens import series as S
from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.signatures._curves import confidence, loss_scale, loss_view
from runlens.signatures.base import NotChecked, Param, Params, Signature


class NoisyLoss(Signature):
    """The training loss is dominated by step-to-step noise.

    What it detects:
        The robust step-to-step noise of the training loss (σ from the median absolute
        deviation of first differences, after the transient) is a large fraction of the
        loss scale: the larger of the late loss level and the improvement made since the
        start. The trend is then hard to see and each update follows mostly noise. Not
        applicable to a loss logged per epoch (each point an epoch average: no batch noise
        left to measure).

        While the run is still being written (``ctx.final`` False: ``runlens watch``), the
        improvement since the start is not known yet: it keeps growing while the loss
        falls, and the final analysis divides by it. Live, the scale is at least the initial
        loss (the largest the final scale can be for a loss that stays between 0 and its
        start), so the noisy phase of a loss that has not finished falling (right after an
        LR warm-up) waits for the final analysis.

    Why it matters:
        The per-step loss is a mean over the batch; its noise falls as 1/√batch. Noise
        comparable to the loss itself means tiny batches (or per-example variance that is
        huge), so gradient estimates are noisy too: progress is slow, the final level is
        worse at a given LR, and diagnostics on the curve (plateaus, trends) are unreliable.

    Evidence:
        ``noise / loss scale`` against ``max_noise``; the noise σ, the late level and the
        improvement since the start (live: the initial loss, the floor of the scale); the
        configured batch size when the config names one.

    How to fix:
        Increase the batch size (or accumulate gradients over several batches) and scale
        the learning rate with it; otherwise lower the learning rate. Log the loss averaged
        over several steps if only the display is the problem.

    References:
        McCandlish et al., "An Empirical Model of Large-Batch Training" (2018): gradient
        noise scale; Smith & Le, "A Bayesian Perspective on Generalization and SGD" (2018);
        TensorBoard scalar smoothing (debiased EMA) for reading noisy curves.
    """

    name = "noisy-loss"
    summary = "step-to-step noise large relative to the trend (batch too small)"
    category = "curve"
    severity = "warning"
    requires = ("train/loss",)
    params = (
        Param(
            "max_noise",
            0.3,
            "robust step-to-step σ of the loss as a fraction of the loss scale",
            "runlens calibration: healthy sample runs (batch 32–64) ≤ 0.06, dropout 0.6 "
            "≈ 0.15, batch size 1 > 1",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        if ctx.x_unit == "epoch":
            raise NotChecked(
                "the training loss is logged per epoch: each point averages a whole epoch, "
                "so there is no per-batch noise to measure (swings between epochs are "
                "loss-oscillation's)",
                "not-applicable",
            )
        v = loss_view(ctx)
        noise = S.robust_noise(v.raw)
        level = float(np.median(v.raw[len(v) // 2 :]))
        scale = loss_scale(v.start, level)
        # The improvement since the start grows until the run ends (lr-too-high-warmup:
        # 0.93 at step 199, 1.88 at the end): live, the scale is what it can become.
        floor = not ctx.final and abs(v.start) > scale
        if floor:
            scale = abs(v.start)
        ratio = noise / scale
        if not (np.isfinite(ratio) and ratio >= p.max_noise):
            return []
        batch = _batch_size(ctx)
        evidence = [
            Evidence("noise σ / loss scale", ratio, p.max_noise, ">="),
            Evidence("noise σ (robust)", noise),
            Evidence("late level", level),
            Evidence("improvement since start", v.start - level),
        ]
        if floor:
            evidence.append(Evidence("initial loss (live: floor of the scale)", v.start))
        summary = (
            f"step-to-step noise of the training loss (σ≈{fmt_num(noise)}) is {ratio:.0%} of "
            f"its scale (level {fmt_num(level)}, improvement {fmt_num(v.start - level)})"
        )
        if floor:
            summary += f"; live, against the initial loss {fmt_num(v.start)}"
        if batch is not None:
            evidence.append(Evidence("batch size (config)", batch))
            summary += f"; batch size {batch}"
        return [
            Finding(
                signature=self.name,
                severity="warning",
                confidence=confidence(ratio, p.max_noise),
                summary=summary,
                steps=(v.first_step, v.last_step),
                evidence=tuple(evidence),
                causes=(
                    "batch size too small",
                    "learning rate high for the gradient noise of this batch size",
                    "very heterogeneous examples (per-example losses differ by orders)",
                ),
                fix="Increase the batch size or accumulate gradients (scale the LR with it), "
                "or lower the learning rate.",
                series=(fmt.TRAIN_LOSS,),
            )
        ]


def _batch_size(ctx: Context) -> int | None:
    for key in ("batch_size", "batch", "bs", "train_batch_size"):
        b = ctx.run.config.get(key)
        if isinstance(b, int) and not isinstance(b, bool) and b > 0:
            return b
    return None
