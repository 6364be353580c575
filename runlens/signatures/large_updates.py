"""Update/weight ratios far above ~1e-3 on most layers, sustained: learning rate too high."""

from __future__ import annotations

from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Finding
from runlens.needs import LayerStat
from runlens.signatures._updates import update_findings
from runlens.signatures.base import Param, Params, Signature


class LargeUpdates(Signature):
    """Weights that change by a large fraction of themselves every step: LR too high.

    What it detects:
        The update/weight ratio ``||w_after - w_before|| / ||w_before||`` of the weight
        matrices (biases and normalization gains excluded) after the early transient —
        large relative updates in the first steps of training from scratch are normal. It
        fires when the ratio is above ``min_ratio`` on at least ``most_layers`` of the
        moving weight layers, on at least ``min_fraction`` of the recorded steps.

    Why it matters:
        A common rule of thumb is that each step should change the weights by about a
        thousandth of their scale. When every step rewrites several percent of the
        weights, the optimizer jumps across the loss landscape instead of descending it:
        the loss oscillates or diverges, ReLUs die, activations saturate, and the final
        model is worse than with a smaller learning rate.

    Evidence:
        The median update/weight ratio over layers and steps, the share of layers and of
        steps above the bound, and the fastest-moving layers by name.

    How to fix:
        Lower the learning rate (an LR range test finds the largest stable one), add
        warm-up, clip gradients, or use per-layer learning rates for the layers named.

    References:
        Karpathy, CS231n notes "Neural Networks Part 3: Learning and Evaluation" — the
        ratio of updates to weights "should be somewhere around 1e-3"; Smith, "Cyclical
        Learning Rates for Training Neural Networks" (WACV 2017) — LR range test;
        You et al., "Large Batch Training of Convolutional Networks" (LARS, 2017) —
        per-layer update/weight ratios.
    """

    name = "large-updates"
    summary = "update/weight ratio far above ~1e-3 on most layers, sustained (LR too high)"
    category = "layer"
    severity = "warning"
    requires = ("layers:update",)
    needs = (LayerStat(fmt.KIND_UPDATE, "update_ratio"),)
    params = (
        Param(
            "min_ratio",
            0.04,
            "update/weight ratio above which a layer's update is large",
            "40× Karpathy's ~1e-3 heuristic (CS231n); our calibration: healthy sample runs "
            "(Adam 1e-3 to 1e-2, SGD+momentum 0.1) stay at or below ~0.016 after the "
            "transient, SGD at lr 2 sits near 0.12",
        ),
        Param(
            "most_layers",
            0.5,
            "share of the moving weight layers that must be above the bound on a step",
            "runlens default: 'most layers'",
        ),
        Param(
            "min_fraction",
            0.5,
            "share of post-transient recorded steps on which most layers must be above",
            "runlens default: sustained beyond the first steps",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        return update_findings(
            self.name,
            ctx,
            p.min_ratio,
            below=False,
            most_layers=p.most_layers,
            min_fraction=p.min_fraction,
            margin_weight=0.3,
            fix="Lower the learning rate (an LR range test finds the largest stable one), "
            "add warm-up, or clip gradients.",
            causes=(
                "learning rate too high",
                "no warm-up for a large learning rate",
                "weights initialized very small relative to the step size",
            ),
        )
