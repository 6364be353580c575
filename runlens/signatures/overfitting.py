"""Validation getting worse while training keeps improving."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens import series as S
from runlens.context import Context, Curve
from runlens.findings import Evidence, Finding, fmt_num
from runlens.signatures._curves import TINY, confidence, finite_points
from runlens.signatures.base import NotChecked, Param, Params, Signature


class Overfitting(Signature):
    """Validation loss rises (or validation accuracy falls) while the training loss keeps
    falling: the train/validation gap widens.

    What it detects:
        The validation loss (rolling median of 3 evaluations) reaches its best value and
        then ends at least ``min_rise`` above it, over at least ``min_evals`` later
        evaluations, while the training loss at the end is no higher than at the best
        validation step. Without a validation loss, the same on validation accuracy with an
        absolute drop of ``min_acc_drop``.

    Why it matters:
        The model is memorizing the training set instead of learning what generalizes.
        Every step after the best validation point makes the deployed model worse; the best
        checkpoint is the one at that step.

    Evidence:
        The best and final validation values and the step of the best; the relative rise
        (or accuracy drop) against its threshold; the training loss at both points; the
        train/validation gap at both points.

    How to fix:
        Stop early at the best validation step (keep that checkpoint); add regularization
        (weight decay, dropout, data augmentation), get more data, or use a smaller model.

    References:
        Prechelt, "Early Stopping — But When?" (1998); Goodfellow et al., Deep Learning
        (2016) §7.8; Zhang et al., AUTOTRAINER (ICSE 2021).
    """

    name = "overfitting"
    summary = "validation getting worse while training improves; a widening gap"
    category = "curve"
    severity = "warning"
    requires = ("train/loss", "val/loss|val/accuracy")
    params = (
        Param(
            "min_rise",
            0.1,
            "final validation loss above its best by this fraction of the best",
            "runlens default; Prechelt's generalization-loss criterion GL_α uses α≈5–20%",
        ),
        Param(
            "min_acc_drop",
            0.03,
            "absolute drop of validation accuracy from its best (when no val loss)",
            "runlens default",
        ),
        Param("min_evals", 3, "validation evaluations needed after the best one"),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        train = ctx.train_loss
        if train is None:
            raise NotChecked(f"no {fmt.TRAIN_LOSS} recorded", "not-recorded")
        t_steps, t_raw = finite_points(train)
        if t_raw.size < MIN_TRAIN_POINTS:
            raise NotChecked.too_few(
                int(t_raw.size), f"finite {fmt.TRAIN_LOSS} points", MIN_TRAIN_POINTS
            )
        t_level = S.rolling_median(t_raw, max(5, t_raw.size // 20) | 1)
        need = int(p.min_evals) + 2
        counts = []
        for name, on in ((fmt.VAL_LOSS, self._on_loss), (fmt.VAL_ACCURACY, self._on_accuracy)):
            c = ctx.curve(name)
            if c is None:
                continue
            n = int(np.isfinite(c.raw).sum())
            if n >= need:
                return on(ctx, p, t_steps, t_level)
            counts.append(f"{n} {name}")
        raise NotChecked(
            f"only {' and '.join(counts)} evaluations with a finite value, needs {need} "
            f"(min_evals {int(p.min_evals)} after the best one)",
            "too-few-points",
        )

    def _on_loss(
        self, ctx: Context, p: Params, t_steps: np.ndarray, t_level: np.ndarray
    ) -> list[Finding]:
        assert ctx.val_loss is not None
        steps, i_best, after, best, final = _best_and_final(ctx.val_loss, lowest=True)
        rise = (final - best) / max(abs(best), TINY)
        if after < p.min_evals or not np.isfinite(rise) or rise < p.min_rise:
            return []
        b_step, e_step = int(steps[i_best]), int(steps[-1])
        train_at = _train_fell(t_steps, t_level, b_step, e_step)
        if train_at is None:
            return []  # training got worse too: not overfitting (divergence, drift)
        tb, te = train_at
        gap_b, gap_e = best - tb, final - te
        return [
            Finding(
                signature=self.name,
                severity="warning",
                confidence=confidence(rise, p.min_rise),
                summary=(
                    f"validation loss rose {rise:.0%} from its best {fmt_num(best)} at step "
                    f"{b_step} to {fmt_num(final)} while training loss fell "
                    f"{fmt_num(tb)} → {fmt_num(te)}; the gap widened "
                    f"{fmt_num(gap_b)} → {fmt_num(gap_e)}"
                ),
                steps=(b_step, e_step),
                evidence=(
                    Evidence("val loss rise / best", rise, p.min_rise, ">="),
                    Evidence("best val loss", best),
                    Evidence("best val step", b_step),
                    Evidence("final val loss", final),
                    Evidence("train loss at best val step", tb),
                    Evidence("final train loss", te),
                    Evidence("gap at best val step", gap_b),
                    Evidence("final gap", gap_e),
                ),
                causes=_CAUSES,
                fix=_fix(b_step),
            )
        ]

    def _on_accuracy(
        self, ctx: Context, p: Params, t_steps: np.ndarray, t_level: np.ndarray
    ) -> list[Finding]:
        acc = ctx.curve(fmt.VAL_ACCURACY)
        assert acc is not None
        steps, i_best, after, best, final = _best_and_final(acc, lowest=False)
        drop = best - final
        if after < p.min_evals or not np.isfinite(drop) or drop < p.min_acc_drop:
            return []
        b_step, e_step = int(steps[i_best]), int(steps[-1])
        train_at = _train_fell(t_steps, t_level, b_step, e_step)
        if train_at is None:
            return []
        tb, te = train_at
        return [
            Finding(
                signature=self.name,
                severity="warning",
                confidence=confidence(drop, p.min_acc_drop),
                summary=(
                    f"validation accuracy fell from {best:.1%} at step {b_step} to "
                    f"{final:.1%} while training loss fell {fmt_num(tb)} → {fmt_num(te)}"
                ),
                steps=(b_step, e_step),
                evidence=(
                    Evidence("val accuracy drop", drop, p.min_acc_drop, ">="),
                    Evidence("best val accuracy", best),
                    Evidence("best val step", b_step),
                    Evidence("final val accuracy", final),
                    Evidence("train loss at best val step", tb),
                    Evidence("final train loss", te),
                ),
                causes=_CAUSES,
                fix=_fix(b_step),
            )
        ]


MIN_TRAIN_POINTS = 10
"""Fewer finite training-loss points: no smoothed training curve to compare against."""

_CAUSES = (
    "model too large for the amount of training data",
    "too little regularization (weight decay, dropout, augmentation)",
    "noisy labels being memorized",
    "training far past the best validation point",
)


def _best_and_final(c: Curve, lowest: bool) -> tuple[np.ndarray, int, int, float, float]:
    """(steps, index of the best point, evaluations after it, best level, final level)
    of a validation curve; best is the lowest (loss) or highest (accuracy) median of 3."""
    steps, raw = finite_points(c)
    level = S.rolling_median(raw, 3)
    i_best = int(np.argmin(level) if lowest else np.argmax(level))
    return steps, i_best, raw.size - 1 - i_best, float(level[i_best]), float(np.median(raw[-3:]))


def _train_fell(
    t_steps: np.ndarray, t_level: np.ndarray, b_step: int, e_step: int
) -> tuple[float, float] | None:
    """Smoothed training loss at the best-val and last steps; None unless it did not rise."""
    tb, te = (float(x) for x in S.align(t_steps, t_level, np.array([b_step, e_step])))
    if not (np.isfinite(tb) and np.isfinite(te)) or te > tb:
        return None
    return tb, te


def _fix(b_step: int) -> str:
    return (
        f"Keep the checkpoint from step {b_step} (early stopping); add weight "
        "decay/dropout/augmentation, more data, or use a smaller model."
    )
