"""Initial classification loss far above chance level ln(C)."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.signatures._curves import confidence, finite_points, initial_level, require_chance
from runlens.signatures.base import NotChecked, Param, Params, Signature


class BadInitialLoss(Signature):
    """The first classification loss is far above what a fresh model should give.

    What it detects:
        For a single-label classification run with C classes, the training loss over the
        first few steps is more than ``max_ratio`` times the chance level ln(C) — the
        cross-entropy of a model that spreads probability evenly, which a well-initialized
        network gives at step 0. C comes from ``--task classification:C``, the config's
        ``task``/``num_classes``, or run.json's ``task`` (the loss function the collector
        saw), never from the output's shape; when the task is unknown, or is regression or
        language modeling, the check does not run and the report's coverage says so.

    Why it matters:
        A much higher initial loss means confident wrong predictions before any training:
        a last layer initialized too large, unnormalized inputs, a wrong loss (e.g. logits
        fed where probabilities are expected) or mismatched labels. The first steps are
        spent undoing the initialization ("hockey stick" loss), often with huge gradients
        that damage the rest of the network.

    Evidence:
        ``initial loss / ln(C)`` against ``max_ratio``; the initial loss (median of the first
        ``first_points`` points, cut before a blow-up: a loss that jumps from ln(C) to
        thousands at step 1 started at ln(C)), ln(C) and C.

    How to fix:
        Initialize the last layer small (scale its weights down, zero its bias, or set the
        bias to the log class priors); normalize inputs; check the loss gets raw logits
        (``cross_entropy`` applies log-softmax itself) and that labels are class indices.

    References:
        Karpathy, "A Recipe for Training Neural Networks" (2019): "verify loss @ init";
        Wardat et al., DeepDiagnosis (ICSE 2022); Glorot & Bengio (AISTATS 2010).
    """

    name = "bad-initial-loss"
    summary = "initial loss far above chance level ln(C) for classification"
    category = "curve"
    severity = "warning"
    requires = ("train/loss",)
    params = (
        Param(
            "max_ratio",
            2.0,
            "initial loss above this multiple of ln(C) is flagged",
            "runlens default after Karpathy's 'verify loss @ init' (default-initialized "
            "sample models start at 0.95–1.25× ln(C))",
        ),
        Param("first_points", 3, "number of first points whose median is the initial loss"),
        Param(
            "max_first_step",
            10,
            "runs whose first recorded step is later than this (resumed runs) are skipped",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        chance = require_chance(ctx)
        c = ctx.train_loss
        if c is None:
            raise NotChecked(f"no {fmt.TRAIN_LOSS} recorded", "not-recorded")
        steps, raw = finite_points(c)
        if raw.size == 0:
            raise NotChecked(f"no finite {fmt.TRAIN_LOSS} value", "not-recorded")
        if steps[0] > p.max_first_step:
            raise NotChecked(
                f"the first finite {fmt.TRAIN_LOSS} point is at step {int(steps[0])}, after "
                f"max_first_step {int(p.max_first_step)} (resumed run?): the initial loss "
                "was not recorded",
                "not-recorded",
            )
        k = max(1, int(p.first_points))
        # Before any blow-up: a run that starts at ln(C) and explodes at step 1 has a
        # divergence problem, not a bad initialization.
        initial = initial_level(raw, k)
        ratio = initial / chance if initial is not None else float("nan")
        if initial is None or not (np.isfinite(ratio) and ratio > p.max_ratio):
            return []
        classes = ctx.num_classes
        return [
            Finding(
                signature=self.name,
                severity="warning",
                confidence=confidence(ratio, p.max_ratio),
                summary=(
                    f"initial training loss {fmt_num(initial)} is {ratio:.1f}× the chance "
                    f"level ln({classes}) = {fmt_num(chance)}: the untrained model makes "
                    "confident wrong predictions"
                ),
                steps=(int(steps[0]), int(steps[min(k, raw.size) - 1])),
                evidence=(
                    Evidence("initial loss / ln(C)", ratio, p.max_ratio, ">"),
                    Evidence("initial loss", initial),
                    Evidence("chance level ln(C)", chance),
                    Evidence("classes C", float(classes or 0)),
                ),
                causes=(
                    "last layer initialized too large (logits far from 0)",
                    "unnormalized inputs",
                    "softmax/sigmoid applied before a loss that expects logits",
                    "labels that do not match the outputs",
                ),
                fix="Scale the last layer's init down (zero bias or log-prior bias), "
                "normalize inputs, and pass raw logits to cross_entropy.",
            )
        ]
