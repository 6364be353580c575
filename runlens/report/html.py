"""The HTML report: one self-contained file with interactive plots that opens offline.

``render(report, run_data)`` and ``render_comparison(comparison, runs_data)`` are pure: they
take the analysis result plus display data from :mod:`runlens.plotdata` and return the
page as a string. The page inlines the vendored Plotly build (``runlens/assets``, MIT),
the viewer script and the stylesheet; nothing is fetched. A Content-Security-Policy allows
only the page's own scripts (by hash) and no network at all.

Untrusted strings (layer, metric, config names) travel only inside a
``<script type="application/json">`` block with ``< > &`` and U+2028/2029 escaped, and the
viewer inserts them with ``textContent``. See docs/html-report.md.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any

from runlens.compare import flatten
from runlens.findings import Finding, Report, fmt_num
from runlens.report import _common as C

PLOTLY_ASSET = "plotly-cartesian.min.js"
PLOTLY_LICENSE = "plotly-cartesian.LICENSE"

_JSON_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_JSON_UNSAFE = re.compile("[<>&\u2028\u2029]")


@cache
def asset(name: str) -> str:
    """Text of a file shipped in ``runlens/assets``."""
    return resources.files("runlens").joinpath("assets", name).read_text(encoding="utf-8")


def json_for_script(obj: Any) -> str:
    """JSON safe inside ``<script type="application/json">``: no ``</script>``, no ``<!--``,
    no HTML entity, no JavaScript line terminator can appear literally."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return _JSON_UNSAFE.sub(lambda m: _JSON_ESCAPES[m.group()], text)


def render(report: Report, run_data: Mapping[str, Any]) -> str:
    """The page for one analyzed run. ``run_data`` is ``plotdata.build_plot_data(run, report)``."""
    findings = [_finding(f, 0, run_data, i) for i, f in enumerate(report.findings)]
    payload = {
        "kind": "analyze",
        "title": f"runlens report: {report.run.name}",
        "verdict": _verdict(report),
        "facts": C.header_facts(report),
        "smoothing": run_data.get("smoothing", 0.9),
        "x_axis": report.run.x_axis,
        "findings": findings,
        "runs": [dict(run_data, label=report.run.name)],
        "tables": [
            ("Layer health (last 10% of steps)", _health_table(report)),
            ("Coverage: " + C.coverage_summary(report), _coverage_table(report)),
            ("Warnings", _list_table("warning", report.warnings)),
            ("Config", _config_table(report.run.config)),
        ],
        "lr_sweep": _lr_sweep(report, run_data),
    }
    return page(payload["title"], payload)


def render_comparison(comparison: Any, runs_data: Sequence[Mapping[str, Any]]) -> str:
    """The page comparing runs. ``runs_data[i]`` is the display data of
    ``comparison.runs[i]`` (same order: the ranking)."""
    runs = list(comparison.runs)
    if len(runs_data) != len(runs):
        raise ValueError("render_comparison: one display-data dict per compared run")
    findings: list[dict[str, Any]] = []
    for r, (entry, data) in enumerate(zip(runs, runs_data, strict=True)):
        for i, f in enumerate(entry.report.findings):
            findings.append(_finding(f, r, data, i))
    findings.sort(key=lambda f: (_SEV[f["severity"]], f["run"]))
    title = "runlens comparison: " + ", ".join(e.label for e in runs)
    payload = {
        "kind": "compare",
        "title": title,
        "verdict": _compare_verdict(comparison),
        "facts": _compare_facts(comparison),
        "smoothing": runs_data[0].get("smoothing", 0.9) if runs_data else 0.9,
        # Epochs only when every run counts epochs (mixed runs share a step axis).
        "x_axis": "epoch" if runs and all(e.report.run.x_axis == "epoch" for e in runs) else "step",
        "findings": findings,
        "runs": [dict(d, label=e.label) for e, d in zip(runs, runs_data, strict=True)],
        "tables": [
            ("Ranking", _ranking_table(comparison)),
            ("Config differences", _config_diff_table(comparison)),
            ("Errors", _list_table("run", [f"{e.path}: {e.message}" for e in comparison.errors])),
            ("Warnings", _list_table("warning", comparison.warnings)),
        ],
    }
    return page(title, payload)


def page(title: str, payload: Mapping[str, Any]) -> str:
    """Assemble the HTML document around the payload."""
    scripts = [_script_text(asset(PLOTLY_ASSET)), _script_text(asset("report.js"))]
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in scripts
    )
    # Hash-only script-src also blocks inline event handlers: defence in depth on top of
    # the escaping. connect-src 'none' etc. (via default-src) make the page truly offline.
    csp = (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
        "img-src data: blob:; font-src data:"
    )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<meta name="generator" content="runlens">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{asset('report.css')}</style>",
            "</head>",
            "<body>",
            "<header></header>",
            '<main><aside id="findings"></aside>',
            '<div id="plots"><div id="small"></div></div></main>',
            '<footer class="small" style="padding:0 24px 16px">Plots: plotly.js (MIT license, '
            "embedded). This file needs no network.</footer>",
            f'<script type="application/json" id="runlens-data">{json_for_script(payload)}'
            "</script>",
            f"<script>{scripts[0]}</script>",
            f"<script>{scripts[1]}</script>",
            "</body>",
            "</html>",
            "",
        ]
    )


def _script_text(js: str) -> str:
    # A literal "</script" would end the element early; "<\/" means the same in JS strings.
    return re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)


# -- payload pieces ------------------------------------------------------------------------

_SEV = {"error": 0, "warning": 1, "info": 2}


def _finding(f: Finding, run: int, data: Mapping[str, Any], i: int) -> dict[str, Any]:
    targets = data.get("findings") or []
    rows = targets[i]["rows"] if i < len(targets) else {}
    return {
        "run": run,
        "signature": f.signature,
        "severity": f.severity,
        "confidence": f.confidence,
        "summary": f.summary,
        "fix": f.fix,
        "steps": list(f.steps) if f.steps else None,
        "layers": list(f.layers),
        "evidence": [str(e) for e in f.evidence],
        "causes": list(f.causes),
        "note": C.link_note(f),
        "rows": rows,
    }


def _verdict(report: Report) -> dict[str, Any]:
    worst = report.worst_severity
    if worst is None and not report.coverage.complete:
        worst = "info"  # not the green "ok": the main checks did not all run
    return {"text": C.verdict(report), "severity": worst}


def _table(
    head: list[str],
    rows: list[list[str]],
    numeric: list[bool] | None = None,
    flagged: list[bool] | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    return {
        "head": head,
        "rows": rows,
        "numeric": numeric or [False] * len(head),
        "flagged": flagged or [False] * len(rows),
        "note": note,
    }


def _health_table(report: Report) -> dict[str, Any]:
    rows, left_out = C.layer_rows(report.layers)
    return _table(
        ["layer", "grad norm", "update ratio", "dead", "saturated", "flagged by"],
        [
            [
                r.layer,
                C.fmt_opt(r.grad_norm),
                C.fmt_opt(r.update_ratio),
                C.fmt_frac(r.dead_fraction),
                C.fmt_frac(r.saturated_fraction),
                ", ".join(r.flagged_by),
            ]
            for r in rows
        ],
        [False, True, True, True, True, False],
        [bool(r.flagged_by) for r in rows],
        f"… {left_out} more layers" if left_out else None,
    )


def _coverage_table(report: Report) -> dict[str, Any]:
    lines = C.coverage_lines(report)
    rows = [[ln.heading, ln.text] for ln in lines]
    return _table(["", "signatures"], rows, [False, False], [ln.wanted for ln in lines])


def _list_table(head: str, items: Sequence[str]) -> dict[str, Any]:
    return _table([head], [[str(x)] for x in items])


def _config_table(config: Mapping[str, Any]) -> dict[str, Any]:
    rows = [[k, _value_text(v)] for k, v in sorted(flatten(config).items())]
    return _table(["key", "value"], rows)


def _value_text(v: Any) -> str:
    if isinstance(v, float):
        return fmt_num(v)
    if isinstance(v, str):
        return v
    try:
        return json.dumps(v, default=repr)
    except (TypeError, ValueError):
        return repr(v)


# -- comparison pieces (duck-typed on runlens.compare.Comparison) --------------------------


def _compare_verdict(comparison: Any) -> dict[str, Any]:
    runs = list(comparison.runs)
    n = sum(len(e.report.findings) for e in runs)
    worst = None
    for e in runs:
        w = e.report.worst_severity
        if w is not None and (worst is None or _SEV[w] < _SEV[worst]):
            worst = w
    text = f"{len(runs)} runs compared on {comparison.metric}"
    incomplete = [e.label for e in runs if not e.report.coverage.complete]
    if n:
        text += f"; {n} finding{'s' if n != 1 else ''} in total"
    elif incomplete:
        text += "; nothing found, but not every main check ran in " + ", ".join(incomplete)
        worst = "info"
    else:
        text += "; no problems found"
    return {"text": text, "severity": worst}


def _compare_facts(comparison: Any) -> list[tuple[str, str]]:
    facts = [("metric", f"{comparison.metric} ({comparison.mode} is better)")]
    facts.append(("baseline", comparison.baseline))
    if comparison.runs:
        facts.append(("best", comparison.runs[0].label))
    return facts


def _ranking_table(comparison: Any) -> dict[str, Any]:
    rows = []
    for e in comparison.runs:
        s = e.report.summary
        rows.append(
            [
                "-" if e.rank is None else str(e.rank),
                e.label,
                "-" if e.metric_final is None else fmt_num(e.metric_final),
                str(s.steps),
                e.report.run.status,
                str(len(e.report.findings)),
                str(len(e.report.not_checked)),
            ]
        )
    return _table(
        ["#", "run", str(comparison.metric), "steps", "status", "findings", "checks not run"],
        rows,
        [True, False, True, True, False, True, True],
    )


def _config_diff_table(comparison: Any) -> dict[str, Any]:
    diffs = list(getattr(comparison, "config_diff", ()) or ())
    labels = [e.label for e in comparison.runs]
    rows = [[d.key, *[_value_text(v) for v in d.values]] for d in diffs]
    return _table(["key", *labels], rows)


# -- LR range test: loss against learning rate (docs/playbook.md) ---------------------------


def _lr_sweep(report: Report, data: Mapping[str, Any]) -> dict[str, Any] | None:
    """Loss (raw and smoothed) against the swept LR of an ``lr_range_test`` run, with the
    suggested LR; None for other runs. The LR at each loss point is interpolated in
    log-space from the recorded ``lr/0`` (both series are downsampled independently)."""
    import numpy as np

    from runlens import series as S

    series = data.get("series") or {}
    loss, lr = series.get("train/loss"), series.get("lr/0")
    if report.run.kind != "lr_range_test" or not loss or not lr or not loss.get("ema"):
        return None
    src = loss["ema"]
    steps = np.asarray(src["steps"], dtype=np.float64)
    values = np.asarray([np.nan if v is None else v for v in src["values"]], dtype=np.float64)
    lr_steps = np.asarray(lr["steps"], dtype=np.float64)
    lr_values = np.asarray([np.nan if v is None else v for v in lr["values"]], dtype=np.float64)
    ok = np.isfinite(lr_values) & (lr_values > 0)
    if ok.sum() < 2 or steps.size < 2:
        return None
    order = np.argsort(lr_steps[ok])
    log_lr = np.interp(steps, lr_steps[ok][order], np.log10(lr_values[ok][order]))
    smooth = S.ema_debiased(values, float(data.get("smoothing", S.DEFAULT_SMOOTHING)))
    keep = np.isfinite(values)

    def floats(a: np.ndarray) -> list[float]:
        return [float(v) for v in a[keep]]

    return {
        "lr": floats(10.0**log_lr),
        "loss": floats(values),
        "smooth": floats(smooth),
        "suggested": report.summary.suggested_lr,
        "method": report.summary.lr_method,
    }
