"""Following a live run: new segments as they land, new findings once, stalls and the end.

:class:`Watcher` does one round per :meth:`Watcher.poll`; :func:`watch` loops over it and
yields :class:`WatchEvent` values. Nothing here prints or exits: the CLI renders the events
and runs the actions (runlens/live/actions.py).

Cadence (docs/watch.md): each poll reads only the segments that landed since the last
one (a half-written segment is never seen: the collector writes each under a hidden
``.tmp-`` name and renames it into place). When the training loss advanced, the curve
signatures run on a snapshot of the run so far; every ``layer_every``-th such pass runs
every signature, with the layer statistics of the first ``head_steps`` and the last
``window_steps`` recorded layer steps. When run.json says the run ended, a last pass
analyzes the whole run exactly as ``runlens analyze`` does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq
from runlens_collect import format as fmt

from runlens import importers
from runlens.engine import AnalyzeOptions, analyze
from runlens.errors import OptionError, RunlensError, RunLoadError
from runlens.findings import Finding, Report, _jsonable
from runlens.live.data import LiveData
from runlens.live.dedupe import Seen, Sighting
from runlens.live.follower import Follower
from runlens.run import read_meta, read_segment
from runlens.signatures import REGISTRY

EventKind = Literal["waiting", "watching", "finding", "stalled", "resumed", "finished", "warning"]
EXACT_SIGNATURES = ("nan-inf",)
"""Signatures with no threshold to be fooled by a short run: they run from the first
step, the others once ``min_steps`` steps are in."""
SEGMENT_RETRIES = 3
"""Polls a segment may fail to read before it is skipped with a warning."""


@dataclass(frozen=True)
class WatchOptions:
    """How to watch. Times in seconds. See docs/watch.md for what each one trades."""

    analyze: AnalyzeOptions = field(default_factory=AnalyzeOptions)
    interval: float = 5.0
    """Seconds between polls."""
    min_steps: int = 100
    """Training steps before any signature but EXACT_SIGNATURES runs (early curves are
    transients, not diagnoses)."""
    layer_every: int = 5
    """Every N-th analysis pass runs the layer (and system, sanity) signatures too."""
    confirm: int = 2
    """A finding is reported once this many consecutive passes of its signature found it
    (1: at first sight). EXACT_SIGNATURES and the final pass need no confirmation."""
    head_steps: int = 20
    window_steps: int | None = 2000
    """Recorded layer steps kept: the first ``head_steps`` and the last ``window_steps``
    (None: all)."""
    stall_factor: float = 20.0
    """Stalled: no new step for stall_factor x the median step time ..."""
    stall_floor: float = 60.0
    """... and at least this long, and at least twice the collector's flush interval
    (``flush_seconds``, or ``flush_steps`` x the median step time when shorter)."""

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise OptionError(f"--interval must be > 0, got {self.interval}")
        if self.min_steps < 0 or self.layer_every < 1 or self.head_steps < 0 or self.confirm < 1:
            raise OptionError("min_steps, head_steps must be >= 0; layer_every, confirm >= 1")
        if self.window_steps is not None and self.window_steps < 1:
            raise OptionError(f"--layer-window must be >= 1, got {self.window_steps}")
        if self.stall_factor <= 0 or self.stall_floor < 0:
            raise OptionError("stall_factor must be > 0 and stall_floor >= 0")


@dataclass(frozen=True)
class WatchEvent:
    """Something the watch saw: a new finding, a stall, the end of the run, ..."""

    kind: EventKind
    run: str
    path: str
    time: float
    """UNIX seconds when the watch saw it."""
    status: str
    """run.json status at that moment (running / finished / crashed / unknown)."""
    step: int | None
    """Last step of the data seen when it was seen."""
    message: str
    finding: Finding | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (the line of ``--format jsonl``, the body ``--exec`` and
        ``--webhook`` receive)."""
        return _jsonable(dataclasses.asdict(self))


@dataclass
class WatchStats:
    """What the watch did (for benchmarks/watch_cpu.py and the docs)."""

    polls: int = 0
    segments_read: int = 0
    rows_read: int = 0
    curve_passes: int = 0
    full_passes: int = 0
    read_seconds: float = 0.0
    analyze_seconds: float = 0.0


class Watcher:
    """One live run; call :meth:`poll` every ``options.interval`` seconds."""

    def __init__(
        self,
        path: str | Path,
        options: WatchOptions | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = str(path)
        self.options = options or WatchOptions()
        self.clock = clock
        self.stats = WatchStats()
        self.done = False
        self.seen = Seen()
        self._follower = Follower(self.path)
        self._data: LiveData | None = None
        self._said_waiting = False
        self._started = False
        self._passes = 0
        self._analyzed_step: int | None = None
        self._last_progress: float | None = None
        self._stalled_at: float | None = None
        self._ending = False
        self._streak: dict[str, list[tuple[Sighting, int]]] = {}
        """Per signature: its findings in its last pass, with the passes in a row each
        has been seen (see ``confirm``)."""
        user_only = self.options.analyze.only
        names = [n for n in REGISTRY if user_only is None or n in user_only]
        self._curve = tuple(n for n in names if REGISTRY[n].category == "curve")
        self._exact = tuple(n for n in names if n in EXACT_SIGNATURES)
        self._all = tuple(names)

    # -- one round ----------------------------------------------------------------------
    def poll(self) -> list[WatchEvent]:
        """Read what landed since the last poll; return what is new (possibly nothing)."""
        if self.done:
            return []
        self.stats.polls += 1
        t0 = time.perf_counter()
        root = self._follower.sync()
        if root is None:
            if self._said_waiting:
                return []
            self._said_waiting = True
            return [self._event("waiting", f"waiting for {self.path} to appear")]
        out: list[WatchEvent] = []
        data = self._data or self._open(root)
        meta, warnings = read_meta(root)
        if meta is not None:
            self._check_meta(meta, warnings)
            data.meta = meta
        status = str(data.meta.get("status") or "unknown")
        before = data.last_step
        complete = self._read_new(root, data, out)
        self.stats.read_seconds += time.perf_counter() - t0
        if not self._started and (data.last_step is not None or meta is not None):
            self._started = True
            out.insert(0, self._event("watching", f"{self._name()} ({status})"))
        now = self.clock()
        if data.last_step is not None and data.last_step != before:
            if self._stalled_at is not None:
                idle = now - (self._last_progress or now)
                out.append(self._event("resumed", f"new steps after {idle:.0f} s without"))
                self._stalled_at = None
            self._last_progress = now if before is not None else self._first_progress(now)
        ended = status in (fmt.STATUS_FINISHED, fmt.STATUS_CRASHED)
        if ended and self._follower.url is not None and not self._ending:
            self._ending = True  # object storage: one more poll for uploads still under way
            ended = False
        if ended and complete:
            out += self._final(status)
            self.done = True
            return out
        if data.last_step is not None and data.last_step != self._analyzed_step:
            out += self._analysis_pass(data)
        elif status == fmt.STATUS_RUNNING or status == "unknown":
            out += self._check_stall(data, now)
        return out

    def _open(self, root: Path) -> LiveData:
        if root.is_dir() and not importers.is_runlens_dir(root):
            try:
                kind = importers.detect_format(root)
            except RunlensError:
                kind = None
            if kind is not None and kind != importers.RUNLENS:
                raise RunLoadError(
                    f"{self.path} is a {kind} log: watch follows runlens run directories "
                    "(the collector's output); use `runlens analyze` for logs"
                )
        elif not root.is_dir():
            raise RunLoadError(f"not a run directory: {self.path}")
        self._data = LiveData(root, self.options.head_steps, self.options.window_steps)
        return self._data

    def _check_meta(self, meta: dict[str, Any], warnings: list[str]) -> None:
        try:
            fmt.check_schema_version(meta)
        except fmt.SchemaVersionError as exc:
            if not warnings:  # an unreadable run.json got defaults: keep following
                raise RunLoadError(f"{self.path}: {exc}") from None

    def _read_new(self, root: Path, data: LiveData, out: list[WatchEvent]) -> bool:
        """Read the new segments and events; False when a segment is to be read again at
        the next poll (it vanished, merged away, or failed fewer than SEGMENT_RETRIES
        times): an ended run is not final until it is read."""
        f = self._follower
        complete = True
        # Every rank is followed (a rank may start writing later than another): the
        # snapshot merges them (runlens.ranks), as `runlens analyze` does.
        ranks = sorted(
            {
                int(p.name.split("=", 1)[1])
                for table in (fmt.SCALARS_DIR, fmt.LAYERS_DIR)
                for p in (root / table).glob("rank=*")
                if p.name.split("=", 1)[1].isdigit()
            }
        )
        if not ranks:
            return complete
        data.ranks = ranks
        data.rank = ranks[0]
        for table, rank in ((t, r) for t in (fmt.SCALARS_DIR, fmt.LAYERS_DIR) for r in ranks):
            for seg in f.new_segments(root, table, rank):
                done = f.rows_read(table, rank, seg)
                try:
                    if done and done >= pq.read_metadata(seg).num_rows:
                        f.mark_read(table, rank, seg, done)  # every row of it read already
                        continue
                    df = read_segment(seg, table)
                except Exception as exc:  # read_segment's RunLoadError, a footer's
                    if not seg.exists():  # merged away: the next poll reads what replaced it
                        complete = False
                        break
                    if not isinstance(exc, RunLoadError):
                        exc = RunLoadError(f"unreadable segment {seg.name}: {exc}")
                    f.failures[seg] = f.failures.get(seg, 0) + 1
                    if f.failures[seg] >= SEGMENT_RETRIES:
                        f.seen[table].add(seg)
                        data.warnings.append(f"skipped {table}/{seg.name}: {exc}")
                        out.append(self._event("warning", f"skipped {table}/{seg.name}: {exc}"))
                        continue
                    # Read in order: the segments read stay a prefix of any merge that
                    # covers them (rows_read); the next poll tries this one again first.
                    complete = False
                    break
                f.mark_read(table, rank, seg, df.height)
                df = df.slice(done)  # the rows of the segments it covers read before
                self.stats.segments_read += 1
                self.stats.rows_read += df.height
                (data.add_scalars if table == fmt.SCALARS_DIR else data.add_layers)(df, rank)
        events, reset = f.new_events(root)
        if reset:
            data.events = []
        data.events.extend(events)
        return complete

    # -- analysis -----------------------------------------------------------------------
    def _analysis_pass(self, data: LiveData) -> list[WatchEvent]:
        self._analyzed_step = data.last_step
        if data.n_steps < self.options.min_steps:
            names = self._exact
        elif self._passes % self.options.layer_every == 0:
            names = self._all
        else:
            names = self._curve
        if not names:
            return []
        if names != self._exact:
            self._passes += 1
        t0 = time.perf_counter()
        try:
            report = analyze(data.snapshot(), self._options(names))
        finally:
            self.stats.analyze_seconds += time.perf_counter() - t0
        if names == self._all:
            self.stats.full_passes += 1
        else:
            self.stats.curve_passes += 1
        last = data.last_step
        return self._new_findings(self._confirmed(report, names, last), last)

    def _confirmed(self, report: Report, ran: tuple[str, ...], last: int | None) -> list[Finding]:
        """Findings seen in ``confirm`` passes in a row of their signature (a transient
        state of a young run rarely lasts two passes; a real problem does)."""
        out = []
        for name in ran:
            before = self._streak.get(name, [])
            streak = []
            for f in (f for f in report.findings if f.signature == name):
                n = 1 + max((k for g, k in before if g.matches(f)), default=0)
                streak.append((Sighting.of(f, last), n))
                if n >= self.options.confirm or name in EXACT_SIGNATURES:
                    out.append(f)
            self._streak[name] = streak
        return out

    def _options(self, names: tuple[str, ...]) -> AnalyzeOptions:
        # A live pass sees a prefix of the run: final=False tells the signatures that
        # judge the end of the run (Context.final).
        return dataclasses.replace(self.options.analyze, only=names, preview_points=2, final=False)

    def _new_findings(self, findings: Iterable[Finding], last: int | None) -> list[WatchEvent]:
        return [
            self._event("finding", f.summary, finding=f)
            for f in findings
            if self.seen.is_new(f, last)
        ]

    def _final(self, status: str) -> list[WatchEvent]:
        """The whole run, analyzed as `runlens analyze` would, once it has ended."""
        from runlens.sources import open_run

        out: list[WatchEvent] = []
        t0 = time.perf_counter()
        try:
            report = analyze(open_run(self.path), self.options.analyze)
        except RunlensError as exc:
            out.append(self._event("warning", f"final analysis failed: {exc}"))
        else:
            out += self._new_findings(report.findings, report.summary.last_step)
        finally:
            self.stats.analyze_seconds += time.perf_counter() - t0
            self.stats.full_passes += 1
        out.append(
            self._event(
                "finished",
                f"run ended with status {status}; {len(self.seen)} finding(s) reported",
                details={"findings": len(self.seen)},
            )
        )
        return out

    # -- stalls -------------------------------------------------------------------------
    def _first_progress(self, now: float) -> float:
        """When the last step seen at the first poll happened (its wall time; the watch
        may start long after a trainer died)."""
        assert self._data is not None
        s = self._data.scalar(fmt.TRAIN_LOSS)
        if s is not None and np.isfinite(s.wall_time[-1]):
            return min(now, float(s.wall_time[-1]))
        return now

    def median_step_seconds(self) -> float | None:
        """Median wall time between recent consecutive steps of the training loss."""
        if self._data is None:
            return None
        s = self._data.scalar(fmt.TRAIN_LOSS)
        if s is None or len(s) < 3:
            return None
        w = s.wall_time[-1001:]
        d = np.diff(w) / np.maximum(np.diff(s.steps[-1001:]), 1)
        d = d[np.isfinite(d) & (d > 0)]
        return float(np.median(d)) if d.size else None

    def stall_threshold(self) -> float | None:
        """Seconds without a new step after which the run counts as stalled (None until
        the median step time is known)."""
        med = self.median_step_seconds()
        if med is None:
            return None
        # New steps become visible one flush at a time: every flush_seconds, or every
        # flush_steps steps when that comes first.
        col = (self._data.meta.get("collector") or {}) if self._data else {}
        secs, steps = col.get("flush_seconds"), col.get("flush_steps")
        flush = min(
            float(secs) if _number(secs) else 0.0,
            float(steps) * med if _number(steps) else float("inf"),
        )
        return max(self.options.stall_factor * med, self.options.stall_floor, 2 * flush)

    def _check_stall(self, data: LiveData, now: float) -> list[WatchEvent]:
        if self._stalled_at is not None or self._last_progress is None:
            return []
        limit = self.stall_threshold()
        idle = now - self._last_progress
        if limit is None or idle <= limit:
            return []
        self._stalled_at = now
        med = self.median_step_seconds()
        return [
            self._event(
                "stalled",
                f"no new step for {idle:.0f} s (limit {limit:.0f} s; median step "
                f"{med:.3g} s); last step {data.last_step}",
                details={"idle_s": idle, "limit_s": limit, "median_step_s": med},
            )
        ]

    # -- events -------------------------------------------------------------------------
    def _name(self) -> str:
        if self._data is not None and self._data.meta.get("name"):
            return str(self._data.meta["name"])
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def _event(
        self,
        kind: EventKind,
        message: str,
        finding: Finding | None = None,
        details: dict[str, Any] | None = None,
    ) -> WatchEvent:
        data = self._data
        return WatchEvent(
            kind=kind,
            run=self._name(),
            path=self.path,
            time=self.clock(),
            status=str((data.meta if data else {}).get("status") or "unknown"),
            step=data.last_step if data else None,
            message=message,
            finding=finding,
            details=details or {},
        )


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def watch(
    path: str | Path,
    options: WatchOptions | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[WatchEvent]:
    """Follow the run at ``path`` (a run directory or an object-storage URL) and yield
    each new event as it happens; returns once the run has ended (finished or crashed).
    A run that never ends (killed) is reported ``stalled`` and watched on: stop iterating
    to stop watching. Raises :class:`RunlensError` for a path that is not a runlens run."""
    w = Watcher(path, options)
    while True:
        yield from w.poll()
        if w.done:
            return
        sleep(w.options.interval)
