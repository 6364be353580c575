"""Validation loss clearly and persistently below the training loss."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens import series as S
from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.signatures._curves import TINY, finite_points, start_level
from runlens.signatures.base import NotChecked, Param, Params, Signature


class ValBelowTrain(Signature):
    """The validation loss sits well below the training loss for most of the run.

    What it detects:
        At the validation steps after the transient, the validation loss is below the
        training loss (its centered rolling median, so there is no smoothing lag) by a
        median relative gap of at least ``min_gap``, at ``min_fraction`` or more of the
        evaluations, and by an absolute gap of at least ``min_abs_gap`` of the initial loss.
        A validation loss below half the training loss is more than train-only dropout or
        augmentation usually explains (they give gaps up to about 40%, which is not
        reported).

        "Most of the run" needs the run: while it is still being written (``ctx.final``
        False: ``runlens watch``), at least ``LIVE_MIN_EVALS`` evaluations after the
        transient, since a young run's few evaluations all fall in its steep descent, where
        a training loss averaged over the epoch lags the model that is evaluated.

    Why it matters:
        A model normally does no better on unseen data than on its training data. A large,
        persistent reverse gap means the two losses are not measured the same way: dropout
        or augmentation active only in training (expected, but then the training curve
        understates the model), validation data that overlaps the training data or is
        easier (leakage), or a validation bug (wrong reduction, eval on a subset).

    Evidence:
        The median relative gap (train − val) / train against ``min_gap``; the fraction of
        evaluations with validation below training against ``min_fraction``; the median
        absolute gap against ``min_abs_gap`` × initial loss; the levels at the end.

    How to fix:
        If it is train-only dropout/augmentation, it is expected: compare on the same
        footing (evaluate the training set in eval mode) and consider lighter
        regularization. Otherwise check for duplicates between the splits, that the
        validation split is drawn from the same distribution, and how the validation loss
        is reduced (mean over examples, not batches of different size).

    References:
        Srivastava et al., "Dropout" (JMLR 2014); Kaufman et al., "Leakage in Data Mining"
        (TKDD 2012); Keras FAQ, "Why is my training loss much higher than my testing
        loss?".
    """

    name = "val-below-train"
    summary = "validation loss clearly and persistently below training loss"
    category = "curve"
    severity = "warning"
    requires = ("train/loss", "val/loss")
    params = (
        Param(
            "min_gap",
            0.5,
            "median (train − val) / train over the post-transient evaluations",
            "runlens calibration: healthy sample runs < 0 (val above train); dropout 0.6 "
            "with train-only input noise ≈ 0.41. Raised from 0.15 by the development "
            "corpus, whose labels call gaps that dropout/augmentation explain healthy: "
            "other-brain-tumor-valbelow 0.39, other-nids-cnn-history 0.22, "
            "lightning-tcc-cnn1d-v3 0.16. The val-below-train sample (validation split = "
            "the training examples, dropout 0.5) ≈ 0.7",
        ),
        Param(
            "min_fraction",
            0.8,
            "fraction of evaluations at which val < train (persistence)",
            "runlens default",
        ),
        Param(
            "min_abs_gap",
            0.02,
            "median absolute gap as a fraction of the initial training loss (ignores gaps "
            "between two near-zero losses)",
            "runlens default",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        train, val = ctx.train_loss, ctx.val_loss
        if train is None or val is None:
            raise NotChecked(f"needs {fmt.TRAIN_LOSS} and {fmt.VAL_LOSS}", "not-recorded")
        t_steps, t_raw = finite_points(train)
        v_steps, v_raw = finite_points(val)
        start = start_level(train)
        keep = v_steps > ctx.transient_end
        v_steps, v_raw = v_steps[keep], v_raw[keep]
        if t_raw.size < 10 or start is None:
            raise NotChecked.too_few(int(t_raw.size), f"finite {fmt.TRAIN_LOSS} points", 10)
        if v_raw.size < 3:
            raise NotChecked.too_few(
                int(v_raw.size),
                f"finite {fmt.VAL_LOSS} points",
                3,
                f"after the warm-up (step {ctx.transient_end})",
            )
        t_level = S.rolling_median(t_raw, max(5, t_raw.size // 25) | 1)
        t_at = S.align(t_steps, t_level, v_steps)
        ok = np.isfinite(t_at) & (np.abs(t_at) > TINY)
        if ok.sum() < 3:
            raise NotChecked.too_few(
                int(ok.sum()), f"{fmt.VAL_LOSS} points", 3, "within the training loss's steps"
            )
        t_at, v_at, st = t_at[ok], v_raw[ok], v_steps[ok]
        if not ctx.final and st.size < LIVE_MIN_EVALS:
            return []  # not yet "most of the run": wait for more evaluations
        rel = (t_at - v_at) / np.abs(t_at)
        gap = float(np.median(rel))
        fraction = float(np.mean(v_at < t_at))
        abs_gap = float(np.median(t_at - v_at)) / max(abs(start), TINY)
        if not (gap >= p.min_gap and fraction >= p.min_fraction and abs_gap >= p.min_abs_gap):
            return []
        return [
            Finding(
                signature=self.name,
                severity="warning",
                confidence=min(1.0, 0.5 + 0.5 * (gap / p.min_gap - 1)) * fraction,
                summary=(
                    f"validation loss is below training loss at {fraction:.0%} of "
                    f"{len(st)} evaluations, by {gap:.0%} (median); at the end val "
                    f"{fmt_num(float(v_at[-1]))} vs train {fmt_num(float(t_at[-1]))}"
                ),
                steps=(int(st[0]), int(st[-1])),
                evidence=(
                    Evidence("median (train − val) / train", gap, p.min_gap, ">="),
                    Evidence("fraction of evals with val < train", fraction, p.min_fraction, ">="),
                    Evidence("median gap / initial loss", abs_gap, p.min_abs_gap, ">="),
                    Evidence("final val loss", float(v_at[-1])),
                    Evidence("train loss at the last eval", float(t_at[-1])),
                ),
                causes=(
                    "dropout or data augmentation active only in training",
                    "validation data overlapping the training data (leakage)",
                    "an easier or differently distributed validation split",
                    "a validation bug (wrong reduction, subset, eval-mode issues)",
                ),
                fix="If train-only dropout/augmentation explains it, compare in eval mode; "
                "otherwise check the splits for duplicates and how val loss is reduced.",
                series=(fmt.VAL_LOSS, fmt.TRAIN_LOSS),
            )
        ]


LIVE_MIN_EVALS = 6
"""Evaluations after the transient a live run needs (twice the post-hoc minimum of 3)."""
