"""A one-batch overfit run that did not reach (near) zero loss, or lost gradient flow."""

from __future__ import annotations

import math

import numpy as np
from runlens_collect import format as fmt

from runlens import series as S
from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.needs import LayerStat
from runlens.sanity import KIND_OVERFIT_ONE_BATCH, OverfitAnalysis, overfit_analysis
from runlens.signatures._layers import name_list
from runlens.signatures.base import NotChecked, Param, Params, Signature
from runlens.signatures.logits_as_probabilities import softmax_ce_floor


class CannotOverfitBatch(Signature):
    """The model cannot drive a single batch to (near) zero loss, or not every parameter
    receives a gradient.

    What it detects:
        On a run recorded by ``runlens_collect.overfit_one_batch`` (run kind
        ``overfit_one_batch``: many steps on one fixed batch, weight decay off), a failure
        of either check: the loss (median of the last ``tail`` points) stays above
        ``max(rel_target × initial loss, abs_target)``, or a parameter the optimizer holds
        never received a non-zero gradient. It names the likely cause from the layer data:
        parameters without gradient (a stray ``detach()``, ``torch.no_grad()``, ``.data``,
        ``requires_grad=False`` or an integer op upstream), a loss floor matching
        probabilities fed to cross-entropy, a learning rate too small to move the
        weights, a loss still falling when the run ended, or dropout kept active.
        The verdict is also ``summary.overfit_check``.

    Why it matters:
        Any reasonable network can memorize one small batch. If it cannot, more data and
        more epochs will not help: the bug is in the model, the loss or the optimizer
        wiring, and it is far cheaper to find here than after a full run.

    Evidence:
        Initial and final loss, their ratio against ``rel_target``, the target loss, the
        number of parameters without gradient (and their names as the finding's layers),
        and for the cause found: the output range and row sum against the softmax-CE floor
        ``log(1 + (C - 1) / e)``, or the median update/weight ratio against
        ``min_update_ratio``, or the loss slope over the last quarter of the run.

    How to fix:
        No gradient: find what cuts the graph before the named layers (``detach``,
        ``.item()``/``.numpy()`` round trips, ``with torch.no_grad()``, frozen parameters
        left in the optimizer). Probabilities into cross-entropy: drop the final softmax
        and pass logits. LR too small: raise it (run ``lr_range_test``). Loss still falling:
        give the test more steps. Otherwise check the labels match the inputs and the
        model has capacity for the batch.

    References:
        Karpathy, "A Recipe for Training Neural Networks" (2019): "overfit one batch";
        Goodfellow, Bengio & Courville, Deep Learning (2016), §11.5 "Debugging
        Strategies" (fit a tiny dataset); Zhang et al., "Understanding deep learning
        requires rethinking generalization" (ICLR 2017): networks memorize random labels.
    """

    name = "cannot-overfit-batch"
    summary = "one-batch overfit run failed: loss not near zero, or no gradient reaches a layer"
    category = "sanity"
    severity = "error"
    requires = ("train/loss",)
    needs = (
        LayerStat(fmt.KIND_OUTPUT, "min"),
        LayerStat(fmt.KIND_OUTPUT, "max"),
        LayerStat(fmt.KIND_OUTPUT, "row_sum_mean"),
        LayerStat(fmt.KIND_UPDATE, "update_ratio"),
        LayerStat(fmt.KIND_GRAD, "norm", "max"),
    )
    params = (
        Param(
            "rel_target",
            0.05,
            "the final loss must fall to this fraction of the initial loss",
            "runlens default (a healthy MLP with Adam reaches < 1% of its initial "
            "cross-entropy on one batch of 32 in 300 steps)",
        ),
        Param("abs_target", 1e-3, "a final loss at or below this passes whatever the start"),
        Param("tail", 5, "last points whose median is the final loss"),
        Param(
            "min_update_ratio",
            1e-5,
            "median ||update|| / ||weight|| below this names a too-small learning rate",
            "runlens default; healthy Adam/SGD training sits near 1e-3 (Karpathy, CS231n "
            "'ratio of weights:updates')",
        ),
        Param(
            "sum_tol",
            1e-3,
            "|mean output row sum - 1| within this counts as softmax outputs",
            "as logits-as-probabilities",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        if ctx.run.kind != KIND_OVERFIT_ONE_BATCH:
            raise NotChecked(
                f"only one-batch overfit runs (kind {KIND_OVERFIT_ONE_BATCH}) are checked",
                "not-applicable",
            )
        a = overfit_analysis(ctx, p.rel_target, p.abs_target, int(p.tail))
        if a is None:
            c = ctx.train_loss
            n = int(np.isfinite(c.raw).sum()) if c is not None else 0
            raise NotChecked.too_few(n, f"finite {fmt.TRAIN_LOSS} points", 2)
        if a.check.passed:
            return []
        check = a.check
        initial = check.initial_loss or float("nan")
        final = check.final_loss if check.final_loss is not None else float("nan")
        evidence = [
            Evidence("final loss / initial loss", final / initial, p.rel_target, ">"),
            Evidence("initial loss", initial),
            Evidence("final loss", final, check.target_loss, ">"),
            Evidence("steps", check.steps),
        ]
        causes: list[str] = []
        problems: list[str] = []
        if check.layers_without_grad:
            n = len(check.layers_without_grad)
            evidence.append(Evidence("parameters without gradient", n, 0, ">"))
            problems.append(
                f"{n} of {a.checked_params} parameters never received a gradient "
                f"({name_list(check.layers_without_grad)})"
            )
            causes.append(
                f"no gradient reaches {name_list(check.layers_without_grad)}: a detach(), "
                "torch.no_grad(), .data/.item() round trip or requires_grad=False upstream"
            )
        elif a.grads_ok is None:
            problems.append("gradient flow could not be checked (no gradient statistics)")
        if not a.loss_ok:
            problems.append(
                f"the loss went from {fmt_num(initial)} to {fmt_num(final)}, not below "
                f"{fmt_num(check.target_loss)}"
            )
            causes += _loss_causes(ctx, a, p, evidence, fallback=not causes)
        if not causes:
            causes.append("the parameters above get no gradient; the loss fell without them")
        return [
            Finding(
                signature=self.name,
                severity="error",
                confidence=1.0 if check.layers_without_grad or not a.loss_ok else 0.6,
                summary="the model cannot overfit one batch: " + "; ".join(problems),
                fix=_fix(causes),
                steps=ctx.steps,
                layers=check.layers_without_grad,
                evidence=tuple(evidence),
                causes=tuple(causes),
            )
        ]


def _loss_causes(
    ctx: Context, a: OverfitAnalysis, p: Params, evidence: list[Evidence], fallback: bool
) -> list[str]:
    """Why the loss stayed up, most specific first, from output, update and loss data."""
    causes: list[str] = []
    final = a.check.final_loss
    lo = ctx.layer(fmt.KIND_OUTPUT, "min")
    hi = ctx.layer(fmt.KIND_OUTPUT, "max")
    rs = ctx.layer(fmt.KIND_OUTPUT, "row_sum_mean")
    classes = ctx.num_classes
    if lo is not None and hi is not None and rs is not None and final is not None:
        mn, mx, s = (float(np.nanmedian(m.values[-5:, 0])) for m in (lo, hi, rs))
        if mn >= -1e-6 and mx <= 1 + 1e-6 and abs(s - 1) <= p.sum_tol and classes:
            floor = softmax_ce_floor(int(classes))
            evidence.append(Evidence("output row sum (softmax outputs)", s, 1.0, "≈"))
            evidence.append(Evidence("softmax-CE loss floor log(1+(C-1)/e)", floor))
            if final >= 0.9 * floor:
                causes.append(
                    f"the loss floor {fmt_num(final)} matches cross-entropy applied to "
                    f"probabilities (floor {fmt_num(floor)} for {classes} classes): the "
                    "model ends in softmax and the loss applies it again"
                )
    upd = ctx.layer(fmt.KIND_UPDATE, "update_ratio")
    if upd is not None and np.isfinite(upd.values).any():
        ratio = float(np.nanmedian(upd.values))
        if ratio < p.min_update_ratio:
            evidence.append(Evidence("median update/weight ratio", ratio, p.min_update_ratio, "<"))
            lr = ctx.lr.last_finite(smoothed=False) if ctx.lr is not None else None
            at = f" at lr {fmt_num(lr[1])}" if lr else ""
            causes.append(
                f"the learning rate{at} is too small to move the weights (updates are "
                f"{fmt_num(ratio)} of the weights per step)"
            )
    c = ctx.train_loss
    if c is not None and len(c) >= 8:
        q = c.between(int(c.steps[-len(c) // 4]), int(c.steps[-1]))
        slope = S.robust_slope(q.steps, q.smooth)
        level = float(np.nanmean(np.abs(q.smooth))) or 1.0
        # Falling by more than 25% of its level over the last quarter: not converged yet.
        if math.isfinite(slope) and -slope * (q.steps[-1] - q.steps[0]) > 0.25 * level:
            evidence.append(Evidence("loss slope over the last quarter", slope, 0, "<"))
            causes.append("the loss was still falling when the run ended: more steps needed")
    types = ctx.run.module_types.values()
    if any(t.startswith("Dropout") or t.endswith("Dropout") for t in types):
        causes.append("dropout stays active during the test and keeps the loss above zero")
    if not causes and fallback:
        causes.append(
            "labels inconsistent with inputs (e.g. duplicates with different labels), or "
            "too little capacity for the batch"
        )
    return causes


def _fix(causes: list[str]) -> str:
    text = " ".join(causes)
    if "no gradient" in text:
        return (
            "Find what cuts the graph before the named layers (detach, no_grad, .data, "
            "frozen parameters) and reconnect them."
        )
    if "probabilities" in text:
        return "Remove the final softmax and pass raw logits to CrossEntropyLoss."
    if "learning rate" in text:
        return "Raise the learning rate (find one with lr_range_test)."
    if "more steps" in text:
        return "Run the overfit test for more steps."
    return (
        "Check the labels against the inputs and the model's capacity; remove dropout "
        "for the test if it is heavy."
    )
