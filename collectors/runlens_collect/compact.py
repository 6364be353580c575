"""Compaction: merge a run's many small segments into few large ones, crash-safely.

A collector writes one segment per flush, so a long run leaves hundreds of small files,
and reading many small files costs more than reading a few large ones. ``compact_run``
merges them; the collector calls it from ``close()`` and ``runlens compact RUN_DIR`` does
it for runs that ended abnormally (while the run records, the collector's writer merges
as it goes: runlens_collect.rolling, by the same protocol under the same lock). The
protocol (format.py, "compaction"):

1. Per table and rank, the live segments (``format.live_segments``) in order are grouped:
   consecutive readable segments with the same schema, each of fewer than
   ``SMALL_ROWS`` rows, up to ``MAX_FILE_ROWS`` rows per group. Larger or unreadable
   segments stay as they are.
2. A group of two or more segments is streamed, one segment at a time, into a hidden
   temporary file in the rank folder, in row groups of ``ROW_GROUP_ROWS`` rows with
   column statistics (predicate push-down on ``step``), then flushed to disk (fsync).
3. The file is renamed to ``part-A-B.parquet`` (A, B: the first and last segment numbers
   of the group) and the folder fsynced. From now on readers read it and ignore the
   segments it covers.
4. The covered segments are deleted.

A crash at any point leaves a readable run with every row exactly once: before step 3
the old segments (the temporary file is not a segment name and is ignored), after it the
merged segment (covered leftovers are ignored, and removed by the next compaction).

Standard library and pyarrow only: the analyzer imports this module too.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from runlens_collect import format as fmt

ROW_GROUP_ROWS = fmt.COMPACT_ROW_GROUP_ROWS
SMALL_ROWS = fmt.COMPACT_SMALL_ROWS
MAX_FILE_ROWS = fmt.COMPACT_MAX_FILE_ROWS
LOCK_NAME = ".compact.lock"
STALE_LOCK_S = 600.0
"""A lock older than this is from a compaction that died; it is taken over."""


@dataclass(frozen=True)
class Merged:
    """One compacted segment: the segments it replaced and its size."""

    path: Path
    replaced: tuple[Path, ...]
    rows: int
    bytes_before: int
    bytes_after: int


@dataclass
class Compaction:
    """What :func:`compact_run` did (or, with ``dry_run``, would do)."""

    merged: list[Merged] = field(default_factory=list)
    kept: int = 0
    """Live segments left as they were (already large, alone, or unreadable)."""
    skipped: list[str] = field(default_factory=list)
    """One line per segment or folder not compacted, and why."""

    @property
    def before(self) -> int:
        return sum(len(m.replaced) for m in self.merged) + self.kept

    @property
    def after(self) -> int:
        return len(self.merged) + self.kept

    def describe(self) -> str:
        if not self.merged:
            return f"nothing to compact ({self.kept} segments)"
        b = sum(m.bytes_before for m in self.merged) / 2**20
        a = sum(m.bytes_after for m in self.merged) / 2**20
        return (
            f"{self.before} segments -> {self.after} ({sum(len(m.replaced) for m in self.merged)}"
            f" merged into {len(self.merged)}; {b:.1f} MiB -> {a:.1f} MiB)"
        )


def compact_run(
    run_dir: str | os.PathLike[str],
    ranks: Iterable[int] | None = None,
    *,
    first: Mapping[str, int] | None = None,
    dry_run: bool = False,
    row_group_rows: int = ROW_GROUP_ROWS,
    max_file_rows: int = MAX_FILE_ROWS,
) -> Compaction:
    """Compact the segments of ``run_dir`` (of ``ranks``; None: every rank).

    ``first`` (table -> segment number) leaves alone the segments numbered below it: a
    collector compacts only what it wrote, never the segments of an earlier run that
    shares its directory."""
    root = Path(run_dir)
    out = Compaction()
    wanted = None if ranks is None else set(ranks)
    resumes: dict[int, list[dict]] = {}  # rank -> its resume records, read once
    for table in (fmt.SCALARS_DIR, fmt.LAYERS_DIR):
        base = root / table
        if not base.is_dir():
            continue
        for rank_dir in sorted(base.glob("rank=*")):
            rank = _rank(rank_dir)
            if not rank_dir.is_dir() or rank is None or (wanted is not None and rank not in wanted):
                continue
            low = (first or {}).get(table, 0)
            if rank not in resumes:
                resumes[rank] = _resume_records(root, rank)
            breaks = _breaks(resumes[rank], table)
            _compact_folder(
                root,
                table,
                rank,
                rank_dir,
                out,
                dry_run,
                row_group_rows,
                max_file_rows,
                low,
                breaks,
            )
    return out


def _resume_records(root: Path, rank: int) -> list[dict]:
    """``rank``'s resume records: its ``resume`` events, and run.json ``resumed`` for rank
    0 (in case its events file was lost). A compacted segment never spans a continuation's
    first segment: readers drop the rows a continuation superseded by segment number."""
    records: list[dict] = []
    if rank == 0:
        try:
            meta = json.loads((root / fmt.RUN_JSON).read_text(encoding="utf-8"))
            records += list(fmt.read_resumed(meta)) if isinstance(meta, dict) else []
        except (OSError, ValueError):
            pass
    try:
        with open(fmt.events_path(root, rank), encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if isinstance(ev, dict) and ev.get("kind") == "resume":
                    records.append(ev)
    except OSError:
        pass
    return records


def _breaks(records: list[dict], table: str) -> set[int]:
    """First segment numbers of ``table`` where a continuation starts."""
    out: set[int] = set()
    for r in records:
        segs = r.get("segments")
        first = segs.get(table) if isinstance(segs, dict) else None
        if isinstance(first, int) and not isinstance(first, bool):
            out.add(first)
    return out


def _rank(rank_dir: Path) -> int | None:
    try:
        return int(rank_dir.name.split("=", 1)[1])
    except (IndexError, ValueError):
        return None


def _compact_folder(
    root: Path,
    table: str,
    rank: int,
    folder: Path,
    out: Compaction,
    dry_run: bool,
    row_group_rows: int,
    max_file_rows: int,
    low: int = 0,
    breaks: set[int] | None = None,
) -> None:

    def planned() -> list[_Group]:
        files = list(folder.glob("part-*.parquet"))
        live = fmt.live_segments(files)
        _remove_covered(files, live, dry_run)
        mine = [p for p in live if (fmt.segment_range(p) or (-1, -1))[0] >= low]
        out.kept += len(live) - len(mine)
        groups, kept = _plan(mine, out, row_group_rows, max_file_rows, breaks or set())
        out.kept += kept
        return groups

    if dry_run:
        for g in planned():
            first, last = _span(g.paths)
            path = fmt.compacted_segment_path(root, table, rank, first, last)
            out.merged.append(Merged(path, tuple(g.paths), g.rows, g.bytes, g.bytes))
        return
    with _lock(folder) as held:
        if not held:
            out.skipped.append(f"{folder}: another compaction is running")
            out.kept += sum(len(g.paths) for g in planned())
            return
        # Listed under the lock: a live collector's writer may have merged since (rolling).
        for g in planned():
            out.merged.append(_merge(root, table, rank, g, row_group_rows))


@dataclass
class _Group:
    paths: list[Path] = field(default_factory=list)
    schema: pa.Schema | None = None
    rows: int = 0
    bytes: int = 0


def _plan(
    live: list[Path],
    out: Compaction,
    row_group_rows: int,
    max_file_rows: int,
    breaks: set[int] | None = None,
) -> tuple[list[_Group], int]:
    """Groups of consecutive small segments with one schema, never across a resume
    (``breaks``: first segment numbers of continuations); and how many stay alone."""
    groups: list[_Group] = []
    cur = _Group()
    kept = 0

    def close() -> None:
        nonlocal cur, kept
        if len(cur.paths) >= 2:
            groups.append(cur)
        else:
            kept += len(cur.paths)
        cur = _Group()

    for p in live:
        r = fmt.segment_range(p)
        if r is not None and r[0] in (breaks or ()):
            close()  # a continuation starts here
        try:
            md = pq.read_metadata(p)
            schema = md.schema.to_arrow_schema()
        except Exception as exc:  # unreadable: left in place, the reader skips it
            close()
            kept += 1
            out.skipped.append(f"{p}: unreadable ({type(exc).__name__}), left as it is")
            continue
        if md.num_rows >= SMALL_ROWS:  # already large: nothing to gain
            close()
            kept += 1
            continue
        same = cur.schema is None or cur.schema.equals(schema, check_metadata=False)
        if not same or cur.rows + md.num_rows > max_file_rows:
            close()
        cur.paths.append(p)
        cur.schema = schema
        cur.rows += md.num_rows
        cur.bytes += p.stat().st_size
    close()
    return groups, kept


def _span(paths: list[Path]) -> tuple[int, int]:
    first = fmt.segment_range(paths[0])
    last = fmt.segment_range(paths[-1])
    assert first is not None and last is not None
    return first[0], last[1]


def _merge(root: Path, table: str, rank: int, g: _Group, row_group_rows: int) -> Merged:
    first, last = _span(g.paths)
    dest = fmt.compacted_segment_path(root, table, rank, first, last)
    assert g.schema is not None
    fd, tmp = tempfile.mkstemp(prefix=".tmp-compact-", suffix=".parquet", dir=dest.parent)
    rows = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            writer = pq.ParquetWriter(fh, g.schema, compression="zstd", write_statistics=True)
            pending: list[pa.Table] = []
            n_pending = 0
            for t in _batches(g.paths, g.schema, row_group_rows):
                # One input batch in memory at a time, plus at most one row group: a merge
                # of large (already merged) segments holds no more than a small one's.
                pending.append(t)
                n_pending += t.num_rows
                rows += t.num_rows
                if n_pending >= row_group_rows:
                    n_pending = _write_groups(writer, pending, row_group_rows, final=False)
            _write_groups(writer, pending, row_group_rows, final=True)
            writer.close()
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)  # the merged segment is in place: readers switch to it
        _fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    for p in g.paths:
        if p != dest:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    _fsync_dir(dest.parent)
    return Merged(dest, tuple(g.paths), rows, g.bytes, dest.stat().st_size)


def _batches(paths: list[Path], schema: pa.Schema, rows: int) -> Iterable[pa.Table]:
    """The rows of ``paths`` in order, at most ``rows`` at a time."""
    for p in paths:
        with pq.ParquetFile(p) as pf:
            for b in pf.iter_batches(batch_size=rows):
                yield pa.Table.from_batches([b]).cast(schema)


def _write_groups(
    writer: pq.ParquetWriter, pending: list[pa.Table], row_group_rows: int, final: bool
) -> int:
    """Write whole row groups out of ``pending`` (all of it when ``final``); what is left
    stays in ``pending``. Returns the rows left."""
    table = pa.concat_tables(pending).unify_dictionaries() if pending else None
    pending.clear()
    if table is None or table.num_rows == 0:
        return 0
    n = table.num_rows if final else (table.num_rows // row_group_rows) * row_group_rows
    if n:
        writer.write_table(table.slice(0, n), row_group_size=row_group_rows)
    rest = table.slice(n)
    if rest.num_rows:
        pending.append(rest)
    return rest.num_rows


def _remove_covered(files: list[Path], live: list[Path], dry_run: bool) -> None:
    """Delete segments a compacted segment covers (left by a compaction that died after
    its rename)."""
    if dry_run:
        return
    keep = set(live)
    for f in files:
        if fmt.segment_range(f) is not None and f not in keep:
            with contextlib.suppress(FileNotFoundError):
                f.unlink()


@contextlib.contextmanager
def _lock(folder: Path):  # type: ignore[no-untyped-def]
    """An exclusive lock file in ``folder`` (yields False when another process holds it)."""
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            stale = time.time() - path.stat().st_mtime > STALE_LOCK_S or _dead_holder(path)
        except FileNotFoundError:
            stale = True
        if not stale:
            yield False
            return
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            yield False
            return
    try:
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        os.close(fd)
        # Held: a compaction's temporary file here is an orphan of one that died.
        for orphan in folder.glob(".tmp-compact-*.parquet"):
            with contextlib.suppress(OSError):
                orphan.unlink()
        yield True
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _dead_holder(path: Path) -> bool:
    """Whether the lock at ``path`` was taken by a process of this host that is gone (a
    collector killed in the middle of a rolling merge): taken over at once rather than
    after STALE_LOCK_S. A holder on another host is never judged from here."""
    try:
        pid_text, host = path.read_text(encoding="utf-8").split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, not ours to signal
        return False
    return False


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
