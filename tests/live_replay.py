"""Replaying a finished run as a live one: its rows cut into segments by step and written
one flush at a time with the collector's own atomic ``format.write_segment``, run.json
saying ``running`` until the end. Shared by the watch tests."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from runlens_collect import format as fmt

from runlens.live import Watcher, WatchOptions

SAMPLES = Path(__file__).resolve().parent.parent / "sample_runs"


class Replay:
    """The run at ``src`` (a sample name, or a run directory) re-written into ``dest`` as
    a live run: ``status: running`` and its rows (every segment of the lowest rank) cut
    into one segment pair per ``chunk`` steps."""

    def __init__(self, src: str | Path, dest: Path, chunk: int = 25) -> None:
        src = SAMPLES / src if isinstance(src, str) else src
        self.dest = dest
        self.meta = json.loads((src / fmt.RUN_JSON).read_text())
        self.final_status = self.meta.get("status") or fmt.STATUS_FINISHED
        self.meta["status"] = fmt.STATUS_RUNNING
        dest.mkdir(parents=True)
        fmt.write_json_atomic(self.meta, dest / fmt.RUN_JSON)
        self.tables = {}
        for t in (fmt.SCALARS_DIR, fmt.LAYERS_DIR):
            parts = sorted((src / t / "rank=0").glob("part-*.parquet"))
            if parts:
                self.tables[t] = pa.concat_tables([pq.read_table(p) for p in parts])
        steps = self.tables[fmt.SCALARS_DIR]["step"]
        self.next = pc.min(steps).as_py()
        self.last = pc.max(steps).as_py()
        self.chunk = chunk
        self.seq = 0

    def flush(self) -> bool:
        """Write the next chunk of steps; False when there is none left."""
        lo, hi = self.next, self.next + self.chunk
        if lo > self.last:
            return False
        for name, t in self.tables.items():
            part = t.filter(pc.and_(pc.greater_equal(t["step"], lo), pc.less(t["step"], hi)))
            if part.num_rows:
                fmt.write_segment(part, fmt.segment_path(self.dest, name, 0, self.seq))
        self.seq += 1
        self.next = hi
        return True

    def finish(self) -> None:
        self.meta["status"] = fmt.STATUS_FINISHED
        fmt.write_json_atomic(self.meta, self.dest / fmt.RUN_JSON)


def replay_events(
    src: str | Path, dest: Path, options: WatchOptions | None = None, chunk: int = 25
) -> list:
    """Every event a watch of ``src`` replayed into ``dest`` reports, the final pass's
    included (the watch ends with the run)."""
    rp = Replay(src, dest, chunk)
    w = Watcher(dest, options or WatchOptions(interval=0.01))
    events = []
    while rp.flush():
        events += w.poll()
    rp.finish()
    events += w.poll()
    assert w.done
    return events
