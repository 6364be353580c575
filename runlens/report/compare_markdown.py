"""The comparison as GitHub-flavoured Markdown, for a pull request or an issue.

Every string from the runs goes through :func:`runlens.report.markdown.escape`, so a
hostile run name cannot open an HTML tag, end a table cell or start a code span.
"""

from __future__ import annotations

from collections.abc import Sequence

from runlens.compare import Comparison
from runlens.findings import fmt_num
from runlens.report import _compare_common as C
from runlens.report.markdown import escape

SEVERITY_ICON = {"error": "🔴", "warning": "🟠", "info": "🔵"}


def render(comparison: Comparison) -> str:
    c = comparison
    out = [f"## {escape(C.title(c))}", ""]
    out += [f"*{escape(c.metric)}*: {escape(c.mode_reason)}. Baseline for pairs: "
            f"**{escape(c.baseline)}**.", ""]  # fmt: skip
    out += ["### Ranking", "", *_table(C.rank_headers(c), C.rank_rows(c)), ""]

    out += ["### Config differences", ""]
    if c.config_diff:
        headers, rows, more = C.config_table(c)
        out += _table(headers, rows)
        if more:
            out.append(f"\n… {more} more differing keys (see the JSON output)")
    else:
        out.append("No differences in run.json config/repro/versions.")
    out.append("")

    out += ["### Findings", ""]
    if c.findings:
        headers, rows = C.findings_table(c)
        rows = [[r[0], *(_sev(cell) for cell in r[1:])] for r in rows]
        out += _table(headers, rows, escaped_cols=(0,))
        out.append("")
        for g in c.groups:
            runs = ", ".join(escape(r) for r in g.runs)
            out.append(f"- {SEVERITY_ICON[g.severity]} **{escape(g.signature)}**: {runs}")
        if c.clean_runs:
            out.append("- ✅ " + escape(C.clean_text(c)))
    else:
        out.append("No findings in any run.")
        if any(not r.report.coverage.complete for r in c.runs):
            out += ["", escape(C.clean_text(c))]
    out.append("")

    if c.separations:
        out += [f"### Where curves separate from {escape(c.baseline)} (by {c.by})", ""]
        rows = [
            [s.run, s.curve, C.separation_text(s, c.by), C.separation_detail(s)]
            for s in c.separations
        ]
        out += [*_table(["run", "curve", "separates at", "evidence"], rows), ""]

    rows, more = C.layer_rows(c)
    if rows or c.layer_sets:
        out += [f"### Layers differing ≥ {fmt_num(c.layer_ratio)}× from {escape(c.baseline)}", ""]
        if rows:
            headers = ["run", "layer", "stat", c.baseline, "run value", "ratio"]
            out += _table(headers, rows)
            if more:
                out.append(f"\n… {more} more layer differences (see the JSON output)")
            out.append("")
        out += [f"- {escape(line)}" for line in C.layer_set_lines(c)]
        out.append("")

    if c.errors:
        out += ["### Skipped", ""]
        out += [f"- {escape(e.path)}: {escape(e.message)}" for e in c.errors]
        out.append("")
    if c.warnings:
        out += ["### Warnings", ""]
        out += [f"- {escape(w)}" for w in c.warnings]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _sev(cell: str) -> str:
    return f"{SEVERITY_ICON[cell]} {cell}" if cell in SEVERITY_ICON else cell


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], escaped_cols: Sequence[int] | None = None
) -> list[str]:
    """A GFM table; cells are escaped unless they are our own (icons) in non-listed cols."""

    def cell(j: int, text: str) -> str:
        return escape(text) if escaped_cols is None or j in escaped_cols else text

    lines = ["| " + " | ".join(escape(h) for h in headers) + " |"]
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    lines += ["| " + " | ".join(cell(j, t) for j, t in enumerate(r)) + " |" for r in rows]
    return lines
