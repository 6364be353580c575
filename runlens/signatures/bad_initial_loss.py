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
        language modeling, the check does not run and the report's coverage says so. The
        first evaluation is checked the same way when it ran before any training (its
        ``val/loss`` point comes before the first training loss, or the collector's mode
        probe saw its forwards before the first training forward): a first
        validation loss far above ln(C) while the first training loss is normal points at
        eval-mode behaviour (an evaluation before any training forward: see
        train-eval-mode), not at the initialization.

    Why it matters:
        A much higher initial loss means confident wrong predictions before any training:
        a last layer initialized too large, unnormalized inputs, a wrong loss (e.g. logits
        fed where probabilities are expected) or mismatched labels. The first steps are
        spent undoing the initialization ("hockey stick" loss), often with huge gradients
        that damage the rest of the network.

    Evidence:
        ``initial loss / ln(C)`` against ``max_ratio``; the initial loss (median of the first
        ``first_points`` points, cut before a blow-up: a loss that jumps from ln(C) to
        thousands at step 1 started at ln(C)), ln(C) and C; ``first val loss / ln(C)`` and
        the first val loss when the first evaluation is the problem.

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
        train_bad = initial is not None and bool(np.isfinite(ratio) and ratio > p.max_ratio)
        val0 = _first_evaluation(ctx, int(steps[0]))
        val_ratio = val0[1] / chance if val0 is not None else float("nan")
        val_bad = bool(np.isfinite(val_ratio) and val_ratio > p.max_ratio)
        if not (train_bad or val_bad):
            return []
        classes = ctx.num_classes
        parts, evidence = [], []
        if train_bad:
            parts.append(
                f"initial training loss {fmt_num(initial)} is {ratio:.1f}× the chance "
                f"level ln({classes}) = {fmt_num(chance)}: the untrained model makes "
                "confident wrong predictions"
            )
            evidence += [
                Evidence("initial loss / ln(C)", ratio, p.max_ratio, ">"),
                Evidence("initial loss", initial),  # type: ignore[arg-type]
            ]
        if val_bad:
            assert val0 is not None
            what = (
                f"while the first training loss was {fmt_num(initial)}"
                if not train_bad and initial is not None
                else "too"
            )
            parts.append(
                f"the first evaluation (step {val0[0]}) gave {fmt.VAL_LOSS} {fmt_num(val0[1])}, "
                f"{fmt_num(val_ratio)}× ln({classes}) = {fmt_num(chance)}, {what}"
            )
            evidence += [
                Evidence("first val loss / ln(C)", val_ratio, p.max_ratio, ">"),
                Evidence("first val loss", val0[1]),
            ]
        evidence += [
            Evidence("chance level ln(C)", chance),
            Evidence("classes C", float(classes or 0)),
        ]
        last = int(steps[min(k, raw.size) - 1])
        span = (int(steps[0]), last) if train_bad else (val0[0], val0[0])  # type: ignore[index]
        return [
            Finding(
                signature=self.name,
                severity="warning",
                confidence=confidence(
                    max(np.nan_to_num(ratio), np.nan_to_num(val_ratio)), p.max_ratio
                ),
                summary="; ".join(parts),
                steps=span,
                evidence=tuple(evidence),
                causes=(
                    "last layer initialized too large (logits far from 0)",
                    "unnormalized inputs",
                    "softmax/sigmoid applied before a loss that expects logits",
                    "labels that do not match the outputs",
                    *(
                        (
                            "an evaluation-mode forward that differs from training (eval before "
                            "any training forward: spectral norm, BatchNorm statistics)",
                        )
                        if val_bad and not train_bad
                        else ()
                    ),
                ),
                fix="Scale the last layer's init down (zero bias or log-prior bias), "
                "normalize inputs, and pass raw logits to cross_entropy."
                if train_bad
                else "Compare the model in eval and train mode at step 0: a first evaluation "
                "far above the first training loss comes from eval-mode behaviour "
                "(see train-eval-mode), not from the initialization.",
            )
        ]


def _first_evaluation(ctx: Context, first_train_step: int) -> tuple[int, float] | None:
    """The first validation loss when it was measured before any training: logged before
    the first training loss (imported logs), or at that step when the collector's mode
    probe saw the evaluation forwards run before the first training forward. (An
    evaluation right after step 0's update is logged at step 0 as well: without the probe
    the two cannot be told apart, and a run that blows up at step 0 must not count.)"""
    c = ctx.val_loss
    if c is None or len(c) == 0:
        return None
    step, value = int(c.steps[0]), float(c.raw[0])
    if not np.isfinite(value) or step > first_train_step:
        return None
    if step == first_train_step:
        before = ctx.curve(fmt.MODE_EVALS_BEFORE_TRAIN)
        if before is None or not (len(before) and before.raw[0] > 0):
            return None
    return step, value
