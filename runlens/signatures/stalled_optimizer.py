"""Every update exactly zero while the gradients are normal."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.needs import LayerStat
from runlens.signatures._probes import LOW_PRECISION, on_steps, param_dtype
from runlens.signatures.base import NotChecked, Param, Params, Signature


class StalledOptimizer(Signature):
    """The optimizer runs but the weights do not move.

    What it detects:
        Recorded steps on which every parameter the optimizer holds that has a finite,
        non-zero gradient gets an update of exactly 0 (``update`` rows, measured as the
        weights after ``optimizer.step()`` minus before), for at least ``min_steps`` steps
        and ``min_fraction`` of the run, while the gradients stay at their earlier size.
        The learning rate at those steps says which of two causes it is: an LR of 0 (a
        schedule that ended early: a per-epoch schedule stepped every batch, a decay whose
        ``num_training_steps`` counts one epoch), or a step that did not change the
        weights (skipped by an AMP ``GradScaler`` after overflow on every step, weights
        restored after the step, ``step()`` on an optimizer without these parameters'
        gradients). Parameters stored in bf16/fp16 are left to ``bf16-stagnation`` while
        the LR is not 0 (their updates can round away).

    Why it matters:
        Training continues, the loss is logged, nothing improves: the symptoms (a flat
        loss, tiny updates, underfitting) point at the learning rate or the model while
        the optimizer is not doing anything at all.

    Evidence:
        The stalled steps (count, share of the recorded steps, first and last); the
        learning rate there; the gradient norm there against before the stall.

    How to fix:
        With an LR of 0: give the schedule the real number of optimizer steps
        (``num_training_steps = epochs * len(loader) // accumulation``), or step a
        per-epoch scheduler once per epoch. Otherwise: check that ``optimizer.step()``
        runs on the optimizer holding these parameters, that a ``GradScaler`` is not
        skipping every step (``scaler.get_scale()`` collapsing: fix the overflow), and that
        nothing reloads the weights after the step.

    References:
        PyTorch docs, "How to adjust learning rate" (``scheduler.step()`` placement) and
        ``torch.amp.GradScaler`` (skipped steps); Hugging Face transformers,
        ``get_linear_schedule_with_warmup`` (decays to 0 at ``num_training_steps``);
        Lou et al., TrainCheck (OSDI 2025).
    """

    name = "stalled-optimizer"
    summary = "updates exactly zero on trainable parameters while gradients are normal"
    category = "bug"
    severity = "error"
    requires = (f"layers:{fmt.KIND_UPDATE}", f"layers:{fmt.KIND_GRAD}")
    needs = (LayerStat(fmt.KIND_UPDATE, "norm"), LayerStat(fmt.KIND_GRAD, "norm"))
    params = (
        Param(
            "min_steps",
            10,
            "stalled recorded steps needed",
            "runlens default: a schedule that reaches 0 on the very last step is normal",
        ),
        Param(
            "min_fraction",
            0.1,
            "share of the recorded steps that must be stalled",
            "runlens default: a cosine or linear decay ends at 0 for at most a step or two",
        ),
        Param(
            "max_grad_drop",
            100.0,
            "gradient norm before the stall / during it above which the gradients vanished "
            "(then vanishing-gradients, not a stalled optimizer)",
            "runlens default",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        upd = ctx.layer(fmt.KIND_UPDATE, "norm")
        grad = ctx.layer(fmt.KIND_GRAD, "norm")
        if upd is None or grad is None:
            raise NotChecked("no update or gradient rows", "not-recorded")
        steps = np.intersect1d(upd.steps, grad.steps)
        if steps.size < p.min_steps:
            raise NotChecked.too_few(
                int(steps.size), "recorded steps with updates", int(p.min_steps)
            )
        layers = [n for n in upd.layers if n in grad.layers]
        ui = np.searchsorted(upd.steps, steps)
        gi = np.searchsorted(grad.steps, steps)
        u = upd.values[np.ix_(ui, [upd.layers.index(n) for n in layers])]
        g = grad.values[np.ix_(gi, [grad.layers.index(n) for n in layers])]
        lr = on_steps(ctx, fmt.lr_name(0), steps)
        lr_zero = np.isfinite(lr) & (lr == 0)
        low = np.array([param_dtype(ctx, n) in LOW_PRECISION for n in layers], bool)
        # Parameters whose update counts: in the optimizer (update row present) with a
        # finite non-zero gradient; low-precision ones only where the LR is 0.
        live = np.isfinite(u) & np.isfinite(g) & (g > 0)
        live &= ~low[None, :] | lr_zero[:, None]
        judged = live.any(axis=1)
        stalled = judged & ~(live & (u != 0)).any(axis=1)
        if stalled.sum() < p.min_steps or stalled.mean() < p.min_fraction:
            return []
        gsum = np.sqrt(np.nansum(np.where(live, g, 0.0) ** 2, axis=1))
        before = judged & ~stalled & (steps < steps[stalled][0])
        g_during = float(np.median(gsum[stalled]))
        g_before = float(np.median(gsum[before])) if before.any() else float("nan")
        drop = g_before / g_during if g_during > 0 else float("inf")
        if np.isfinite(drop) and drop > p.max_grad_drop:
            return []  # the gradients vanished: updates underflow, not a stalled optimizer
        st = steps[stalled]
        lr_at = lr[stalled]
        zero_lr = bool(np.isfinite(lr_at).all() and (lr_at == 0).all())
        share = float(stalled.mean())
        if zero_lr:
            cause = "the learning rate is exactly 0 there: the schedule ended early"
            fix = (
                "Give the LR schedule the real number of optimizer steps (num_training_steps "
                "= epochs * len(loader) // accumulation_steps), or step a per-epoch scheduler "
                "once per epoch, not every batch."
            )
        else:
            lr_txt = fmt_num(float(np.nanmedian(lr_at))) if np.isfinite(lr_at).any() else "unknown"
            cause = f"the learning rate is {lr_txt}: optimizer.step() did not change the weights"
            fix = (
                "Check that optimizer.step() runs on the optimizer that holds these parameters, "
                "that a GradScaler is not skipping every step (scaler.get_scale() collapsing: "
                "fix the overflow), and that nothing reloads the weights after the step."
            )
        return [
            Finding(
                signature=self.name,
                severity="error",
                confidence=0.95 if share >= 0.3 else 0.8,
                summary=(
                    f"the optimizer stalled: on {int(stalled.sum())} of {steps.size} recorded "
                    f"steps (from step {int(st[0])} to {int(st[-1])}) every update was exactly "
                    f"0 while the gradients stayed normal (norm {fmt_num(g_during)}, "
                    f"{fmt_num(g_before)} before); {cause}"
                ),
                fix=fix,
                steps=(int(st[0]), int(st[-1])),
                evidence=(
                    Evidence("stalled steps", int(stalled.sum()), p.min_steps, ">="),
                    Evidence("share of recorded steps stalled", share, p.min_fraction, ">="),
                    Evidence("first stalled step", int(st[0])),
                    Evidence(
                        "learning rate at the stalled steps (median)",
                        float(np.nanmedian(lr_at)) if np.isfinite(lr_at).any() else float("nan"),
                    ),
                    Evidence("gradient norm while stalled (median)", g_during),
                    Evidence("gradient norm before / while stalled", drop, p.max_grad_drop, "<="),
                ),
                causes=(
                    "an LR schedule that reached 0 early (wrong number of training steps, "
                    "a per-epoch schedule stepped per batch)",
                    "every optimizer step skipped (AMP GradScaler after overflow)",
                    "optimizer.step() on another optimizer, or the weights reloaded after it",
                ),
            )
        ]
