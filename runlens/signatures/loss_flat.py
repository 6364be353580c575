"""Training loss that barely moves from its start."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens import series as S
from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.signatures._curves import (
    TINY,
    chance_for_part,
    confidence,
    finite_points,
    start_level,
)
from runlens.signatures.base import NotChecked, Param, Params, Signature


class LossFlat(Signature):
    """The training loss stays at its initial value: nothing is being learned.

    What it detects:
        Over the whole run, the training loss (its rolling median) never drops more than
        ``max_drop`` below its initial level, and does not end far from it either.

    Why it matters:
        A flat loss means the parameters are not moving in a useful direction: the
        optimizer is not connected to the model, the learning rate is ~0, the parameters
        are frozen, gradients vanish or the labels carry no signal. Every step is wasted.

    Evidence:
        ``drop`` = (initial level − lowest rolling median) / |initial level| compared with
        ``max_drop``; the initial and final levels; for classification, the initial level
        against chance ln(C).

    How to fix:
        Check that the optimizer received ``model.parameters()`` and that
        ``optimizer.step()`` runs, that parameters have ``requires_grad``, and the learning
        rate (a typo such as 1e-7). Try to overfit a single batch: a working setup drives its
        loss to ~0 within a few hundred steps.

    References:
        Karpathy, "A Recipe for Training Neural Networks" (2019): overfit one batch;
        Zhang et al., AUTOTRAINER (ICSE 2021), "slow convergence";
        Schoop et al., UMLAUT (CHI 2021).
    """

    name = "loss-flat"
    summary = "training loss that barely moves from its start"
    category = "curve"
    severity = "error"
    requires = ("train/loss",)
    params = (
        Param(
            "max_drop",
            0.05,
            "largest relative drop of the loss below its initial level that still counts as flat",
            "runlens calibration (healthy sample runs drop > 80%)",
        ),
        Param(
            "min_points",
            10,
            "fewer finite loss points than this: too short to judge",
            "runlens default (was 30; lowered so a 10-epoch log, each point an epoch, is checked)",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        c = ctx.train_loss
        if c is None:
            raise NotChecked(f"no {fmt.TRAIN_LOSS} recorded", "not-recorded")
        steps, raw = finite_points(c)
        start = start_level(c)
        need = max(int(p.min_points), 5)
        if start is None or raw.size < need:
            raise NotChecked.too_few(int(raw.size), f"finite {fmt.TRAIN_LOSS} points", need)
        if abs(start) < TINY:
            raise NotChecked(
                "the initial training loss is 0: a relative drop is undefined", "not-applicable"
            )
        level = S.rolling_median(raw, max(5, raw.size // 20) | 1)
        low = float(np.nanmin(level))
        k = max(3, raw.size // 10)
        final = float(np.median(raw[-k:]))
        drop = (start - low) / abs(start)
        end_change = abs(final - start) / abs(start)
        if not (np.isfinite(drop) and drop < p.max_drop and end_change < p.max_drop):
            return []
        chance = chance_for_part(
            ctx, "severity from the chance level (a start far below it is a warning, not an error)"
        )
        already_good = chance is not None and start < 0.5 * chance
        evidence = [
            Evidence("largest drop below the initial level", drop, p.max_drop, "<"),
            Evidence("initial level", start),
            Evidence("final level", final),
        ]
        summary = (
            f"training loss stayed at {fmt_num(start)} → {fmt_num(final)} over "
            f"{raw.size} steps (never more than {drop:.1%} below its start)"
        )
        if chance is not None:
            evidence.append(Evidence("chance level ln(C)", chance))
            summary += f"; chance level is {fmt_num(chance)}"
        return [
            Finding(
                signature=self.name,
                # A model that starts far below chance and stays there may simply be done
                # (e.g. fine-tuning an already good model): a warning, not an error.
                severity="warning" if already_good else "error",
                confidence=0.6 if already_good else confidence(p.max_drop, max(drop, TINY)),
                summary=summary,
                steps=(int(steps[0]), int(steps[-1])),
                evidence=tuple(evidence),
                causes=(
                    "learning rate ~0 (typo) or a scheduler that zeroed it",
                    "frozen parameters, or the optimizer built on the wrong parameters",
                    "vanishing gradients / dead units / saturated activations",
                    "labels that carry no signal (shuffled or constant)",
                ),
                fix="Check the LR and that optimizer.step() updates model.parameters() "
                "(requires_grad); verify the setup can overfit one batch.",
                series=(fmt.TRAIN_LOSS,),
            )
        ]
