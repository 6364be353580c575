"""The terminal report: rich tables rendered to a string (colour only when asked).

Everything taken from the run goes through :class:`rich.text.Text`, never through markup
strings, so a layer called ``[red]x`` prints as ``[red]x``.
"""

from __future__ import annotations

from rich import box
from rich.console import Group, RenderableType
from rich.padding import Padding
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from runlens.findings import Finding, Report, fmt_num
from runlens.report import _common as C
from runlens.report._rich import render_sections

SEVERITY_STYLE = {"error": "bold red", "warning": "bold yellow", "info": "bold cyan"}


def render(report: Report, width: int = 100, color: bool = False) -> str:
    """The whole report as text ``width`` columns wide; ANSI colours only if ``color``."""
    return render_sections(_sections(report), width, color)


def _sections(report: Report) -> list[list[RenderableType]]:
    """Blocks separated by one blank line: header, verdict, findings, tables, notes."""
    title = Rule(Text("runlens report", style="bold"), align="left")
    sections: list[list[RenderableType]] = [[title, _header(report)], [_verdict(report)]]
    unit = report.run.x_axis
    sections += [[_finding(i, f, unit)] for i, f in enumerate(report.findings, 1)]
    if report.curves:
        sections.append([_curves(report), Text(C.curves_note(report.curves), style="dim")])
    if report.layers:
        sections.append([_layers(report)])
    sections.append([_coverage(report)])
    notes: list[RenderableType] = []
    if C.shown_warnings(report):
        notes.append(Text("Load warnings:", style="bold yellow"))
        notes += [Text("  ! ") + Text(_one_line(w)) for w in C.shown_warnings(report)]
    if notes:
        sections.append(notes)
    return sections


def _header(report: Report) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for label, value in C.header_facts(report):
        grid.add_row(Text(label), Text(_one_line(value)))
    return grid


def _verdict(report: Report) -> Text:
    worst = report.worst_severity
    style = "bold green" if worst is None else SEVERITY_STYLE[worst]
    if worst is None and not report.coverage.complete:
        style = "bold yellow"  # nothing found, but the main checks did not all run
    return Text(C.verdict(report), style=style)


def _coverage(report: Report) -> Group:
    """What ran and what could not (docs/report-schema.md#coverage)."""
    title = Text("Coverage: ", style="bold") + Text(C.coverage_summary(report))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column()
    for line in C.coverage_lines(report):
        style = "" if line.wanted else "dim"
        grid.add_row(Text(line.heading, style="bold " + style), Text(_one_line(line.text), style))
    return Group(title, Padding(grid, (0, 0, 0, 2)))


def _finding(index: int, f: Finding, unit: str = "step") -> Group:
    title = Text(f"{index}. ")
    title.append(f.severity.upper(), style=SEVERITY_STYLE[f.severity])
    title.append("  ")
    title.append(f.signature, style="bold")
    title.append(f"  {C.fmt_where(f.steps, unit)}  confidence {100 * f.confidence:.0f}%")
    body: list[RenderableType] = [Text(_one_line(f.summary))]
    note = C.link_note(f)
    if note:
        body.append(Text("→ " + note, style="italic"))
    if f.layers:
        body.append(Text("layers: ", style="bold") + Text(", ".join(f.layers)))
    if f.evidence:
        ev = Table(box=None, show_header=True, header_style="dim", padding=(0, 2, 0, 0))
        ev.add_column("evidence")
        ev.add_column("value", justify="right")
        ev.add_column("threshold")
        for e in f.evidence:
            value = fmt_num(e.value) + (f" {e.unit}" if e.unit else "")
            thr = "" if e.threshold is None else f"{e.op or 'vs'} {fmt_num(e.threshold)}"
            ev.add_row(Text(e.name), Text(value), Text(thr))
        body.append(ev)
    if f.causes:
        body.append(Text("likely causes:", style="bold"))
        body.extend(Padding(Text("- ") + Text(_one_line(c)), (0, 0, 0, 2)) for c in f.causes)
    body.append(Text("fix: ", style="bold green") + Text(_one_line(f.fix)))
    # Padding indents wrapped lines too, so long summaries stay inside their finding.
    return Group(title, Padding(Group(*body), (0, 0, 0, 3)))


def _curves(report: Report) -> Table:
    t = Table(title="Curves", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    for name, justify in (
        ("curve", "left"),
        ("trend", "left"),
        ("first", "right"),
        ("final", "right"),
        ("best", "right"),
    ):
        t.add_column(name, justify=justify, no_wrap=name == "trend")  # type: ignore[arg-type]
    for r in C.curve_rows(report.curves, report.run.x_axis):
        t.add_row(*(Text(v) for v in (r.name, r.spark, r.first, r.final, r.best)))
    return t


def _layers(report: Report) -> Group:
    rows, hidden = C.layer_rows(report.layers)
    t = Table(
        title="Layer health (last 10% of steps)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
    )
    t.add_column("", width=1)
    t.add_column("layer", overflow="fold")
    for name in ("grad norm", "update ratio", "dead", "saturated"):
        t.add_column(name, justify="right")
    t.add_column("flagged by", overflow="fold")
    for r in rows:
        mark = Text("!", style="bold red") if r.flagged_by else Text("")
        t.add_row(
            mark,
            Text(r.layer),
            Text(C.fmt_opt(r.grad_norm)),
            Text(C.fmt_opt(r.update_ratio)),
            Text(C.fmt_frac(r.dead_fraction)),
            Text(C.fmt_frac(r.saturated_fraction)),
            Text(", ".join(r.flagged_by)),
        )
    if hidden:
        return Group(t, Text(f"  … {hidden} more layer{'s' if hidden > 1 else ''}", style="dim"))
    return Group(t)


def _one_line(text: str) -> str:
    # A newline or carriage return in a run-provided string must not forge report lines.
    return " ".join(str(text).splitlines()) if text else ""
