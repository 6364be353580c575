"""What the comparison reporters show, computed once as rows of plain strings.

Strings here come straight from the runs (names, config values, layer names); each
reporter escapes them for its own output format at the last moment.
"""

from __future__ import annotations

import json
import math
from typing import Any

from runlens.compare import ComparedRun, Comparison, Separation
from runlens.findings import fmt_num
from runlens.report._common import fmt_duration

MAX_CONFIG_KEYS = 10
"""Config differences show at most this many keys as columns, then "… N more"."""
MAX_LAYER_ROWS = 40
MAX_VALUE_CHARS = 40

RANK_HEADERS = (
    "#",
    "run",
    "{metric} final",
    "best (step)",
    "train loss final",
    "steps",
    "duration",
    "steps/s",
    "status",
    "findings",
)


def title(c: Comparison) -> str:
    n = len(c.runs)
    return f"runlens compare: {n} run{'s' if n != 1 else ''}, ranked by {c.metric}"


def rank_headers(c: Comparison) -> list[str]:
    return [h.format(metric=c.metric) for h in RANK_HEADERS]


def rank_rows(c: Comparison) -> list[list[str]]:
    rows = []
    for r in c.runs:
        s = r.report.summary
        final = "NaN/Inf" if r.metric_nonfinite else fmt_opt(r.metric_final)
        best = "-" if r.metric_best is None else f"{fmt_num(r.metric_best)} ({r.metric_best_step})"
        rows.append(
            [
                "-" if r.rank is None else str(r.rank),
                r.label,
                final,
                best,
                fmt_opt(s.final_train_loss),
                str(s.steps),
                fmt_duration(s.duration_s),
                fmt_opt(s.steps_per_s),
                r.report.run.status,
                findings_cell(r),
            ]
        )
    return rows


def findings_cell(r: ComparedRun) -> str:
    """``1 error, 2 warning``, or ``none``; with ``· N not run`` when checks could not
    run, so a run with fewer checks does not look cleaner than it is."""
    counts: dict[str, int] = {}
    for f in r.report.findings:
        counts[f.severity] = counts.get(f.severity, 0) + 1
    text = ", ".join(f"{n} {sev}" for sev, n in counts.items()) or "none"
    n_not = len(r.report.not_checked)
    return f"{text} · {n_not} not run" if n_not else text


def clean_text(c: Comparison) -> str:
    """``no findings: a, b (3 checks could not run: loss-spike, ...)`` for the runs with
    none, saying per run when its main checks did not all run."""
    parts = []
    for label in c.clean_runs:
        rep = c.run(label).report
        if rep.coverage.complete:
            parts.append(label)
        else:
            n = len(rep.not_checked)
            parts.append(f"{label} (incomplete: {n} check{'s' if n != 1 else ''} could not run)")
    return "no findings: " + ", ".join(parts)


def fmt_opt(x: float | None) -> str:
    return "-" if x is None else fmt_num(x)


def fmt_value(v: Any, present: bool) -> str:
    """A config value for a cell: absent keys show as "(absent)", long ones cut."""
    if not present:
        return "(absent)"
    if isinstance(v, float):
        text = fmt_num(v) if math.isfinite(v) else str(v)
    elif isinstance(v, str):
        text = v
    else:
        text = json.dumps(v, default=repr)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def config_table(c: Comparison) -> tuple[list[str], list[list[str]], int]:
    """(headers, rows, keys left out): one row per run, one column per differing key."""
    diffs = c.config_diff[:MAX_CONFIG_KEYS]
    headers = ["run", *(d.key for d in diffs)]
    rows = [
        [r.label, *(fmt_value(d.values[i], d.present[i]) for d in diffs)]
        for i, r in enumerate(c.runs)
    ]
    return headers, rows, max(0, len(c.config_diff) - MAX_CONFIG_KEYS)


def findings_table(c: Comparison) -> tuple[list[str], list[list[str]]]:
    """The signature × run matrix, oriented so the longer side runs down the page: one
    row per signature (runs as columns) for a few runs, one row per run for a sweep."""
    if len(c.runs) <= len(c.findings):
        headers = ["signature", *c.labels]
        rows = [[row.signature, *(cell or "·" for cell in row.cells)] for row in c.findings]
        return headers, rows
    headers = ["run", *(row.signature for row in c.findings)]
    rows = [[r.label, *(row.cells[i] or "·" for row in c.findings)] for i, r in enumerate(c.runs)]
    return headers, rows


def separation_text(s: Separation, by: str) -> str:
    if s.at is None:
        if s.overlap is None or s.compared_points == 0:
            return "no overlap to compare"
        return f"never, within {fmt_at(s.overlap[0], by)}–{fmt_at(s.overlap[1], by)}"
    where = fmt_at(s.at, by)
    if by == "time" and s.step is not None:
        where += f" (step {s.step})"
    return where


def separation_detail(s: Separation) -> str:
    if s.at is None:
        return ""
    if s.nonfinite:
        return "one run went NaN/Inf"
    return f"Δ {fmt_num(s.delta)} (> {fmt_num(s.threshold)}, noise {fmt_num(s.noise)})"


def fmt_at(x: float, by: str) -> str:
    return f"{x:.1f}s" if by == "time" else f"step {round(x)}"


def layer_rows(c: Comparison) -> tuple[list[list[str]], int]:
    rows = []
    for d in c.layer_diffs[:MAX_LAYER_ROWS]:
        ratio = "non-finite" if d.ratio is None else f"×{fmt_num(d.ratio)}"
        rows.append([d.run, d.layer, d.stat, fmt_opt(d.baseline_value), fmt_opt(d.value), ratio])
    return rows, max(0, len(c.layer_diffs) - MAX_LAYER_ROWS)


def layer_set_lines(c: Comparison) -> list[str]:
    out = []
    for d in c.layer_sets:
        parts = []
        if d.only_in_run:
            parts.append(f"{len(d.only_in_run)} layer(s) only in it ({_few(d.only_in_run)})")
        if d.only_in_baseline:
            parts.append(f"{len(d.only_in_baseline)} only in the baseline")
        out.append(f"{d.run}: " + "; ".join(parts))
    return out


def _few(names: tuple[str, ...], n: int = 4) -> str:
    return ", ".join(names[:n]) + (", …" if len(names) > n else "")
