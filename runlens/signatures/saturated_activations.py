"""tanh/sigmoid-like outputs pinned at their bounds."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Finding
from runlens.needs import LayerStat
from runlens.signatures import _layers as L
from runlens.signatures.base import NotChecked, Param, Params, Signature


class SaturatedActivations(Signature):
    """Bounded activations (tanh, sigmoid, ...) stuck at their bounds.

    What it detects:
        Layers with a bounded output (``Tanh``, ``Sigmoid``, ``Hardtanh``, ``Hardsigmoid``,
        ``Softsign``...) where, after the early transient, the fraction of outputs within 1%
        of a bound (the collector's ``frac_saturated``) is at least ``saturated_fraction``
        on at least ``min_fraction`` of the recorded steps.

    Why it matters:
        At its bounds a sigmoid or tanh is flat: its derivative is ~0, so the gradient
        through a saturated unit vanishes and the layers below it stop learning. Glorot &
        Bengio saw the top sigmoid layer of deep networks saturate early in training and
        recover only slowly; pre-activations that are too large (big weights or inputs,
        no normalization) saturate every layer.

    Evidence:
        The saturated fraction of each flagged layer (median after the transient), the
        share of steps over the threshold, and the step range.

    How to fix:
        Normalize the inputs; use Xavier/Glorot initialization for tanh/sigmoid layers (or
        smaller weights); add normalization before the activation; lower the learning rate;
        or switch hidden layers to ReLU-family/GELU activations.

    References:
        Glorot & Bengio, "Understanding the difficulty of training deep feedforward neural
        networks" (AISTATS 2010); LeCun, Bottou, Orr & Müller, "Efficient BackProp" (1998);
        Wardat et al., "DeepDiagnosis" (ICSE 2022) — saturated-activation rule.
    """

    name = "saturated-activations"
    summary = "tanh/sigmoid-like outputs pinned at their bounds"
    category = "layer"
    severity = "warning"
    requires = ("layers:activation",)
    needs = (LayerStat(fmt.KIND_ACTIVATION, "frac_saturated"),)
    params = (
        Param(
            "saturated_fraction",
            0.5,
            "fraction of a layer's outputs within 1% of a bound to flag the layer",
            "Glorot & Bengio 2010 (saturation of the top hidden layer); 0.5 is our "
            "calibration (healthy tanh runs stay under 0.1)",
        ),
        Param(
            "min_fraction",
            0.8,
            "fraction of post-transient recorded steps on which the layer must be saturated",
            "runlens default: saturation that persists, not a burst",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        m = ctx.layer(fmt.KIND_ACTIVATION, "frac_saturated")
        if m is None:
            raise NotChecked("no frac_saturated activation statistic", "not-recorded")
        types = [ctx.module_type(n) for n in m.layers]
        # Only bounded modules have a meaningful saturated fraction; when types are unknown
        # trust the collector, which leaves it NaN for unbounded activations.
        known = any(types)
        cols = np.array(
            [j for j, t in enumerate(types) if (t in L.BOUNDED) or not known], dtype=int
        )
        if cols.size == 0:
            raise NotChecked(
                "no bounded activation layer (Tanh, Sigmoid, ...) among the recorded ones",
                "not-applicable",
            )
        hit = L.persistent_layers(ctx, m, cols, p.saturated_fraction, p.min_fraction)
        if hit is None:
            return []
        sp = hit.steps
        names = hit.layers
        parts = ", ".join(
            f"`{n}` ({ctx.module_type(n) or '?'}) {v:.0%}"
            for n, v in zip(names[:4], hit.medians, strict=False)
        )
        return [
            Finding(
                signature=self.name,
                severity="warning",
                confidence=hit.confidence(p.saturated_fraction),
                summary=(
                    f"{len(names)} bounded activation layer(s) saturated (outputs within 1% of "
                    f"a bound): {parts} (threshold {p.saturated_fraction:.0%})" + hit.step_text
                ),
                fix="Normalize inputs, use Xavier/Glorot init (smaller weights), add "
                "normalization before the activation, or use ReLU/GELU in hidden layers.",
                steps=sp,
                layers=tuple(names),
                evidence=hit.evidence("saturated fraction", p.saturated_fraction, p.min_fraction),
                causes=(
                    "weights or inputs too large (no input normalization, large init)",
                    "learning rate too high pushing pre-activations out",
                    "sigmoid/tanh in a deep stack without normalization",
                ),
            )
        ]
