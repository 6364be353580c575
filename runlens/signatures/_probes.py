"""Shared helpers of the silent-bug signatures: the collector's probe scalars
(``format.PROBE_SCALARS``), its run.json ``probes`` facts and parameter facts.

The probes are described in ``runlens_collect.probes`` and docs/silent-bugs.md. A signature
that needs a probe declares one of its scalars in ``requires``, so a run recorded without
it (an imported log, an older collector, ``probes=()``) is reported as not checked.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runlens.context import Context
from runlens.signatures import _layers as L

LOW_PRECISION: dict[str, float] = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
"""Storage types without enough mantissa for small updates, with their resolution: half
the spacing of representable numbers relative to the value (bf16 keeps 8 significant bits,
fp16 11). An update smaller than this fraction of a weight rounds back to the weight."""


def probe_json(ctx: Context, probe: str) -> dict[str, Any]:
    """run.json ``probes.<probe>`` (empty when the probe did not run)."""
    probes = ctx.run.meta.get("probes")
    entry = probes.get(probe) if isinstance(probes, dict) else None
    return entry if isinstance(entry, dict) else {}


def series(ctx: Context, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and raw values of a probe scalar (empty arrays when absent)."""
    c = ctx.curve(name)
    if c is None:
        return np.zeros(0, np.int64), np.zeros(0)
    return c.steps, c.raw


def on_steps(ctx: Context, name: str, steps: np.ndarray) -> np.ndarray:
    """Values of scalar ``name`` at exactly ``steps`` (NaN where it has none)."""
    s, v = series(ctx, name)
    out = np.full(len(steps), np.nan)
    if s.size == 0:
        return out
    idx = np.searchsorted(s, steps)
    idx = np.clip(idx, 0, s.size - 1)
    hit = s[idx] == steps
    out[hit] = v[idx[hit]]
    return out


def param_dtype(ctx: Context, name: str) -> str | None:
    """Storage dtype of a parameter from run.json's model summary (None when unknown)."""
    return _dtypes(ctx).get(name)


def _dtypes(ctx: Context) -> dict[str, str]:
    return ctx.cached("_probes_param_dtypes", lambda: _read_dtypes(ctx))


def _read_dtypes(ctx: Context) -> dict[str, str]:
    from runlens.run import full_param_name

    out: dict[str, str] = {}
    for mod in (ctx.run.meta.get("model") or {}).get("modules", []) or []:
        if not isinstance(mod, dict):
            continue
        for prm in mod.get("params", []) or []:
            if isinstance(prm, dict) and isinstance(prm.get("dtype"), str) and "name" in prm:
                out[full_param_name(str(mod.get("path") or ""), str(prm["name"]))] = prm["dtype"]
    return out


def numel(ctx: Context, name: str) -> int:
    info = L.param_info(ctx).get(name)
    if info is None or info.shape is None:
        return 0
    return int(np.prod(info.shape)) if info.shape else 1


def step_list(steps: list[int] | np.ndarray, limit: int = 8) -> str:
    """``3, 17, 40 …`` (the first ``limit``)."""
    steps = [int(s) for s in steps]
    return ", ".join(str(s) for s in steps[:limit]) + (" …" if len(steps) > limit else "")


def weights_changed(ctx: Context) -> dict[str, bool]:
    """Parameters whose recorded weight statistics (norm or mean) changed over the run:
    some optimizer applies their gradients, whether or not the collector was given it."""
    return ctx.cached("_probes_weights_changed", lambda: _weights_changed(ctx))


def _weights_changed(ctx: Context) -> dict[str, bool]:
    from runlens_collect import format as fmt

    out: dict[str, bool] = {}
    for stat in ("norm", "mean"):
        w = ctx.layer(fmt.KIND_WEIGHT, stat)
        if w is None or len(w.steps) < 2:
            continue
        ok = np.isfinite(w.values)
        hi = np.where(ok, w.values, -np.inf).max(axis=0)
        lo = np.where(ok, w.values, np.inf).min(axis=0)
        moved = ok.any(axis=0) & (hi != lo)
        for j, name in enumerate(w.layers):
            out[name] = out.get(name, False) or bool(moved[j])
    return out
