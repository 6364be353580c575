"""Non-finite loss or metric."""

from __future__ import annotations

import numpy as np
import polars as pl
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Evidence, Finding
from runlens.signatures.base import Params, Signature

# Within one step, tensors go bad in computation order: forward, output, backward, step.
_KIND_ORDER = {
    fmt.KIND_ACTIVATION: 0,
    fmt.KIND_OUTPUT: 1,
    fmt.KIND_GRAD: 2,
    fmt.KIND_UPDATE: 3,
    fmt.KIND_WEIGHT: 4,
}


class NanInf(Signature):
    """The first NaN or Inf in the training loss or a metric.

    What it detects:
        The first step at which the training loss, or any logged metric, is NaN or ±Inf;
        and, when layer statistics were recorded, the first layer and tensor kind
        (activation, output, gradient, update, weight) where non-finite values appeared.

    Why it matters:
        Once a NaN enters the weights every later step is garbage, yet many loops keep
        running and logging. The first layer that went non-finite points at the cause:
        an overflowing activation, a log/division of zero, an exploding gradient.

    Evidence:
        The step of the first non-finite loss, the number of non-finite points, and the
        first (step, layer, kind) with ``frac_nonfinite > 0`` or a non-finite norm.

    How to fix:
        Find the root cause first (exploding gradients, a too-high learning rate, a loss
        computed on probabilities). Then: clip gradients (``clip_grad_norm_``), lower the
        learning rate or add warm-up, use numerically stable ops (``log_softmax`` +
        ``nll_loss``, ``BCEWithLogitsLoss``, an ``eps`` in divisions and ``sqrt``), and under
        fp16 use a GradScaler or bf16. ``torch.autograd.detect_anomaly()`` finds the op.

    References:
        Goodfellow et al., Deep Learning (2016), §4.1 numerical computation;
        PyTorch docs, "Automatic Mixed Precision" and ``torch.autograd.detect_anomaly``.
    """

    name = "nan-inf"
    summary = "first non-finite loss or metric, and the first layer where it appeared"
    category = "curve"
    severity = "error"
    requires = ("train/loss",)
    params = ()

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        first: tuple[int, str] | None = None
        bad_counts: dict[str, int] = {}
        for name in ctx.run.scalar_names:
            if name.startswith((fmt.LR_PREFIX, "time/", fmt.PROBE_PREFIX)):
                continue  # probe scalars are evidence, not metrics (the input: below)
            c = ctx.curve(name)
            if c is None:
                continue
            bad = ~np.isfinite(c.raw)
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
        layer_hit = _first_nonfinite_layer(ctx)
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
                    "exploding gradients or a learning rate too high",
                    "a numerically unsafe op (log of 0, division by ~0, exp overflow)",
                    "fp16 overflow without loss scaling",
                    "bad input data (NaN in the batch)",
                ),
                fix="Clip gradients, lower the LR or add warm-up, use log_softmax/"
                "BCEWithLogitsLoss and eps in divisions; locate the op with "
                "torch.autograd.detect_anomaly().",
            )
        ]


def _first_nonfinite_layer(ctx: Context) -> tuple[int, str, str] | None:
    if ctx.run.layers is None:
        return None
    bad = ctx.run.query(
        fmt.LAYERS_DIR,
        lambda lf: (
            lf.filter(~pl.col("missing"))
            .filter((pl.col("frac_nonfinite") > 0) | ~pl.col("norm").is_finite())
            .select("step", pl.col("layer").cast(pl.String), pl.col("kind").cast(pl.String))
            .sort("step")
            .head(10_000)
        ),
    )
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
