"""Activation scale growing layer by layer or over steps."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens import series as S
from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.needs import LayerStat
from runlens.signatures import _layers as L
from runlens.signatures.base import NotChecked, Param, Params, Signature, run_parts


class ActivationExplosion(Signature):
    """Activations whose scale grows geometrically with depth or with training.

    What it detects:
        The root-mean-square of each recorded activation (``norm / sqrt(numel)``), in
        forward order. *Over depth*: on most post-transient steps the last quarter of the
        layers is ``depth_growth``× or more above the first quarter. *Over steps*: a
        layer's smoothed RMS climbs ``time_growth``× or more above its level over the first
        steps. Either way the grown activations must also be large in absolute terms
        (RMS ≥ ``min_rms``), so a small first layer (an embedding at std 0.02) is no alarm.

    Why it matters:
        A variance-preserving network keeps activations at a similar scale in every layer.
        When each layer multiplies the scale by a factor above one (initialization too
        large, no normalization, residual branches summed without scaling), the scale grows
        geometrically with depth; logits become huge, the softmax saturates, gradients
        explode and fp16/bf16 overflow. Growth over steps means the weights themselves are
        blowing up.

    Evidence:
        The RMS of the first and last layers (named) and their ratio, or the starting and
        peak RMS of the layer that grew the most, with the steps.

    How to fix:
        Use a variance-preserving initialization (Kaiming for ReLU, Xavier for tanh), add
        normalization (BatchNorm/LayerNorm) between layers, scale residual branches (e.g.
        init the last layer of each block at zero), lower the learning rate, add weight
        decay.

    References:
        Glorot & Bengio (AISTATS 2010) and He et al., "Delving Deep into Rectifiers"
        (ICCV 2015) — variance-preserving initialization; Ioffe & Szegedy, "Batch
        Normalization" (ICML 2015); Wardat et al., "DeepDiagnosis" (ICSE 2022).
    """

    name = "activation-explosion"
    summary = "activation scale growing layer by layer or over steps"
    category = "layer"
    severity = "warning"
    requires = ("layers:activation",)
    needs = (
        LayerStat(fmt.KIND_ACTIVATION, "norm"),
        LayerStat(fmt.KIND_ACTIVATION, "numel"),
    )
    params = (
        Param(
            "depth_growth",
            100.0,
            "RMS of the last activation layers / RMS of the first ones, above which the scale "
            "explodes with depth",
            "He et al. 2015 (a variance-preserving network keeps this near 1); 100× is our "
            "calibration (healthy sample runs, a transformer included, stay under 10×)",
        ),
        Param(
            "time_growth",
            100.0,
            "smoothed RMS of a layer / its level over the first steps, above which the scale "
            "explodes over training",
            "runlens default, our calibration (healthy sample runs stay under 10×)",
        ),
        Param(
            "min_rms",
            10.0,
            "the grown activations must have at least this RMS",
            "runlens default: standard initializations keep activation RMS near 1",
        ),
        Param(
            "min_fraction",
            0.5,
            "fraction of post-transient recorded steps on which the depth growth must hold",
            "runlens default: 'sustained' means most of the run",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        steps, layers, v = _rms(ctx)
        # Growth over depth is the finding when both hold: one instability, one finding.
        depth, time = run_parts(
            ctx,
            (
                ("growth over depth", lambda: _over_depth(ctx, p, steps, layers, v)),
                ("growth over steps", lambda: _over_steps(ctx, p, steps, layers, v)),
            ),
        )
        found = depth or time
        return [found] if found is not None else []


_FIX = (
    "Use Kaiming/Xavier initialization, add BatchNorm/LayerNorm between layers, scale "
    "residual branches, lower the learning rate or add weight decay."
)
_CAUSES = (
    "initialization too large for the depth",
    "no normalization layers",
    "learning rate too high (weights growing)",
)


def _rms(ctx: Context) -> tuple[np.ndarray, tuple[str, ...], np.ndarray]:
    norm = ctx.layer(fmt.KIND_ACTIVATION, "norm")
    numel = ctx.layer(fmt.KIND_ACTIVATION, "numel")
    if norm is None or numel is None or norm.layers != numel.layers:
        raise NotChecked("no activation norm/numel statistics", "not-recorded")
    with np.errstate(invalid="ignore", divide="ignore"):
        v = norm.values / np.sqrt(np.where(numel.values > 0, numel.values, np.nan))
    v = np.where(np.isfinite(v) & (v > 0), v, np.nan)
    if not np.isfinite(v).any():
        raise NotChecked("no finite, non-zero activation norm", "not-recorded")
    return norm.steps, norm.layers, v


def _over_depth(
    ctx: Context, p: Params, steps: np.ndarray, layers: tuple[str, ...], v: np.ndarray
) -> Finding | None:
    if len(layers) < 3:
        raise NotChecked(
            f"{len(layers)} activation layer(s) recorded; comparing first and last layers needs 3",
            "not-applicable",
        )
    k = max(1, len(layers) // 4)
    lv = np.log10(v)
    early = _rowmean(lv[:, :k])
    late = _rowmean(lv[:, -k:])
    mask = steps > ctx.transient_end
    if mask.sum() < 3:
        mask = np.arange(len(steps)) >= len(steps) // 2
    valid = mask & np.isfinite(early) & np.isfinite(late)
    if valid.sum() < 2:
        raise NotChecked.too_few(
            int(valid.sum()), "steps with first and last layer activations", 2, "after the warm-up"
        )
    growth = 10 ** (late - early)
    hit = valid & (growth >= p.depth_growth) & (10**late >= p.min_rms)
    frac = hit.sum() / valid.sum()
    if frac < p.min_fraction:
        return None
    g = float(np.median(growth[valid]))
    e, la = float(np.median(10 ** early[valid])), float(np.median(10 ** late[valid]))
    sp = L.span(steps, hit)
    assert sp is not None
    first, last = list(layers[:k]), list(layers[-k:])
    return Finding(
        signature="activation-explosion",
        severity="warning",
        confidence=L.depth_confidence(g, p.depth_growth, frac),
        summary=(
            f"activation RMS grows {L.orders(g)} with depth, from {fmt_num(e)} in "
            f"{L.name_list(first)} to {fmt_num(la)} in {L.name_list(last)} (threshold "
            f"{fmt_num(p.depth_growth)}×) from step {sp[0]} to {sp[1]}"
        ),
        fix=_FIX,
        steps=sp,
        layers=tuple(last) + tuple(first),
        evidence=(
            Evidence("activation RMS, first layers (median)", e),
            Evidence("activation RMS, last layers (median)", la, p.min_rms, ">="),
            Evidence("last/first growth (median)", g, p.depth_growth, ">=", "×"),
            Evidence("fraction of steps over threshold", float(frac), p.min_fraction, ">="),
        ),
        causes=_CAUSES,
    )


def _over_steps(
    ctx: Context, p: Params, steps: np.ndarray, layers: tuple[str, ...], v: np.ndarray
) -> Finding | None:
    n = len(steps)
    if n < 10:
        raise NotChecked.too_few(n, "recorded activation steps", 10)
    lv = np.log10(v)
    n0 = max(3, n // 10)
    ok0 = np.isfinite(lv[:n0]).any(axis=0)
    start = np.full(lv.shape[1], np.nan)
    start[ok0] = np.nanmedian(lv[:n0, ok0], axis=0)
    win = max(3, n // 20)
    # Rolling median per column over the step axis: one odd batch is no trend. A rolling
    # median never exceeds the column's max, so columns whose max cannot pass the
    # thresholds below are skipped (the same verdict, much less work on long runs).
    with np.errstate(invalid="ignore"):
        top = np.nanmax(np.where(np.isfinite(lv), lv, -np.inf), axis=0)
        cand = (top - start >= np.log10(p.time_growth)) & (top >= np.log10(p.min_rms))
    smooth = np.full(lv.shape, np.nan)
    for j in np.flatnonzero(cand):
        smooth[:, j] = S.rolling_median(lv[:, j], win)
    late = steps > ctx.transient_end
    if not late.any():
        raise NotChecked(
            f"no activation statistics after the warm-up (step {ctx.transient_end})",
            "too-few-points",
        )
    sl = np.where(late[:, None], smooth, np.nan)
    growth = sl - start[None, :]
    big = np.isfinite(growth) & (growth >= np.log10(p.time_growth)) & (sl >= np.log10(p.min_rms))
    cols = np.flatnonzero(big.any(axis=0))
    if cols.size == 0:
        return None
    peak = np.nanmax(np.where(np.isfinite(growth[:, cols]), growth[:, cols], -np.inf), axis=0)
    order = cols[np.argsort(-peak)]
    j = int(order[0])
    i = int(np.nanargmax(np.where(np.isfinite(growth[:, j]), growth[:, j], -np.inf)))
    g = float(10 ** growth[i, j])
    sp = L.span(steps, big.any(axis=1))
    assert sp is not None
    names = [layers[c] for c in order]
    return Finding(
        signature="activation-explosion",
        severity="warning",
        confidence=float(min(1.0, 0.6 + 0.1 * np.log10(g / p.time_growth))),
        summary=(
            f"activation RMS of `{layers[j]}` grew {L.orders(g)} from "
            f"{fmt_num(10 ** start[j])} to {fmt_num(10 ** smooth[i, j])} at step "
            f"{int(steps[i])} (threshold {fmt_num(p.time_growth)}×); "
            f"{len(names)} layer(s) affected from step {sp[0]} to {sp[1]}"
        ),
        fix=_FIX,
        steps=sp,
        layers=tuple(names),
        evidence=(
            Evidence(f"activation RMS of {layers[j]} over the first steps", 10 ** start[j]),
            Evidence(f"peak activation RMS of {layers[j]}", 10 ** smooth[i, j], p.min_rms, ">="),
            Evidence("growth", g, p.time_growth, ">=", "×"),
        ),
        causes=_CAUSES,
    )


def _rowmean(x: np.ndarray) -> np.ndarray:
    ok = np.isfinite(x)
    n = ok.sum(axis=1)
    return np.where(n > 0, np.where(ok, x, 0.0).sum(axis=1) / np.maximum(n, 1), np.nan)
