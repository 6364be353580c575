"""Isolated evaluations where the validation loss jumps to several times its level."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens import series as S
from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.signatures._curves import TINY, confidence, finite_points
from runlens.signatures.base import NotChecked, Param, Params, Signature


class ValSpike(Signature):
    """At one or two evaluations the validation loss jumps to several times its level, and
    the next evaluations are back down.

    What it detects:
        Evaluations (after the warm-up) whose validation loss is at least ``1 + min_rel``
        times the median of the up to 3 evaluations on either side of it (itself left
        out), higher than the evaluation before it by the same margin halved, and followed
        within 2 evaluations by one back within that halved margin of the median: a peak
        that comes back, not a step up. The jump must also exceed 3 rounding steps of the
        log (a bf16- or 4-decimal-rounded loss moves in steps). More than ``max_events``
        such peaks (or 5% of the evaluations, when that is more) are a loss that swings
        all the time, which loss-oscillation reports instead. Needs ``MIN_POINTS``
        evaluations after the warm-up.

    Why it matters:
        The weights at that evaluation were much worse than just before and after: one
        update (a bad batch, a learning rate too high for a moment, an optimizer state
        blown up by a tiny second moment) or polluted BatchNorm running statistics (an
        outlier batch in training mode) threw the model off. Training often recovers, but
        a checkpoint saved there is bad, early stopping may trigger on it, and repeated
        jumps precede divergence.

    Evidence:
        The number of peaks and their steps; the largest peak / its local median against
        ``1 + min_rel``; the validation loss there and the median around it.

    How to fix:
        Look at what happened just before the listed evaluations: the training batches
        (corrupted or extreme examples), the learning rate, gradient norms. Clip gradients;
        lower the learning rate; with BatchNorm, keep outlier batches out of training or
        raise its momentum's averaging window; keep more than the last checkpoint.

    References:
        Ioffe & Szegedy, "Batch Normalization" (ICML 2015), running statistics used at
        evaluation; Chowdhery et al., PaLM (2022) §5.1, loss spikes and restarting before
        them; Prechelt, "Early Stopping — But When?" (1998).
    """

    name = "val-spike"
    summary = "validation loss jumping to several times its level at single evaluations"
    category = "curve"
    severity = "warning"
    requires = ("val/loss",)
    params = (
        Param(
            "min_rel",
            1.0,
            "a peak is at least 1 + min_rel times the median of the evaluations around it",
            "runlens default: 'several times the local level' (the corpus label "
            "definition of a spike); other-nids-cnn-history's labelled validation spike is "
            "3.3×",
        ),
        Param(
            "max_events",
            2,
            "more peaks than this (and than 5% of the evaluations) are a swinging loss, not spikes",
            "runlens default; keras-ssl-unstable (labelled oscillating) has more",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        c = ctx.val_loss
        if c is None:
            raise NotChecked(f"no {fmt.VAL_LOSS} recorded", "not-recorded")
        steps, raw = finite_points(c)
        keep = steps > ctx.transient_end
        steps, raw = steps[keep], raw[keep]
        if raw.size < MIN_POINTS:
            raise NotChecked.too_few(
                int(raw.size), f"finite {fmt.VAL_LOSS} points", MIN_POINTS,
                f"after the warm-up (step {ctx.transient_end})",
            )  # fmt: skip
        base = _around(raw, NEIGHBOURS)
        floor = 3 * S.resolution(raw)
        peak = 1 + p.min_rel
        back = 1 + p.min_rel / 2
        spikes = []
        for i in range(1, raw.size - 1):
            b = base[i]
            if not (b > TINY and raw[i] >= peak * b and raw[i] - b > floor):
                continue
            if raw[i - 1] * back > raw[i]:
                continue  # not a jump from the evaluation before: a step up or a slope
            if not np.any(raw[i + 1 : i + 3] <= back * b):
                continue  # does not come back: a shift, not a spike
            spikes.append(i)
        if not spikes:
            return []
        allowed = max(int(p.max_events), int(0.05 * raw.size))
        if len(spikes) > allowed:
            return []
        worst = max(spikes, key=lambda i: raw[i] / base[i])
        ratio = float(raw[worst] / base[worst])
        unit = ctx.x_unit
        at = [int(steps[i]) for i in spikes]
        return [
            Finding(
                signature=self.name,
                severity="warning",
                confidence=confidence(ratio - 1, p.min_rel),
                summary=(
                    f"the validation loss jumped to {ratio:.1f}× its level at "
                    f"{len(spikes)} evaluation(s) ({unit} {', '.join(map(str, at))}): "
                    f"{fmt_num(float(raw[worst]))} against {fmt_num(float(base[worst]))} "
                    f"around it at {unit} {int(steps[worst])}, and came back"
                ),
                steps=(at[0], at[-1]),
                evidence=(
                    Evidence("peaks", len(spikes), allowed, "<="),
                    Evidence("largest peak / local median", ratio, peak, ">="),
                    Evidence("val loss at the largest peak", float(raw[worst])),
                    Evidence("local median there", float(base[worst])),
                    *(Evidence(f"peak at {unit}", s) for s in at[:5]),
                ),
                causes=(
                    "one bad update: a corrupted or extreme batch, a moment of too-high LR",
                    "BatchNorm running statistics polluted by an outlier training batch",
                    "Adam's second moment tiny for some weights, then a large step",
                ),
                fix="Look at the batches, LR and gradient norms just before these "
                "evaluations; clip gradients or lower the LR; keep outlier batches out of "
                "BatchNorm statistics; keep more than the last checkpoint.",
                series=(fmt.VAL_LOSS,),
            )
        ]


MIN_POINTS = 8
"""Evaluations after the warm-up needed: a peak needs neighbours on both sides."""

NEIGHBOURS = 3
"""Evaluations on each side whose median is a point's local level."""


def _around(x: np.ndarray, h: int) -> np.ndarray:
    """Median of the up to ``h`` points on either side of each point, the point itself
    left out (so a peak does not lift its own baseline)."""
    out = np.empty(x.size)
    for i in range(x.size):
        out[i] = np.median(np.concatenate([x[max(0, i - h) : i], x[i + 1 : i + 1 + h]]))
    return out
