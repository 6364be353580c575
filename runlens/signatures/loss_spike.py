"""Isolated sudden jumps of the training loss that recover."""

from __future__ import annotations

import numpy as np

from runlens import series as S
from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.signatures._curves import TINY, confidence, loss_view
from runlens.signatures.base import Param, Params, Signature


class LossSpike(Signature):
    """A few steps where the loss jumps far above its recent level, then comes back.

    What it detects:
        Points of the training loss (after the transient) more than ``z`` robust noise
        units and at least ``min_rel`` (relative) above the rolling median of the
        surrounding steps, which return close to that baseline within ``recover_steps``
        points. Many such points mean heavy-tailed noise, not isolated spikes, and are not
        reported (see noisy-loss).

    Why it matters:
        A spike is one step with a huge gradient: a corrupted or mislabelled batch, a
        numerically bad example, or an update too large for the current curvature. Even
        when the loss recovers, the step can knock the weights to a worse region, and in
        large-scale training repeated spikes precede divergence.

    Evidence:
        The number of spike events and their steps; the largest score (robust σ above the
        baseline) against ``z``; the largest relative jump against ``min_rel``; the
        fraction of spiky points against ``max_fraction``.

    How to fix:
        Inspect the batches at the listed steps (bad samples, wrong scaling, label
        errors); clip gradients; lower the learning rate or Adam's ε/β2 sensitivity; for
        large models, skip batches whose loss or gradient norm is an outlier and resume
        from a checkpoint before repeated spikes.

    References:
        Chowdhery et al., PaLM (2022) §5.1: restart before the spike and skip batches;
        Team OLMo, "2 OLMo 2 Furious" (2024): a "spike score" of loss/gradient-norm points
        many σ above a rolling average; Zhang et al., AUTOTRAINER (ICSE 2021).
    """

    name = "loss-spike"
    summary = "isolated sudden jumps far above the smoothed curve that recover"
    category = "curve"
    severity = "warning"
    requires = ("train/loss",)
    params = (
        Param(
            "z",
            6.0,
            "robust noise units (σ from the rolling MAD) above the rolling median",
            "in the spirit of OLMo 2's spike score (points many σ above a rolling average); "
            "the value 6 is runlens calibration (injected spikes score > 15σ)",
        ),
        Param(
            "min_rel",
            0.5,
            "a spike is also at least this fraction above its baseline",
            "runlens default: keeps tiny wobbles of very smooth curves out",
        ),
        Param("window", 25, "rolling-median window (points) of the baseline", "runlens default"),
        Param(
            "recover_steps",
            20,
            "points within which the loss must return near the baseline",
            "runlens default; a loss that stays up is loss-divergence",
        ),
        Param(
            "max_fraction",
            0.02,
            "above this fraction of spiky points the curve is heavy-tailed noise, not spikes",
            "runlens calibration (batch-size-1 sample ≈ 5%, spike sample < 1%)",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        v = loss_view(ctx)
        spikes = S.find_spikes(
            v.steps, v.raw, threshold=p.z, window=int(p.window), min_rel=p.min_rel
        )
        if not spikes:
            return []
        fraction = len(spikes) / len(v)
        if fraction > p.max_fraction:
            return []
        events: list[list[S.Spike]] = []
        for sp in spikes:  # adjacent spiky points are one event
            if events and sp.index - events[-1][-1].index <= 3:
                events[-1].append(sp)
            else:
                events.append([sp])
        recovered = []
        for ev in events:
            top = max(ev, key=lambda s: s.score)
            after = v.raw[ev[-1].index + 1 : ev[-1].index + 1 + int(p.recover_steps)]
            limit = top.baseline + 0.5 * p.min_rel * abs(top.baseline)
            if after.size and np.any(after <= limit):
                recovered.append(top)
        if not recovered:
            return []
        worst = max(recovered, key=lambda s: s.score)
        rel = max((s.value - s.baseline) / max(abs(s.baseline), TINY) for s in recovered)
        steps = [s.step for s in recovered]
        shown = ", ".join(str(s) for s in steps[:8]) + (" …" if len(steps) > 8 else "")
        return [
            Finding(
                signature=self.name,
                severity="warning",
                confidence=confidence(worst.score, p.z),
                summary=(
                    f"{len(recovered)} loss spike(s) at step {shown}; the largest reached "
                    f"{fmt_num(worst.value)} against a baseline of {fmt_num(worst.baseline)} "
                    f"({worst.score:.0f}σ) at step {worst.step}, and the loss recovered"
                ),
                steps=(steps[0], steps[-1]),
                evidence=(
                    Evidence("spike events", len(recovered)),
                    Evidence("largest score (robust σ)", worst.score, p.z, ">"),
                    Evidence("largest jump / baseline", rel, p.min_rel, ">="),
                    Evidence("fraction of spiky points", fraction, p.max_fraction, "<="),
                    *(Evidence("spike at step", s) for s in steps[:5]),
                ),
                causes=(
                    "corrupted, mislabelled or wrongly scaled batches",
                    "an occasional update too large for the local curvature (LR too high)",
                    "Adam with a small ε dividing by a tiny second moment",
                ),
                fix="Inspect the batches at these steps, clip gradients, lower the LR; "
                "for large runs skip outlier batches and restart before repeated spikes.",
            )
        ]
