"""Update/weight ratios far below ~1e-3 on most layers, sustained: learning rate too low."""

from __future__ import annotations

from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Finding
from runlens.needs import LayerStat
from runlens.signatures._updates import update_findings
from runlens.signatures.base import Param, Params, Signature


class TinyUpdates(Signature):
    """Weights that barely move: the learning rate is far too low.

    What it detects:
        The update/weight ratio ``||w_after - w_before|| / ||w_before||`` of the weight
        matrices (biases and normalization gains excluded), after the early transient. It
        fires when the ratio is below ``max_ratio`` on at least ``most_layers`` of the
        moving weight layers, on at least ``min_fraction`` of the recorded steps.
        Parameters that never move at all are left to ``frozen-layer``.

    Why it matters:
        A common rule of thumb is that each step should change the weights by about a
        thousandth of their scale. Orders of magnitude below that, training crawls: the
        loss looks flat or decreases far too slowly, and the run wastes its compute
        budget. Usually the learning rate is too low (a missing warm-up end, a scheduler
        stepped per step instead of per epoch, a typo like 1e-7), or the gradients are
        tiny (vanishing gradients, a loss scaled down by a huge batch sum).

    Evidence:
        The median update/weight ratio over layers and steps, the share of layers and of
        steps below the bound, and the slowest layers by name.

    How to fix:
        Raise the learning rate (run an LR range test: ``runlens`` can analyze one), check
        the scheduler (is it stepped at the right cadence? does warm-up end?), and check
        that the loss is not scaled down.

    References:
        Karpathy, CS231n notes "Neural Networks Part 3: Learning and Evaluation" — the
        ratio of updates to weights "should be somewhere around 1e-3"; Smith, "Cyclical
        Learning Rates for Training Neural Networks" (WACV 2017) — LR range test;
        Zhang et al., "AUTOTRAINER" (ICSE 2021).
    """

    name = "tiny-updates"
    summary = "update/weight ratio far below ~1e-3 on most layers, sustained (LR too low)"
    category = "layer"
    severity = "warning"
    requires = ("layers:update",)
    needs = (LayerStat(fmt.KIND_UPDATE, "update_ratio"),)
    params = (
        Param(
            "max_ratio",
            1e-5,
            "update/weight ratio below which a layer's update is tiny",
            "two orders of magnitude below Karpathy's ~1e-3 heuristic (CS231n); the margin is "
            "our calibration (healthy SGD and Adam sample runs stay above 1e-4)",
        ),
        Param(
            "most_layers",
            0.5,
            "share of the moving weight layers that must be below the bound on a step",
            "runlens default: 'most layers'",
        ),
        Param(
            "min_fraction",
            0.8,
            "share of post-transient recorded steps on which most layers must be below",
            "runlens default: sustained, so the tail of a decaying LR schedule is not enough",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        return update_findings(
            self.name,
            ctx,
            p.max_ratio,
            below=True,
            most_layers=p.most_layers,
            min_fraction=p.min_fraction,
            margin_weight=0.15,
            fix="Raise the learning rate (an LR range test finds a good one) and check "
            "that the scheduler and warm-up do what you expect.",
            causes=(
                "learning rate too low",
                "scheduler stepped at the wrong cadence (LR decayed to ~0)",
                "tiny gradients (vanishing gradients, a scaled-down loss)",
            ),
        )
