"""A model that learns nothing: loss at the chance level, accuracy frozen at one value."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens import levels as L
from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.signatures._curves import TINY, finite_points
from runlens.signatures.base import NotChecked, Param, Params, Signature, run_parts

ACCURACIES = (fmt.VAL_ACCURACY, "train/accuracy")


class NotLearning(Signature):
    """The model learns nothing: its loss stays at the chance level, or its accuracy
    stays at one value for the whole run.

    What it detects:
        Two independent parts; either one is a finding.

        *Loss at chance.* For a single-label classification with C classes (the task
        stated or recorded, see runlens.task), the training loss after the warm-up never
        gets more than ``band`` below ln(C), the loss of a uniform guess, and ends within
        ``band`` of it. Without a known C this part does not run (the report's coverage
        says so).

        *Accuracy frozen.* The validation accuracy (the training accuracy when there is no
        validation one) spans less than ``max_acc_range`` (absolute) over all its points,
        at least ``min_points`` of them, while the loss beside it (training loss, else
        validation loss) never drops more than ``max_drop`` below its first level. A model
        that predicts one class, or the same answers whatever it is fed, scores the same
        accuracy at every evaluation; this needs no task information.

    Why it matters:
        A model at chance has learned at most the class priors: every step is wasted. The
        causes are setup bugs, not tuning: labels that do not match the inputs (shuffled,
        misaligned), a learning rate so small nothing moves, frozen parameters, a model
        whose output ignores its input (a collapsed layer, a wrong head).

    Evidence:
        Loss at chance: the lowest and the late training-loss level / ln(C) against the
        band, ln(C) and C. Accuracy frozen: the accuracy's range against
        ``max_acc_range``, its value, the number of points, and the loss's largest drop
        against ``max_drop``.

    How to fix:
        Check that inputs and labels are paired correctly (shuffle them together; look at
        a few examples with their labels), that the optimizer holds the model's parameters
        and the learning rate is not ~0, that the head has C outputs and receives the
        features; then try to overfit a single batch: a working setup drives its loss
        toward 0 within a few hundred steps.

    References:
        Karpathy, "A Recipe for Training Neural Networks" (2019): verify loss at init,
        overfit one batch; Zhang et al., "Understanding Deep Learning Requires Rethinking
        Generalization" (ICLR 2017): random labels; Wardat et al., DeepDiagnosis
        (ICSE 2022), "accuracy not increasing".
    """

    name = "not-learning"
    summary = "loss at the chance level or accuracy frozen at one value for the whole run"
    category = "curve"
    severity = "error"
    requires = ("train/loss|val/accuracy|train/accuracy",)
    params = (
        Param(
            "band",
            0.05,
            "relative distance from ln(C) within which the training loss counts as at chance",
            "runlens default: a model that learned something beyond the priors of a "
            "balanced task gets its loss more than 5% below ln(C)",
        ),
        Param(
            "max_acc_range",
            0.005,
            "largest range (max − min, absolute) of an accuracy that counts as frozen",
            "development corpus: the four not-learning runs of tb-hf-lora-runs-parent span "
            "0.0001–0.0015; learning logs span ≥ 0.0085 (0.0048 for a 5-epoch fine-tune "
            "whose loss fell 33%, hence max_drop)",
        ),
        Param(
            "max_drop",
            0.05,
            "largest relative drop of the loss below its first level that still counts as "
            "not learning (frozen-accuracy part)",
            "matches loss-flat's max_drop",
        ),
        Param("min_points", 5, "accuracy points needed for the frozen-accuracy part"),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        parts = [("training loss compared with the chance level", lambda: _at_chance(ctx, p))]
        # Most logs have no accuracy: then there is nothing to check, and nothing missing.
        if any(ctx.curve(n) is not None for n in ACCURACIES):
            parts.append(("accuracy frozen at one value", lambda: _frozen(ctx, p)))
        return [f for f in run_parts(ctx, parts) if f is not None]


_CAUSES = (
    "labels that do not match the inputs (shuffled or misaligned)",
    "learning rate ~0, or parameters frozen / not given to the optimizer",
    "a model whose output ignores its input (collapsed layer, wrong head)",
)
_FIX = (
    "Check that inputs and labels are paired, that optimizer.step() updates the model's "
    "parameters at a sane LR, and that the setup can overfit one batch."
)


def _at_chance(ctx: Context, p: Params) -> Finding | None:
    chance = ctx.task.chance_level
    if chance is None:
        kind, why = ctx.task.why_no_chance()
        raise NotChecked(why, kind)  # type: ignore[arg-type]
    c = ctx.train_loss
    if c is None:
        raise NotChecked(f"no {fmt.TRAIN_LOSS} recorded", "not-recorded")
    steps, raw = finite_points(c)
    keep = steps > ctx.transient_end
    steps, raw = steps[keep], raw[keep]
    if raw.size < MIN_LOSS_POINTS:
        raise NotChecked.too_few(
            int(raw.size), f"finite {fmt.TRAIN_LOSS} points", MIN_LOSS_POINTS,
            f"after the warm-up (step {ctx.transient_end})",
        )  # fmt: skip
    level = L.level_curve(raw, L.level_window(raw.size))
    low = float(np.min(level))
    late = float(np.median(raw[3 * raw.size // 4 :]))
    if not (low >= (1 - p.band) * chance and abs(late - chance) <= p.band * chance):
        return None
    n = ctx.num_classes
    return Finding(
        signature="not-learning",
        severity="error",
        confidence=0.9,
        summary=(
            f"the training loss stayed at the chance level ln({n}) = {fmt_num(chance)}: "
            f"never below {fmt_num(low)}, {fmt_num(late)} at the end (step {int(steps[-1])})"
        ),
        steps=(int(steps[0]), int(steps[-1])),
        evidence=(
            Evidence("lowest level / ln(C)", low / chance, 1 - p.band, ">="),
            Evidence("late level / ln(C)", late / chance),
            Evidence("chance level ln(C)", chance),
            Evidence("classes C", n if n is not None else float("nan")),
        ),
        causes=_CAUSES,
        fix=_FIX,
        series=(fmt.TRAIN_LOSS,),
    )


MIN_LOSS_POINTS = 5
"""Training-loss points after the warm-up needed to say it stayed at chance."""


def _frozen(ctx: Context, p: Params) -> Finding | None:
    name = next(n for n in ACCURACIES if ctx.curve(n) is not None)
    c = ctx.curve(name)
    assert c is not None
    steps, acc = finite_points(c)
    need = int(p.min_points)
    if acc.size < need:
        raise NotChecked.too_few(int(acc.size), f"finite {name} points", need)
    span = float(np.ptp(acc))
    if span >= p.max_acc_range:
        return None
    loss_name = fmt.TRAIN_LOSS if ctx.train_loss is not None else fmt.VAL_LOSS
    loss = ctx.curve(loss_name)
    drop = float("nan")
    if loss is not None:
        _, lraw = finite_points(loss)
        if lraw.size:
            level = L.level_curve(lraw, L.level_window(lraw.size))
            drop = float((level[0] - np.min(level)) / max(abs(level[0]), TINY))
    if not np.isfinite(drop):
        raise NotChecked(
            "no finite loss beside the accuracy to tell a frozen model from a converged one",
            "not-recorded",
        )
    if drop >= p.max_drop:
        return None  # the loss still moves: the model learns, its accuracy just plateaued
    value = float(np.median(acc))
    unit = ctx.x_unit
    return Finding(
        signature="not-learning",
        severity="error",
        confidence=0.8,
        summary=(
            f"{name} stayed at {value:.2%} (range {span:.2%}) over all {acc.size} points "
            f"({unit} {int(steps[0])}–{int(steps[-1])}) while {loss_name} never dropped more "
            f"than {drop:.1%}: the model gives the same answers whatever it learns from"
        ),
        steps=(int(steps[0]), int(steps[-1])),
        evidence=(
            Evidence(f"{name} range", span, p.max_acc_range, "<"),
            Evidence(f"{name} (median)", value),
            Evidence("points", int(acc.size), need, ">="),
            Evidence(f"largest drop of {loss_name}", drop, p.max_drop, "<"),
        ),
        causes=_CAUSES,
        fix=_FIX,
        series=(name, loss_name),
    )
