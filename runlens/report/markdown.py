"""The Markdown report (GitHub-flavoured), for pasting into a pull request or an issue.

Every string from the run goes through :func:`escape`, so a hostile layer name cannot
open an HTML tag, end a table cell or start a code span.
"""

from __future__ import annotations

from collections.abc import Sequence

from runlens.findings import Finding, Report, fmt_num
from runlens.report import _common as C

SEVERITY_ICON = {"error": "🔴", "warning": "🟠", "info": "🔵"}

# Characters with a meaning in GFM inline text or tables. Backslash escapes work for all
# ASCII punctuation; < > & become entities so no raw HTML can form.
_ESCAPES = {
    "\\": "\\\\",
    "`": "\\`",
    "*": "\\*",
    "_": "\\_",
    "[": "\\[",
    "]": "\\]",
    "|": "\\|",
    "#": "\\#",
    "~": "\\~",
    "!": "\\!",
    "<": "&lt;",
    ">": "&gt;",
    "&": "&amp;",
}


def escape(text: object) -> str:
    """``text`` as literal GFM inline text, safe inside a table cell (one line)."""
    s = " ".join(str(text).splitlines())
    return "".join(_ESCAPES.get(ch, ch) for ch in s)


def render(report: Report) -> str:
    out: list[str] = [f"## runlens report: {escape(report.run.name)}", ""]
    out += _table(["", ""], [[f"**{escape(k)}**", escape(v)] for k, v in C.header_facts(report)])
    out.append("")
    worst = report.worst_severity
    icon = ("✅" if report.coverage.complete else "⚪") if worst is None else SEVERITY_ICON[worst]
    out += [f"**{icon} {escape(C.verdict(report))}**", ""]
    if report.findings:
        out += ["### Findings", ""]
        for i, f in enumerate(report.findings, 1):
            out += _finding(i, f, report.run.x_axis)
    if report.curves:
        out += ["### Curves", ""]
        rows = [
            [escape(r.name), r.spark, r.first, r.final, escape(r.best)]
            for r in C.curve_rows(report.curves, report.run.x_axis)
        ]
        out += _table(["curve", "trend", "first", "final", "best"], rows, "llrrr")
        out += ["", f"_{escape(C.curves_note(report.curves))}_", ""]
    if report.layers:
        out += _layers(report)
    out += ["### Coverage", "", escape(C.coverage_summary(report)), ""]
    out += [f"- **{escape(ln.heading)}:** {escape(ln.text)}" for ln in C.coverage_lines(report)]
    out.append("")
    if C.shown_warnings(report):
        out += ["### Load warnings", ""]
        out += [f"- {escape(w)}" for w in C.shown_warnings(report)]
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def _finding(index: int, f: Finding, unit: str = "step") -> list[str]:
    icon = SEVERITY_ICON[f.severity]
    out = [
        f"#### {index}. {icon} {f.severity.upper()}: {escape(f.signature)}",
        "",
        escape(f.summary),
        "",
        f"- **{unit}s:** {escape(C.fmt_steps(f.steps))}",
        f"- **confidence:** {100 * f.confidence:.0f}%",
    ]
    if f.layers:
        out.append(f"- **layers:** {escape(', '.join(f.layers))}")
    note = C.link_note(f)
    if note:
        out.append(f"- **linked:** {escape(note)}")
    out.append("")
    if f.evidence:
        rows = []
        for e in f.evidence:
            value = fmt_num(e.value) + (f" {e.unit}" if e.unit else "")
            thr = "" if e.threshold is None else f"{e.op or 'vs'} {fmt_num(e.threshold)}"
            rows.append([escape(e.name), escape(value), escape(thr)])
        out += _table(["evidence", "value", "threshold"], rows, "lrl")
        out.append("")
    if f.causes:
        out += ["**Likely causes:**", ""]
        out += [f"- {escape(c)}" for c in f.causes]
        out.append("")
    out += [f"**Fix:** {escape(f.fix)}", ""]
    return out


def _layers(report: Report) -> list[str]:
    rows, hidden = C.layer_rows(report.layers)
    body = [
        [
            "⚠️" if r.flagged_by else "",
            escape(r.layer),
            C.fmt_opt(r.grad_norm),
            C.fmt_opt(r.update_ratio),
            C.fmt_frac(r.dead_fraction),
            C.fmt_frac(r.saturated_fraction),
            escape(", ".join(r.flagged_by)),
        ]
        for r in rows
    ]
    out = ["### Layer health (last 10% of steps)", ""]
    out += _table(
        ["", "layer", "grad norm", "update ratio", "dead", "saturated", "flagged by"],
        body,
        "llrrrrl",
    )
    if hidden:
        out += ["", f"… {hidden} more layer{'s' if hidden > 1 else ''}"]
    out.append("")
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> list[str]:
    """A GFM table; cells must already be escaped. ``align`` is one of l/r per column."""
    seps = ["---:" if (align[i : i + 1] == "r") else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(seps) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines
