"""Early layers' gradients orders of magnitude below later layers' and tiny."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.needs import LayerStat
from runlens.signatures import _layers as L
from runlens.signatures.base import NotChecked, Param, Params, Signature
from runlens.signatures.exploding_gradients import depth_profile


class VanishingGradients(Signature):
    """Gradients that vanish on their way back to the first layers.

    What it detects:
        After the early transient, on most recorded steps, the gradient norm of the first
        quarter of the weight layers is ``ratio``× or more below that of the last quarter
        *and* below ``max_norm`` in absolute terms. Layers that never receive a gradient
        at all are left to ``frozen-layer``.

    Why it matters:
        The backward pass multiplies the gradient by each layer's Jacobian; with saturating
        activations (sigmoid's derivative is at most 0.25) or too-small weights the product
        shrinks geometrically with depth. The first layers then barely learn: the network
        behaves like a shallow one on top of random features and the loss plateaus.

    Evidence:
        The median gradient norm of the first and of the last weight layers, named, their
        ratio, and the steps where both conditions held.

    How to fix:
        Use ReLU-family activations (or GELU/SiLU) instead of sigmoid/tanh in deep stacks,
        a variance-preserving initialization (Kaiming for ReLU, Xavier/Glorot for tanh),
        normalization layers, and residual connections; for RNNs use LSTM/GRU cells.

    References:
        Glorot & Bengio, "Understanding the difficulty of training deep feedforward neural
        networks" (AISTATS 2010); Pascanu, Mikolov & Bengio (ICML 2013); Hochreiter (1991);
        Zhang et al., "AUTOTRAINER" (ICSE 2021) — vanishing-gradient rule.
    """

    name = "vanishing-gradients"
    summary = "early layers' gradients orders of magnitude below the last layers' and tiny"
    category = "layer"
    severity = "warning"
    requires = ("layers:grad",)
    needs = (LayerStat(fmt.KIND_GRAD, "norm"),)
    params = (
        Param(
            "ratio",
            1e-3,
            "median gradient norm of the first weight layers / that of the last ones, below "
            "which the gradient vanishes",
            "Glorot & Bengio 2010 show per-layer gradient profiles; three orders of magnitude "
            "is our calibration (healthy sample runs stay within 10×)",
        ),
        Param(
            "max_norm",
            1e-4,
            "absolute gradient norm of the first layers below which they are 'tiny'",
            "AUTOTRAINER (Zhang et al. 2021) uses absolute gradient thresholds of this order; "
            "the value is our calibration",
        ),
        Param(
            "min_fraction",
            0.5,
            "fraction of post-transient recorded steps on which both conditions must hold",
            "runlens default: 'sustained' means most of the run",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        steps, early, late, enames, lnames, post = depth_profile(ctx)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = early / late
        valid = post & np.isfinite(ratio)
        if valid.sum() < 3:
            raise NotChecked.too_few(
                int(valid.sum()),
                "steps with first and last layer gradients",
                3,
                "after the warm-up",
            )
        hit = valid & (ratio <= p.ratio) & (early <= p.max_norm)
        frac = hit.sum() / valid.sum()
        if frac < p.min_fraction:
            return []
        med_ratio = float(np.median(ratio[valid]))
        med_early = float(np.median(early[valid]))
        med_late = float(np.median(late[valid]))
        sp = L.span(steps, hit)
        assert sp is not None
        margin = np.log10(p.ratio / max(med_ratio, 1e-300))
        return [
            Finding(
                signature=self.name,
                severity="warning",
                confidence=float(min(1.0, 0.5 + 0.1 * margin + 0.3 * frac)),
                summary=(
                    f"gradient norm of the first layers ({L.name_list(enames)}) is "
                    f"{fmt_num(med_early)}, {L.orders(1 / med_ratio)} below the last layers "
                    f"({L.name_list(lnames)}, {fmt_num(med_late)}; thresholds "
                    f"{fmt_num(p.ratio)} ratio, {fmt_num(p.max_norm)} norm) from step "
                    f"{sp[0]} to {sp[1]}"
                ),
                fix="Use ReLU/GELU instead of sigmoid/tanh in deep stacks, Kaiming/Xavier "
                "initialization, normalization layers and residual connections.",
                steps=sp,
                layers=tuple(enames),
                evidence=(
                    Evidence("median grad norm, first layers", med_early, p.max_norm, "<"),
                    Evidence("median grad norm, last layers", med_late),
                    Evidence("first/last ratio (median)", med_ratio, p.ratio, "<"),
                    Evidence("fraction of steps vanishing", float(frac), p.min_fraction, ">="),
                ),
                causes=(
                    "saturating activations (sigmoid/tanh) in a deep stack",
                    "weights initialized too small for the depth",
                    "dead ReLU units blocking the backward pass",
                ),
            )
        ]
