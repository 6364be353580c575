"""Runs side by side: ranking, config differences, findings matrix, where curves separate.

``compare(runs) -> Comparison`` loads and analyzes every run (in a thread pool: polars and
numpy release the GIL), then compares them. It never prints; a caller that wants a
progress bar passes ``on_progress`` (the CLI uses :func:`progress_bar`). A run that cannot
be read becomes an entry in ``Comparison.errors`` instead of failing the comparison; only
when no run at all can be read does it raise :class:`~runlens.errors.RunlensError`.

Every per-run tuple in a :class:`Comparison` (config values, matrix cells) is in the
order of ``Comparison.runs``, which is the ranking. The baseline for pairwise results
(separation, layer differences) is the first run *given*, whatever its rank.
See docs/compare.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from runlens_collect import format as fmt

from runlens import metrics as M
from runlens import series as S
from runlens.context import Context
from runlens.discover import FoundRun, discover
from runlens.engine import AnalyzeOptions, analyze
from runlens.errors import OptionError, RunlensError
from runlens.findings import SEVERITY_ORDER, Report, Severity, _jsonable
from runlens.levels import levels
from runlens.run import Run
from runlens.sources import open_found
from runlens.storage import is_url

Mode = Literal["min", "max"]
By = Literal["step", "time"]
ProgressFn = Callable[[int, int], None]
"""Called as ``on_progress(done, total)`` after each run is loaded and analyzed."""

# Metric direction (docs/compare.md): see runlens.metrics (re-exported here).
HIGHER_IS_BETTER = M.HIGHER_IS_BETTER
LOWER_IS_BETTER = M.LOWER_IS_BETTER

GRAD_NORM_STAT = "grad_norm"
UPDATE_RATIO_STAT = "update_ratio"
_LAYER_STATS = {
    GRAD_NORM_STAT: (fmt.KIND_GRAD, "norm"),
    UPDATE_RATIO_STAT: (fmt.KIND_UPDATE, "update_ratio"),
}
_GLOB_CHARS = re.compile(r"[*?\[]")
PROGRESS_MIN_RUNS = 10


@dataclass(frozen=True)
class CompareOptions:
    """How to compare. ``metric=None`` picks ``val/loss`` if every run has it, else
    ``train/loss``; ``mode=None`` infers the direction from the metric name."""

    metric: str | None = None
    mode: Mode | None = None
    by: By = "step"
    analyze: AnalyzeOptions = field(default_factory=AnalyzeOptions)
    separation_k: float = 3.0
    """Curves separate where |Δ smoothed| > k × √2 × min(σ_a, σ_b) (σ: robust step noise)."""
    separation_min_rel: float = 0.02
    """... and |Δ| > this fraction of the curves' level, so noiseless curves need a real gap."""
    separation_window: int = 5
    """... for this many consecutive compared points (fewer on very short overlaps)."""
    layer_ratio: float = 10.0
    """Per-layer medians differing by at least this factor are reported."""
    layer_tail: float = 0.25
    """Per-layer values are medians over this last fraction of the recorded steps."""
    workers: int | None = None
    input_format: str | None = None
    """Format of inputs that are not runlens runs (None: detect; see runlens.sources)."""
    mapping: tuple[tuple[str, str], ...] = ()
    """Source-name -> runlens-name overrides for imported logs (``--map``)."""

    def __post_init__(self) -> None:
        if self.by not in ("step", "time"):
            raise OptionError(f"--by must be 'step' or 'time', got {self.by!r}")
        if self.mode not in (None, "min", "max"):
            raise OptionError(f"metric mode must be 'min' or 'max', got {self.mode!r}")
        if self.separation_k <= 0 or self.separation_window < 1:
            raise OptionError("separation_k must be > 0 and separation_window >= 1")
        if self.layer_ratio <= 1:
            raise OptionError(f"layer_ratio must be > 1, got {self.layer_ratio}")
        if not 0 < self.layer_tail <= 1:
            raise OptionError(f"layer_tail must be in (0, 1], got {self.layer_tail}")


# -- result values ------------------------------------------------------------------------


@dataclass(frozen=True)
class ComparedRun:
    """One run of the comparison with its analysis and its value of the ranking metric."""

    label: str
    """Unique display name (the run name, with its path when two runs share a name)."""
    path: str
    rank: int | None
    """1 = best by the metric; None when the run has no finite final value of it."""
    metric_final: float | None
    """Final level of the metric (runlens.levels, as the report header); None if its
    last recorded point is not finite."""
    metric_best: float | None
    metric_best_step: int | None
    """Best level of the metric and its step (runlens.levels, as the report header)."""
    metric_nonfinite: bool
    """The metric's last recorded point is NaN/Inf (the run blew up)."""
    report: Report


@dataclass(frozen=True)
class ConfigDiff:
    """A flattened ``run.json`` key whose value differs; ``values[i]`` is that of
    ``Comparison.runs[i]`` and ``present[i]`` says whether that run had the key at all."""

    key: str
    section: str
    """``config``, ``repro``, ``versions`` or ``run`` (host, device, world size)."""
    values: tuple[Any, ...]
    present: tuple[bool, ...]


@dataclass(frozen=True)
class FindingsRow:
    """One signature across runs: the worst severity it had in each run (None: absent)."""

    signature: str
    cells: tuple[Severity | None, ...]
    summaries: tuple[str | None, ...]


@dataclass(frozen=True)
class FindingGroup:
    signature: str
    severity: Severity
    runs: tuple[str, ...]


@dataclass(frozen=True)
class Separation:
    """Where ``run``'s curve leaves ``baseline``'s beyond their noise (``at`` None: never
    within the overlap). ``at`` is a step, or seconds since start with ``by='time'``."""

    curve: str
    baseline: str
    run: str
    at: float | None
    step: int | None
    """The run's step at the separation point (equals ``at`` when aligned by step)."""
    delta: float | None
    """run − baseline (smoothed) there; None when one side was non-finite."""
    threshold: float | None
    noise: float | None
    """Combined robust noise √2 × min(σ_a, σ_b) of the two raw curves there."""
    nonfinite: bool
    """Separated because exactly one of the two curves had gone NaN/Inf."""
    compared_points: int
    overlap: tuple[float, float] | None


@dataclass(frozen=True)
class LayerDiff:
    """A layer whose tail median of ``stat`` differs by ≥ ``layer_ratio`` from the baseline
    (or is non-finite in exactly one of them). ``ratio`` = value / baseline_value."""

    layer: str
    stat: str
    baseline: str
    run: str
    baseline_value: float | None
    value: float | None
    ratio: float | None


@dataclass(frozen=True)
class LayerSetDiff:
    """Layers recorded in only one of (baseline, run), e.g. a deeper model."""

    baseline: str
    run: str
    only_in_run: tuple[str, ...]
    only_in_baseline: tuple[str, ...]


@dataclass(frozen=True)
class CompareError:
    """An input that could not be compared (unreadable run, glob with no match)."""

    path: str
    message: str


@dataclass(frozen=True)
class Comparison:
    runs: tuple[ComparedRun, ...]
    baseline: str
    metric: str
    mode: Mode
    mode_reason: str
    by: By
    config_diff: tuple[ConfigDiff, ...]
    findings: tuple[FindingsRow, ...]
    groups: tuple[FindingGroup, ...]
    clean_runs: tuple[str, ...]
    separations: tuple[Separation, ...]
    layer_diffs: tuple[LayerDiff, ...]
    layer_sets: tuple[LayerSetDiff, ...]
    layer_ratio: float = 10.0
    errors: tuple[CompareError, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(r.label for r in self.runs)

    def run(self, label: str) -> ComparedRun:
        for r in self.runs:
            if r.label == label:
                return r
        raise KeyError(label)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; each run carries its summary and findings, not the whole report.
        Schema: docs/compare.md."""
        runs = []
        for r in self.runs:
            rep = r.report
            runs.append(
                {
                    "label": r.label,
                    "name": rep.run.name,
                    "path": r.path,
                    "status": rep.run.status,
                    "rank": r.rank,
                    "metric_final": r.metric_final,
                    "metric_best": r.metric_best,
                    "metric_best_step": r.metric_best_step,
                    "metric_nonfinite": r.metric_nonfinite,
                    "summary": dataclasses.asdict(rep.summary),
                    "findings": [
                        {
                            "signature": f.signature,
                            "severity": f.severity,
                            "confidence": f.confidence,
                            "summary": f.summary,
                            "steps": f.steps,
                            "layers": f.layers,
                        }
                        for f in rep.findings
                    ],
                    "warnings": rep.warnings,
                    "coverage": dataclasses.asdict(rep.coverage),
                    "skipped": [dataclasses.asdict(s) for s in rep.skipped],
                }
            )

        def rows(items: Sequence[Any]) -> list[Any]:
            return [dataclasses.asdict(x) for x in items]

        return _jsonable(
            {
                "metric": self.metric,
                "mode": self.mode,
                "mode_reason": self.mode_reason,
                "by": self.by,
                "baseline": self.baseline,
                "runs": runs,
                "config_diff": rows(self.config_diff),
                "findings": rows(self.findings),
                "groups": rows(self.groups),
                "clean_runs": self.clean_runs,
                "separations": rows(self.separations),
                "layer_diffs": rows(self.layer_diffs),
                "layer_ratio": self.layer_ratio,
                "layer_sets": rows(self.layer_sets),
                "errors": rows(self.errors),
                "warnings": self.warnings,
            }
        )


# -- metric direction ---------------------------------------------------------------------


metric_mode = M.metric_mode


# -- inputs ---------------------------------------------------------------------------------


def expand_inputs(
    items: Sequence[str | os.PathLike[str]], input_format: str | None = None
) -> tuple[list[FoundRun], list[CompareError]]:
    """The runs to compare: globs expanded (sorted), each path's runs found by
    :func:`runlens.discover.discover` (a folder of runs gives all of them, a CSV with
    runs appended each of them). A path that holds no run becomes an error entry."""
    found: list[FoundRun] = []
    errors: list[CompareError] = []
    for item in items:
        text = os.fspath(item)
        paths = [text]
        if _GLOB_CHARS.search(text) and not os.path.exists(text) and not is_url(text):
            paths = sorted(glob.glob(os.path.expanduser(text)))
            if not paths:
                errors.append(CompareError(text, f"no run matches {text!r}"))
        for p in paths:
            try:
                found += discover(p if is_url(p) else Path(p).expanduser(), input_format).runs
            except RunlensError as exc:
                errors.append(CompareError(p, str(exc)))
    return found, errors


# -- per-run work (in the pool) -------------------------------------------------------------


@dataclass(frozen=True)
class _Loaded:
    """What the comparison keeps of one run once its frames are no longer needed."""

    run_meta: dict[str, Any]
    path: str
    report: Report
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    """name -> (x, raw, smooth) on the chosen axis (steps or seconds since start)."""
    curve_steps: dict[str, np.ndarray]
    layer_tails: dict[str, dict[str, float]]
    scalar_names: tuple[str, ...]


def _load_one(
    source: Run | FoundRun, curve_names: Sequence[str] | None, opts: CompareOptions
) -> _Loaded:
    run = source if isinstance(source, Run) else open_found(source, dict(opts.mapping) or None)
    report = analyze(run, opts.analyze)
    ctx = Context(run, opts.analyze.smoothing)
    # The default metric (val/loss or train/loss) is chosen once all runs are loaded.
    wanted = {*(curve_names or ()), fmt.TRAIN_LOSS, fmt.VAL_LOSS}
    t0 = _start_time(run)
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    curve_steps: dict[str, np.ndarray] = {}
    for name in sorted(wanted):
        c = ctx.curve(name) if run.has_scalar(name) else None
        if c is None or len(c) == 0:
            continue
        x = c.steps.astype(np.float64)
        if opts.by == "time":
            s = run.scalar(name)
            assert s is not None
            # Clock steps backwards (NTP) must not unsort the axis.
            x = np.fmax.accumulate(s.wall_time) - t0
        curves[name] = (x, c.raw, c.smooth)
        curve_steps[name] = c.steps
    tails = {
        stat: _layer_tail(run, kind, st, opts.layer_tail)
        for stat, (kind, st) in _LAYER_STATS.items()
    }
    return _Loaded(
        run_meta=run.meta,
        path=report.run.path,  # for an imported log: the user's log, not the cache entry
        report=report,
        curves=curves,
        curve_steps=curve_steps,
        layer_tails=tails,
        scalar_names=run.scalar_names,
    )


def _start_time(run: Run) -> float:
    t = run.meta.get("start_time")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t):
        return float(t)
    s = run.scalar(fmt.TRAIN_LOSS)
    if s is not None and np.isfinite(s.wall_time).any():
        return float(np.nanmin(s.wall_time))
    return 0.0


def _layer_tail(run: Run, kind: str, stat: str, frac: float) -> dict[str, float]:
    m = run.layer_matrix(kind, stat)
    if m is None or m.values.size == 0:
        return {}
    tail = m.values[-max(1, round(frac * len(m.steps))) :]
    out = {}
    for j, name in enumerate(m.layers):
        col = tail[:, j]
        # A layer gone non-finite for the whole tail is reported as such (NaN).
        fin = col[np.isfinite(col)]
        out[name] = float(np.median(fin)) if fin.size * 2 >= col.size else float("nan")
    return out


# -- the comparison -------------------------------------------------------------------------


def compare(
    runs: Sequence[Run | str | os.PathLike[str]],
    options: CompareOptions | None = None,
    on_progress: ProgressFn | None = None,
) -> Comparison:
    """Compare runs (Run objects, run directories, folders of runs or glob patterns).

    The first run given is the baseline of the pairwise results. Raises
    :class:`RunlensError` when nothing was given or no run could be read.
    """
    opts = options or CompareOptions()
    if not runs:
        raise OptionError("compare needs at least one run")
    sources: list[Run | FoundRun] = []
    errors: list[CompareError] = []
    input_format = None if opts.input_format in (None, "auto") else opts.input_format
    for r in runs:  # expand one at a time so the user's order (and baseline) is kept
        if isinstance(r, Run):
            sources.append(r)
        else:
            found, errs = expand_inputs([r], input_format)
            sources += found
            errors += errs
    sources, dup_warnings = _dedupe(sources)
    if not sources:
        raise RunlensError(_nothing_message(errors))

    curve_names = None if opts.metric is None else [opts.metric]
    loaded: list[_Loaded | None] = [None] * len(sources)
    workers = opts.workers or min(8, len(sources), 2 * (os.cpu_count() or 2))
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(_load_one, s, curve_names, opts) for s in sources]
        for i, fut in enumerate(futures):
            try:
                loaded[i] = fut.result()
            except RunlensError as exc:
                errors.append(CompareError(_source_path(sources[i]), str(exc)))
            except Exception as exc:  # one corrupt run must not sink a 50-run sweep
                errors.append(
                    CompareError(_source_path(sources[i]), f"{type(exc).__name__}: {exc}")
                )
            done += 1
            if on_progress is not None:
                on_progress(done, len(sources))
    good = [x for x in loaded if x is not None]
    if not good:
        raise RunlensError(_nothing_message(errors))
    return _build(good, opts, errors, dup_warnings)


def _dedupe(sources: list[Run | FoundRun]) -> tuple[list[Run | FoundRun], list[str]]:
    seen: set[tuple[str, int | None]] = set()
    out, warnings = [], []
    for s in sources:
        part = s.part if isinstance(s, FoundRun) else None
        key = (os.path.realpath(_source_path(s)), part)
        if key in seen:
            warnings.append(f"{_source_path(s)} given twice; compared once")
            continue
        seen.add(key)
        out.append(s)
    return out, warnings


def _source_path(s: Run | FoundRun) -> str:
    path = s.origin if isinstance(s, FoundRun) and s.origin else str(s.path)
    if isinstance(s, FoundRun) and s.part is not None:
        return f"{path}#{s.part + 1}"
    return path


def _nothing_message(errors: list[CompareError]) -> str:
    if not errors:
        return "no run to compare"
    first = errors[0].message
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"no run could be read: {first}{more}"


def _build(
    loaded: list[_Loaded], opts: CompareOptions, errors: list[CompareError], warnings: list[str]
) -> Comparison:
    warnings = list(warnings)
    labels = _labels(loaded)
    metric = opts.metric
    if metric is None:
        has_val = all(fmt.VAL_LOSS in x.curves for x in loaded)
        metric = fmt.VAL_LOSS if has_val else fmt.TRAIN_LOSS
    if not any(metric in x.scalar_names for x in loaded):
        avail = sorted({n for x in loaded for n in x.scalar_names})
        raise OptionError(
            f"no run has the metric {metric!r} (available: {', '.join(avail[:12]) or 'none'})"
        )
    if opts.mode is not None:
        mode: Mode = opts.mode
        mode_reason = f"{'lower' if mode == 'min' else 'higher'} is better (given)"
    else:
        mode, mode_reason = metric_mode(metric)
    missing = [lab for lab, x in zip(labels, loaded, strict=True) if metric not in x.curves]
    if missing:
        warnings.append(f"{len(missing)} run(s) have no {metric}: {', '.join(missing[:5])}")

    entries = [_entry(lab, x, metric, mode) for lab, x in zip(labels, loaded, strict=True)]
    order = sorted(range(len(entries)), key=lambda i: _rank_key(entries[i], mode, i))
    ranked: list[ComparedRun] = []
    rank = 0
    for i in order:
        e = entries[i]
        if e.metric_final is not None:
            rank += 1
            e = dataclasses.replace(e, rank=rank)
        ranked.append(e)
    by_label = {lab: x for lab, x in zip(labels, loaded, strict=True)}
    ranked_loaded = [by_label[e.label] for e in ranked]
    baseline = labels[0]
    base = loaded[0]

    curves = [fmt.TRAIN_LOSS] + ([metric] if metric != fmt.TRAIN_LOSS else [])
    separations = [
        _separation(name, baseline, base, lab, x, opts)
        for lab, x in zip(labels[1:], loaded[1:], strict=True)
        for name in curves
        if name in base.curves and name in x.curves
    ]
    layer_diffs, layer_sets = _layer_differences(baseline, base, labels[1:], loaded[1:], opts)
    findings, groups, clean = _findings_matrix(ranked)
    return Comparison(
        runs=tuple(ranked),
        baseline=baseline,
        metric=metric,
        mode=mode,
        mode_reason=mode_reason,
        by=opts.by,
        config_diff=tuple(_config_diff(ranked_loaded)),
        findings=findings,
        groups=groups,
        clean_runs=clean,
        separations=tuple(separations),
        layer_diffs=tuple(layer_diffs),
        layer_sets=tuple(layer_sets),
        layer_ratio=opts.layer_ratio,
        errors=tuple(errors),
        warnings=tuple(warnings),
    )


def _labels(loaded: list[_Loaded]) -> list[str]:
    names = [x.report.run.name for x in loaded]
    counts = {n: names.count(n) for n in names}
    labels = [
        n if counts[n] == 1 else f"{n} ({x.path})" for n, x in zip(names, loaded, strict=True)
    ]
    return labels


def _entry(label: str, x: _Loaded, metric: str, mode: Mode) -> ComparedRun:
    final = best = None
    best_step = None
    nonfinite = False
    if metric in x.curves:
        _, raw, _ = x.curves[metric]
        nonfinite = not math.isfinite(raw[-1])
        # The levels of the run's report header (runlens.levels); a schedule has no best.
        schedule = M.is_schedule(metric, x.run_meta)
        lv = levels(x.curve_steps[metric], raw, None if schedule else mode, 1 if schedule else None)
        if lv is not None:
            final = None if nonfinite else lv.final
            best, best_step = lv.best, lv.best_step
    return ComparedRun(
        label=label,
        path=x.path,
        rank=None,
        metric_final=final,
        metric_best=best,
        metric_best_step=best_step,
        metric_nonfinite=nonfinite,
        report=x.report,
    )


def _rank_key(e: ComparedRun, mode: Mode, i: int) -> tuple[Any, ...]:
    # Runs without a finite final value come last (blown-up ones before metric-less ones).
    if e.metric_final is None:
        return (1, 0 if e.metric_nonfinite else 1, i)
    v = e.metric_final if mode == "min" else -e.metric_final
    return (0, v, i)


# -- config -----------------------------------------------------------------------------


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts flattened with dots: ``{"opt": {"lr": 1}}`` -> ``{"opt.lr": 1}``."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


_RUN_KEYS = ("host", "device", "world_size", "kind")


def _config_diff(loaded: list[_Loaded]) -> list[ConfigDiff]:
    per_run: list[dict[tuple[str, str], Any]] = []
    for x in loaded:
        meta = x.run_meta
        flat: dict[tuple[str, str], Any] = {}
        for section in ("config", "repro", "versions"):
            val = meta.get(section)
            if isinstance(val, Mapping):
                prefix = "" if section == "config" else section + "."
                flat.update({(section, k): v for k, v in flatten(val, prefix).items()})
        flat.update({("run", k): meta[k] for k in _RUN_KEYS if k in meta})
        per_run.append(flat)
    keys: list[tuple[str, str]] = []
    for flat in per_run:
        keys.extend(k for k in flat if k not in keys)
    section_order = {"config": 0, "repro": 1, "versions": 2, "run": 3}
    diffs = []
    for section, key in sorted(keys, key=lambda k: (section_order[k[0]], k[1])):
        present = tuple((section, key) in flat for flat in per_run)
        values = tuple(flat.get((section, key)) for flat in per_run)
        canon = {_canon(v) if p else "\0absent" for v, p in zip(values, present, strict=True)}
        if len(canon) > 1:
            diffs.append(ConfigDiff(key, section, values, present))
    return diffs


def _canon(v: Any) -> str:
    import json

    return json.dumps(v, sort_keys=True, default=repr)


# -- findings ---------------------------------------------------------------------------


def _findings_matrix(
    runs: list[ComparedRun],
) -> tuple[tuple[FindingsRow, ...], tuple[FindingGroup, ...], tuple[str, ...]]:
    worst: dict[str, list[Severity | None]] = {}
    text: dict[str, list[str | None]] = {}
    for i, r in enumerate(runs):
        for f in r.report.findings:
            cells = worst.setdefault(f.signature, [None] * len(runs))
            texts = text.setdefault(f.signature, [None] * len(runs))
            cur = cells[i]
            if cur is None or SEVERITY_ORDER[f.severity] < SEVERITY_ORDER[cur]:
                cells[i] = f.severity
                texts[i] = f.summary

    def sig_key(sig: str) -> tuple[int, int, str]:
        sevs = [s for s in worst[sig] if s is not None]
        return (min(SEVERITY_ORDER[s] for s in sevs), -len(sevs), sig)

    sigs = sorted(worst, key=sig_key)
    rows = tuple(FindingsRow(s, tuple(worst[s]), tuple(text[s])) for s in sigs)
    groups = tuple(
        FindingGroup(
            signature=s,
            severity=min((c for c in worst[s] if c is not None), key=SEVERITY_ORDER.__getitem__),
            runs=tuple(r.label for r, c in zip(runs, worst[s], strict=True) if c is not None),
        )
        for s in sigs
    )
    clean = tuple(r.label for r in runs if not r.report.findings)
    return rows, groups, clean


# -- separation -------------------------------------------------------------------------


def _separation(
    name: str, base_label: str, base: _Loaded, label: str, other: _Loaded, opts: CompareOptions
) -> Separation:
    xa, ra, sa = base.curves[name]
    xb, rb, sb = other.curves[name]
    steps_b = other.curve_steps[name]
    none = Separation(name, base_label, label, None, None, None, None, None, False, 0, None)
    okx_a, okx_b = np.isfinite(xa), np.isfinite(xb)
    if not okx_a.any() or not okx_b.any():
        return none
    lo = max(float(xa[okx_a].min()), float(xb[okx_b].min()))
    hi = min(float(xa[okx_a].max()), float(xb[okx_b].max()))
    if hi < lo:
        return none
    # Compare on the points of the sparser curve inside the overlap: interpolating the
    # sparse one onto the dense grid would invent values between its measurements.
    sparse_is_a = okx_a.sum() <= okx_b.sum()
    gx = xa if sparse_is_a else xb
    grid = np.sort(gx[np.isfinite(gx) & (gx >= lo) & (gx <= hi)])
    if grid.size == 0:
        return none
    va = S.align(xa, sa, grid)
    vb = S.align(xb, sb, grid)
    bad_a = grid >= _first_bad_x(xa, ra)
    bad_b = grid >= _first_bad_x(xb, rb)
    # The question is "does b still behave like a?": under that hypothesis both curves
    # have the quieter one's noise, so combine √2 × min(σ_a, σ_b). A blowing-up curve's
    # growth is trend, not noise, and must not raise the bar for detecting it; for the
    # same reason σ is measured causally (on each curve up to the compared point).
    noise = np.sqrt(2.0) * np.minimum(_causal_noise(xa, ra, grid), _causal_noise(xb, rb, grid))
    level = 0.5 * (np.abs(va) + np.abs(vb))
    with np.errstate(invalid="ignore"):
        thr = np.maximum(opts.separation_k * noise, opts.separation_min_rel * level)
        delta = vb - va
        apart = (bad_a != bad_b) | (~bad_a & ~bad_b & (np.abs(delta) > thr))
    window = max(1, min(opts.separation_window, grid.size // 4))
    wins = S.windows_where(apart, min_len=window)
    overlap = (lo, hi)
    if not wins:
        last = float(noise[-1]) if np.isfinite(noise[-1]) else None
        return dataclasses.replace(
            none, noise=last, compared_points=int(grid.size), overlap=overlap
        )
    i = wins[0][0]
    nonfinite = bool(bad_a[i] != bad_b[i])
    step = _step_at(other.curves[name][0], steps_b, float(grid[i]))
    return Separation(
        curve=name,
        baseline=base_label,
        run=label,
        at=float(grid[i]),
        step=step,
        delta=None if nonfinite else float(delta[i]),
        threshold=None if nonfinite else float(thr[i]),
        noise=float(noise[i]),
        nonfinite=nonfinite,
        compared_points=int(grid.size),
        overlap=overlap,
    )


def _first_bad_x(x: np.ndarray, raw: np.ndarray) -> float:
    bad = ~np.isfinite(raw) & np.isfinite(x)
    return float(x[bad].min()) if bad.any() else math.inf


MIN_NOISE_POINTS = 10
"""The causal noise estimate uses at least this many points (the first ones, early on)."""


def _causal_noise(x: np.ndarray, raw: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Robust step-to-step noise of ``raw`` over its finite points with x <= each grid
    point (at least MIN_NOISE_POINTS). Evaluated at ~log-spaced prefix lengths and held
    constant in between, so it costs O(n log n), not O(n²)."""
    ok = np.isfinite(x) & np.isfinite(raw)
    xs, vs = x[ok], raw[ok]
    n = xs.size
    out = np.zeros(grid.shape)
    if n < 3:
        return out
    lengths = np.unique(
        np.concatenate([np.geomspace(min(MIN_NOISE_POINTS, n), n, num=48).astype(np.int64), [n]])
    )
    noise = np.array([S.robust_noise(vs[:k]) for k in lengths])
    noise = np.nan_to_num(noise, nan=0.0)
    # Prefix length available at each grid point, then the checkpoint at or below it.
    avail = np.searchsorted(xs, grid, side="right")
    j = np.searchsorted(lengths, np.maximum(avail, lengths[0]), side="right") - 1
    return noise[np.clip(j, 0, lengths.size - 1)]


def _step_at(x: np.ndarray, steps: np.ndarray, at: float) -> int | None:
    ok = np.isfinite(x)
    if not ok.any():
        return None
    xs, ss = x[ok], steps[ok]
    i = int(np.searchsorted(xs, at, side="left"))
    return int(ss[min(i, len(ss) - 1)])


# -- layers -----------------------------------------------------------------------------


def _layer_differences(
    base_label: str,
    base: _Loaded,
    labels: Sequence[str],
    others: Sequence[_Loaded],
    opts: CompareOptions,
) -> tuple[list[LayerDiff], list[LayerSetDiff]]:
    diffs: list[LayerDiff] = []
    sets: list[LayerSetDiff] = []
    base_layers = _recorded_layers(base)
    for label, x in zip(labels, others, strict=True):
        layers = _recorded_layers(x)
        only_run = tuple(n for n in layers if n not in base_layers)
        only_base = tuple(n for n in base_layers if n not in layers)
        if only_run or only_base:
            sets.append(LayerSetDiff(base_label, label, only_run, only_base))
        for stat in _LAYER_STATS:
            bt, rt = base.layer_tails[stat], x.layer_tails[stat]
            for layer in bt:
                if layer not in rt:
                    continue
                d = _layer_diff(layer, stat, base_label, label, bt[layer], rt[layer], opts)
                if d is not None:
                    diffs.append(d)
    return diffs, sets


def _recorded_layers(x: _Loaded) -> list[str]:
    out: list[str] = []
    for tails in x.layer_tails.values():
        out.extend(n for n in tails if n not in out)
    return out


def _layer_diff(
    layer: str, stat: str, bl: str, rl: str, bv: float, rv: float, opts: CompareOptions
) -> LayerDiff | None:
    fb, fr = math.isfinite(bv), math.isfinite(rv)
    if not fb and not fr:
        return None
    if fb != fr:
        return LayerDiff(layer, stat, bl, rl, bv if fb else None, rv if fr else None, None)
    if bv <= 0 and rv <= 0:
        return None
    ratio = rv / bv if bv > 0 else math.inf
    if ratio >= opts.layer_ratio or ratio <= 1.0 / opts.layer_ratio:
        return LayerDiff(layer, stat, bl, rl, bv, rv, ratio)
    return None


# -- progress -------------------------------------------------------------------------------


@contextlib.contextmanager
def progress_bar(enabled: bool | None = None) -> Iterator[ProgressFn]:
    """A rich progress bar on stderr for long loads, as an ``on_progress`` callback.

    ``enabled=None`` shows it only when stderr is a terminal or there are more than
    ``PROGRESS_MIN_RUNS`` runs (the total is known at the first callback)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = Console(stderr=True)
    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "show" not in state:
            auto = console.is_terminal or total > PROGRESS_MIN_RUNS
            state["show"] = auto if enabled is None else enabled
            if state["show"]:
                prog = Progress(
                    TextColumn("loading runs"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    console=console,
                    transient=console.is_terminal,
                )
                prog.start()
                state["prog"], state["task"] = prog, prog.add_task("runs", total=total)
        if state["show"]:
            state["prog"].update(state["task"], completed=done)

    try:
        yield update
    finally:
        if state.get("show"):
            state["prog"].stop()
