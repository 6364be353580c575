"""Ranking runs by a metric, their config differences and the findings matrix."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from runlens import metrics as M
from runlens.compare.loading import Loaded
from runlens.compare.model import ComparedRun, ConfigDiff, FindingGroup, FindingsRow, Mode
from runlens.findings import SEVERITY_ORDER, Severity
from runlens.levels import levels

metric_mode = M.metric_mode


def labels_of(loaded: list[Loaded]) -> list[str]:
    names = [x.report.run.name for x in loaded]
    counts = {n: names.count(n) for n in names}
    labels = [
        n if counts[n] == 1 else f"{n} ({x.path})" for n, x in zip(names, loaded, strict=True)
    ]
    return labels


def entry(label: str, x: Loaded, metric: str, mode: Mode) -> ComparedRun:
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


def rank_key(e: ComparedRun, mode: Mode, i: int) -> tuple[Any, ...]:
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


def config_diff(loaded: list[Loaded]) -> list[ConfigDiff]:
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
    return json.dumps(v, sort_keys=True, default=repr)


# -- findings ---------------------------------------------------------------------------


def findings_matrix(
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
