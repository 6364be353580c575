"""Training loss that becomes exactly zero and stays there."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens import series as S
from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.signatures._curves import finite_points, start_level
from runlens.signatures.base import NotChecked, Param, Params, Signature


class LossCollapseZero(Signature):
    """The training loss hits exactly 0 and stays there: the task has become trivial.

    What it detects:
        From some point on, the training loss is exactly 0 at ``min_fraction`` or more of
        the remaining points, for at least ``min_points`` points and to the end of the
        run, after a start above 0. A loss written with few decimals (values stepping by
        1e-6 or more) shows 0 once it is below its rounding step, which a healthy
        converged run can reach too: there the finding is only ``info`` and names the
        log's resolution.

    Why it matters:
        A real task keeps some loss on its training batches: label noise, ambiguous
        examples, regularization. A loss of exactly 0 (in float32, every logit margin
        beyond ~17) means the model finds the answer in its input: the label leaked into
        the features (an id, a file name, a column derived from the target), the
        examples are duplicated so that the batch is memorized, or the loss is computed
        on something trivial (a masked-out target, an empty batch, a constant label).
        The gradient is then 0 too and training has stopped.

    Evidence:
        The step where the zeros start, the fraction of exact zeros after it against
        ``min_fraction``, the number of points against ``min_points``, the initial loss,
        the log's resolution (smallest step between its values).

    How to fix:
        Look for the leak: drop features that are derived from the label, check that the
        train and validation splits share no examples, that the target is not also an
        input (teacher forcing without a shift, a mask that hides nothing), and that the
        loss sees real labels. Compare with the validation loss: a leak within the
        training data only shows as val loss far above 0.

    References:
        Kaufman et al., "Leakage in Data Mining: Formulation, Detection, and Avoidance"
        (TKDD 2012); Kapoor & Narayanan, "Leakage and the Reproducibility Crisis in
        Machine-Learning-based Science" (Patterns 2023).
    """

    name = "loss-collapse-zero"
    summary = "training loss exactly 0 from some point on (leakage, trivial task)"
    category = "curve"
    severity = "warning"
    requires = ("train/loss",)
    params = (
        Param(
            "min_fraction",
            0.8,
            "fraction of the points from the first zero to the end that are exactly 0",
            "runlens default: tolerates the odd batch whose mean keeps one ~1e-8 term (the "
            "label-leak sample: 343 exact zeros in 382 steps)",
        ),
        Param(
            "min_points",
            5,
            "exact zeros needed (a single zero batch is not a collapse)",
            "runlens default",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        c = ctx.train_loss
        if c is None:
            raise NotChecked(f"no {fmt.TRAIN_LOSS} recorded", "not-recorded")
        steps, raw = finite_points(c)
        need = int(p.min_points)
        if raw.size < need + 1:
            raise NotChecked.too_few(int(raw.size), f"finite {fmt.TRAIN_LOSS} points", need + 1)
        zero = raw == 0.0
        if not zero.any() or zero[0]:
            # Never 0, or 0 from the start (nothing was ever learned: a constant or
            # masked loss; loss-flat's case).
            return []
        # The collapse starts at the first zero from which the zeros hold to the end.
        start = _collapse_start(zero, p.min_fraction)
        if start is None:
            return []
        tail = zero[start:]
        count = int(tail.sum())
        fraction = count / tail.size
        if count < need:
            return []
        initial = start_level(c)
        res = S.resolution(raw)
        first_step = int(steps[start])
        rounded = res >= ROUNDED
        rounding = (
            f"; the log's values step by {fmt_num(res)}, so 0 may be a loss below that rounding"
            if rounded
            else ""
        )
        return [
            Finding(
                signature=self.name,
                # Written with few decimals, 0 only says "below the rounding", where a
                # converged regression can be too: said, but not as a warning.
                severity="info" if rounded else "warning",
                confidence=0.5 if rounded else 0.9,
                summary=(
                    f"the training loss is exactly 0 at {count} of the {tail.size} points "
                    f"from {ctx.x_unit} {first_step} to the end (it started at "
                    f"{fmt_num(initial)}){rounding}: the model finds the answer in its input"
                ),
                steps=(first_step, int(steps[-1])),
                evidence=(
                    Evidence(
                        "fraction of exact zeros from the first one",
                        fraction,
                        p.min_fraction,
                        ">=",
                    ),
                    Evidence("exact zeros", count, need, ">="),
                    Evidence(f"collapse began at {ctx.x_unit}", first_step),
                    Evidence("initial loss", initial if initial is not None else float("nan")),
                    Evidence("log resolution", res),
                ),
                causes=(
                    "the label leaked into the inputs (an id, a derived column, the target "
                    "as a feature)",
                    "duplicated examples memorized (the same batch over and over)",
                    "a loss over nothing: every target masked out, a constant label",
                ),
                fix="Look for the leak: features derived from the label, examples shared "
                "between splits, a target that is also an input; check the loss sees real "
                "labels.",
                series=(fmt.TRAIN_LOSS,),
            )
        ]


ROUNDED = 1e-6
"""A log whose values step by at least this much was written with few decimals."""


def _collapse_start(zero: np.ndarray, min_fraction: float) -> int | None:
    """Index of the first zero such that at least ``min_fraction`` of the points from it
    to the end are zeros, and the last point is one; None if there is no such point."""
    if not zero[-1]:
        return None
    n = zero.size
    # zeros from i to the end / points from i to the end, for every i
    frac = np.cumsum(zero[::-1])[::-1] / np.arange(n, 0, -1)
    ok = np.flatnonzero(zero & (frac >= min_fraction))
    return int(ok[0]) if ok.size else None
