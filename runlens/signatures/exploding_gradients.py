"""Gradient norms growing by orders of magnitude, over steps or towards the input."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from runlens_collect import format as fmt

from runlens import series as S
from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.needs import LayerStat
from runlens.signatures import _layers as L
from runlens.signatures.base import NotChecked, Param, Params, Signature, run_parts


class ExplodingGradients(Signature):
    """Gradient norms that grow by orders of magnitude.

    What it detects:
        Two shapes of the same instability. *Over steps*: the total gradient norm (the
        ``grad_norm`` scalar, else the root-sum-square of the per-layer norms), smoothed by
        a rolling median, climbs after the early transient to ``growth``× or more above
        the lowest level it had reached before. *Over depth*: after the early transient,
        the gradient norms of the first weight layers are ``depth_ratio``× or more above
        those of the last ones on most recorded steps — the backward pass multiplies the
        gradient up on its way to the input.

    Why it matters:
        Each backward step multiplies the gradient by the layer Jacobians; with weights or
        activations too large the product grows geometrically with depth and, as training
        amplifies the weights, with time. Updates then overshoot, the loss jumps or
        diverges, and soon the weights overflow to Inf/NaN.

    Evidence:
        Over steps: the starting and the peak (rolling-median) total gradient norm, their
        ratio and the steps of each. Over depth: the median gradient norm of the first and
        of the last weight layers, named, and their ratio, with the step range where it
        held.

    How to fix:
        Clip gradients (``torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)``),
        lower the learning rate or add warm-up, use a variance-preserving initialization
        (Kaiming for ReLU, Xavier/Glorot for tanh), add normalization (BatchNorm/LayerNorm)
        or residual connections in deep stacks, and check for a loss that grows without
        bound (e.g. an unnormalized sum over a large batch).

    References:
        Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural
        networks" (ICML 2013) — gradient clipping; Glorot & Bengio, "Understanding the
        difficulty of training deep feedforward neural networks" (AISTATS 2010);
        Zhang et al., "AUTOTRAINER" (ICSE 2021) and Wardat et al., "DeepDiagnosis"
        (ICSE 2022) — gradient-norm growth rules.
    """

    name = "exploding-gradients"
    summary = "gradient norms growing by orders of magnitude over steps or towards the input"
    category = "layer"
    severity = "warning"
    requires = ("grad_norm|layers:grad",)
    needs = (LayerStat(fmt.KIND_GRAD, "norm"),)
    params = (
        Param(
            "growth",
            1e3,
            "smoothed total gradient norm / its lowest earlier level, above which the "
            "gradients are exploding over time",
            "three orders of magnitude: Pascanu et al. 2013 describe explosion as growth by "
            "orders of magnitude; the factor is our calibration (healthy sample runs stay "
            "below 30×)",
        ),
        Param(
            "depth_ratio",
            1e3,
            "median gradient norm of the first weight layers / that of the last ones, above "
            "which the gradient explodes towards the input",
            "Glorot & Bengio 2010 (per-layer gradient profile); the factor is our "
            "calibration (healthy sample runs stay within 10× across depth)",
        ),
        Param(
            "min_fraction",
            0.5,
            "fraction of post-transient recorded steps on which the depth ratio must hold",
            "runlens default: 'sustained' means most of the run",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        parts = (
            ("growth over steps", lambda: _over_steps(ctx, p)),
            ("ratio over depth", lambda: _over_depth(ctx, p)),
        )
        found = [f for f in run_parts(ctx, parts) if f is not None]
        # One finding per run: both shapes together are one instability.
        return [_merge(*found)] if len(found) == 2 else found


def _merge(a: Finding, b: Finding) -> Finding:
    assert a.steps is not None and b.steps is not None
    return replace(
        a,
        confidence=max(a.confidence, b.confidence),
        summary=a.summary + "; " + b.summary,
        steps=(min(a.steps[0], b.steps[0]), max(a.steps[1], b.steps[1])),
        layers=tuple(dict.fromkeys(b.layers + a.layers)),
        evidence=a.evidence + b.evidence,
    )


MIN_NORM_POINTS = 10
"""Fewer finite gradient norms: no trend over steps to speak of."""

_FIX = (
    "Clip gradients (clip_grad_norm_ to ~1.0), lower the learning rate or add warm-up, use "
    "Kaiming/Xavier initialization, and add normalization or residual connections."
)
_CAUSES = (
    "learning rate too high",
    "initialization too large for the depth (no normalization)",
    "activations growing layer by layer",
)


def _total_norm(ctx: Context) -> tuple[np.ndarray, np.ndarray, str]:
    c = ctx.curve(fmt.GRAD_NORM)
    if c is not None and np.isfinite(c.raw).sum() >= 5:
        return c.steps, c.raw, "grad_norm"
    m = ctx.layer(fmt.KIND_GRAD, "norm")
    if m is None:
        if c is not None:
            raise NotChecked.too_few(int(np.isfinite(c.raw).sum()), "finite grad_norm points", 10)
        raise NotChecked("no grad_norm scalar and no per-layer gradient norms", "not-recorded")
    v = m.values
    with np.errstate(invalid="ignore"):
        total = np.sqrt(np.nansum(np.square(v), axis=1))
    total[~np.isfinite(v).any(axis=1)] = np.nan
    return m.steps, total, "total gradient norm"


def _over_steps(ctx: Context, p: Params) -> Finding | None:
    steps, total, label = _total_norm(ctx)
    ok = np.isfinite(total) & (total > 0)
    if ok.sum() < MIN_NORM_POINTS:
        raise NotChecked.too_few(int(ok.sum()), f"finite, non-zero {label} points", MIN_NORM_POINTS)
    steps, logv = steps[ok], np.log10(total[ok])
    # Rolling median in log space: one noisy batch is not an explosion. Growth is measured
    # from the lowest smoothed level reached so far, so a run that first calms down and
    # then blows up is caught, and so is one that explodes within its first steps.
    win = max(5, len(logv) // 20)
    smooth = S.rolling_median(logv, win)
    runmin = np.minimum.accumulate(smooth)
    late = steps > ctx.transient_end
    if not late.any():
        raise NotChecked(
            f"no {label} point after the warm-up (step {ctx.transient_end})", "too-few-points"
        )
    rise = np.where(late, smooth - runmin, -np.inf)
    i = int(np.argmax(rise))
    growth = float(10 ** rise[i])
    if not growth >= p.growth:
        return None
    j = int(np.argmin(smooth[: i + 1]))
    over = late & (rise >= np.log10(p.growth))
    first_hit = int(np.flatnonzero(over)[0])
    severity = "error" if growth >= p.growth**2 else "warning"
    peak, base = 10 ** smooth[i], 10 ** smooth[j]
    return Finding(
        signature="exploding-gradients",
        severity=severity,
        confidence=float(min(1.0, 0.6 + 0.1 * (np.log10(growth) - np.log10(p.growth)))),
        summary=(
            f"{label} grew {L.orders(growth)} from {fmt_num(base)} at step {int(steps[j])} "
            f"to {fmt_num(peak)} at step {int(steps[i])} (rolling median; threshold "
            f"{fmt_num(p.growth)}×), above the threshold on {over.sum()} of {late.sum()} "
            f"steps after step {int(steps[first_hit])}"
        ),
        fix=_FIX,
        steps=(int(steps[first_hit]), int(steps[-1])),
        layers=_largest_grad_layers(ctx, int(steps[i])),
        evidence=(
            Evidence(f"{label} at its lowest (step {int(steps[j])})", base),
            Evidence(f"{label} peak (rolling median) at step {int(steps[i])}", peak),
            Evidence("growth", growth, p.growth, ">", "×"),
        ),
        causes=_CAUSES,
    )


def _largest_grad_layers(ctx: Context, step: int) -> tuple[str, ...]:
    m = ctx.layer(fmt.KIND_GRAD, "norm")
    if m is None or not len(m.steps):
        return ()
    i = min(int(np.searchsorted(m.steps, step)), len(m.steps) - 1)
    row = np.where(np.isfinite(m.values[i]), m.values[i], -np.inf)
    top = np.argsort(row)[::-1][:3]
    return tuple(m.layers[j] for j in top if np.isfinite(row[j]))


def depth_profile(
    ctx: Context,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str], np.ndarray]:
    """Per-step geometric-mean gradient norm of the first and of the last quarter of the
    weight layers: (steps, early, late, early names, late names, post-transient mask).
    Raises NotChecked without per-layer gradient norms or with fewer than 3 weight layers
    that ever receive a gradient (no depth to compare)."""
    m = ctx.layer(fmt.KIND_GRAD, "norm")
    if m is None:
        raise NotChecked("no per-layer gradient norms (layers:grad)", "not-recorded")
    cols = L.weight_columns(ctx, m)
    v = m.values[:, cols]
    # A layer that never gets a gradient is frozen-layer's business, not the profile's.
    live = (np.isfinite(v) & (v > 0)).any(axis=0)
    cols, v = cols[live], v[:, live]
    if len(cols) < 3:
        raise NotChecked(
            f"{len(cols)} weight layer(s) receive a gradient; comparing first and last "
            "layers needs 3",
            "not-applicable",
        )
    k = max(1, len(cols) // 4)
    with np.errstate(divide="ignore", invalid="ignore"):
        lv = np.log10(np.where(v > 0, v, np.nan))
    early = _nanmean_rows(lv[:, :k])
    late = _nanmean_rows(lv[:, -k:])
    names = [m.layers[j] for j in cols]
    return m.steps, 10**early, 10**late, names[:k], names[-k:], L.after_transient(ctx, m)


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    ok = np.isfinite(x)
    n = ok.sum(axis=1)
    s = np.where(ok, x, 0.0).sum(axis=1)
    return np.where(n > 0, s / np.maximum(n, 1), np.nan)


def _over_depth(ctx: Context, p: Params) -> Finding | None:
    steps, early, late, enames, lnames, post = depth_profile(ctx)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = early / late
    valid = post & np.isfinite(ratio)
    if valid.sum() < 3:
        raise NotChecked.too_few(
            int(valid.sum()), "steps with first and last layer gradients", 3, "after the warm-up"
        )
    hit = valid & (ratio >= p.depth_ratio)
    frac = hit.sum() / valid.sum()
    if frac < p.min_fraction:
        return None
    med = float(np.median(ratio[valid]))
    sp = L.span(steps, hit)
    assert sp is not None
    return Finding(
        signature="exploding-gradients",
        severity="warning",
        confidence=L.depth_confidence(med, p.depth_ratio, frac),
        summary=(
            f"gradient norm of the first layers ({L.name_list(enames)}, "
            f"{fmt_num(float(np.median(early[valid])))}) is {L.orders(med)} above the last "
            f"layers ({L.name_list(lnames)}, {fmt_num(float(np.median(late[valid])))}; "
            f"threshold {fmt_num(p.depth_ratio)}×) from step {sp[0]} to {sp[1]}"
        ),
        fix=_FIX,
        steps=sp,
        layers=tuple(enames) + tuple(lnames),
        evidence=(
            Evidence("median grad norm, first layers", float(np.median(early[valid]))),
            Evidence("median grad norm, last layers", float(np.median(late[valid]))),
            Evidence("first/last ratio (median)", med, p.depth_ratio, ">", "×"),
            Evidence("fraction of steps over threshold", float(frac), p.min_fraction, ">="),
        ),
        causes=_CAUSES,
    )
