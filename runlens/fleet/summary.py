"""The one-page summary of a triage: a value computed from the findings table, and pure
renderers (terminal text, Markdown, HTML)."""

from __future__ import annotations

import html
from dataclasses import dataclass

import polars as pl
import pyarrow as pa

WORST = 10


@dataclass(frozen=True)
class SignatureCount:
    signature: str
    severity: str
    runs: int
    findings: int


@dataclass(frozen=True)
class RunLine:
    run: str
    path: str
    status: str
    steps: int | None
    errors: int
    warnings: int
    signatures: tuple[str, ...]
    report: str | None


@dataclass(frozen=True)
class Broken:
    path: str
    error: str


@dataclass(frozen=True)
class TriageSummary:
    root: str
    runs: int
    analyzed: int
    reused: int
    with_findings: int
    statuses: tuple[tuple[str, int], ...]
    by_signature: tuple[SignatureCount, ...]
    worst: tuple[RunLine, ...]
    broken: tuple[Broken, ...]


def summarize(table: pa.Table, root: str, analyzed: int, reused: int) -> TriageSummary:
    df = pl.from_arrow(table)
    assert isinstance(df, pl.DataFrame)
    if df.height == 0:
        return TriageSummary(root, 0, analyzed, reused, 0, (), (), (), ())
    per_run = df.group_by("path", maintain_order=True).agg(
        pl.col("run").first(),
        pl.col("status").first(),
        pl.col("steps").first(),
        pl.col("report").first(),
        pl.col("error").first(),
        (pl.col("severity") == "error").sum().alias("errors"),
        (pl.col("severity") == "warning").sum().alias("warnings"),
        pl.col("signature").drop_nulls().unique(maintain_order=True).alias("signatures"),
    )
    statuses = per_run.group_by("status").len().sort(["len", "status"], descending=[True, False])
    sigs = (
        df.filter(pl.col("signature").is_not_null())
        .group_by("signature", "severity")
        .agg(pl.col("path").n_unique().alias("runs"), pl.len().alias("findings"))
        .sort(["runs", "findings", "signature"], descending=[True, True, False])
    )
    ok = per_run.filter(pl.col("error").is_null() & (pl.col("signatures").list.len() > 0))
    worst = ok.sort(["errors", "warnings", "path"], descending=[True, True, False]).head(WORST)
    broken = per_run.filter(pl.col("error").is_not_null()).sort("path")
    return TriageSummary(
        root=root,
        runs=per_run.height,
        analyzed=analyzed,
        reused=reused,
        with_findings=ok.height,
        statuses=tuple((str(s), int(n)) for s, n in statuses.iter_rows()),
        by_signature=tuple(SignatureCount(*r) for r in sigs.iter_rows()),
        worst=tuple(
            RunLine(
                r["run"],
                r["path"],
                r["status"],
                r["steps"],
                r["errors"],
                r["warnings"],
                tuple(r["signatures"]),
                r["report"],
            )
            for r in worst.iter_rows(named=True)
        ),
        broken=tuple(Broken(p, e) for p, e in broken.select("path", "error").iter_rows()),
    )


def _headline(s: TriageSummary) -> str:
    st = ", ".join(f"{n} {k}" for k, n in s.statuses)
    return (
        f"{s.runs} runs under {s.root} ({st}); {s.with_findings} with findings, "
        f"{len(s.broken)} unreadable. Analyzed {s.analyzed}, reused {s.reused} unchanged."
    )


def render_terminal(s: TriageSummary, out_dir: str) -> str:
    lines = [_headline(s), ""]
    if s.by_signature:
        w = max(len(c.signature) for c in s.by_signature)
        lines.append(f"{'SIGNATURE':<{w}}  SEVERITY  RUNS  FINDINGS")
        lines += [
            f"{c.signature:<{w}}  {c.severity:<8}  {c.runs:>4}  {c.findings:>8}"
            for c in s.by_signature
        ]
        lines.append("")
    if s.worst:
        lines.append("Worst runs:")
        lines += [
            f"  {r.errors} errors, {r.warnings} warnings  {r.path}  ({', '.join(r.signatures)})"
            for r in s.worst
        ]
        lines.append("")
    if s.broken:
        lines.append(f"Unreadable runs ({len(s.broken)}):")
        lines += [f"  {b.path}: {b.error}" for b in s.broken[:20]]
        if len(s.broken) > 20:
            lines.append(f"  ... and {len(s.broken) - 20} more (see summary.md)")
        lines.append("")
    lines.append(f"Table: {out_dir}/findings  Summary: {out_dir}/summary.md, summary.html")
    return "\n".join(lines) + "\n"


def _md(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(s: TriageSummary) -> str:
    out = ["# runlens triage", "", _headline(s), ""]
    if s.by_signature:
        out += [
            "## Findings by signature",
            "",
            "| signature | severity | runs | findings |",
            "| --- | --- | ---: | ---: |",
        ]
        out += [
            f"| `{c.signature}` | {c.severity} | {c.runs} | {c.findings} |" for c in s.by_signature
        ]
        out.append("")
    if s.worst:
        out += [
            "## Worst runs",
            "",
            "| run | status | steps | errors | warnings | findings |",
            "| --- | --- | ---: | ---: | ---: | --- |",
        ]
        for r in s.worst:
            name = f"[{_md(r.run)}]({r.report})" if r.report else _md(r.run)
            out.append(
                f"| {name} | {r.status} | {r.steps if r.steps is not None else ''} | "
                f"{r.errors} | {r.warnings} | {_md(', '.join(r.signatures))} |"
            )
        out.append("")
    if s.broken:
        out += ["## Unreadable runs", "", "| path | error |", "| --- | --- |"]
        out += [f"| {_md(b.path)} | {_md(b.error)} |" for b in s.broken]
        out.append("")
    out += [
        "Query the table: see docs/triage.md (`findings/` is a Hive-partitioned Parquet dataset).",
        "",
    ]
    return "\n".join(out)


def render_html(s: TriageSummary) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>runlens triage</title>",
        "<style>body{font:14px system-ui,sans-serif;margin:2em;max-width:70em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:left}.error{color:#b00}.warning{color:#a60}</style>",
        f"</head><body><h1>runlens triage</h1><p>{e(_headline(s))}</p>",
    ]
    if s.by_signature:
        parts.append(
            "<h2>Findings by signature</h2><table><tr><th>signature</th>"
            "<th>severity</th><th>runs</th><th>findings</th></tr>"
        )
        parts += [
            f"<tr><td><code>{e(c.signature)}</code></td><td class='{e(c.severity)}'>"
            f"{e(c.severity)}</td><td>{c.runs}</td><td>{c.findings}</td></tr>"
            for c in s.by_signature
        ]
        parts.append("</table>")
    if s.worst:
        parts.append(
            "<h2>Worst runs</h2><table><tr><th>run</th><th>status</th><th>steps</th>"
            "<th>errors</th><th>warnings</th><th>findings</th></tr>"
        )
        for r in s.worst:
            name = f"<a href='{e(r.report)}'>{e(r.run)}</a>" if r.report else e(r.run)
            parts.append(
                f"<tr><td>{name}<br><small>{e(r.path)}</small></td><td>{e(r.status)}"
                f"</td><td>{r.steps if r.steps is not None else ''}</td><td>{r.errors}"
                f"</td><td>{r.warnings}</td><td>{e(', '.join(r.signatures))}</td></tr>"
            )
        parts.append("</table>")
    if s.broken:
        parts.append("<h2>Unreadable runs</h2><table><tr><th>path</th><th>error</th></tr>")
        parts += [f"<tr><td>{e(b.path)}</td><td>{e(b.error)}</td></tr>" for b in s.broken]
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
