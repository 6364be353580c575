"""Rolling compaction: the collector's writer merges its own segments while the run records.

A run still recording, or one that crashed, would otherwise have one segment per flush
per table (hundreds of small files, slower to analyze than a few large ones). After each
flush the writer thread calls :func:`roll`: segments are grouped in tiers (a flush's
segment is tier 0; a merge of ``ROLL_FANOUT`` segments of tier L is of tier L+1) and
whenever ``ROLL_FANOUT`` consecutive segments of one tier are there, they are merged by
compaction's crash-safe protocol (runlens_collect.compact) under its lock. The policy
(format.ROLLING_POLICY, docs/run-format.md) bounds both the number of segments and how
often a row is rewritten by log(flushes).

Standard library and pyarrow only, like compact.py.
"""

from __future__ import annotations

import os
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
