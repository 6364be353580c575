"""Display data for graphical reports: a :class:`Run` and its :class:`Report` turned into
small, plain, JSON-able dicts (downsampled series, binned heatmaps, histograms).

The HTML renderer and the PNG figures read only this, so they stay pure functions and a
100k-step run still produces a light file:

* Line series keep each bucket's min and max (``series.downsample_minmax``), so spikes
  survive; NaN/±Inf points are listed separately (``nonfinite``) to be drawn as markers.
* Smoothed curves are recomputed by the viewer from ``ema``: the exact series when it has
  at most ``ema_points`` points, else the means of ``bucket`` consecutive points (the
  viewer then uses the weight ``w ** bucket`` so the time constant in steps is kept).
* Heatmaps are layer × step-bin matrices, at most ``heat_bins`` bins; the norm and update
  ratio take each bin's maximum (an explosion in one step stays visible), fractions the
  mean. Cells whose statistic was NaN/Inf are listed in ``nonfinite``.
* Histograms over time keep at most ``hist_steps`` recorded histogram steps per tensor.

Nothing here reads files beyond what :class:`Run` loads, and nothing renders. Given the
analysis' :class:`~runlens.context.Context` (runlens.engine.make_context), the series and
matrices it already read are reused; given a :class:`Run`, a Context is made for it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl
from runlens_collect import format as fmt

from runlens import series as S
from runlens.context import Context
from runlens.findings import Report
from runlens.health import module_of
from runlens.run import Run

PLOT_DATA_VERSION = 1

LINE_POINTS = 2000
"""Points kept per displayed raw line (min/max of LINE_POINTS/2 buckets)."""
EMA_POINTS = 10000
"""Points kept per series for the viewer's smoothing (exact below this length)."""
NONFINITE_POINTS = 500
"""NaN/Inf markers kept per series (first point of each non-finite run first)."""
HEAT_BINS = 240
HEAT_LAYERS = 200
HIST_STEPS = 40
HIST_TENSORS = 120

# Heatmap metric -> (kind, stat, transform, bin aggregation, label).
HEATMAPS: dict[str, tuple[str, str, str, str, str]] = {
    "grad_norm": (fmt.KIND_GRAD, "norm", "log10", "max", "gradient norm (log10)"),
    "update_ratio": (fmt.KIND_UPDATE, "update_ratio", "log10", "max", "update ratio (log10)"),
    "dead": (fmt.KIND_ACTIVATION, "frac_dead_units", "id", "mean", "dead-unit fraction"),
    "saturated": (fmt.KIND_ACTIVATION, "frac_saturated", "id", "mean", "saturated fraction"),
}

LOSS_CURVES = (fmt.TRAIN_LOSS, fmt.VAL_LOSS)
SMOOTHED = (fmt.TRAIN_LOSS, fmt.VAL_LOSS, fmt.GRAD_NORM)
"""Series the viewer smooths with the slider (others are shown raw)."""
MAX_EXTRA_CURVES = 12


def build_plot_data(
    source: Run | Context,
    report: Report,
    *,
    smoothing: float = S.DEFAULT_SMOOTHING,
    line_points: int = LINE_POINTS,
    ema_points: int = EMA_POINTS,
    heat_bins: int = HEAT_BINS,
    heat_layers: int = HEAT_LAYERS,
    hist_steps: int = HIST_STEPS,
    hist_tensors: int = HIST_TENSORS,
) -> dict[str, Any]:
    """Everything a graphical report draws for one run, as plain JSON-able values."""
    ctx = source if isinstance(source, Context) else Context(source, smoothing)
    run = ctx.run
    names = run.scalar_names
    lr_names = [n for n in names if n.startswith(fmt.LR_PREFIX)] or (
        ["lr"] if "lr" in names else []
    )
    special = {*LOSS_CURVES, fmt.GRAD_NORM, *lr_names}
    # Probe scalars are the silent-bug checks' evidence (fingerprints, counts), not curves.
    extra = [n for n in names if n not in special and not n.startswith(("time/", fmt.PROBE_PREFIX))]
    series: dict[str, Any] = {}
    for name in [*LOSS_CURVES, fmt.GRAD_NORM, *lr_names, *extra[:MAX_EXTRA_CURVES]]:
        s = ctx.scalar(name)
        if s is not None and len(s):
            with_ema = name in SMOOTHED
            series[name] = line_series(s.steps, s.values, line_points, ema_points, with_ema)
    heatmaps = {}
    for key, spec in HEATMAPS.items():
        h = heatmap(ctx, *spec[:4], heat_bins, heat_layers)
        if h is not None:
            h["label"] = spec[4]
            heatmaps[key] = h
    return {
        "version": PLOT_DATA_VERSION,
        "name": run.name,
        "x_axis": run.x_axis,
        "smoothing": float(smoothing),
        "series": series,
        "lr": [n for n in lr_names if n in series],
        "extra": [n for n in extra[:MAX_EXTRA_CURVES] if n in series],
        "extra_left_out": max(0, len(extra) - MAX_EXTRA_CURVES),
        "time": step_time(ctx, line_points // 2),
        "heatmaps": heatmaps,
        "hist": histograms(ctx, hist_steps, hist_tensors),
        "findings": finding_targets(report, heatmaps),
    }


def build_comparison_plot_data(comparison: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """Display data for each run of a :class:`~runlens.compare.Comparison`, in its order.

    The comparison keeps reports, not frames, so each run is loaded again (lazily: only
    the columns drawn are read). Keyword arguments go to :func:`build_plot_data`.
    """
    from runlens.sources import open_run  # reads imported logs (TensorBoard, CSV) too

    kwargs.setdefault("heat_bins", HEAT_BINS // 2)  # n runs in one file: keep it light
    return [build_plot_data(open_run(e.path), e.report, **kwargs) for e in comparison.runs]


# -- line series --------------------------------------------------------------------------


def line_series(
    steps: np.ndarray,
    values: np.ndarray,
    line_points: int = LINE_POINTS,
    ema_points: int = EMA_POINTS,
    with_ema: bool = True,
) -> dict[str, Any]:
    """A raw line (min/max downsampled), its non-finite points, and the smoothing input."""
    st = np.asarray(steps, dtype=np.int64)
    x = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(x)
    ds, dv = S.downsample_minmax(st[finite], x[finite], line_points)
    out: dict[str, Any] = {
        "n": int(x.size),
        "steps": _ints(ds),
        "values": _floats(dv),
        "nonfinite": nonfinite_points(st, x),
    }
    if with_ema:
        out["ema"] = ema_source(st, x, ema_points)
    return out


def nonfinite_points(steps: np.ndarray, values: np.ndarray, cap: int = NONFINITE_POINTS) -> dict:
    """NaN/±Inf points as ``{steps, kinds, count}``; at most ``cap`` markers, always
    including the first point of every contiguous non-finite run (when that fits)."""
    x = np.asarray(values, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size > cap:
        starts = bad[np.concatenate([[True], np.diff(bad) > 1])]
        rest = np.setdiff1d(bad, starts)
        room = max(0, cap - starts.size)
        pick = rest[np.linspace(0, rest.size - 1, room).astype(np.int64)] if room else rest[:0]
        bad = np.unique(np.concatenate([starts[:cap], pick]))
    kinds = ["nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") for v in x[bad]]
    return {
        "steps": _ints(np.asarray(steps)[bad]),
        "kinds": kinds,
        "count": int((~np.isfinite(x)).sum()),
    }


def ema_source(steps: np.ndarray, values: np.ndarray, cap: int = EMA_POINTS) -> dict[str, Any]:
    """The input of the viewer's EMA: the series itself when short, else bucket means.

    A bucket containing a non-finite value stays non-finite (the EMA passes it through),
    so a NaN is never averaged away.
    """
    st = np.asarray(steps, dtype=np.int64)
    x = np.asarray(values, dtype=np.float64)
    if x.size <= cap:
        return {"bucket": 1, "steps": _ints(st), "values": _floats(x)}
    k = math.ceil(x.size / cap)
    n = x.size // k * k
    head = x[:n].reshape(-1, k)
    with np.errstate(invalid="ignore"):
        means = head.mean(axis=1)  # NaN/Inf propagate on purpose
    bucket_steps = st[:n].reshape(-1, k)[:, -1]
    if n < x.size:  # the short last bucket
        means = np.append(means, x[n:].mean())
        bucket_steps = np.append(bucket_steps, st[-1])
    return {"bucket": int(k), "steps": _ints(bucket_steps), "values": _floats(means)}


def step_time(source: Run | Context, buckets: int) -> dict[str, Any] | None:
    """time/data and time/compute on a shared step grid (bucket means, so they stack)."""
    data, comp = source.scalar(fmt.TIME_DATA), source.scalar(fmt.TIME_COMPUTE)
    total = source.scalar(fmt.TIME_STEP)
    if data is None and comp is None and total is None:
        return None
    ref = comp or data or total
    assert ref is not None
    steps = ref.steps
    cols = {}
    for key, s in (("data", data), ("compute", comp), ("step", total)):
        if s is not None:
            cols[key] = S.align(s.steps, s.values, steps) if len(s) > 1 else s.values
    k = max(1, math.ceil(len(steps) / max(1, buckets)))
    n = math.ceil(len(steps) / k)
    edges = np.minimum(np.arange(n + 1) * k, len(steps))
    out: dict[str, Any] = {"steps": _ints([steps[min(b, len(steps)) - 1] for b in edges[1:]])}
    for key, v in cols.items():
        means = []
        for a, b in itertools.pairwise(edges):
            seg = v[a:b]
            seg = seg[np.isfinite(seg)]
            means.append(float(seg.mean()) if seg.size else float("nan"))
        out[key] = _floats(means)
    out["bucket"] = int(k)
    return out


# -- heatmaps -------------------------------------------------------------------------------


def heatmap(
    source: Run | Context,
    kind: str,
    stat: str,
    transform: str,
    agg: str,
    max_bins: int = HEAT_BINS,
    max_layers: int = HEAT_LAYERS,
) -> dict[str, Any] | None:
    """A layer × step-bin matrix of one statistic (rows in model order)."""
    m = source.layer(kind, stat) if isinstance(source, Context) else source.layer_matrix(kind, stat)
    if m is None or m.values.size == 0 or not m.layers:
        return None
    v = m.values[:, :max_layers]
    layers = list(m.layers[:max_layers])
    bad = ~np.isfinite(v)
    zero_floor = None
    if transform == "log10":
        pos = v[np.isfinite(v) & (v > 0)]
        # Zero norms are real (frozen or dead layers): draw them one decade below the
        # smallest positive value, so they stay visible without squashing the colour scale.
        zero_floor = float(np.floor(np.log10(pos.min())) - 1) if pos.size else -12.0
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where(v > 0, np.log10(np.where(v > 0, v, 1.0)), zero_floor)
    v = np.where(bad, np.nan, v)
    n = len(m.steps)
    per_bin = math.ceil(n / max(1, max_bins))  # whole steps per column: easier to read
    nb = math.ceil(n / per_bin)
    edges = np.minimum(np.arange(nb + 1) * per_bin, n)
    z = np.full((len(layers), nb), np.nan)
    bad_bins = np.zeros((len(layers), nb), dtype=bool)
    bin_steps = []
    for b in range(nb):
        a, e = edges[b], edges[b + 1]
        seg = v[a:e]
        bad_bins[:, b] = bad[a:e].any(axis=0)
        ok = np.isfinite(seg)
        with np.errstate(invalid="ignore"):
            if agg == "max":
                col = np.where(ok, seg, -np.inf).max(axis=0)
            else:
                col = np.where(ok, seg, 0.0).sum(axis=0) / np.maximum(ok.sum(axis=0), 1)
        z[:, b] = np.where(ok.any(axis=0), col, np.nan)
        bin_steps.append([int(m.steps[a]), int(m.steps[e - 1])])
    cells = np.argwhere(bad_bins)
    return {
        "kind": kind,
        "stat": stat,
        "layers": layers,
        "layers_left_out": max(0, len(m.layers) - max_layers),
        "x": [int((a + b) / 2) for a, b in bin_steps],
        "bins": bin_steps,
        "z": [_floats(row, 4) for row in z],
        "nonfinite": [[int(i), int(j)] for i, j in cells[:2000]],
        "steps_per_bin": int(per_bin),
        "zero_floor": zero_floor,
    }


# -- histograms -----------------------------------------------------------------------------


def hist_bin_labels() -> list[str]:
    """One readable label per fixed bin of format.py, e.g. ``-2^3``, ``0``, ``≥2^8``."""
    labels = [f"≤-2^{fmt.HIST_LOG2_MAX}"]
    labels += [f"-2^{k}" for k in range(fmt.HIST_LOG2_MAX - 1, fmt.HIST_LOG2_MIN - 1, -1)]
    labels.append("0")
    labels += [f"2^{k}" for k in range(fmt.HIST_LOG2_MIN, fmt.HIST_LOG2_MAX)]
    labels.append(f"≥2^{fmt.HIST_LOG2_MAX}")
    return labels


def histograms(
    source: Run | Context, max_steps: int = HIST_STEPS, max_tensors: int = HIST_TENSORS
) -> dict:
    """Fixed-bin histograms over time: per (kind, layer), fractions per bin at up to
    ``max_steps`` evenly spaced histogram steps; bins trimmed to the used range.

    Two queries: which (kind, layer, step) rows have a histogram (small columns), then
    the histograms of the rows kept only (at most ``max_tensors`` × ``max_steps``), so
    a long run's histograms are never all in memory."""
    run = source.run if isinstance(source, Context) else source
    query = source.query if isinstance(source, Context) else run.query
    empty: dict[str, Any] = {"labels": [], "tensors": []}
    if run.layers is None:
        return empty
    keys = ["step", "layer", "kind"]
    where = query(
        fmt.LAYERS_DIR,
        lambda lf: lf.filter(pl.col("hist").is_not_null()).select(
            "step", pl.col("layer").cast(pl.String), pl.col("kind").cast(pl.String)
        ),
    )
    if where.height == 0:
        return empty
    where = where.unique(keys, keep="last", maintain_order=True)
    chosen: list[tuple[str, str, np.ndarray]] = []
    for (kind, layer), g in where.group_by(["kind", "layer"], maintain_order=True):
        if len(chosen) >= max_tensors:
            break
        st = np.sort(g["step"].to_numpy())
        idx = np.unique(np.linspace(0, st.size - 1, min(max_steps, st.size)).astype(np.int64))
        chosen.append((str(kind), str(layer), st[idx]))
    picked = pl.DataFrame(
        {
            "kind": [k for k, _, s in chosen for _ in s],
            "layer": [lay for _, lay, s in chosen for _ in s],
            "step": np.concatenate([s for _, _, s in chosen]).astype(np.int64),
        }
    )
    steps = picked["step"].unique().implode()
    rows = query(
        fmt.LAYERS_DIR,
        lambda lf: (
            lf.filter(pl.col("hist").is_not_null() & pl.col("step").is_in(steps))
            .select("step", pl.col("layer").cast(pl.String), pl.col("kind").cast(pl.String), "hist")
            .join(picked.lazy(), on=keys, how="semi", maintain_order="left")
        ),
    )
    rows = rows.unique(keys, keep="last", maintain_order=True)
    hist_of = {
        (k, lay, int(st)): h
        for k, lay, st, h in zip(
            rows["kind"], rows["layer"], rows["step"], rows["hist"], strict=True
        )
    }
    tensors: list[dict[str, Any]] = []
    lo, hi = fmt.HIST_NUM_BINS, -1
    for kind, layer, st in chosen:
        counts = np.zeros((st.size, fmt.HIST_NUM_BINS))
        for r, step in enumerate(st):
            h = hist_of.get((kind, layer, int(step)))
            h = np.asarray(h.to_list() if h is not None else [], dtype=np.float64)
            counts[r, : min(h.size, fmt.HIST_NUM_BINS)] = h[: fmt.HIST_NUM_BINS]
        used = np.flatnonzero(counts.sum(axis=0) > 0)
        if used.size:
            lo, hi = min(lo, int(used[0])), max(hi, int(used[-1]))
        tensors.append({"kind": kind, "layer": layer, "steps": _ints(st), "c": counts})
    if hi < 0:
        return empty
    for t in tensors:
        c = t.pop("c")[:, lo : hi + 1]
        tot = c.sum(axis=1, keepdims=True)
        frac = np.divide(c, tot, out=np.zeros_like(c), where=tot > 0)
        t["frac"] = [_floats(row, 3) for row in frac]
    return {"labels": hist_bin_labels()[lo : hi + 1], "tensors": tensors}


# -- findings ---------------------------------------------------------------------------------


def layer_matches(finding_layer: str, row: str) -> bool:
    """A finding's layer (a parameter or a module path) designates heatmap row ``row``."""
    return (
        row == finding_layer or module_of(row) == finding_layer or row == module_of(finding_layer)
    )


def finding_targets(report: Report, heatmaps: dict[str, Any]) -> list[dict[str, Any]]:
    """Per finding (report order): its step range and the heatmap rows it designates."""
    out = []
    for f in report.findings:
        rows = {
            key: [
                i
                for i, row in enumerate(h["layers"])
                if any(layer_matches(L, row) for L in f.layers)
            ]
            for key, h in heatmaps.items()
        }
        out.append({"steps": list(f.steps) if f.steps else None, "rows": rows})
    return out


# -- helpers ---------------------------------------------------------------------------------


def _ints(a: Sequence[int] | np.ndarray) -> list[int]:
    return [int(v) for v in a]


def _floats(a: Sequence[float] | np.ndarray, digits: int | None = None) -> list[float | None]:
    """Floats for JSON: non-finite -> None; optionally rounded to ``digits`` significant."""
    out: list[float | None] = []
    for v in a:
        f = float(v)
        if not math.isfinite(f):
            out.append(None)
        elif digits is None or f == 0:
            out.append(f)
        else:
            out.append(float(f"{f:.{digits}g}"))
    return out
