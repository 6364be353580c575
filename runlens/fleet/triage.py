"""``runlens triage ROOT --out DIR``: every run under ROOT analyzed into one table.

Steps: find the runs (runlens.discover: the rules of `runlens analyze` and `compare`, on
a local folder or on one listing of object storage); skip those whose fingerprint
(:func:`fingerprint`: inputs' paths, sizes, mtimes or ETags) and
analysis options are those of the manifest of the last triage into DIR; analyze the rest
with :func:`runlens.fleet.task.analyze_one` in-process, in a process pool
(``workers``) or as Ray tasks (``ray``); write under DIR

* ``findings/KEY=VALUE/part-0.parquet``: the findings table, Hive-partitioned (by
  ``date`` unless told otherwise), replaced atomically;
* ``reports/<run>.md`` (or .html): each run's report;
* ``summary.md`` / ``summary.html``: the one-page summary;
* ``manifest.json`` and ``.runlens/rows.parquet``: what the next triage reuses.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from runlens import storage
from runlens.discover import FoundRun, discover
from runlens.engine import AnalyzeOptions
from runlens.errors import OptionError, RunLoadError
from runlens.fleet.summary import TriageSummary, summarize
from runlens.fleet.task import REPORT_FORMATS, ROWS_SCHEMA, RunResult, RunTask, analyze_one

PARTITION_KEYS = ("date", "status", "source_format", "signature", "severity", "run", "none")
MANIFEST = "manifest.json"
TABLE_DIR = "findings"
REPORTS_DIR = "reports"
_STATE_DIR = ".runlens"
_ROWS = "rows.parquet"
MANIFEST_VERSION = 1

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TriageOptions:
    analyze: AnalyzeOptions = field(default_factory=AnalyzeOptions)
    workers: int = 1
    """Processes analyzing runs (1: in this process)."""
    ray: str | None = None
    """Run the analyses as Ray tasks: 'local' starts a local Ray instance, anything else
    is a Ray address (``auto``, ``ray://head:10001``). None: no Ray."""
    partition_by: str = "date"
    reports: str = "md"
    force: bool = False
    """Analyze every run again, whatever the manifest says."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise OptionError(f"--workers must be >= 1, got {self.workers}")
        if self.partition_by not in PARTITION_KEYS:
            raise OptionError(
                f"--partition-by {self.partition_by!r}: choose from {', '.join(PARTITION_KEYS)}"
            )
        if self.reports not in REPORT_FORMATS:
            raise OptionError(f"--reports must be one of {', '.join(REPORT_FORMATS)}")


@dataclass(frozen=True)
class TriageResult:
    out: Path
    runs: int
    analyzed: int
    reused: int
    removed: int
    rows: pa.Table
    summary: TriageSummary
    seconds: float


def triage(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: TriageOptions | None = None,
    on_progress: Progress | None = None,
) -> TriageResult:
    """Triage every run under ``root`` (a folder or an object-storage URL) into ``out``."""
    t0 = time.perf_counter()
    opts = options or TriageOptions()
    out_dir = Path(out)
    root_s = os.fspath(root)
    found = _discover(root_s, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = _options_key(opts)
    manifest = _read_manifest(out_dir)
    cached = _read_rows(out_dir) if manifest.get("options_key") == key else None
    known = manifest.get("runs", {}) if cached is not None else {}

    tasks: list[RunTask] = []
    reused: list[str] = []
    fps = {r.location: fingerprint(r) for r in found}
    for run in found:
        loc = run.location
        if not opts.force and known.get(loc, {}).get("fingerprint") == fps[loc]:
            reused.append(loc)
        else:
            tasks.append(
                RunTask(
                    loc,
                    run.format,
                    fps[loc],
                    _mtime(run),
                    opts.analyze,
                    opts.reports,
                    part=run.part,
                )
            )
    results = _execute(tasks, opts, on_progress)

    new_rows = []
    reports = {}
    for res in results:
        rel = _write_report(out_dir, res, opts.reports)
        reports[res.location] = rel
        new_rows += [{**r, "report": rel} for r in res.rows]
    parts = []
    if reused and cached is not None:
        parts.append(cached.filter(pc.is_in(cached["path"], pa.array(reused))))
    if new_rows:
        parts.append(pa.Table.from_pylist(new_rows, schema=ROWS_SCHEMA))
    table = pa.concat_tables(parts) if parts else ROWS_SCHEMA.empty_table()
    table = table.sort_by(
        [
            ("path", "ascending"),
            ("signature", "ascending"),
            ("step_start", "ascending"),
            ("summary", "ascending"),
        ]
    )
    present = {r.location for r in found}
    removed = [loc for loc in known if loc not in present]
    for loc in removed + [r.location for r in results if reports.get(r.location) is None]:
        _remove_report(out_dir, known.get(loc, {}).get("report"))

    _write_rows(out_dir, table)
    write_table(table, out_dir / TABLE_DIR, opts.partition_by)
    report_of = dict(zip(table["path"].to_pylist(), table["report"].to_pylist(), strict=True))
    entries = {
        loc: {"fingerprint": fps[loc], "report": report_of.get(loc)} for loc in sorted(present)
    }
    _write_json(
        out_dir / MANIFEST,
        {"version": MANIFEST_VERSION, "root": root_s, "options_key": key, "runs": entries},
    )
    summary = summarize(table, root_s, analyzed=len(tasks), reused=len(reused))
    from runlens.fleet.summary import render_html, render_markdown

    (out_dir / "summary.md").write_text(render_markdown(summary), encoding="utf-8")
    (out_dir / "summary.html").write_text(render_html(summary), encoding="utf-8")
    return TriageResult(
        out_dir,
        len(found),
        len(tasks),
        len(reused),
        len(removed),
        table,
        summary,
        time.perf_counter() - t0,
    )


# -- finding runs -----------------------------------------------------------------------------


def _discover(root: str, out_dir: Path) -> list[FoundRun]:
    """The runs under ``root`` as `runlens analyze` and `compare` find them, with their
    input files (nothing downloaded: each worker mirrors its own run); never the
    triage's own output folder."""
    if storage.is_url(root):
        return list(discover(root, fetch=False).runs)
    p = Path(root)
    if not p.is_dir():
        raise RunLoadError(f"no such folder: {root}")
    out = out_dir.resolve()
    try:
        runs = discover(p, inputs=True).runs
    except RunLoadError:  # a folder without runs (any more): an empty table
        return []
    return [r for r in runs if out not in (r.path.resolve(), *r.path.resolve().parents)]


def fingerprint(run: FoundRun) -> str:
    """Hash of the run's format, part and inputs' relative paths, sizes and versions:
    unchanged files, unchanged fingerprint (a new checkpoint's weights change nothing)."""
    h = hashlib.sha256(f"{run.format}#{run.part}".encode())
    for f in sorted(run.inputs, key=lambda e: e.rel):
        h.update(f"\0{f.rel}\0{f.size}\0{f.version}".encode())
    return h.hexdigest()[:24]


def _mtime(run: FoundRun) -> float | None:
    """Latest modification time of the inputs (UNIX seconds), if known."""
    times = [f.mtime for f in run.inputs if f.mtime is not None]
    return max(times) if times else None


# -- running the analyses ---------------------------------------------------------------------


def _execute(
    tasks: Sequence[RunTask], opts: TriageOptions, progress: Progress | None
) -> list[RunResult]:
    done: list[RunResult] = []

    def finished(res: RunResult) -> None:
        done.append(res)
        if progress is not None:
            progress(len(done), len(tasks))

    if not tasks:
        return done
    if opts.ray is not None:
        _on_ray(tasks, opts, finished)
    elif opts.workers == 1:
        for t in tasks:
            finished(analyze_one(t))
    else:
        import multiprocessing

        # spawn, not fork: polars' and Arrow's thread pools do not survive a fork.
        ctx = multiprocessing.get_context("spawn")
        workers = min(opts.workers, len(tasks))
        # A few batches per worker: one round trip per batch, not per (small) run.
        size = max(1, min(16, len(tasks) // (4 * workers)))
        batches = [tuple(tasks[i : i + size]) for i in range(0, len(tasks), size)]
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = {pool.submit(_analyze_batch, b): b for b in batches}
            for fut in as_completed(futures):
                try:
                    results = fut.result()
                except Exception as exc:  # a worker died (killed, out of memory)
                    results = [_crashed(t, exc) for t in futures[fut]]
                for res in results:
                    finished(res)
    return done


def _analyze_batch(tasks: Sequence[RunTask]) -> list[RunResult]:
    return [analyze_one(t) for t in tasks]


def _on_ray(
    tasks: Sequence[RunTask], opts: TriageOptions, finished: Callable[[RunResult], None]
) -> None:
    try:
        import ray
    except ImportError:
        raise OptionError("--ray needs Ray: pip install 'runlens[ray]'") from None
    import logging

    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.ERROR,
        }
        if opts.ray == "local":
            ray.init(address="local", num_cpus=opts.workers, **kwargs)
        else:
            ray.init(address=opts.ray, **kwargs)
    try:
        remote = ray.remote(num_cpus=1, max_retries=1)(analyze_one)
        pending = {remote.remote(t): t for t in tasks}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                task = pending.pop(ref)
                try:
                    finished(ray.get(ref))
                except Exception as exc:  # the task's worker died
                    finished(_crashed(task, exc))
    finally:
        if started:
            ray.shutdown()


def _crashed(task: RunTask, exc: BaseException) -> RunResult:
    from runlens.fleet.task import _error

    msg = f"worker failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return _error(
        task,
        {
            "path": task.location,
            "source_format": task.source_format,
            "fingerprint": task.fingerprint,
        },
        msg,
    )


# -- writing ----------------------------------------------------------------------------------


def write_table(table: pa.Table, dest: Path, partition_by: str) -> None:
    """Write ``table`` as a Hive-partitioned Parquet dataset at ``dest``, replacing what
    was there in one rename (readers see the old table or the new one)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-findings-", dir=dest.parent))
    try:
        if partition_by == "none":
            pq.write_table(table, tmp / "part-0.parquet")
        else:
            ds.write_dataset(
                table,
                tmp,
                format="parquet",
                partitioning=ds.partitioning(
                    pa.schema([table.schema.field(partition_by)]), flavor="hive"
                ),
                basename_template="part-{i}.parquet",
                existing_data_behavior="overwrite_or_ignore",
            )
        old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _slug(location: str) -> str:
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", location.split("://", 1)[-1]).strip("-.")[-60:]
    return f"{tail}-{hashlib.sha256(location.encode()).hexdigest()[:8]}"


def _write_report(out_dir: Path, res: RunResult, fmt: str) -> str | None:
    if res.report is None:
        return None
    rel = f"{REPORTS_DIR}/{_slug(res.location)}.{fmt}"
    path = out_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(res.report, encoding="utf-8")
    return rel


def _remove_report(out_dir: Path, rel: str | None) -> None:
    if rel:
        (out_dir / rel).unlink(missing_ok=True)


def _options_key(opts: TriageOptions) -> str:
    from runlens import __version__
    from runlens.importers import IMPORTER_VERSION

    a = opts.analyze
    blob = json.dumps(
        [
            __version__,
            IMPORTER_VERSION,
            sorted((k, sorted(v.items())) for k, v in a.overrides.items()),
            a.smoothing,
            a.only,
            opts.reports,
        ],
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_manifest(out_dir: Path) -> dict[str, Any]:
    try:
        m = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) and m.get("version") == MANIFEST_VERSION else {}


def _read_rows(out_dir: Path) -> pa.Table | None:
    try:
        t = pq.read_table(out_dir / _STATE_DIR / _ROWS)
    except Exception:  # absent or damaged: analyze everything again
        return None
    return t.cast(ROWS_SCHEMA) if t.schema.names == ROWS_SCHEMA.names else None


def _write_rows(out_dir: Path, table: pa.Table) -> None:
    (out_dir / _STATE_DIR).mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=out_dir / _STATE_DIR)
    os.close(fd)
    pq.write_table(table, tmp)
    os.replace(tmp, out_dir / _STATE_DIR / _ROWS)


def _write_json(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)
