"""Validation getting worse while training keeps improving."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from runlens_collect import format as fmt

from runlens import levels as L
from runlens import series as S
from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.signatures._curves import TINY, confidence, finite_points, loss_scale, start_level
from runlens.signatures.base import NotChecked, Param, Params, Signature


class Overfitting(Signature):
    """Validation loss rises (or validation accuracy falls) while the training loss keeps
    falling: the train/validation gap widens.

    What it detects:
        The validation loss reaches its best level and then ends at least ``min_rise``
        above it, over at least ``min_evals`` later evaluations (a third of the
        evaluations, at least 1, when there are fewer than ``3 × min_evals``: an
        epoch-level log with 3 evaluations is checked), while the training loss at the end
        is not higher than at the best validation step by more than ``min_rise`` of its
        scale (the larger of its level and its improvement since the start: a per-batch
        loss wobbling near 0 after falling from 0.6 has not risen). Best and final are the report's
        levels (runlens.levels: medians of a few evaluations around each one, each
        evaluation on its own below 10 of them; the numbers the header shows). The
        training loss is read at the evaluation steps; an evaluation logged after the last
        training-loss point (the end-of-epoch evaluation) pairs with that last point when
        it lies within one logging interval of it. Without a validation loss, the same on
        validation accuracy with an absolute drop of ``min_acc_drop``.
        While the run is still being written (``ctx.final`` False: ``runlens watch``), the
        evaluations after the best must also trend up (down for accuracy): a one-sided
        Mann–Kendall test at the 5% level (z >= 1.645, so at least 4 evaluations after the
        best). A validation loss that jumped and is coming back down, or wanders around a
        plateau, is not yet overfitting; the final analysis judges the level it ends at.

    Why it matters:
        The model is memorizing the training set instead of learning what generalizes.
        Every step after the best validation point makes the deployed model worse; the best
        checkpoint is the one at that step.

    Evidence:
        The best and final validation values and the step of the best; the relative rise
        (or accuracy drop) against its threshold; the training loss at both points; the
        train/validation gap at both points.

    How to fix:
        Stop early at the best validation step (keep that checkpoint; when the run logs a
        task metric such as WER or accuracy whose best step differs, both steps are named);
        add regularization (weight decay, dropout, data augmentation), get more data, or
        use a smaller model.

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
        Param(
            "min_evals",
            3,
            "validation evaluations needed after the best one (a third of the evaluations, "
            "at least 1, on shorter logs)",
            "runlens default; lowered on short logs because a 3-epoch fine-tune "
            "(hf-bert-mood-3ep, dev corpus) overfits in its last epoch",
        ),
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
        # The report's level of the training loss at each point (runlens.levels).
        t_level = L.level_curve(t_raw, L.level_window(t_raw.size))
        counts = []
        for name, on in ((fmt.VAL_LOSS, self._on_loss), (fmt.VAL_ACCURACY, self._on_accuracy)):
            c = ctx.curve(name)
            if c is None:
                continue
            v_steps, _ = finite_points(c)
            if v_steps.size >= MIN_EVALS:
                hold = max(S.typical_gap(t_steps), S.typical_gap(v_steps))
                start = start_level(train)
                tv = _Train(t_steps, t_level, hold, t_raw[0] if start is None else start)
                return on(ctx, p, tv, _evals_after(p, v_steps.size))
            counts.append(f"{v_steps.size} {name}")
        raise NotChecked(
            f"only {' and '.join(counts)} evaluations with a finite value, needs {MIN_EVALS}",
            "too-few-points",
        )

    def _on_loss(self, ctx: Context, p: Params, tv: _Train, min_after: int) -> list[Finding]:
        assert ctx.val_loss is not None
        got = _best_and_final(ctx, fmt.VAL_LOSS)
        if got is None:
            return []
        b_step, e_step, after, best, final = got
        rise = (final - best) / max(abs(best), TINY)
        if after < min_after or not np.isfinite(rise) or rise < p.min_rise:
            return []
        trend = _live_trend(ctx, fmt.VAL_LOSS, b_step, +1)
        if trend is not None and trend.value < trend.threshold:
            return []
        unit = ctx.x_unit
        train_at = _train_fell(tv, b_step, e_step, p.min_rise)
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
                    f"validation loss rose {rise:.0%} from its best {fmt_num(best)} at {unit} "
                    f"{b_step} to {fmt_num(final)} while training loss {_went(tb, te)} "
                    f"{fmt_num(tb)} → {fmt_num(te)}; the gap widened "
                    f"{fmt_num(gap_b)} → {fmt_num(gap_e)}"
                ),
                steps=(b_step, e_step),
                evidence=(
                    Evidence("val loss rise / best", rise, p.min_rise, ">="),
                    Evidence("evaluations after the best", after, min_after, ">="),
                    Evidence("best val loss", best),
                    Evidence(f"best val {unit}", b_step),
                    Evidence("final val loss", final),
                    Evidence(f"train loss at best val {unit}", tb),
                    Evidence("final train loss", te),
                    Evidence(f"gap at best val {unit}", gap_b),
                    Evidence("final gap", gap_e),
                    *((trend,) if trend is not None else ()),
                    *_task_evidence(ctx, fmt.VAL_LOSS),
                ),
                causes=_CAUSES,
                fix=_fix(ctx, b_step, "lowest val loss", fmt.VAL_LOSS),
                series=(fmt.VAL_LOSS, fmt.TRAIN_LOSS),
            )
        ]

    def _on_accuracy(self, ctx: Context, p: Params, tv: _Train, min_after: int) -> list[Finding]:
        acc = ctx.curve(fmt.VAL_ACCURACY)
        assert acc is not None
        got = _best_and_final(ctx, fmt.VAL_ACCURACY)
        if got is None:
            return []
        b_step, e_step, after, best, final = got
        drop = best - final
        if after < min_after or not np.isfinite(drop) or drop < p.min_acc_drop:
            return []
        trend = _live_trend(ctx, fmt.VAL_ACCURACY, b_step, -1)
        if trend is not None and trend.value < trend.threshold:
            return []
        unit = ctx.x_unit
        train_at = _train_fell(tv, b_step, e_step, p.min_rise)
        if train_at is None:
            return []
        tb, te = train_at
        return [
            Finding(
                signature=self.name,
                severity="warning",
                confidence=confidence(drop, p.min_acc_drop),
                summary=(
                    f"validation accuracy fell from {best:.1%} at {unit} {b_step} to "
                    f"{final:.1%} while training loss {_went(tb, te)} {fmt_num(tb)} → "
                    f"{fmt_num(te)}"
                ),
                steps=(b_step, e_step),
                evidence=(
                    Evidence("val accuracy drop", drop, p.min_acc_drop, ">="),
                    Evidence("best val accuracy", best),
                    Evidence(f"best val {unit}", b_step),
                    Evidence("final val accuracy", final),
                    Evidence(f"train loss at best val {unit}", tb),
                    Evidence("final train loss", te),
                    *((trend,) if trend is not None else ()),
                    *_task_evidence(ctx, fmt.VAL_ACCURACY),
                ),
                causes=_CAUSES,
                fix=_fix(ctx, b_step, "best val accuracy", fmt.VAL_ACCURACY),
                series=(fmt.VAL_ACCURACY, fmt.TRAIN_LOSS),
            )
        ]


MIN_TRAIN_POINTS = 2
"""Fewer finite training-loss points: no training trend to compare against."""

MIN_EVALS = 3
"""Fewer finite evaluations: no best with a later one to compare it with (3: the best may
be the middle one of a 3-epoch log)."""


def _evals_after(p: Params, n: int) -> int:
    """Evaluations needed after the best: ``min_evals``, or a third of the ``n``
    evaluations (at least 1) when that is fewer, so short epoch-level logs are checked."""
    return int(max(1, min(int(p.min_evals), n // 3)))


_CAUSES = (
    "model too large for the amount of training data",
    "too little regularization (weight decay, dropout, augmentation)",
    "noisy labels being memorized",
    "training far past the best validation point",
)


def _best_and_final(ctx: Context, name: str) -> tuple[int, int, int, float, float] | None:
    """(best step, last step, evaluations after the best, best level, final level) of a
    validation curve: the report's levels (runlens.levels), so the finding cites the
    header's numbers and names the header's best step."""
    c, lv = ctx.curve(name), ctx.levels(name)
    if c is None or lv is None or lv.best is None or lv.best_step is None:
        return None
    steps, _ = finite_points(c)
    after = int(np.count_nonzero(steps > lv.best_step))
    return lv.best_step, lv.final_step, after, lv.best, lv.final


MK_MAX_POINTS = 500
LIVE_TREND_Z = 1.645
"""One-sided 5% level of the Mann–Kendall trend test, asked of a live run's rise."""


def _live_trend(ctx: Context, name: str, b_step: int, sign: int) -> Evidence | None:
    """While the run is live (``ctx.final`` False): the Mann–Kendall z of the evaluations
    after the best one, in the direction ``sign`` (+1 rising), as evidence against
    LIVE_TREND_Z; None for a finished run (its final level is judged as it is)."""
    if ctx.final:
        return None
    c = ctx.curve(name)
    assert c is not None
    steps, raw = finite_points(c)
    return Evidence(
        "trend after the best (Mann–Kendall z)",
        mann_kendall_z(sign * raw[steps > b_step]),
        LIVE_TREND_Z,
        ">=",
    )


def mann_kendall_z(x: np.ndarray) -> float:
    """Mann–Kendall trend statistic of ``x`` in order, as a normal z (continuity-corrected;
    no tie correction): > 0 rising. 0 for fewer than 3 points."""
    x = x[-MK_MAX_POINTS:]  # O(n²) pairs: the latest evaluations are the ones that matter
    n = int(x.size)
    if n < 3:
        return 0.0
    d = np.sign(x[None, :] - x[:, None])
    s = float(np.triu(d, 1).sum())
    sd = float(np.sqrt(n * (n - 1) * (2 * n + 5) / 18.0))
    return (s - np.sign(s)) / sd


def _task_evidence(ctx: Context, curve: str) -> tuple[Evidence, ...]:
    """The task metric's best level and step, when the run logs one besides ``curve``."""
    task = ctx.task_metric
    lv = ctx.levels(task) if task is not None and task != curve else None
    if lv is None or lv.best is None or lv.best_step is None:
        return ()
    return (
        Evidence(f"best {task}", lv.best),
        Evidence(f"best {task} {ctx.x_unit}", lv.best_step),
    )


@dataclass(frozen=True)
class _Train:
    """The training loss as overfitting compares it with the validation curve."""

    steps: np.ndarray
    level: np.ndarray
    """The report's level at each point (runlens.levels)."""
    hold: float
    """An evaluation this many steps past the last training point still pairs with it."""
    start: float


def _train_fell(
    tv: _Train, b_step: int, e_step: int, max_rise: float
) -> tuple[float, float] | None:
    """Training-loss level at the best-val and last evaluation steps; None when it rose
    between them by more than ``max_rise`` of its scale (training got worse too:
    divergence or drift, not overfitting). The scale is the larger of the level and the
    improvement since the start, so a per-batch loss wobbling near 0 (1e-3 → 9e-3 after
    falling from 0.6) does not count as a rise."""
    at = S.align(tv.steps, tv.level, np.array([b_step, e_step]), hold=tv.hold)
    tb, te = (float(x) for x in at)
    if not (np.isfinite(tb) and np.isfinite(te)):
        return None
    if te - tb > max_rise * loss_scale(tv.start, tb):
        return None
    return tb, te


def _went(tb: float, te: float) -> str:
    return "fell" if te <= tb else "stayed low"


def _fix(ctx: Context, b_step: int, why: str, curve: str) -> str:
    """Early-stopping advice naming the checkpoint(s) to keep: the best step of ``curve``
    and, when the run logs a task metric (WER, accuracy, F1...) that peaked elsewhere,
    that step too: the checkpoint to ship is the one best on the metric that matters."""
    unit = ctx.x_unit
    keep = f"Keep the checkpoint from {unit} {b_step} ({why})"
    task = ctx.task_metric
    lv = ctx.levels(task) if task is not None and task != curve else None
    if lv is not None and lv.best is not None and lv.best_step is not None:
        if lv.best_step == b_step:
            keep = f"Keep the checkpoint from {unit} {b_step} ({why} and best {task})"
        else:
            keep += (
                f", or the one from {unit} {lv.best_step} where {task} was best "
                f"({fmt_num(lv.best)}) if {task} is what you select models by"
            )
    return (
        f"{keep} (early stopping); add weight decay/dropout/augmentation, more data, or "
        "use a smaller model."
    )
