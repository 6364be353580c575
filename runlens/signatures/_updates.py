"""Shared logic of tiny-updates and large-updates: the update/weight ratio of the weight
matrices after the early transient, compared with a bound on most layers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.signatures import _layers as L
from runlens.signatures.base import NotChecked


@dataclass(frozen=True)
class UpdateVerdict:
    layers: tuple[str, ...]
    """Weight layers whose median ratio is beyond the bound, most extreme first."""
    layer_medians: tuple[float, ...]
    median_ratio: float
    """Median over the post-transient steps of the per-step median over weight layers."""
    layer_share: float
    """Fraction of weight layers whose median ratio is beyond the bound."""
    step_share: float
    """Fraction of post-transient steps on which most layers were beyond the bound."""
    steps: tuple[int, int] | None
    n_layers: int


def update_verdict(ctx: Context, bound: float, below: bool, most_layers: float) -> UpdateVerdict:
    """Compare update ratios with ``bound`` (``below``: ratio < bound, else > bound).
    Raises NotChecked without update ratios or when no weight layer moved."""
    m = ctx.layer(fmt.KIND_UPDATE, "update_ratio")
    if m is None:
        raise NotChecked("no update_ratio statistic", "not-recorded")
    L.require_rows(m)
    cols = L.weight_columns(ctx, m)
    post = L.after_transient(ctx, m)
    v = m.values[post][:, cols]
    # Frozen parameters (never moved) are frozen-layer's finding, not a learning-rate one.
    moving = (np.isfinite(v) & (v > 0)).any(axis=0)
    cols, v = cols[moving], v[:, moving]
    if cols.size == 0:
        raise NotChecked(
            f"no weight layer moved in {int(post.sum())} recorded step(s) after the warm-up "
            "(frozen parameters are frozen-layer's finding)",
            "not-applicable",
        )
    valid = np.isfinite(v)
    with np.errstate(invalid="ignore"):
        beyond = valid & ((v < bound) if below else (v > bound))
    # Per step: the share of layers beyond the bound.
    n_valid = valid.sum(axis=1)
    share_per_step = np.where(n_valid > 0, beyond.sum(axis=1) / np.maximum(n_valid, 1), np.nan)
    ok_steps = n_valid > 0
    hit = ok_steps & (share_per_step >= most_layers)
    step_share = float(hit.sum() / max(1, ok_steps.sum()))
    med_layer = L.nanmedian0(v)
    with np.errstate(invalid="ignore"):
        flagged = np.flatnonzero((med_layer < bound) if below else (med_layer > bound))
    order = flagged[np.argsort(med_layer[flagged] if below else -med_layer[flagged])]
    step_med = np.full(v.shape[0], np.nan)
    rows = valid.any(axis=1)
    step_med[rows] = np.nanmedian(np.where(valid[rows], v[rows], np.nan), axis=1)
    return UpdateVerdict(
        layers=tuple(m.layers[cols[j]] for j in order),
        layer_medians=tuple(float(med_layer[j]) for j in order),
        median_ratio=float(np.nanmedian(step_med)) if np.isfinite(step_med).any() else np.nan,
        layer_share=float(flagged.size / cols.size),
        step_share=step_share,
        steps=L.span(m.steps[post], hit),
        n_layers=int(cols.size),
    )


def update_findings(
    name: str,
    ctx: Context,
    bound: float,
    below: bool,
    most_layers: float,
    min_fraction: float,
    margin_weight: float,
    fix: str,
    causes: tuple[str, ...],
) -> list[Finding]:
    """The one finding of tiny-updates (``below``) or large-updates, or none.

    ``margin_weight`` scales how much the decades between median ratio and ``bound`` add to
    the confidence.
    """
    v = update_verdict(ctx, bound, below=below, most_layers=most_layers)
    if v.step_share < min_fraction or v.layer_share < most_layers:
        return []
    ratio = max(v.median_ratio, 1e-300)
    margin = np.log10(bound / ratio) if below else np.log10(ratio / bound)
    side, op, extreme = ("below", "<", "slowest") if below else ("above", ">", "fastest")
    where = f" from step {v.steps[0]} to {v.steps[1]}" if v.steps else ""
    return [
        Finding(
            signature=name,
            severity="warning",
            confidence=float(min(1.0, 0.5 + margin_weight * margin + 0.2 * v.step_share)),
            summary=(
                f"update/weight ratio is {fmt_num(v.median_ratio)} (median), {side} "
                f"{fmt_num(bound)} on {v.layer_share:.0%} of {v.n_layers} weight "
                f"layers{where}; Karpathy's heuristic is ~1e-3 — {extreme}: "
                f"{L.name_list(list(v.layers))}"
            ),
            fix=fix,
            steps=v.steps,
            layers=v.layers,
            evidence=(
                Evidence("median update/weight ratio", v.median_ratio, bound, op),
                Evidence(f"share of weight layers {side}", v.layer_share, most_layers, ">="),
                Evidence(f"share of steps {side}", v.step_share, min_fraction, ">="),
                *(
                    Evidence(f"update ratio of {n}", r)
                    for n, r in zip(v.layers[:3], v.layer_medians[:3], strict=False)
                ),
            ),
            causes=causes,
        )
    ]
