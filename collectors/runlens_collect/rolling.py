"""Rolling compaction: the collector's writer merges its own segments while the run records.

A run still recording, or one that crashed, would otherwise have one segment per flush
per table (hundreds of small files, slower to analyze than a few large ones). After each
flush the writer hands the tables it wrote to its :class:`Roller` thread, which calls
:func:`roll`: segments are grouped in tiers (a flush's
segment is tier 0; a merge of ``ROLL_FANOUT`` segments of tier L is of tier L+1) and
whenever ``ROLL_FANOUT`` consecutive segments of one tier are there, they are merged by
compaction's crash-safe protocol (runlens_collect.compact) under its lock. The policy
(format.ROLLING_POLICY, docs/run-format.md) bounds both the number of segments and how
often a row is rewritten by log(flushes). The merges run on their own thread because a
merge of a high tier rewrites the rows of hundreds of flushes at once: on the writer
thread it would stop the step queue draining for that long, and a fast training loop
would fill the queue and drop steps.

Standard library and pyarrow only, like compact.py.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from runlens_collect import format as fmt
from runlens_collect.compact import (
    MAX_FILE_ROWS,
    ROW_GROUP_ROWS,
    SMALL_ROWS,
    Merged,
    _Group,
    _lock,
    _merge,
    _remove_covered,
)

ROLL_FANOUT = fmt.ROLL_FANOUT


def roll_level(first: int, last: int, fanout: int = ROLL_FANOUT) -> int:
    """A segment's tier: floor(log_fanout(segment numbers it covers)); a flush's own
    segment is tier 0, a merge of ``fanout`` tier-L segments is tier L+1."""
    span, level = last - first + 1, 0
    while span >= fanout:
        span //= fanout
        level += 1
    return level


def roll_plan(
    segments: list[tuple[int, int, int]],
    fanout: int = ROLL_FANOUT,
    small_rows: int = SMALL_ROWS,
    max_file_rows: int = MAX_FILE_ROWS,
) -> list[int] | None:
    """The next rolling merge among ``segments`` ((first, last, rows) of one writer's live
    segments of a table, in order): the indices of the first ``fanout`` consecutive
    segments of one tier, each of fewer than ``small_rows`` rows, or None when there are
    none. Applied after every flush (and again after each merge), it keeps fewer than
    ``fanout`` segments per tier, so n flushes leave at most (fanout-1) x log_fanout(n)
    small segments, and each row is rewritten at most once per tier (log_fanout(n) times).
    """
    run: list[int] = []
    rows = 0
    for i, (first, last, n) in enumerate(segments):
        level = roll_level(first, last, fanout)
        same = bool(run) and roll_level(*segments[run[0]][:2], fanout) == level
        if n >= small_rows:  # already large: a barrier, never merged again
            run, rows = [], 0
            continue
        if not same or rows + n > max_file_rows:
            run, rows = [], 0
        run.append(i)
        rows += n
        if len(run) == fanout:
            return run
    return None


def roll(
    run_dir: str | os.PathLike[str],
    table: str,
    rank: int,
    first: int,
    *,
    fanout: int = ROLL_FANOUT,
    row_group_rows: int = ROW_GROUP_ROWS,
    rows_cache: dict[str, int] | None = None,
) -> list[Merged]:
    """Rolling compaction of one writer's segments of ``table`` (numbered ``first`` on:
    never an earlier collector's, so never across a resume), by :func:`roll_plan`, each
    merge by the crash-safe protocol of :func:`compact_run` under the same lock (when
    another compaction holds it, nothing is done: the next flush tries again).
    ``rows_cache`` (file name -> rows) spares re-reading the footers of segments seen at
    earlier flushes (files never change once named)."""
    root = Path(run_dir)
    folder = root / table / f"rank={rank}"
    cache = rows_cache if rows_cache is not None else {}
    merged: list[Merged] = []
    if _next_roll(folder, first, fanout, cache) is None:
        return merged  # the usual case: no lock taken, one listing
    with _lock(folder) as held:
        if not held:
            return merged
        for _ in range(64):  # each merge may complete a tier above (a carry); bounded
            nxt = _next_roll(folder, first, fanout, cache)
            if nxt is None:
                break
            paths, rows = nxt
            schema = pq.read_schema(paths[0])
            if any(not pq.read_schema(p).equals(schema, check_metadata=False) for p in paths[1:]):
                break  # e.g. a column added: left for close()'s compaction
            g = _Group(paths, schema, rows, sum(p.stat().st_size for p in paths))
            m = _merge(root, table, rank, g, row_group_rows)
            cache[m.path.name] = m.rows
            for p in paths:
                cache.pop(p.name, None)
            merged.append(m)
        files = list(folder.glob("part-*.parquet"))
        # leftovers of a merge that died after its rename (a crash, a failed unlink)
        _remove_covered([f for f in files if _mine(f, first)], fmt.live_segments(files), False)
    return merged


def _next_roll(
    folder: Path, first: int, fanout: int, cache: dict[str, int]
) -> tuple[list[Path], int] | None:
    """The segments of the next rolling merge in ``folder`` and their rows (None: none)."""
    mine = [p for p in fmt.live_segments(folder.glob("part-*.parquet")) if _mine(p, first)]
    segs = []
    for p in mine:
        if p.name not in cache:
            try:
                cache[p.name] = pq.read_metadata(p).num_rows
            except Exception:  # unreadable: a barrier, never merged (readers skip it)
                cache[p.name] = SMALL_ROWS
        r = fmt.segment_range(p)
        assert r is not None
        segs.append((r[0], r[1], cache[p.name]))
    pick = roll_plan(segs, fanout)
    if pick is None:
        return None
    return [mine[i] for i in pick], sum(segs[i][2] for i in pick)


def _mine(p: Path, first: int) -> bool:
    r = fmt.segment_range(p)
    return r is not None and r[0] >= first


@dataclass
class RollStats:
    """What the writer spent on segments: writing them (writer thread), and merging them
    as it goes (roller thread)."""

    write_seconds: float = 0.0
    roll_seconds: float = 0.0
    write_cpu: float = 0.0
    """CPU seconds of the writer thread writing segments (the seconds above: wall)."""
    roll_cpu: float = 0.0
    merges: int = 0
    rows_rewritten: int = 0


class Roller(threading.Thread):
    """Rolling merges of one writer's segments, off the writer thread.

    ``request(tables, step)`` after each flush (writer thread): the tables just written,
    and the last step they hold. Requests that arrive during a merge are taken together.
    ``on_done(step)`` is called once the merges a flush allowed are done. ``close()``
    (writer thread, at its end): no merge starts after it; it waits for the one running,
    so that ``Collector.close()``'s compaction finds the lock free. A failed merge turns
    rolling off for the rest of the run with one report (the merge is crash-safe: the
    segments stay readable, and ``close()`` compacts them)."""

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        first_seq: dict[str, int],
        stats: RollStats,
        report: Callable[[str, str, BaseException | None], None],
        on_done: Callable[[int], None],
    ) -> None:
        super().__init__(name="runlens-roller", daemon=True)
        self.run_dir, self.rank, self.first_seq = run_dir, rank, first_seq
        self.stats, self.report, self.on_done = stats, report, on_done
        self.enabled = True
        self._cv = threading.Condition()
        self._tables: set[str] = set()
        self._step: int | None = None
        self._closing = False
        self._rows: dict[str, int] = {}  # roll()'s footer cache

    def request(self, tables: list[str], step: int | None) -> None:
        with self._cv:
            self._tables.update(tables)
            if step is not None:
                self._step = step if self._step is None else max(self._step, step)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self.is_alive():
            self.join()

    def run(self) -> None:
        while True:
            with self._cv:
                while not self._closing and not self._tables and self._step is None:
                    self._cv.wait()
                if self._closing:
                    return
                tables, step = sorted(self._tables), self._step
                self._tables, self._step = set(), None
            if self.enabled and tables:
                self._roll(tables)
            if step is not None:
                self.on_done(step)

    def _roll(self, tables: list[str]) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            for table in tables:
                merged = roll(
                    self.run_dir, table, self.rank, self.first_seq[table], rows_cache=self._rows
                )
                self.stats.merges += len(merged)
                self.stats.rows_rewritten += sum(m.rows for m in merged)
        except Exception as exc:
            self.enabled = False
            self.report("writer", "rolling compaction failed; it is off for this run", exc)
        finally:
            self.stats.roll_seconds += time.perf_counter() - t0
            self.stats.roll_cpu += time.thread_time() - c0
