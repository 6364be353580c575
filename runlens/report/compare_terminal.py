"""The comparison as rich tables rendered to a string (colour only when asked).

Everything taken from the runs goes through :class:`rich.text.Text`, never through markup
strings, so a run called ``[red]x`` prints as ``[red]x``.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.console import RenderableType
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from runlens.compare import Comparison
from runlens.findings import fmt_num
from runlens.report import _compare_common as C
from runlens.report._rich import render_sections

SEVERITY_STYLE = {"error": "bold red", "warning": "bold yellow", "info": "cyan"}


def render(comparison: Comparison, width: int = 120, color: bool = False) -> str:
    """The whole comparison as text ``width`` columns wide; ANSI colours only if ``color``."""
    return render_sections([_parts(comparison)], width, color)


def _parts(c: Comparison) -> list[RenderableType]:
    parts: list[RenderableType] = [Rule(Text(C.title(c), style="bold"), align="left")]
    parts.append(Text(f"{c.metric}: {c.mode_reason}. Baseline for pairs: {c.baseline}"))
    parts.append(_table(C.rank_headers(c), C.rank_rows(c), "Ranking"))

    headers, rows, more = C.config_table(c)
    if c.config_diff:
        parts.append(_table(headers, rows, "Config differences"))
        if more:
            parts.append(Text(f"… {more} more differing keys (see --format json)"))
    else:
        parts.append(Text("Config: no differences in run.json config/repro/versions."))

    if c.findings:
        headers, rows = C.findings_table(c)
        parts.append(_table(headers, rows, "Findings", severity_cells=True))
        for g in c.groups:
            line = Text(f"{g.signature}", style=SEVERITY_STYLE[g.severity])
            line.append(f" ({g.severity}): " + ", ".join(g.runs), style="")
            parts.append(line)
        if c.clean_runs:
            parts.append(Text(C.clean_text(c)))
    else:
        parts.append(Text("Findings: none in any run."))
        if any(not r.report.coverage.complete for r in c.runs):
            parts.append(Text(C.clean_text(c)))

    if c.separations:
        rows = [
            [s.run, s.curve, C.separation_text(s, c.by), C.separation_detail(s)]
            for s in c.separations
        ]
        title = f"Where curves separate from {c.baseline} (by {c.by})"
        parts.append(_table(["run", "curve", "separates at", "evidence"], rows, title))

    if c.layer_diffs or c.layer_sets:
        rows, more = C.layer_rows(c)
        if rows:
            headers = ["run", "layer", "stat", f"{c.baseline}", "run value", "ratio"]
            title = f"Layers differing ≥ {fmt_num(c.layer_ratio)}× from {c.baseline} (tail medians)"
            parts.append(_table(headers, rows, title))
            if more:
                parts.append(Text(f"… {more} more layer differences (see --format json)"))
        for line in C.layer_set_lines(c):
            parts.append(Text(line))

    for e in c.errors:
        parts.append(Text(f"skipped {e.path}: {e.message}", style="red"))
    for w in c.warnings:
        parts.append(Text(f"warning: {w}", style="yellow"))
    return parts


def _table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    title: str,
    severity_cells: bool = False,
) -> Table:
    table = Table(title=Text(title, style="bold"), title_justify="left", box=box.SIMPLE_HEAD)
    for h in headers:
        table.add_column(Text(h), overflow="fold")
    for row in rows:
        cells = []
        for j, cell in enumerate(row):
            style = SEVERITY_STYLE.get(cell, "") if severity_cells and j > 0 else ""
            cells.append(Text(cell, style=style))
        table.add_row(*cells)
    return table
