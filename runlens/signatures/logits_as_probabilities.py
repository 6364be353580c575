"""The loss is fed softmax outputs: probabilities where logits are expected."""

from __future__ import annotations

import math

import numpy as np
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.needs import LayerStat
from runlens.signatures import _layers as L
from runlens.signatures._curves import require_chance
from runlens.signatures.base import NotChecked, Param, Params, Signature


def softmax_ce_floor(num_classes: int) -> float:
    """Lowest cross-entropy reachable when the logits are probabilities: the correct class
    at 1 and the others at 0 give ``-log(e / (e + C - 1)) = log(1 + (C - 1) / e)``."""
    return math.log1p((num_classes - 1) / math.e)


class LogitsAsProbabilities(Signature):
    """Softmax (probabilities) fed to a loss that applies its own softmax.

    What it detects:
        The model's output rows lie in [0, 1] and sum to 1 (within ``sum_tol``) on at least
        ``min_fraction`` of the recorded steps — the model ends with a softmax — *and* the
        training loss never goes below the floor that cross-entropy on probabilities can
        reach, ``log(1 + (C - 1) / e)`` for ``C`` classes (1.46 for 10 classes), less a
        ``floor_tol`` margin. A model that outputs probabilities but is trained correctly
        (``NLLLoss`` on their log) goes below that floor and is not flagged. ``C`` is the
        stated class count of a classification task (see ``bad-initial-loss``); without
        one the check does not run.

    Why it matters:
        ``CrossEntropyLoss`` applies ``log_softmax`` itself. Fed probabilities, it
        squashes them a second time: the logits span only [0, 1], so the loss can never go
        below the floor, gradients are tiny and nearly uniform, and training stalls or
        crawls while looking "fine".

    Evidence:
        The output range and mean row sum, the share of steps that look like
        probabilities, the number of classes, the lowest smoothed training loss and the
        floor.

    How to fix:
        Remove the final ``nn.Softmax``/``softmax`` from the model and feed raw logits to
        ``CrossEntropyLoss`` (apply softmax only at inference), or keep ``log_softmax``
        in the model and use ``NLLLoss``. The same holds for ``sigmoid`` +
        ``BCEWithLogitsLoss`` (use ``BCELoss``, or better drop the sigmoid).

    References:
        PyTorch docs, ``torch.nn.CrossEntropyLoss`` ("The input is expected to contain the
        unnormalized logits"); Schoop et al., "UMLAUT" (CHI 2021) — the softmax-before-loss
        check; Wardat et al., "DeepDiagnosis" (ICSE 2022).
    """

    name = "logits-as-probabilities"
    summary = "softmax outputs fed to a cross-entropy loss (loss floor well above zero)"
    category = "layer"
    severity = "error"
    requires = ("layers:output", "train/loss")
    needs = (
        LayerStat(fmt.KIND_OUTPUT, "min"),
        LayerStat(fmt.KIND_OUTPUT, "max"),
        LayerStat(fmt.KIND_OUTPUT, "row_sum_mean"),
    )
    params = (
        Param(
            "sum_tol",
            1e-3,
            "largest |mean row sum - 1| for outputs to count as probabilities",
            "runlens default: float32 softmax rows sum to 1 within ~1e-6",
        ),
        Param(
            "min_fraction",
            0.9,
            "share of recorded output steps that must look like probabilities",
            "runlens default",
        ),
        Param(
            "floor_tol",
            0.05,
            "relative margin below the softmax-CE floor the loss may reach and still be "
            "flagged (smoothing noise)",
            "runlens default",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        lo = ctx.layer(fmt.KIND_OUTPUT, "min")
        hi = ctx.layer(fmt.KIND_OUTPUT, "max")
        rs = ctx.layer(fmt.KIND_OUTPUT, "row_sum_mean")
        loss = ctx.train_loss
        if lo is None or hi is None or rs is None or loss is None:
            raise NotChecked(
                "no output min/max/row_sum_mean statistics or no training loss", "not-recorded"
            )
        require_chance(ctx)  # the softmax-CE floor needs C: classification only
        classes = ctx.num_classes
        assert classes is not None
        j = _output_column(lo.layers)
        mn, mx, s = lo.values[:, j], hi.values[:, j], rs.values[:, j]
        valid = np.isfinite(mn) & np.isfinite(mx) & np.isfinite(s)
        if valid.sum() < 3:
            raise NotChecked.too_few(int(valid.sum()), "steps with finite output statistics", 3)
        with np.errstate(invalid="ignore"):
            probs = valid & (mn >= -1e-6) & (mx <= 1 + 1e-6) & (np.abs(s - 1) <= p.sum_tol)
        share = float(probs.sum() / valid.sum())
        if share < p.min_fraction:
            return []
        finite = np.isfinite(loss.smooth)
        if finite.sum() < 3:
            raise NotChecked.too_few(int(finite.sum()), f"finite {fmt.TRAIN_LOSS} points", 3)
        floor = softmax_ce_floor(int(classes))
        i = int(np.nanargmin(np.where(finite, loss.smooth, np.nan)))
        best = float(loss.smooth[i])
        if best < floor * (1 - p.floor_tol):
            return []
        sp = L.span(lo.steps, probs)
        return [
            Finding(
                signature=self.name,
                severity="error",
                confidence=float(min(1.0, 0.6 + 0.4 * share * min(1.0, floor / max(best, 1e-9)))),
                summary=(
                    f"model outputs are probabilities (range {fmt_num(float(np.nanmin(mn)))}–"
                    f"{fmt_num(float(np.nanmax(mx)))}, rows sum to "
                    f"{fmt_num(float(np.nanmedian(s)))} on {share:.0%} of steps) and the "
                    f"training loss never went below {fmt_num(best)} (step {int(loss.steps[i])}), "
                    f"above the floor {fmt_num(floor)} of cross-entropy on softmax outputs for "
                    f"{classes} classes: the loss is applying softmax twice"
                ),
                fix="Remove the final softmax from the model and feed raw logits to "
                "CrossEntropyLoss (or use log_softmax + NLLLoss).",
                steps=sp,
                layers=(fmt.OUTPUT_LAYER,),
                evidence=(
                    Evidence("output min", float(np.nanmin(mn)), 0.0, ">="),
                    Evidence("output max", float(np.nanmax(mx)), 1.0, "<="),
                    Evidence(
                        "|mean row sum - 1| (median)",
                        float(np.nanmedian(np.abs(s - 1))),
                        p.sum_tol,
                        "<=",
                    ),
                    Evidence(
                        "share of steps with probability outputs", share, p.min_fraction, ">="
                    ),
                    Evidence("number of classes", float(classes)),
                    Evidence("lowest smoothed train loss", best, floor, ">="),
                ),
                causes=(
                    "nn.Softmax at the end of the model with nn.CrossEntropyLoss",
                    "sigmoid outputs fed to BCEWithLogitsLoss",
                ),
            )
        ]


def _output_column(layers: tuple[str, ...]) -> int:
    return layers.index(fmt.OUTPUT_LAYER) if fmt.OUTPUT_LAYER in layers else 0
