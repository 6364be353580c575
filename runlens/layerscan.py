"""One pass over a run's layers table: every step × layer matrix an analysis needs, in
memory bounded by a setting, not by the run.

The pass reads the columns of the declared needs (runlens.needs) once, in chunks of
``Resolution.chunk_rows`` rows (polars' streaming engine, ``collect_batches``), and turns
each chunk into rows of the matrices before reading the next:

* **Exact** (the run has at most ``Resolution.rows_for(layers)`` steps, or
  :data:`EXACT`): one row per recorded step, one column per layer in first-seen (model)
  order, NaN where a layer has no row; a (step, layer) written twice keeps the last write,
  as for scalars.
* **Windows** (longer runs): the steps are cut into windows of ``window`` consecutive
  step numbers and each row is the window's level (``LayerStat.reduce``): the median of
  the finite values by default, a robust level that one odd step does not move. A window
  where most values are non-finite has a non-finite level (its last non-finite value), so
  a NaN/Inf layer still shows. The row's step is the last recorded step of its window.
  A kind recorded every ``k`` steps with ``k >= window`` keeps one value per window: its
  rows are exact.

The window is chosen per kind when the kind is first seen, from the run's step span and
the number of its layers, so a matrix never exceeds ``Resolution.max_cells`` cells nor
``Resolution.max_rows`` rows. Signatures see the same :class:`LayerMatrix` either way;
``LayerMatrix.window`` says how many step numbers a row covers (1: every step).

Nothing here knows which files the frame comes from: a chunk that fails to read raises,
and the caller (Context) excludes the segment and runs the pass again.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import polars as pl

from runlens.levelrows import KindRows, Rows, block, merge
from runlens.needs import LayerStat, NonFiniteRows

MIB = 2**20
DEFAULT_MEMORY_MB = 1024
"""Default bound on the analyzer's memory (AnalyzeOptions.memory_mb)."""
LEVEL_ROWS = 20_000
"""Rows kept per matrix at most, whatever the memory: the resolution signatures need
(their windows are a twentieth of the run and longer) with room to spare."""
THREADS = min(4, os.cpu_count() or 1)
"""Threads turning one chunk's kinds into matrix rows at once."""
MIN_LEVEL_ROWS = 1_000
"""Rows kept per matrix at least, however many layers (memory then grows with layers)."""


@dataclass(frozen=True)
class Resolution:
    """How finely and in what memory the layers table is read."""

    max_rows: int | None
    """Rows per matrix at most (None: every recorded step, whatever the length)."""
    max_cells: int | None
    """Cells (rows × layers) per matrix at most (None: no bound)."""
    chunk_rows: int
    """Layers rows read per chunk."""

    @classmethod
    def for_memory(cls, memory_mb: float) -> Resolution:
        """The resolution that keeps an analysis within about ``memory_mb`` MiB.

        A chunk costs ~600 bytes per row while it is read and scattered (the polars
        frame, its numpy copies per kind, the window arrays); a matrix is float64 and an
        analysis holds ~16 of them plus the signatures' temporaries (~4 copies each)."""
        budget = max(64.0, float(memory_mb)) * MIB
        chunk = int(min(4_000_000, max(100_000, budget / 4 / 600)))
        cells = int(budget / 4 / (8 * 16 * 4))
        return cls(LEVEL_ROWS, max(cells, 10_000), chunk)

    def rows_for(self, n_layers: int) -> int | None:
        """Rows per matrix for a kind with ``n_layers`` layers (None: unbounded)."""
        if self.max_rows is None:
            return None
        rows = self.max_rows
        if self.max_cells is not None:
            rows = min(rows, max(MIN_LEVEL_ROWS, self.max_cells // max(1, n_layers)))
        return rows


NONFINITE_SCHEMA = {"step": pl.Int64, "layer": pl.String, "kind": pl.String}

EXACT = Resolution(max_rows=None, max_cells=None, chunk_rows=2_000_000)
"""Every recorded step (Run.layer_matrix): memory grows with the run."""


@dataclass(frozen=True)
class LayerMatrix:
    """``values[i, j]`` is the statistic of ``layers[j]`` at ``steps[i]`` (NaN if absent).

    With ``window > 1`` each row is the level of a window of ``window`` step numbers
    ending at (and shown as) ``steps[i]``, reduced by ``reduce`` (see runlens.layerscan);
    with ``window == 1`` every recorded step is a row."""

    kind: str
    stat: str
    steps: np.ndarray
    layers: tuple[str, ...]
    values: np.ndarray
    window: int = 1
    reduce: str = "exact"

    def column(self, layer: str) -> np.ndarray:
        return self.values[:, self.layers.index(layer)]


@dataclass(frozen=True)
class LayerPass:
    """What one pass found: the kinds present, each planned matrix, the non-finite rows."""

    kinds: tuple[str, ...]
    """Kinds present in the table, sorted."""
    layers: dict[str, tuple[str, ...]]
    """Layers of each planned kind, first-seen (model) order."""
    matrices: dict[LayerStat, LayerMatrix | None]
    """Each planned statistic (None: its kind has no row)."""
    nonfinite: pl.DataFrame | None
    """``step, layer, kind`` of the first non-finite rows (None when not planned)."""
    rows: int
    steps: tuple[int, int] | None = None
    """First and last step read (None: no rows)."""


def scan_layers(
    lf: pl.LazyFrame,
    stats: Iterable[LayerStat],
    *,
    nonfinite: NonFiniteRows | None = None,
    resolution: Resolution = EXACT,
    step_range: tuple[int, int] | None = None,
    total_rows: int | None = None,
) -> LayerPass:
    """Read ``stats`` (and the non-finite rows) from the layers frame ``lf`` in one pass.

    ``step_range`` (first, last step of the table) sets the windows; it is read from the
    frame when not given and the resolution may need windows. ``total_rows``, when known,
    lets a table that fits in one chunk be collected at once. Statistics that are not
    columns of ``lf`` are left out (their matrices are missing from the result)."""
    schema = lf.collect_schema()
    names = schema.names()
    wanted = list(dict.fromkeys(s for s in stats if s.stat in names))
    columns = list(dict.fromkeys(s.stat for s in wanted))
    probe = nonfinite is not None and {"missing", "frac_nonfinite", "norm"} <= set(names)
    exprs: list[pl.Expr] = [
        pl.col("step").cast(pl.Int64),
        pl.col("layer").cast(pl.Categorical),
        pl.col("kind").cast(pl.Categorical),
        # Conversions in the query: the streaming engine's threads do them while this
        # thread reduces the previous chunk.
        pl.col("layer").cast(pl.Categorical).to_physical().alias("_layer_code"),
        pl.col("kind").cast(pl.Categorical).to_physical().alias("_kind_code"),
        *(_as_float(c, schema[c]) for c in columns),
    ]
    if probe:
        bad = ~pl.col("missing") & (
            (pl.col("frac_nonfinite") > 0) | ~pl.col("norm").cast(pl.Float64).is_finite()
        )
        exprs.append(bad.fill_null(False).alias("_nonfinite"))
    query = lf.select(exprs)
    if resolution.max_rows is not None and step_range is None:
        r = lf.select(pl.col("step").min().alias("a"), pl.col("step").max().alias("b")).collect()
        a, b = r["a"][0], r["b"][0]
        step_range = (int(a), int(b)) if a is not None and b is not None else (0, 0)
    span = (step_range[1] - step_range[0] + 1) if step_range else 1
    origin = step_range[0] if step_range else 0

    by_kind: dict[str, list[LayerStat]] = {}
    for s in wanted:
        by_kind.setdefault(s.kind, []).append(s)
    acc = _Pass(by_kind, resolution, span, origin, nonfinite if probe else None)
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        acc.pool = pool if THREADS > 1 else None
        for df in _chunks(query, resolution.chunk_rows, total_rows):
            acc.feed(df)
    return acc.finish(wanted, nonfinite is not None)


def _chunks(query: pl.LazyFrame, chunk_rows: int, total_rows: int | None) -> Iterator[pl.DataFrame]:
    if total_rows is not None and total_rows <= chunk_rows:
        yield query.collect()
        return
    # The streaming engine hands out chunks in order; memory stays at a few chunks.
    yield from query.collect_batches(chunk_size=chunk_rows, maintain_order=True)


# -- the pass -------------------------------------------------------------------------------


class _Pass:
    def __init__(
        self,
        by_kind: dict[str, list[LayerStat]],
        resolution: Resolution,
        span: int,
        origin: int,
        nonfinite: NonFiniteRows | None,
    ) -> None:
        self.kinds = {k: KindRows(v) for k, v in by_kind.items()}
        self.resolution = resolution
        self.span = span
        self.origin = origin
        self.nonfinite = nonfinite
        self.bad: list[pl.DataFrame] = []
        self.bad_rows = 0
        self.kind_codes: dict[int, str] = {}
        self.rows = 0
        self.steps: tuple[int, int] | None = None
        self.pool: ThreadPoolExecutor | None = None

    # -- per chunk --------------------------------------------------------------------------
    def feed(self, df: pl.DataFrame) -> None:
        if df.height == 0:
            return
        self.rows += df.height
        kind_s = df["kind"]
        kc = df["_kind_code"].to_numpy()
        first = int(kc[0])
        if bool(np.all(kc == first)):
            where: dict[int, np.ndarray | None] = {first: None}  # one kind: every row
        else:
            codes = np.flatnonzero(np.bincount(kc))
            where = {int(c): np.flatnonzero(kc == c) for c in codes}
        for code, rows in where.items():
            if code not in self.kind_codes:
                self.kind_codes[code] = str(kind_s[0 if rows is None else int(rows[0])])
        if self.nonfinite is not None:
            self._probe(df)
        step = df["step"].to_numpy()
        lo, hi = int(step.min()), int(step.max())
        if self.steps is not None:
            lo, hi = min(lo, self.steps[0]), max(hi, self.steps[1])
        self.steps = (lo, hi)
        lc = df["_layer_code"].to_numpy()
        layer = df["layer"]
        jobs = []
        arrays: dict[str, np.ndarray] = {}
        for code, rows in where.items():
            acc = self.kinds.get(self.kind_codes[code])
            if acc is None:
                continue
            for stat in dict.fromkeys(x.stat for x in acc.stats):
                if stat not in arrays:
                    arrays[stat] = _floats(df[stat])
            jobs.append((acc, rows))

        def run(job: tuple[KindRows, np.ndarray | None]) -> None:
            acc, rows = job
            take = _taker(rows)
            cols = acc.columns(take(lc), layer, rows)
            st = take(step)
            vals = {k: take(arrays[k]) for k in dict.fromkeys(x.stat for x in acc.stats)}
            if acc.window is None:
                acc.window = self._window(len(acc.names))
            self._add_rows(acc, st, cols, vals, final=False)

        # Kinds are independent (each its own accumulator): numpy releases the GIL, so
        # they are turned into blocks in parallel.
        if self.pool is not None and len(jobs) > 1:
            list(self.pool.map(run, jobs))
        else:
            for job in jobs:
                run(job)

    def _window(self, n_layers: int) -> int:
        rows = self.resolution.rows_for(n_layers)
        if rows is None or self.span <= rows:
            return 1
        return math.ceil(self.span / rows)

    def _probe(self, df: pl.DataFrame) -> None:
        assert self.nonfinite is not None
        hit = df["_nonfinite"].to_numpy()
        if not hit.any():
            return
        rows = df.filter(pl.Series(hit)).select(
            "step", pl.col("layer").cast(pl.String), pl.col("kind").cast(pl.String)
        )
        self.bad.append(rows)
        self.bad_rows += rows.height
        if self.bad_rows > 2 * self.nonfinite.limit:  # keep the first ones only
            kept = _first_rows(pl.concat(self.bad), self.nonfinite.limit)
            self.bad, self.bad_rows = [kept], kept.height

    def _add_rows(
        self,
        acc: KindRows,
        steps: np.ndarray,
        cols: np.ndarray,
        vals: dict[str, np.ndarray],
        final: bool,
    ) -> None:
        """Turn the rows of complete windows (steps, when exact) into blocks; keep the
        rows of the last one, which may go on in the next chunk."""
        assert acc.window is not None
        w = acc.window
        win = steps if w == 1 else (steps - self.origin) // w
        ordered = win.size < 2 or bool(np.all(win[1:] >= win[:-1]))
        rows = Rows(steps, cols, vals, win)
        if not ordered:  # rows out of step order (a resumed run): one block of everything
            if acc.carry is not None:
                rows = Rows.concat([acc.carry, rows])
                acc.carry = None
            self._emit(acc, rows, final)
            return
        if acc.carry is not None and win.size:
            # The rows of the carried window that are in this chunk join it.
            head = int(np.searchsorted(win, acc.carry.win[-1], side="right"))
            first = Rows.concat([acc.carry, rows.slice(0, head)])
            acc.carry = None
            rows = rows.slice(head, win.size)
            if rows.win.size == 0 and not final:
                acc.carry = first
                return
            acc.blocks.append(block(first, acc))
        elif acc.carry is not None:
            rows, acc.carry = acc.carry, None
        self._emit(acc, rows, final)

    def _emit(self, acc: KindRows, rows: Rows, final: bool) -> None:
        if rows.win.size == 0:
            return
        if not final:
            # The last step/window may go on in the next chunk: keep its rows for then.
            last = rows.win.max()
            if bool(np.all(rows.win[1:] >= rows.win[:-1])):
                cut = int(np.searchsorted(rows.win, last))
                acc.carry = rows.slice(cut, rows.win.size)
                rows = rows.slice(0, cut)
            else:
                open_ = rows.win == last
                acc.carry = rows.take(open_)
                rows = rows.take(~open_)
            if rows.win.size == 0:
                return
        acc.blocks.append(block(rows, acc))

    # -- the end ----------------------------------------------------------------------------
    def finish(self, wanted: list[LayerStat], probe_planned: bool) -> LayerPass:
        for acc in self.kinds.values():
            if acc.window is not None and acc.carry is not None:
                rows, acc.carry = acc.carry, None
                self._emit(acc, rows, final=True)
        matrices: dict[LayerStat, LayerMatrix | None] = {}
        layers: dict[str, tuple[str, ...]] = {}
        for kind, acc in self.kinds.items():
            layers[kind] = tuple(acc.names)
            merged = merge(acc) if acc.blocks else None
            for s in acc.stats:
                if merged is None:
                    matrices[s] = None
                    continue
                steps, values = merged
                window = acc.window or 1
                matrices[s] = LayerMatrix(
                    kind,
                    s.stat,
                    steps,
                    layers[kind],
                    values[s],
                    window=window,
                    reduce=s.reduce if window > 1 else "exact",
                )
        for s in wanted:
            matrices.setdefault(s, None)
        nonfinite = None
        if probe_planned:
            limit = self.nonfinite.limit if self.nonfinite is not None else 0
            empty = pl.DataFrame(schema=NONFINITE_SCHEMA)
            nonfinite = _first_rows(pl.concat(self.bad), limit) if self.bad else empty
        kinds = tuple(sorted(set(self.kind_codes.values())))
        return LayerPass(kinds, layers, matrices, nonfinite, self.rows, self.steps)


def _first_rows(df: pl.DataFrame, limit: int) -> pl.DataFrame:
    """The first ``limit`` rows by step, rows of one step in the order written."""
    return df.sort("step", maintain_order=True).head(limit)


def _as_float(name: str, dtype: pl.DataType) -> pl.Expr:
    """Column ``name`` as float values: float32 columns stay float32 (exact in float64
    later, half the memory traffic until then), others become float64."""
    col = pl.col(name)
    return col if dtype.is_float() else col.cast(pl.Float64)


def _floats(col: pl.Series) -> np.ndarray:
    """A float column (see _as_float) as numpy, nulls as NaN."""
    if col.dtype.is_float():
        return col.to_numpy()  # nulls come out as NaN
    return col.cast(pl.Float64).fill_null(float("nan")).to_numpy()


def _taker(rows: np.ndarray | None) -> Callable[[np.ndarray], np.ndarray]:
    """``a -> a[rows]`` for the chunk's arrays, by block copies when ``rows`` are blocks
    of equal length at equal spacing (one kind's rows in the collector's layout: each
    step writes the kind's layers together), which is several times faster than a
    gather; the first and last block may be partial (a chunk cut mid-step)."""
    if rows is None:
        return lambda a: a
    if rows.size == 0 or rows[-1] - rows[0] + 1 == rows.size:
        lo, hi = (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, 0)
        return lambda a: a[lo:hi]
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1  # first row of each later block
    if breaks.size < 3:
        return lambda a: a[rows]
    head, tail = int(breaks[0]), int(breaks[-1])  # rows before / from here: partial blocks
    starts = rows[breaks[:-1]]  # the body's blocks
    length = int(breaks[1] - breaks[0])
    spacing = int(starts[1] - starts[0])
    if bool(np.any(np.diff(breaks) != length)) or bool(np.any(np.diff(starts) != spacing)):
        return lambda a: a[rows]
    n_blocks, base = starts.size, int(starts[0])
    h0, t0 = int(rows[0]), int(rows[tail])

    def take(a: np.ndarray) -> np.ndarray:
        out = np.empty(rows.size, a.dtype)
        out[:head] = a[h0 : h0 + head]
        body = np.lib.stride_tricks.as_strided(
            a[base:], (n_blocks, length), (spacing * a.strides[0], a.strides[0]), writeable=False
        )
        out[head:tail].reshape(n_blocks, length)[...] = body
        out[tail:] = a[t0 : t0 + rows.size - tail]
        return out

    return take
