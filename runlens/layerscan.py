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

import itertools
import math
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import polars as pl

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
    names = lf.collect_schema().names()
    wanted = list(dict.fromkeys(s for s in stats if s.stat in names))
    columns = list(dict.fromkeys(s.stat for s in wanted))
    probe = nonfinite is not None and {"missing", "frac_nonfinite", "norm"} <= set(names)
    exprs: list[pl.Expr] = [
        pl.col("step").cast(pl.Int64),
        pl.col("layer").cast(pl.Categorical),
        pl.col("kind").cast(pl.Categorical),
        *(pl.col(c) for c in columns),
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


@dataclass
class _Block:
    """Rows of one kind from one chunk: ``keys`` (steps, or window numbers) sorted and
    unique, ``steps`` shown for them, one (rows × n_layers) array per statistic."""

    keys: np.ndarray
    steps: np.ndarray
    values: dict[LayerStat, np.ndarray]
    written: np.ndarray | None
    """Cells that had a row (a written NaN overrides an earlier value; a gap does not);
    None: all of them."""


@dataclass
class _Rows:
    """Rows of one kind: step, column, window number, and one value array per stat."""

    steps: np.ndarray
    cols: np.ndarray
    vals: dict[str, np.ndarray]
    win: np.ndarray

    def slice(self, a: int, b: int) -> _Rows:
        return _Rows(
            self.steps[a:b],
            self.cols[a:b],
            {k: v[a:b] for k, v in self.vals.items()},
            self.win[a:b],
        )

    def take(self, mask: np.ndarray) -> _Rows:
        return _Rows(
            self.steps[mask],
            self.cols[mask],
            {k: v[mask] for k, v in self.vals.items()},
            self.win[mask],
        )

    @staticmethod
    def concat(parts: list[_Rows]) -> _Rows:
        return _Rows(
            np.concatenate([p.steps for p in parts]),
            np.concatenate([p.cols for p in parts]),
            {k: np.concatenate([p.vals[k] for p in parts]) for k in parts[0].vals},
            np.concatenate([p.win for p in parts]),
        )


@dataclass
class _Kind:
    """Accumulates the matrices of one kind over the chunks."""

    stats: list[LayerStat]
    window: int | None = None
    """Step numbers per row (1: exact); chosen when the kind is first seen."""
    lookup: np.ndarray = field(default_factory=lambda: np.full(0, -1, np.int64))
    """Categorical code -> column (-1: not seen yet)."""
    names: list[str] = field(default_factory=list)
    blocks: list[_Block] = field(default_factory=list)
    carry: _Rows | None = None
    """Rows of the last, possibly unfinished step or window."""

    def columns(self, codes: np.ndarray, layer: pl.Series, rows: np.ndarray | None) -> np.ndarray:
        """Column of each row's layer; layers not seen before get the next columns in
        first-seen order."""
        top = int(codes.max()) + 1 if codes.size else 0
        if top > self.lookup.size:
            grown = np.full(max(top, 2 * self.lookup.size), -1, np.int64)
            grown[: self.lookup.size] = self.lookup
            self.lookup = grown
        cols = self.lookup[codes]
        new = cols < 0
        if new.any():
            pos = np.flatnonzero(new)
            uniq, first = np.unique(codes[pos], return_index=True)
            order = np.argsort(first, kind="stable")
            first_rows = pos[first[order]]
            at = first_rows if rows is None else rows[first_rows]
            labels = layer.gather(at).cast(pl.String).to_list()
            for code, name in zip(uniq[order], labels, strict=True):
                self.lookup[code] = len(self.names)
                self.names.append(str(name))
            cols = self.lookup[codes]
        return cols


class _Pass:
    def __init__(
        self,
        by_kind: dict[str, list[LayerStat]],
        resolution: Resolution,
        span: int,
        origin: int,
        nonfinite: NonFiniteRows | None,
    ) -> None:
        self.kinds = {k: _Kind(v) for k, v in by_kind.items()}
        self.resolution = resolution
        self.span = span
        self.origin = origin
        self.nonfinite = nonfinite
        self.bad: list[pl.DataFrame] = []
        self.bad_rows = 0
        self.kind_codes: dict[int, str] = {}
        self.rows = 0
        self.pool: ThreadPoolExecutor | None = None

    # -- per chunk --------------------------------------------------------------------------
    def feed(self, df: pl.DataFrame) -> None:
        if df.height == 0:
            return
        self.rows += df.height
        kind_s = df["kind"]
        kc = kind_s.to_physical().to_numpy()
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
        lc = df["layer"].to_physical().to_numpy()
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

        def run(job: tuple[_Kind, np.ndarray | None]) -> None:
            acc, rows = job
            cols = acc.columns(lc if rows is None else lc[rows], layer, rows)
            st = step if rows is None else step[rows]
            stats = dict.fromkeys(x.stat for x in acc.stats)
            vals = {k: arrays[k] if rows is None else arrays[k][rows] for k in stats}
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
        acc: _Kind,
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
        rows = _Rows(steps, cols, vals, win)
        if not ordered:  # rows out of step order (a resumed run): one block of everything
            if acc.carry is not None:
                rows = _Rows.concat([acc.carry, rows])
                acc.carry = None
            self._emit(acc, rows, final)
            return
        if acc.carry is not None and win.size:
            # The rows of the carried window that are in this chunk join it.
            head = int(np.searchsorted(win, acc.carry.win[-1], side="right"))
            first = _Rows.concat([acc.carry, rows.slice(0, head)])
            acc.carry = None
            rows = rows.slice(head, win.size)
            if rows.win.size == 0 and not final:
                acc.carry = first
                return
            acc.blocks.append(_block(first, acc))
        elif acc.carry is not None:
            rows, acc.carry = acc.carry, None
        self._emit(acc, rows, final)

    def _emit(self, acc: _Kind, rows: _Rows, final: bool) -> None:
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
        acc.blocks.append(_block(rows, acc))

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
            merged = _merge(acc) if acc.blocks else None
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
        return LayerPass(kinds, layers, matrices, nonfinite, self.rows)


def _first_rows(df: pl.DataFrame, limit: int) -> pl.DataFrame:
    """The first ``limit`` rows by step, rows of one step in the order written."""
    return df.sort("step", maintain_order=True).head(limit)


def _floats(col: pl.Series) -> np.ndarray:
    """A column as float values, nulls as NaN: float32 columns stay float32 (exact in
    float64 later, half the memory traffic until then), others become float64."""
    if col.dtype.is_float():
        return col.to_numpy()  # nulls come out as NaN
    return col.cast(pl.Float64).fill_null(float("nan")).to_numpy()


def _unique_steps(steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct steps and each row's index among them (fast when in order)."""
    if steps.size < 2 or bool(np.all(steps[1:] >= steps[:-1])):
        change = np.empty(steps.size, bool)
        change[:1] = True
        np.not_equal(steps[1:], steps[:-1], out=change[1:])
        rows = np.cumsum(change, dtype=np.int64)
        rows -= 1
        return steps[change], rows
    uniq, inv = np.unique(steps, return_inverse=True)
    return uniq, inv.astype(np.int64, copy=False)


def _last_write(cells: np.ndarray, size: int) -> np.ndarray | None:
    """Rows to keep so that each cell is written once, by its last row (None: all)."""
    seen = np.zeros(size, bool)
    seen[cells] = True
    if np.count_nonzero(seen) == cells.size:
        return None
    _, last_rev = np.unique(cells[::-1], return_index=True)
    return np.sort(cells.size - 1 - last_rev)


def _block(rows: _Rows, acc: _Kind) -> _Block:
    if acc.window == 1:
        return _exact_block(rows.steps, rows.cols, rows.vals, acc)
    return _window_block(rows.steps, rows.win, rows.cols, rows.vals, acc)


def _canonical(rows: np.ndarray, cols: np.ndarray, n_rows: int, n_layers: int) -> bool:
    """True when row i is (step i // n_layers, layer i % n_layers): every step has every
    layer once, in column order (the collector's layout), so a reshape is the matrix."""
    if rows.size != n_rows * n_layers or rows.size == 0:
        return False
    r = rows.reshape(n_rows, n_layers)
    c = cols.reshape(n_rows, n_layers)
    return bool(np.all(c == np.arange(n_layers)) and np.all(r == np.arange(n_rows)[:, None]))


def _exact_block(
    steps: np.ndarray, cols: np.ndarray, vals: dict[str, np.ndarray], acc: _Kind
) -> _Block:
    uniq, rows = _unique_steps(steps)
    n_layers = len(acc.names)
    # Every recorded step is a row: the reductions of one statistic share one matrix.
    by_stat: dict[str, np.ndarray] = {}
    if _canonical(rows, cols, uniq.size, n_layers):
        shape = (uniq.size, n_layers)
        for stat in dict.fromkeys(s.stat for s in acc.stats):
            by_stat[stat] = vals[stat].reshape(shape).astype(np.float64)
        return _Block(uniq, uniq, {s: by_stat[s.stat] for s in acc.stats}, None)
    cells = rows * n_layers + cols
    keep = _last_write(cells, uniq.size * n_layers)
    if keep is not None:
        cells = cells[keep]
    written = np.zeros((uniq.size, n_layers), bool)
    written.ravel()[cells] = True
    for stat in dict.fromkeys(s.stat for s in acc.stats):
        v = vals[stat] if keep is None else vals[stat][keep]
        m = np.full((uniq.size, n_layers), np.nan)
        m.ravel()[cells] = v
        by_stat[stat] = m
    return _Block(uniq, uniq, {s: by_stat[s.stat] for s in acc.stats}, written)


def _window_block(
    steps: np.ndarray,
    win: np.ndarray,
    cols: np.ndarray,
    vals: dict[str, np.ndarray],
    acc: _Kind,
) -> _Block:
    """Window levels of complete windows. Each window's recorded steps get a slot, so
    the arrays hold (steps per window) × (windows × layers) cells: the chunk's own size,
    one contiguous vector per slot."""
    uniq, rows = _unique_steps(steps)
    uwin = np.empty(uniq.size, np.int64)
    uwin[rows] = win  # window number of each distinct step
    change = np.empty(uniq.size, bool)
    change[:1] = True
    np.not_equal(uwin[1:], uwin[:-1], out=change[1:])
    starts = np.flatnonzero(change)
    n_win, n_layers = starts.size, len(acc.names)
    n_slots = int(np.diff(np.append(starts, uniq.size)).max(initial=1))
    ends = np.append(starts[1:], uniq.size) - 1
    n_cells = n_win * n_layers
    keys, shown = uwin[starts], uniq[ends]
    if uniq.size == n_win * n_slots and _canonical(rows, cols, uniq.size, n_layers):
        # Every window full, every step every layer in order: reshapes, no scatter.
        values = {}
        for stat, wanted in _by_stat(acc.stats).items():
            a = vals[stat].reshape(n_win, n_slots, n_layers).transpose(1, 0, 2)
            a = np.array(a, order="C").reshape(n_slots, n_cells)  # a copy: sorted in place
            levels = _reduce_all(a, None, None, [s.reduce for s in wanted])
            for s in wanted:
                values[s] = levels[s.reduce].astype(np.float64, copy=False).reshape(n_win, -1)
        return _Block(keys, shown, values, None)
    win_row = np.cumsum(change, dtype=np.int64) - 1
    slot = np.arange(uniq.size, dtype=np.int64) - starts[win_row]
    cells = slot[rows] * n_cells + win_row[rows] * n_layers + cols
    size = n_slots * n_cells
    keep = _last_write(cells, size)
    if keep is not None:
        cells = cells[keep]
    written = np.zeros(size, bool)
    written[cells] = True
    written = written.reshape(n_slots, n_cells)
    n_written = written.sum(axis=0)
    values = {}
    for stat, wanted in _by_stat(acc.stats).items():
        v = vals[stat] if keep is None else vals[stat][keep]
        a = np.full(size, np.nan)
        a[cells] = v
        levels = _reduce_all(
            a.reshape(n_slots, n_cells), written, n_written, [s.reduce for s in wanted]
        )
        for s in wanted:
            values[s] = levels[s.reduce].reshape(n_win, n_layers)
    return _Block(keys, shown, values, (n_written > 0).reshape(n_win, n_layers))


NETWORK_SLOTS = 16
"""Windows of at most this many steps are sorted by a vectorized sorting network (a few
min/max passes over contiguous vectors); longer ones by numpy's sort."""


def _sorted_slots(a: np.ndarray) -> np.ndarray:
    """``a`` (slots × cells) sorted along the slots, each cell on its own (in place)."""
    n = a.shape[0]
    if n > NETWORK_SLOTS:
        a.sort(axis=0)
        return a
    tmp = np.empty(a.shape[1], a.dtype)
    for r in range(n):  # odd-even transposition: n rounds sort n values
        for i in range(r % 2, n - 1, 2):
            x, y = a[i], a[i + 1]
            np.minimum(x, y, out=tmp)
            np.maximum(x, y, out=y)
            x[:] = tmp
    return a


def _by_stat(stats: list[LayerStat]) -> dict[str, list[LayerStat]]:
    """The planned statistics of a kind grouped by column (one window array each)."""
    out: dict[str, list[LayerStat]] = {}
    for s in stats:
        out.setdefault(s.stat, []).append(s)
    return out


def _reduce_all(
    a: np.ndarray, written: np.ndarray | None, n_written: np.ndarray | None, hows: list[str]
) -> dict[str, np.ndarray]:
    """Each level in ``hows`` of each column of ``a`` (slots × cells: one window of one
    layer per column, NaN where not written; ``written`` None: every slot written).
    ``a`` may be sorted in place."""
    n = a.shape[0]
    fin = np.isfinite(a)
    out: dict[str, np.ndarray] = {}
    if written is None and bool(fin.all()):
        # Every slot written and finite (the usual window): no per-cell bookkeeping.
        if n == 1:
            return dict.fromkeys(hows, a[0].copy())
        if "mean" in hows:
            out["mean"] = a.mean(axis=0, dtype=np.float64)
        if "median" in hows:
            srt = _sorted_slots(a)
            out["median"] = srt[n // 2].copy() if n % 2 else (srt[n // 2 - 1] + srt[n // 2]) / 2
            if "max" in hows:
                out["max"] = srt[-1].copy()
        elif "max" in hows:
            out["max"] = a.max(axis=0)
        return out
    if written is None:
        written = np.ones(a.shape, bool)
        n_written = np.full(a.shape[1], n)
    assert n_written is not None
    for how in dict.fromkeys(hows):
        out[how] = _reduce(a, fin, written, n_written, how)
    return out


def _reduce(
    a: np.ndarray, fin: np.ndarray, written: np.ndarray, n_written: np.ndarray, how: str
) -> np.ndarray:
    """One level of each column of ``a`` (the general case: gaps or non-finite values)."""
    n = a.shape[0]
    k = fin.sum(axis=0)
    out = np.full(a.shape[1], np.nan)
    ok = (k > 0) & (2 * k >= n_written)  # most values finite: a finite level
    if how == "max":
        ok = k > 0  # the largest finite value; only a window with none is non-finite
        out[ok] = np.where(fin, a, -np.inf).max(axis=0)[ok]
    elif n == 1:
        out[ok] = a[0, ok]
    elif how == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(fin, a, 0.0).sum(axis=0) / np.maximum(k, 1)
        out[ok] = mean[ok]
    else:
        srt = _sorted_slots(np.where(fin, a, np.inf))
        cols = np.arange(a.shape[1])
        lo = srt[np.maximum(k - 1, 0) // 2, cols]
        hi = srt[np.minimum(k // 2, n - 1), cols]
        with np.errstate(invalid="ignore"):
            med = np.where(k % 2 == 1, lo, (lo + hi) / 2)
        out[ok] = med[ok]
    # Mostly non-finite: the window's level is its last non-finite value.
    nf = (n_written > 0) & ~ok
    if nf.any():
        bad = (written & ~fin)[:, nf]
        last = n - 1 - np.argmax(bad[::-1], axis=0)
        out[nf] = a[:, nf][last, np.arange(last.size)]
    return out


def _merge(acc: _Kind) -> tuple[np.ndarray, dict[LayerStat, np.ndarray]]:
    """The blocks of one kind as one matrix per statistic (keys sorted; a key written in
    several blocks keeps, per cell, the last write)."""
    n_layers = len(acc.names)
    blocks = acc.blocks
    in_order = all(a.keys[-1] < b.keys[0] for a, b in itertools.pairwise(blocks))
    if in_order:
        steps = np.concatenate([b.steps for b in blocks])
        out = {}
        for s in acc.stats:
            parts = [_pad(b.values[s], n_layers) for b in blocks]
            out[s] = parts[0] if len(parts) == 1 else np.vstack(parts)
        return steps, out
    keys = np.unique(np.concatenate([b.keys for b in blocks]))
    steps = np.full(keys.size, np.iinfo(np.int64).min, np.int64)
    out = {s: np.full((keys.size, n_layers), np.nan) for s in acc.stats}
    for b in blocks:
        at = np.searchsorted(keys, b.keys)
        steps[at] = np.maximum(steps[at], b.steps)
        w = b.written if b.written is not None else np.ones(b.values[acc.stats[0]].shape, bool)
        for s in acc.stats:
            dest = out[s][at, : w.shape[1]]
            dest[w] = b.values[s][w]
            out[s][at, : w.shape[1]] = dest
    return steps, out


def _pad(m: np.ndarray, n_layers: int) -> np.ndarray:
    """``m`` widened to ``n_layers`` columns (layers first seen in a later chunk: NaN)."""
    if m.shape[1] == n_layers:
        return m
    out = np.full((m.shape[0], n_layers), np.nan)
    out[:, : m.shape[1]] = m
    return out
