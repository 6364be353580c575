"""One run of a triage: :func:`analyze_one` turns a run's location into table rows.

It is a pure function of its :class:`RunTask` (besides the import and remote-mirror
caches it may fill): no shared state, nothing printed, never raises for a broken run (it
returns an error row instead). The process pool and Ray run this same function.
"""

from __future__ import annotations

import datetime as dt
import math
import traceback
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from runlens.engine import AnalyzeOptions
from runlens.errors import RunlensError, RunLoadError

EVIDENCE_TYPE = pa.list_(
    pa.struct(
        [
            ("name", pa.string()),
            ("value", pa.float64()),
            ("threshold", pa.float64()),
            ("op", pa.string()),
            ("unit", pa.string()),
        ]
    )
)

ROWS_SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("path", pa.string()),
        ("run_id", pa.string()),
        ("source_format", pa.string()),
        ("status", pa.string()),
        ("ended_abnormally", pa.bool_()),
        ("end_reason", pa.string()),
        ("steps", pa.int64()),
        ("first_step", pa.int64()),
        ("last_step", pa.int64()),
        ("duration_s", pa.float64()),
        ("started_at", pa.timestamp("s", tz="UTC")),
        ("final_train_loss", pa.float64()),
        ("final_val_loss", pa.float64()),
        ("signature", pa.string()),
        ("severity", pa.string()),
        ("confidence", pa.float64()),
        ("summary", pa.string()),
        ("step_start", pa.int64()),
        ("step_end", pa.int64()),
        ("layers", pa.list_(pa.string())),
        ("evidence", EVIDENCE_TYPE),
        ("explained_by", pa.string()),
        ("error", pa.string()),
        ("report", pa.string()),
        ("fingerprint", pa.string()),
        ("runlens_version", pa.string()),
        ("date", pa.string()),
    ]
)
"""One row per finding; a run without findings has one row with ``signature`` null, a
run that could not be read one row with ``error`` set (and ``status`` 'error'). ``date``
(UTC day the run started, else the day its files were last written) is the default
partition key. Documented in docs/triage.md."""

REPORT_FORMATS = ("md", "html", "none")


@dataclass(frozen=True)
class RunTask:
    """What a worker needs to analyze one run (picklable, small)."""

    location: str
    """Local path or URL of the run (a folder, or a log file; ``#k`` appended for the
    k-th run of a CSV file holding several: ``part``)."""
    source_format: str
    fingerprint: str
    mtime: float | None
    options: AnalyzeOptions
    report_format: str = "md"
    part: int | None = None
    """Index of the run among those appended in one CSV file (runlens.discover)."""


@dataclass(frozen=True)
class RunResult:
    location: str
    rows: list[dict[str, Any]]
    report: str | None
    """The run's report (Markdown or HTML) for DIR/reports/, or None."""


def analyze_one(task: RunTask) -> RunResult:
    """Analyze one run into table rows (never raises for a bad run)."""
    from runlens import __version__
    from runlens.engine import analyze
    from runlens.sources import open_found

    base: dict[str, Any] = {
        "path": task.location,
        "source_format": task.source_format,
        "fingerprint": task.fingerprint,
        "runlens_version": __version__,
    }
    try:
        run = open_found(_found(task))
        report = analyze(run, task.options)
        text = _render(run, report, task)
    except RunlensError as exc:
        return _error(task, base, str(exc))
    except Exception as exc:  # a bug must not sink a 10,000-run triage: report it
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return _error(
            task,
            base,
            f"internal error: {type(exc).__name__}: {exc} "
            f"({where.filename.rsplit('/', 1)[-1]}:{where.lineno})",
        )
    s = report.summary
    start = run.meta.get("start_time")
    if not _finite(start):
        start = _first_wall(run)
    base.update(
        run=report.run.name,
        run_id=report.run.run_id,
        source_format=report.run.source_format,
        status=report.run.status,
        ended_abnormally=s.ended_abnormally,
        end_reason=s.end_reason,
        steps=s.steps,
        first_step=s.first_step,
        last_step=s.last_step,
        duration_s=s.duration_s,
        started_at=_timestamp(start),
        final_train_loss=s.final_train_loss,
        final_val_loss=s.final_val_loss,
        date=_day(start if _finite(start) else task.mtime),
    )
    rows = []
    for f in report.findings:
        rows.append(
            {
                **base,
                "signature": f.signature,
                "severity": f.severity,
                "confidence": f.confidence,
                "summary": f.summary,
                "step_start": f.steps[0] if f.steps else None,
                "step_end": f.steps[1] if f.steps else None,
                "layers": list(f.layers),
                "evidence": [
                    {
                        "name": e.name,
                        "value": e.value,
                        "threshold": e.threshold,
                        "op": e.op,
                        "unit": e.unit,
                    }
                    for e in f.evidence
                ],
                "explained_by": f.explained_by,
            }
        )
    return RunResult(task.location, rows or [base], text)


def _found(task: RunTask) -> Any:
    """The run of ``task``, found again by the discovery that listed it (on object
    storage this mirrors its inputs, in the worker that analyzes it)."""
    from runlens.discover import discover, several_message

    target = task.location.rsplit("#", 1)[0] if task.part is not None else task.location
    d = discover(target, task.source_format)
    if task.part is not None:
        for r in d.runs:
            if r.part == task.part:
                return r
        raise RunLoadError(f"{target}: run {task.part + 1} of the file is gone")
    if d.single:
        return d.runs[0]
    raise RunLoadError(several_message(d))


def _error(task: RunTask, base: dict[str, Any], message: str) -> RunResult:
    name = task.location.rstrip("/").rsplit("/", 1)[-1]
    row = {**base, "run": name, "status": "error", "error": message, "date": _day(task.mtime)}
    return RunResult(task.location, [row], None)


def _render(run: Any, report: Any, task: RunTask) -> str | None:
    if task.report_format == "md":
        from runlens.report import markdown

        return markdown.render(report)
    if task.report_format == "html":
        from runlens.plotdata import build_plot_data
        from runlens.report import html

        return html.render(report, build_plot_data(run, report, smoothing=task.options.smoothing))
    return None


def _first_wall(run: Any) -> float | None:
    from runlens_collect import format as fmt

    s = run.scalar(fmt.TRAIN_LOSS) if run.has_scalar(fmt.TRAIN_LOSS) else None
    if s is None:
        return None
    w = s.wall_time[[math.isfinite(x) for x in s.wall_time]]
    return float(w.min()) if w.size else None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _timestamp(t: Any) -> dt.datetime | None:
    if not _finite(t) or not 0 < t < 4e9:
        return None
    return dt.datetime.fromtimestamp(int(t), tz=dt.timezone.utc)


def _day(t: Any) -> str:
    ts = _timestamp(t)
    return ts.strftime("%Y-%m-%d") if ts is not None else "unknown"
