"""Reading segment files: which files a table is, their scan, and reading them when some
turn out unreadable (a damaged segment is left out with a warning, never fatal).

Used by runlens.run (loading) and runlens.context (the analysis' pass): the Run never
changes; the caller decides what to do with the files left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from runlens_collect import format as fmt

from runlens.errors import RunLoadError
from runlens.layerscan import EXACT, scan_layers
from runlens.needs import LayerStat

if TYPE_CHECKING:
    from runlens.run import Run


LIST_RETRIES = 5
"""Listings (and loads) tried before a folder that keeps changing is read as it is."""


class SegmentsChanged(RunLoadError):
    """A listed segment vanished before it was read: a compaction (the collector's
    rolling one, while the run records, or ``runlens compact``) merged it. Nothing is
    lost: its rows are in the merged segment, which a fresh listing reads; so readers
    list again and retry rather than leave the segment out."""


def _vanished(f: Path) -> SegmentsChanged:
    return SegmentsChanged(f"segment {f.name} was merged while being read; read again")


def layer_columns(layers: pl.LazyFrame) -> tuple[str, ...]:
    """Columns of a layers frame. A scan takes them from its first segment; when that
    one is unreadable (the pass will leave it out), they are the format's columns."""
    try:
        return tuple(layers.collect_schema().names())
    except (pl.exceptions.PolarsError, OSError):
        return (*fmt.LAYERS_COLUMNS, "rank")


def footer_extent(files: Sequence[Path]) -> tuple[tuple[int, int], int | None] | None:
    """(first step of the first segment, last step of the last), from their footers'
    statistics, and the row count when those two are all the files. The table's extent
    when steps grow from segment to segment, as the collector writes them; a guess to
    check otherwise. None when there are no files or a footer lacks the statistics."""
    if not files:
        return None
    try:
        first = _step_stats(files[0])
        last = _step_stats(files[-1]) if len(files) > 1 else first
    except Exception:  # unreadable footer: the exact query finds out, and says it
        return None
    if first is None or last is None:
        return None
    rows = None
    if len(files) <= 2:
        rows = first[2] + (last[2] if len(files) == 2 else 0)
    return (first[0], last[1]), rows


def _step_stats(f: Path) -> tuple[int, int, int] | None:
    """(min step, max step, rows) of segment ``f`` from its footer (None: not every row
    group has statistics)."""
    steps = fmt.segment_steps(f)
    return steps[:3] if steps is not None and steps[3] else None


# -- reading segments that may turn out unreadable ------------------------------------------


def collect_tolerant(
    run: Run,
    table: str,
    build: Callable[[pl.LazyFrame], pl.LazyFrame],
    files: Sequence[Path] | None = None,
) -> tuple[pl.DataFrame, list[Path], list[str]]:
    """``build`` on ``table`` (over ``files``, default the run's), collected; a segment
    whose data cannot be read is left out and the query run again. Returns the frame, the
    files it read and a warning per file left out. Raises RunLoadError when nothing can
    be read."""
    files = list(run.segment_files(table) if files is None else files)
    schema = fmt.SCALARS_SCHEMA if table == fmt.SCALARS_DIR else fmt.LAYERS_SCHEMA
    notes: list[str] = []
    while True:
        lf = run.scalars if table == fmt.SCALARS_DIR else run.layers
        if lf is None:
            return pl.DataFrame(), files, notes
        if files != run.segment_files(table):
            lf = scan_segments(files, run.rank, schema, run.cuts.get(table))
        try:
            return build(lf).collect(), files, notes
        except (pl.exceptions.PolarsError, OSError) as exc:
            good, bad = _readable(run, files, build, schema)
            if not bad:
                raise RunLoadError(f"{run.path}: cannot read {table}: {_short(exc)}") from None
            notes += bad
            files = good


def read_layers(
    run: Run,
    needs: Sequence[Any],
    files: Sequence[Path],
    **kwargs: Any,
) -> tuple[Any, list[Path], list[str]]:
    """One pass (runlens.layerscan.scan_layers) over the layers of ``files``; a segment
    whose data cannot be read is left out and the pass run again. Returns the pass, the
    files read and a warning per file left out."""
    from runlens.needs import NonFiniteRows

    stats = [n for n in needs if isinstance(n, LayerStat)]
    nonfinite = next((n for n in needs if isinstance(n, NonFiniteRows)), None)
    files = list(files)
    notes: list[str] = []
    kwargs.setdefault("resolution", EXACT)
    while True:
        lf = run.layers
        if lf is None:
            raise RunLoadError(f"{run.path}: run has no layers")
        if files != run.segment_files(fmt.LAYERS_DIR):
            # every segment unreadable: an empty table (the notes say why)
            lf = scan_segments(files, run.rank, fmt.LAYERS_SCHEMA, run.cuts.get(fmt.LAYERS_DIR))
        try:
            return scan_layers(lf, stats, nonfinite=nonfinite, **kwargs), files, notes
        except (pl.exceptions.PolarsError, OSError) as exc:
            columns = ["step", "layer", "kind", *dict.fromkeys(s.stat for s in stats)]
            if nonfinite is not None:
                columns += ["missing", "frac_nonfinite", "norm"]
            names = set(layer_columns(lf))
            cols = list(dict.fromkeys(c for c in columns if c in names))
            good, bad = _readable(run, files, _selector(cols), fmt.LAYERS_SCHEMA)
            if not bad:
                raise RunLoadError(f"{run.path}: cannot read layers: {_short(exc)}") from None
            notes += bad
            files = good


def _selector(cols: list[str]) -> Callable[[pl.LazyFrame], pl.LazyFrame]:
    return lambda lf: lf.select(cols)


def _readable(
    run: Run,
    files: Sequence[Path],
    build: Callable[[pl.LazyFrame], pl.LazyFrame],
    schema: pa.Schema,
) -> tuple[list[Path], list[str]]:
    """Split ``files`` into those ``build`` reads and a warning for each of the others."""
    return _split_readable(run.path, files, build, schema, run.rank)


def _split_readable(
    root: Path,
    files: Sequence[Path],
    build: Callable[[pl.LazyFrame], pl.LazyFrame],
    schema: pa.Schema,
    rank: int | None,
) -> tuple[list[Path], list[str]]:
    good, notes = [], []
    required = REQUIRED[fmt.SCALARS_DIR if schema is fmt.SCALARS_SCHEMA else fmt.LAYERS_DIR]
    for f in files:
        why = _footer_problem(root, f, required, schema)
        if why is None:
            try:
                build(scan_segments([f], rank, schema)).collect()
            except Exception as exc:
                if not f.exists():
                    raise _vanished(f) from None
                why = f"skipped unreadable segment {_rel(f, root)}: {_short(exc)}"
        if why is not None:
            notes.append(why)
            continue
        good.append(f)
    return good, notes


def _rel(f: Path, root: Path) -> str:
    try:
        return str(f.relative_to(root))
    except ValueError:
        return str(f)


def segment_listing(root: Path, table: str) -> list[Path]:
    """The live segments of ``table`` (format.live_segments), rank by rank."""
    out: list[Path] = []
    base = root / table
    if not base.is_dir():
        return out
    for rank_dir in sorted(base.glob("rank=*")):
        if rank_dir.is_dir():
            out += _stable_listing(rank_dir)
    return out


def _stable_listing(folder: Path) -> list[Path]:
    """The live segments of a rank folder, listed until two listings agree: a merge
    renamed in and its segments deleted while the directory was being read can leave a
    listing with neither (rows missed); a listing taken between changes has one or the
    other (format.live_segments)."""
    prev: list[Path] | None = None
    for _ in range(LIST_RETRIES):
        cur = fmt.live_segments(folder.glob("part-*.parquet"))
        if cur == prev:
            break
        prev = cur
    return cur


REQUIRED = {
    fmt.SCALARS_DIR: tuple(fmt.SCALARS_SCHEMA.names),
    fmt.LAYERS_DIR: ("step", "layer", "kind"),
}
"""Columns a segment of each table must have to be read at all."""


def _footer_problem(
    root: Path, f: Path, required: Sequence[str], expected: pa.Schema
) -> str | None:
    """Why segment ``f`` cannot be read, from its footer: unreadable, a required column
    missing, a column of the wrong type (None when it looks fine)."""
    try:
        schema = pq.read_schema(f)
    except FileNotFoundError:
        raise _vanished(f) from None
    except Exception as exc:  # truncated / not parquet
        if not f.exists():
            raise _vanished(f) from None
        return f"skipped unreadable segment {_rel(f, root)}: {_short(exc)}"
    missing = [c for c in required if c not in schema.names]
    if missing:
        return f"skipped segment {_rel(f, root)}: missing columns {missing}"
    bad = _type_mismatch(schema, expected)
    if bad:
        return f"skipped segment {_rel(f, root)}: {bad}"
    return None


def _type_family(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return "list"
    return str(t)


def _type_mismatch(schema: pa.Schema, expected: pa.Schema) -> str | None:
    """Why a segment's columns cannot be read as ``expected`` (None when they can)."""
    for field_ in expected:
        i = schema.get_field_index(field_.name)
        if i < 0:
            continue
        got = schema.field(i).type
        want = _type_family(field_.type)
        # integers read fine as floats; anything else must match its family
        ok = _type_family(got) == want or (want == "float" and _type_family(got) == "integer")
        if not ok:
            return f"column {field_.name} has type {got}, expected {field_.type}"
    return None


def _rank_of(f: Path) -> int:
    try:
        return int(f.parent.name.split("=", 1)[1])
    except (IndexError, ValueError):
        return 0


def scan_segments(
    files: list[Path],
    rank: int | None,
    schema: Any,
    cuts: Sequence[tuple[int, int]] | None = None,
) -> pl.LazyFrame:
    """A lazy scan of segment ``files`` (of ``rank``) with the format's columns. ``cuts``
    are the run's resumes (step, first segment number of the continuation): a segment
    written before a resume keeps only its rows before that resume's step (the rest
    belong to the attempt the checkpoint replaced)."""
    files = [f for f in files if rank is None or _rank_of(f) == rank]
    if not files:
        empty = pl.from_arrow(schema.empty_table())
        assert isinstance(empty, pl.DataFrame)
        return empty.with_columns(pl.lit(0, pl.Int64).alias("rank")).lazy()
    groups: list[tuple[int | None, list[str]]] = []  # consecutive files with one cap
    for f in files if cuts else ():
        seq = _seq_of(f)
        caps = [step for step, first in cuts or () if seq is not None and seq < first]
        cap = min(caps) if caps else None
        if groups and groups[-1][0] == cap:
            groups[-1][1].append(str(f))
        else:
            groups.append((cap, [str(f)]))
    if not cuts:
        groups.append((None, [str(f) for f in files]))
    frames = []
    for cap, paths in groups:
        lf = pl.scan_parquet(paths, missing_columns="insert", extra_columns="ignore")
        frames.append(lf if cap is None else lf.filter(pl.col("step") < cap))
    lf = frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical_relaxed")
    return lf.with_columns(pl.lit(rank, pl.Int64).alias("rank"))


def _seq_of(f: Path) -> int | None:
    """The (first) segment number of a segment file, compacted ones included."""
    r = fmt.segment_range(f)
    return r[0] if r is not None else None


def _event_rank(e: dict[str, Any]) -> int:
    r = e.get("rank", 0)
    return r if isinstance(r, int) and not isinstance(r, bool) else 0


def resume_cuts(
    events: Sequence[dict[str, Any]], rank: int | None, table: str
) -> list[tuple[int, int]]:
    """(step, first segment of ``table``) of each resume event of ``rank``."""
    cuts = []
    for e in events:
        if e.get("kind") != "resume" or _event_rank(e) != (rank or 0):
            continue
        step, segs = e.get("step"), e.get("segments")
        first = segs.get(table) if isinstance(segs, dict) else None
        if isinstance(step, int) and isinstance(first, int):
            cuts.append((step, first))
    return sorted(set(cuts))


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
