"""The suggested learning rate of an LR range test run."""

from __future__ import annotations

from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.sanity import KIND_LR_RANGE_TEST, lr_suggestion
from runlens.signatures.base import NotChecked, Param, Params, Signature


class LRRangeTest(Signature):
    """The learning rate an LR range test points at, how it was chosen, and where it broke.

    What it detects:
        On a run recorded by ``runlens_collect.lr_range_test`` (run kind
        ``lr_range_test``: the LR grows exponentially each step), the smoothed training
        loss against log10(LR), cut where it first exceeds ``diverge_factor`` × its best.
        It suggests the steepest-descent LR (largest fall of the loss per decade of LR,
        before the lowest loss; Smith's choice) and also reports fastai's ``valley`` (the
        middle of the longest decreasing stretch), the LR of the lowest loss and the
        divergence point. Informational: it also fills ``summary.suggested_lr`` and
        ``summary.lr_method`` (``"steepest"``).

    Why it matters:
        Too small a learning rate wastes compute, too large a one diverges or oscillates;
        the useful range spans one to two decades and depends on the model, the data
        scale and the optimizer. One short sweep finds it instead of a grid of full runs.
        The minimum-loss LR is already too high (the loss is about to turn up); the
        valley and steepest points sit safely below it.

    Evidence:
        The suggested (steepest-descent) LR and its slope (loss per decade), the valley LR,
        the LR and value of the lowest smoothed loss, the loss at the start of the sweep,
        and the LR and step where the loss diverged (if it did).

    How to fix:
        Use the suggested LR as the peak of your schedule (with warm-up for Adam-type
        optimizers), or anything between the valley and the steepest points; never the
        minimum-loss or divergence LR (the loss is about to turn up there). Re-run the
        test when the model, batch size, normalization or data scaling change: the
        suggestion moves with them.

    References:
        Smith, "Cyclical Learning Rates for Training Neural Networks" (WACV 2017), §3.3 "LR
        range test"; fastai ``Learner.lr_find`` and its ``valley``/``steep`` suggestion
        functions (fastai 2.5+, Z. Mueller); Gugger, "How Do You Find A Good Learning
        Rate" (2017).
    """

    name = "lr-range-test"
    summary = "suggested learning rate of an LR range test run (steepest, valley, divergence)"
    category = "sanity"
    severity = "info"
    requires = ("train/loss", "lr/0")
    params = (
        Param(
            "diverge_factor",
            4.0,
            "the sweep is cut where the smoothed loss exceeds this multiple of its best",
            "fastai LRFinder (stop_div: smoothed loss > 4 × best); the collector stops at "
            "the same factor",
        ),
        Param(
            "skip_start",
            0.1,
            "fraction of the sweep's first points ignored (flat, still warming the EMA)",
            "fastai lr_find (drops num_it // 10 points)",
        ),
        Param(
            "skip_end",
            5,
            "points before the divergence cut ignored (the loss is turning up)",
            "fastai lr_find (drops the last 5 points)",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        if ctx.run.kind != KIND_LR_RANGE_TEST:
            raise NotChecked(
                f"only LR range test runs (kind {KIND_LR_RANGE_TEST}) are checked",
                "not-applicable",
            )
        s = lr_suggestion(ctx, p.diverge_factor, p.skip_start, int(p.skip_end))
        if s is None:
            raise NotChecked(
                "fewer than 8 usable points of the sweep (a positive lr/0 and a finite loss) "
                "before it diverged",
                "too-few-points",
            )
        evidence = [
            Evidence("suggested LR (steepest descent)", s.suggested_lr),
            Evidence("steepest slope", s.steepest_slope, unit="loss/decade"),
            Evidence("valley LR (fastai)", s.valley_lr),
            Evidence("LR at the lowest smoothed loss", s.min_loss_lr),
            Evidence("lowest smoothed loss", s.min_loss),
            Evidence("loss at the start of the sweep", s.initial_loss),
        ]
        if s.diverged_lr is not None and s.diverged_step is not None:
            evidence += [
                Evidence("divergence LR", s.diverged_lr),
                Evidence("divergence step", s.diverged_step),
            ]
            where = f"it diverged at LR {fmt_num(s.diverged_lr)} (step {s.diverged_step})"
        else:
            where = "it did not diverge within the sweep (raise end_lr to see where it breaks)"
        lo, hi = sorted((s.steepest_lr, s.valley_lr))
        return [
            Finding(
                signature=self.name,
                severity="info",
                confidence=1.0,
                summary=(
                    f"suggested learning rate {fmt_num(s.suggested_lr)} (steepest descent of the "
                    f"smoothed loss, {fmt_num(s.steepest_slope)} per decade of LR); valley "
                    f"{fmt_num(s.valley_lr)} (middle of the longest descent, steps "
                    f"{s.valley_steps[0]}–{s.valley_steps[1]}); lowest loss at "
                    f"{fmt_num(s.min_loss_lr)}; {where}"
                ),
                fix=f"Train with a peak learning rate near {fmt_num(s.suggested_lr)} "
                f"(anything between {fmt_num(lo)} and {fmt_num(hi)}), below "
                f"{fmt_num(s.min_loss_lr)}.",
                steps=s.valley_steps,
                evidence=tuple(evidence),
            )
        ]
