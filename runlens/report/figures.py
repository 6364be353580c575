"""Static PNG plots for the Markdown report (``runlens analyze --format markdown --plots DIR``).

:func:`render_pngs` draws display data from :mod:`runlens.plotdata` with matplotlib and
returns the PNG bytes by file name; it writes nothing (the CLI does). :func:`with_images`
appends the image section to a Markdown report. matplotlib is optional
(``pip install 'runlens[plots]'``); without it :func:`render_pngs` raises a one-line
:class:`~runlens.errors.RunlensError`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from runlens import series as S
from runlens.errors import RunlensError
from runlens.report.markdown import escape

LOSS_PNG = "loss.png"
GRAD_NORM_PNG = "grad_norm.png"
LAYERS_PNG = "layers_grad_norm.png"
TITLES = {
    LOSS_PNG: "Loss (raw and smoothed)",
    GRAD_NORM_PNG: "Total gradient norm",
    LAYERS_PNG: "Gradient norm per layer (log10)",
}


def render_pngs(run_data: Mapping[str, Any], dpi: int = 110) -> dict[str, bytes]:
    """PNG bytes by file name: loss curves, total gradient norm, layer heatmap (those the
    run has data for), in display order."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RunlensError(
            "--plots needs matplotlib: pip install 'runlens[plots]' (or matplotlib)"
        ) from None
    out: dict[str, bytes] = {}
    series = run_data.get("series", {})
    w = float(run_data.get("smoothing", S.DEFAULT_SMOOTHING))
    for fname, names in ((LOSS_PNG, ("train/loss", "val/loss")), (GRAD_NORM_PNG, ("grad_norm",))):
        present = [n for n in names if n in series]
        if not present:
            continue
        fig = Figure(figsize=(8, 3.2), dpi=dpi, layout="constrained")
        ax = fig.add_subplot()
        for k, name in enumerate(present):
            _line(ax, name, series[name], w, f"C{k}")
        ax.set_xlabel(str(run_data.get("x_axis") or "step"))
        ax.set_title(TITLES[fname], fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        out[fname] = _png(fig)
    heat = run_data.get("heatmaps", {}).get("grad_norm")
    if heat:
        z = np.array([[np.nan if v is None else v for v in row] for row in heat["z"]], dtype=float)
        n = len(heat["layers"])
        fig = Figure(figsize=(8, 1.2 + 0.22 * min(n, 60)), dpi=dpi, layout="constrained")
        ax = fig.add_subplot()
        x = heat["x"]
        im = ax.imshow(
            z,
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            extent=(x[0], x[-1] if len(x) > 1 else x[0] + 1, n - 0.5, -0.5),
        )
        ax.set_yticks(range(n), [_label(s) for s in heat["layers"]], fontsize=7)
        ax.set_xlabel("step")
        ax.set_title(TITLES[LAYERS_PNG], fontsize=10)
        fig.colorbar(im, ax=ax)
        out[LAYERS_PNG] = _png(fig)
    return out


def with_images(markdown_text: str, images: Sequence[tuple[str, str]]) -> str:
    """``markdown_text`` followed by a Plots section showing ``(file name, relative path)``
    pairs (paths use ``/`` and are written as given, so they resolve from the .md file)."""
    if not images:
        return markdown_text
    lines = [markdown_text.rstrip("\n"), "", "### Plots", ""]
    for fname, rel in images:
        title = TITLES.get(fname, fname)
        lines += [f"![{escape(title)}](<{rel}>)", ""]
    return "\n".join(lines)


def _line(ax: Any, name: str, s: Mapping[str, Any], w: float, color: str) -> None:
    steps = np.asarray(s["steps"], dtype=float)
    vals = np.array([np.nan if v is None else v for v in s["values"]], dtype=float)
    ax.plot(steps, vals, color=color, alpha=0.3, lw=0.8)
    ema = s.get("ema")
    if ema:
        ev = np.array([np.nan if v is None else v for v in ema["values"]], dtype=float)
        weight = w ** int(ema.get("bucket", 1))
        ax.plot(ema["steps"], S.ema_debiased(ev, weight), color=color, lw=1.6, label=name)
    else:
        ax.lines[-1].set_label(name)
    nf = s.get("nonfinite") or {}
    if nf.get("steps"):
        top = np.nanmax(vals) if np.isfinite(vals).any() else 0.0
        ax.plot(nf["steps"], [top] * len(nf["steps"]), "x", color="red", label=f"{name} NaN/Inf")


def _label(name: str, width: int = 40) -> str:
    # matplotlib treats $...$ as mathtext: escape it so a layer name renders literally.
    text = name if len(name) <= width else name[: width - 1] + "…"
    return text.replace("$", r"\$")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
