"""The per-layer health table: one row per module with its latest gradient norm, update
ratio and dead/saturated fractions, marked where a finding points."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Finding, LayerHealth
from runlens.levels import tail_levels

TAIL_FRACTION = 0.1
"""Rows summarize the last 10% of recorded steps (runlens.levels.tail_levels: the median,
non-finite when most of them are), so one odd step does not show."""


def module_of(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else param


def layer_health(ctx: Context, findings: Sequence[Finding]) -> list[LayerHealth]:
    grad = _tail(ctx, fmt.KIND_GRAD, "norm")
    upd = _tail(ctx, fmt.KIND_UPDATE, "update_ratio")
    dead = _tail(ctx, fmt.KIND_ACTIVATION, "frac_dead_units")
    sat = _tail(ctx, fmt.KIND_ACTIVATION, "frac_saturated")
    order: list[str] = []
    for names in (grad, upd, dead, sat):
        for n in names:
            m = module_of(n) if names is grad or names is upd else n
            if m not in order:
                order.append(m)
    rows = []
    for mod in order:
        g = [v for k, v in grad.items() if module_of(k) == mod and np.isfinite(v)]
        u = [v for k, v in upd.items() if module_of(k) == mod and np.isfinite(v)]
        flagged = tuple(
            sorted(
                {
                    f.signature
                    for f in findings
                    if any(lay == mod or module_of(lay) == mod for lay in f.layers)
                }
            )
        )
        rows.append(
            LayerHealth(
                layer=mod or "<root>",
                grad_norm=float(np.sqrt(np.sum(np.square(g)))) if g else None,
                update_ratio=float(max(u)) if u else None,
                dead_fraction=_opt(dead.get(mod)),
                saturated_fraction=_opt(sat.get(mod)),
                flagged_by=flagged,
            )
        )
    return rows


def _tail(ctx: Context, kind: str, stat: str) -> dict[str, float]:
    return tail_levels(ctx.layer(kind, stat), TAIL_FRACTION)


def _opt(v: float | None) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)
