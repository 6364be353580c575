"""Non-finite loss or metric (AMP overflows the GradScaler recovers from excepted)."""

from __future__ import annotations

import numpy as np
import polars as pl
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.needs import NONFINITE_ROWS, LayerStat
from runlens.signatures._ranks import first_nonfinite_rank
from runlens.signatures.base import Param, Params, Signature

# Within one step, tensors go bad in computation order: forward, output, backward, step.
_KIND_ORDER = {
    fmt.KIND_ACTIVATION: 0,
    fmt.KIND_OUTPUT: 1,
    fmt.KIND_GRAD: 2,
    fmt.KIND_UPDATE: 3,
    fmt.KIND_WEIGHT: 4,
}

_CAUSES = (
    "exploding gradients or a learning rate too high",
    "a numerically unsafe op (log of 0, division by ~0, exp overflow)",
    "fp16 overflow without loss scaling",
    "bad input data (NaN in the batch)",
)
_FIX = (
    "Clip gradients, lower the LR or add warm-up, use log_softmax/BCEWithLogitsLoss and eps "
    "in divisions; locate the op with torch.autograd.detect_anomaly()."
)


class NanInf(Signature):
    """The first NaN or Inf in the training loss or a metric, or an AMP overflow that
    never ends.

    What it detects:
        The first step at which the training loss, or any logged metric, is NaN or ±Inf;
        and, when layer statistics were recorded, the first layer and tensor kind
        (activation, output, gradient, update, weight) where non-finite values appeared.
        Steps whose optimizer update was skipped (``optim/skipped``: fp16 AMP's
        ``GradScaler`` found inf/NaN gradients, lowered its loss scale and skipped the
        step, as it does by design at the start and every ``growth_interval`` steps) are
        not failures and are ignored, unless the skipping persists: the scaler kept
        skipping after its loss scale fell to ``max_loss_scale`` or below (the gradients
        are non-finite even unscaled), or ``max_skipped_run`` steps in a row were skipped.

    Why it matters:
        Once a NaN enters the weights every later step is garbage, yet many loops keep
        running and logging. The first layer that went non-finite points at the cause:
        an overflowing activation, a log/division of zero, an exploding gradient. A
        GradScaler that skips every step silently stops training: the loss stays flat.

    Evidence:
        The step of the first non-finite loss, the number of non-finite points, and the
        first (step, layer, kind) with ``frac_nonfinite > 0`` or a non-finite norm; for a
        persistent overflow, the skipped steps in a row and the lowest loss scale.

    How to fix:
        Find the root cause first (exploding gradients, a too-high learning rate, a loss
        computed on probabilities). Then: clip gradients (``clip_grad_norm_``), lower the
        learning rate or add warm-up, use numerically stable ops (``log_softmax`` +
        ``nll_loss``, ``BCEWithLogitsLoss``, an ``eps`` in divisions and ``sqrt``), and under
        fp16 use a GradScaler or bf16. ``torch.autograd.detect_anomaly()`` finds the op.

    References:
        Goodfellow et al., Deep Learning (2016), §4.1 numerical computation;
        PyTorch docs, "Automatic Mixed Precision" (GradScaler: skipped steps, dynamic
        loss scaling) and ``torch.autograd.detect_anomaly``; Micikevicius et al., "Mixed
        Precision Training" (ICLR 2018), loss scaling.
    """

    name = "nan-inf"
    summary = "first non-finite loss or metric, and the first layer where it appeared"
    category = "curve"
    severity = "error"
    requires = ("train/loss",)
    # The gradients' missing flags: grad_norm NaN where no parameter had a gradient.
    needs = (NONFINITE_ROWS, LayerStat(fmt.KIND_GRAD, "missing"))
    params = (
        Param(
            "max_loss_scale",
            1.0,
            "AMP loss scale at or below which steps the GradScaler still skips mean the "
            "gradients are non-finite even unscaled",
            "PyTorch GradScaler: the scale halves at every skipped step from 2**16; below 1 "
            "it no longer protects fp16 range, it shrinks the gradients",
        ),
        Param(
            "max_skipped_run",
            100.0,
            "consecutive skipped optimizer steps taken as an overflow that never ends",
            "runlens default: even a 2**64 initial scale halves below 1 in 64 skipped steps",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        skipped = ctx.skipped_steps
        persistent = _persistent_overflow(ctx, skipped, p)
        if persistent is not None:
            return [persistent]
        first: tuple[int, str] | None = None
        bad_counts: dict[str, int] = {}
        for name in ctx.run.scalar_names:
            if name.startswith((fmt.LR_PREFIX, "time/", fmt.PROBE_PREFIX)):
                continue  # probe scalars are evidence, not metrics (the input: below)
            c = ctx.curve(name)
            if c is None:
                continue
            # Values of a step the optimizer skipped (AMP overflow) were never applied.
            bad = ~np.isfinite(c.raw) & ~np.isin(c.steps, skipped)
            if name == fmt.GRAD_NORM:
                # Runs written before the collector left grad_norm out on steps where no
                # parameter had a gradient have NaN there: missing, not a numerical failure.
                bad &= ~_no_gradient_steps(ctx, c.steps)
            if bad.any():
                bad_counts[name] = int(bad.sum())
                step = int(c.steps[np.argmax(bad)])
                if (
                    first is None
                    or step < first[0]
                    or (step == first[0] and name == fmt.TRAIN_LOSS)
                ):
                    first = (step, name)
        layer_hit = _first_nonfinite_layer(ctx, skipped)
        if first is None and layer_hit is None:
            return []
        evidence = []
        layers: tuple[str, ...] = ()
        if first is not None:
            step, name = first
            evidence.append(Evidence(f"first non-finite {name} at step", step))
            evidence.append(Evidence(f"non-finite points in {name}", bad_counts[name]))
            summary = f"{name} became non-finite at step {step}"
        else:
            step = layer_hit[0]  # type: ignore[index]
            summary = f"non-finite values appeared in layer statistics at step {step}"
        bad_input = _first_nonfinite_input(ctx)
        if bad_input is not None:
            evidence.append(Evidence("first non-finite training input at step", bad_input))
            summary += f"; the training input itself was non-finite at step {bad_input}"
            step = min(step, bad_input)
        if layer_hit is not None:
            lstep, layer, kind = layer_hit
            layers = (layer,)
            evidence.append(
                Evidence(f"first non-finite layer stat ({kind} of {layer}) at step", lstep)
            )
            summary += f"; the first non-finite tensor was the {kind} of `{layer}` at step {lstep}"
            step = min(step, lstep)
        where = first_nonfinite_rank(ctx.run)
        if where is not None:
            rstep, ranks = where
            names = ", ".join(map(str, ranks))
            evidence.append(Evidence(f"first non-finite value on rank {names} at step", rstep))
            summary += f"; it appeared first on rank {names} (step {rstep})"
        last = ctx.steps[1] if ctx.steps else step
        return [
            Finding(
                signature=self.name,
                severity="error",
                confidence=1.0,
                summary=summary,
                steps=(step, last),
                layers=layers,
                evidence=tuple(evidence),
                causes=(
                    *(("non-finite values in the input batch",) if bad_input is not None else ()),
                    *_CAUSES,
                ),
                fix=_FIX,
            )
        ]


def _runs(steps: np.ndarray, all_steps: np.ndarray) -> list[tuple[int, int, int]]:
    """(first, last, length) of each run of consecutive recorded steps in ``steps``."""
    if steps.size == 0:
        return []
    pos = np.searchsorted(all_steps, steps)  # index among the recorded steps
    breaks = np.flatnonzero(np.diff(pos) != 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [steps.size - 1]])
    pairs = zip(starts.tolist(), ends.tolist(), strict=True)
    return [(int(steps[a]), int(steps[b]), b - a + 1) for a, b in pairs]


def _persistent_overflow(ctx: Context, skipped: np.ndarray, p: Params) -> Finding | None:
    """A finding when skipped steps go on past the GradScaler's recovery."""
    if skipped.size == 0:
        return None
    marks = ctx.run.scalar(fmt.STEP_SKIPPED)
    if marks is None:
        return None
    scale = ctx.run.scalar(fmt.LOSS_SCALE)
    low: np.ndarray = np.zeros(0, np.int64)
    if scale is not None:
        s_at = dict(zip(scale.steps.tolist(), scale.values.tolist(), strict=True))
        low = np.array(
            [s for s in skipped.tolist() if s_at.get(s, np.inf) <= p.max_loss_scale], np.int64
        )
    runs = _runs(skipped, marks.steps)
    longest = max(runs, key=lambda r: r[2])
    if low.size == 0 and longest[2] < p.max_skipped_run:
        return None
    # From the first skipped step of the run that went on too long.
    if low.size:
        start = next(a for a, b, _ in runs if a <= int(low[0]) <= b)
        run = next(r for r in runs if r[0] == start)
    else:
        run = longest
    first, last, length = run
    evidence = [
        Evidence("optimizer steps skipped in a row", length, p.max_skipped_run, ">="),
        Evidence("optimizer steps skipped in all", int(skipped.size)),
    ]
    summary = (
        f"from step {first} the AMP GradScaler skipped every optimizer step ({length} in a row"
        f"{' to the end of the run' if last == int(marks.steps[-1]) else ''}): "
        "the gradients are inf/NaN at every loss scale, so the weights stopped changing"
    )
    if scale is not None:
        lo = float(np.nanmin(scale.values[np.isin(scale.steps, skipped)]))
        evidence.append(Evidence("lowest loss scale while skipping", lo, p.max_loss_scale, "<="))
        summary += f" (the scale fell to {fmt_num(lo)})"
    layer_hit = _first_nonfinite_layer(ctx, np.zeros(0, np.int64), since=first)
    layers: tuple[str, ...] = ()
    if layer_hit is not None:
        lstep, layer, kind = layer_hit
        layers = (layer,)
        evidence.append(Evidence(f"first non-finite layer stat ({kind} of {layer}) at step", lstep))
        summary += f"; the first non-finite tensor was the {kind} of `{layer}`"
    return Finding(
        signature="nan-inf",
        severity="error",
        confidence=1.0,
        summary=summary,
        steps=(first, last),
        layers=layers,
        evidence=tuple(evidence),
        causes=(
            "a NaN or Inf produced in the forward or backward pass (log of 0, division by "
            "~0, sqrt of a negative) that no loss scale can fix",
            "fp16 overflow of activations in the forward pass (beyond 65504)",
            "bad input data (NaN in the batch)",
        ),
        fix="Locate the op with torch.autograd.detect_anomaly(); use bf16 autocast (fp32 "
        "range, no scaler) or keep the overflowing op in fp32; check the inputs for NaN.",
    )


def _first_nonfinite_layer(
    ctx: Context, skipped: np.ndarray, since: int | None = None
) -> tuple[int, str, str] | None:
    bad = ctx.nonfinite_rows(NONFINITE_ROWS)
    if skipped.size and bad.height:
        # a skipped step (AMP overflow) changed nothing: its tensors are not failures
        bad = bad.filter(~pl.col("step").is_in([int(s) for s in skipped.tolist()]))
    if since is not None and bad.height:
        bad = bad.filter(pl.col("step") >= since)
    if bad.height == 0:
        return None
    s0 = bad["step"][0]
    rows = bad.filter(pl.col("step") == s0).with_row_index("_i").to_dicts()
    rows.sort(key=lambda r: (_KIND_ORDER.get(r["kind"], 9), r["_i"]))
    return int(s0), str(rows[0]["layer"]), str(rows[0]["kind"])


def _no_gradient_steps(ctx: Context, steps: np.ndarray) -> np.ndarray:
    """Mask of ``steps`` at which every gradient row is missing (no parameter had one)."""
    g = ctx.layer(fmt.KIND_GRAD, "missing")
    out = np.zeros(len(steps), bool)
    if g is None or not len(g.steps):
        return out
    none = (g.values == 1).all(axis=1)
    idx = np.clip(np.searchsorted(g.steps, steps), 0, len(g.steps) - 1)
    return (g.steps[idx] == steps) & none[idx]


def _first_nonfinite_input(ctx: Context) -> int | None:
    """First step whose training-input fingerprint (the input probe) is not finite."""
    c = ctx.curve(fmt.INPUT_SUMSQ)
    if c is None:
        return None
    bad = ~np.isfinite(c.raw)
    return int(c.steps[np.argmax(bad)]) if bad.any() else None
