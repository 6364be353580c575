"""Shared helpers of the layer-level signatures: which parameters count, which steps count,
and how to name them in a summary. Everything works on whole step × layer matrices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from runlens.context import Context
from runlens.findings import Evidence, fmt_num
from runlens.run import LayerMatrix, full_param_name
from runlens.signatures.base import NotChecked

RELU_FAMILY = ("ReLU", "ReLU6", "RReLU", "Threshold")
"""Modules whose outputs are exactly zero on their negative side (LeakyReLU, GELU, SiLU
are not: their units cannot die)."""

BOUNDED = ("Tanh", "Sigmoid", "Hardtanh", "Hardsigmoid", "Softsign", "LogSigmoid", "Tanhshrink")
"""Modules with a bounded range, whose units can saturate."""

NORM_MODULES = ("Norm",)  # BatchNorm*, LayerNorm, GroupNorm, RMSNorm...

MIN_ROWS = 3
"""Fewer recorded steps of a statistic than this: too few to call anything persistent."""


def require_rows(m: LayerMatrix, need: int = MIN_ROWS) -> None:
    """Raise NotChecked when ``m`` has fewer than ``need`` recorded steps."""
    if len(m.steps) < need:
        raise NotChecked.too_few(len(m.steps), f"recorded steps of {m.kind} {m.stat}", need)


@dataclass(frozen=True)
class ParamInfo:
    shape: tuple[int, ...] | None
    requires_grad: bool | None
    module_type: str


def param_info(ctx: Context) -> dict[str, ParamInfo]:
    """Parameter name -> shape / requires_grad / owning module type, from run.json."""
    return ctx.cached("_layers_param_info", lambda: _param_info(ctx.run.meta))


def _param_info(meta: dict[str, Any]) -> dict[str, ParamInfo]:
    out: dict[str, ParamInfo] = {}
    for mod in (meta.get("model") or {}).get("modules", []) or []:
        if not isinstance(mod, dict):
            continue
        path = str(mod.get("path") or "")
        for prm in mod.get("params", []) or []:
            if not isinstance(prm, dict) or "name" not in prm:
                continue
            name = full_param_name(path, str(prm["name"]))
            shape = prm.get("shape")
            rg = prm.get("requires_grad")
            out[name] = ParamInfo(
                shape=tuple(int(s) for s in shape) if isinstance(shape, list) else None,
                requires_grad=bool(rg) if isinstance(rg, bool) else None,
                module_type=str(mod.get("type") or ""),
            )
    return out


def is_weight_matrix(ctx: Context, name: str) -> bool:
    """A weight of a linear/conv/embedding layer: ≥2-D and not a normalization scale.

    Biases and norm gains start at 0 or 1 and move differently; update ratios and gradient
    depth profiles are defined on the weight matrices (as in CS231n's heuristic)."""
    info = param_info(ctx).get(name)
    mtype = info.module_type if info else ctx.module_type(name)
    if any(n in mtype for n in NORM_MODULES):
        return False
    if info is not None and info.shape is not None:
        return len(info.shape) >= 2
    leaf = name.rsplit(".", 1)[-1]
    return "weight" in leaf and "norm" not in name.lower()


def weight_columns(ctx: Context, m: LayerMatrix) -> np.ndarray:
    """Column indices of ``m`` that are weight matrices (all columns if none are)."""
    idx = np.array([j for j, n in enumerate(m.layers) if is_weight_matrix(ctx, n)], dtype=int)
    return idx if idx.size else np.arange(len(m.layers))


def after_transient(ctx: Context, m: LayerMatrix, min_rows: int = 3) -> np.ndarray:
    """Row mask of the steps after early-training transients (all rows if too few)."""
    mask = m.steps > ctx.transient_end
    if mask.sum() < min_rows:
        # Short run: keep the second half rather than nothing.
        mask = np.arange(len(m.steps)) >= len(m.steps) // 2
    return mask


def nanmedian0(x: np.ndarray) -> np.ndarray:
    """Column-wise median over finite values; NaN for an all-NaN column, no warning."""
    x = np.where(np.isfinite(x), x, np.nan)
    out = np.full(x.shape[1:], np.nan)
    ok = np.isfinite(x).any(axis=0)
    if ok.any():
        out[ok] = np.nanmedian(x[:, ok], axis=0)
    return out


def frac_true(mask: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Column-wise fraction of valid rows where ``mask`` holds (0 where none are valid)."""
    n = valid.sum(axis=0)
    return np.where(n > 0, (mask & valid).sum(axis=0) / np.maximum(n, 1), 0.0)


def span(steps: np.ndarray, mask: np.ndarray) -> tuple[int, int] | None:
    """First and last step where ``mask`` (1-D over rows) holds."""
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return None
    return int(steps[idx[0]]), int(steps[idx[-1]])


def name_list(names: list[str] | tuple[str, ...], limit: int = 3) -> str:
    """```a`, `b`, `c` and 4 more``."""
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    more = len(names) - limit
    return f"{shown} and {more} more" if more > 0 else shown


def orders(ratio: float) -> str:
    """A ratio as a power of ten for summaries: ``10^4.2×``."""
    if not np.isfinite(ratio) or ratio <= 0:
        return fmt_num(ratio) + "×"
    return f"10^{np.log10(ratio):.1f}×"


def depth_confidence(ratio: float, threshold: float, frac: float) -> float:
    """Confidence of a first-vs-last-layers finding: decades past ``threshold`` and the
    share ``frac`` of steps over it (exploding-gradients, activation-explosion)."""
    return float(min(1.0, 0.5 + 0.1 * np.log10(ratio / threshold) + 0.3 * frac))


@dataclass(frozen=True)
class Persistent:
    """Layers whose statistic stays at or above a threshold after the transient."""

    layers: tuple[str, ...]
    """Flagged layers, worst (highest median) first."""
    medians: tuple[float, ...]
    shares: tuple[float, ...]
    """Share of post-transient steps at or above the threshold, per flagged layer."""
    steps: tuple[int, int] | None

    def confidence(self, threshold: float) -> float:
        """Higher the further the worst layer is past ``threshold`` and the longer it stays."""
        return float(min(1.0, 0.5 + (self.medians[0] - threshold) + 0.2 * max(self.shares)))

    def evidence(self, stat: str, threshold: float, min_fraction: float) -> tuple[Evidence, ...]:
        """``stat`` of the first 8 flagged layers, then the worst layer's share of steps."""
        return (
            *(
                Evidence(f"{stat} of {n} (median)", med, threshold, ">=")
                for n, med in zip(self.layers[:8], self.medians[:8], strict=False)
            ),
            Evidence(
                "share of steps over threshold (worst layer)", self.shares[0], min_fraction, ">="
            ),
        )

    @property
    def step_text(self) -> str:
        """`` from step A to B`` (empty without a step range), to end a summary."""
        return f" from step {self.steps[0]} to {self.steps[1]}" if self.steps else ""


def persistent_layers(
    ctx: Context, m: LayerMatrix, cols: np.ndarray, threshold: float, min_fraction: float
) -> Persistent | None:
    """Columns ``cols`` of ``m`` at or above ``threshold`` on ``min_fraction`` of the
    post-transient steps (None when no layer is). Raises NotChecked when those columns hold
    no finite value after the transient (nothing to judge)."""
    if cols.size == 0:
        return None
    require_rows(m)
    post = after_transient(ctx, m)
    v = m.values[post][:, cols]
    valid = np.isfinite(v)
    if not valid.any():
        raise NotChecked(
            f"no finite {m.kind} {m.stat} value in the {cols.size} layer(s) it applies to, "
            f"over {int(post.sum())} recorded step(s) after the warm-up",
            "not-recorded",
        )
    with np.errstate(invalid="ignore"):
        over = valid & (v >= threshold)
    share = frac_true(over, valid)
    med = nanmedian0(v)
    flagged = np.flatnonzero((share >= min_fraction) & valid.any(axis=0))
    if flagged.size == 0:
        return None
    flagged = flagged[np.argsort(-med[flagged])]
    return Persistent(
        layers=tuple(m.layers[cols[j]] for j in flagged),
        medians=tuple(float(med[j]) for j in flagged),
        shares=tuple(float(share[j]) for j in flagged),
        steps=span(m.steps[post], over[:, flagged].any(axis=1)),
    )
