"""The files of a live run that are new since the last poll (runlens.live.watcher).

Segments are followed by their numbers, not their names: the collector merges segments
while the run records (runlens_collect.rolling), so a new ``part-A-B.parquet`` may cover
segments already read; only the rows not read yet are taken from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runlens_collect import format as fmt

from runlens import storage
from runlens.errors import RunLoadError
from runlens.run import read_events_from


class Follower:
    """New files of one run: a local folder, or a URL mirrored afresh on each poll."""

    def __init__(self, path: str) -> None:
        self.url = path if storage.is_url(path) else None
        self.local = None if self.url else Path(path)
        self.seen: dict[str, set[Path]] = {fmt.SCALARS_DIR: set(), fmt.LAYERS_DIR: set()}
        self.read: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
        """Per table and rank: (first, last segment number, rows) of each segment read."""
        self.failures: dict[Path, int] = {}
        self.events_offsets: dict[Path, int] = {}
        self.events_sizes: dict[Path, int] = {}

    def sync(self) -> Path | None:
        """The local folder to read (None while the run does not exist yet)."""
        if self.local is not None:
            return self.local if self.local.exists() else None
        assert self.url is not None
        try:
            files = storage.list_files(self.url)
        except RunLoadError:
            return None
        keep = [
            f
            for f in files
            if f.rel in (fmt.RUN_JSON, fmt.EVENTS_JSONL)
            or (f.rel.startswith("events-rank") and f.rel.endswith(".jsonl"))
            or (
                f.rel.startswith((f"{fmt.SCALARS_DIR}/", f"{fmt.LAYERS_DIR}/"))
                and f.rel.endswith(".parquet")
            )
        ]
        return storage.mirror(self.url, keep) if keep else None

    def new_segments(self, root: Path, table: str, rank: int) -> list[Path]:
        """The live segments (format.live_segments) not read yet, in order: a merged
        segment (the collector's rolling compaction) among them may cover segments
        already read (see :meth:`rows_read`)."""
        files = fmt.live_segments((root / table / f"rank={rank}").glob("part-*.parquet"))
        return [f for f in files if f not in self.seen[table]]

    def rows_read(self, table: str, rank: int, seg: Path) -> int:
        """Rows already read from the segments ``seg`` covers. A merged segment holds
        its segments' rows in their order (compact._merge), and the segments read are
        always a prefix of those it covers (each poll reads every live segment in order
        and stops at one that vanished), so these are its first rows."""
        r = fmt.segment_range(seg)
        if r is None:
            return 0
        return sum(n for a, b, n in self.read.get((table, rank), ()) if r[0] <= a and b <= r[1])

    def mark_read(self, table: str, rank: int, seg: Path, rows: int) -> None:
        self.seen[table].add(seg)
        r = fmt.segment_range(seg)
        if r is None:
            return
        done = [x for x in self.read.get((table, rank), []) if not (r[0] <= x[0] and x[1] <= r[1])]
        self.read[(table, rank)] = [*done, (r[0], r[1], rows)]

    def new_events(self, root: Path) -> tuple[list[dict[str, Any]], bool]:
        """Complete new lines of every rank's events file, and True when one was rewritten
        (the lines of every file must then replace those read so far)."""
        sizes: dict[Path, int] = {}
        for p in (root / fmt.EVENTS_JSONL, *sorted(root.glob(fmt.EVENTS_RANK_GLOB))):
            try:
                sizes[p] = p.stat().st_size
            except OSError:
                continue
        reset = any(size < self.events_sizes.get(p, 0) for p, size in sizes.items())
        if reset:
            self.events_offsets = {}
        self.events_sizes = sizes
        events: list[dict[str, Any]] = []
        for p, size in sizes.items():
            offset = self.events_offsets.get(p, 0)
            if size != offset:
                new, self.events_offsets[p] = read_events_from(p, offset)
                events.extend(new)
        return events, reset
