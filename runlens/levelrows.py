"""Rows of one kind of layers rows turned into step × layer matrix rows: exact blocks,
window levels, and the merge of the blocks (runlens.layerscan reads the chunks).

A block holds, for the rows of one chunk, one (rows × layers) array per planned
statistic. Exact: one row per recorded step (a reshape when the rows are in the
collector's layout, else a scatter where the last write of a (step, layer) wins).
Windows: each window's recorded steps get a slot, the slots of one window are sorted by a
vectorized network, and the level is read off (median / max / mean of the finite values,
the last non-finite value when most are non-finite).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from runlens.needs import LayerStat


@dataclass
class Block:
    """Rows of one kind from one chunk: ``keys`` (steps, or window numbers) sorted and
    unique, ``steps`` shown for them, one (rows × n_layers) array per statistic."""

    keys: np.ndarray
    steps: np.ndarray
    values: dict[LayerStat, np.ndarray]
    written: np.ndarray | None
    """Cells that had a row (a written NaN overrides an earlier value; a gap does not);
    None: all of them."""


@dataclass
class Rows:
    """Rows of one kind: step, column, window number, and one value array per stat."""

    steps: np.ndarray
    cols: np.ndarray
    vals: dict[str, np.ndarray]
    win: np.ndarray

    def slice(self, a: int, b: int) -> Rows:
        return Rows(
            self.steps[a:b],
            self.cols[a:b],
            {k: v[a:b] for k, v in self.vals.items()},
            self.win[a:b],
        )

    def take(self, mask: np.ndarray) -> Rows:
        return Rows(
            self.steps[mask],
            self.cols[mask],
            {k: v[mask] for k, v in self.vals.items()},
            self.win[mask],
        )

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        return Rows(
            np.concatenate([p.steps for p in parts]),
            np.concatenate([p.cols for p in parts]),
            {k: np.concatenate([p.vals[k] for p in parts]) for k in parts[0].vals},
            np.concatenate([p.win for p in parts]),
        )


@dataclass
class KindRows:
    """Accumulates the matrices of one kind over the chunks."""

    stats: list[LayerStat]
    window: int | None = None
    """Step numbers per row (1: exact); chosen when the kind is first seen."""
    lookup: np.ndarray = field(default_factory=lambda: np.full(0, -1, np.int64))
    """Categorical code -> column (-1: not seen yet)."""
    names: list[str] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    carry: Rows | None = None
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


def unique_steps(steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def last_write(cells: np.ndarray, size: int) -> np.ndarray | None:
    """Rows to keep so that each cell is written once, by its last row (None: all)."""
    seen = np.zeros(size, bool)
    seen[cells] = True
    if np.count_nonzero(seen) == cells.size:
        return None
    _, last_rev = np.unique(cells[::-1], return_index=True)
    return np.sort(cells.size - 1 - last_rev)


def block(rows: Rows, acc: KindRows) -> Block:
    if acc.window == 1:
        return exact_block(rows.steps, rows.cols, rows.vals, acc)
    return window_block(rows.steps, rows.win, rows.cols, rows.vals, acc)


def canonical(rows: np.ndarray, cols: np.ndarray, n_rows: int, n_layers: int) -> bool:
    """True when row i is (step i // n_layers, layer i % n_layers): every step has every
    layer once, in column order (the collector's layout), so a reshape is the matrix."""
    if rows.size != n_rows * n_layers or rows.size == 0:
        return False
    r = rows.reshape(n_rows, n_layers)
    c = cols.reshape(n_rows, n_layers)
    return bool(np.all(c == np.arange(n_layers)) and np.all(r == np.arange(n_rows)[:, None]))


def exact_block(
    steps: np.ndarray, cols: np.ndarray, vals: dict[str, np.ndarray], acc: KindRows
) -> Block:
    uniq, rows = unique_steps(steps)
    n_layers = len(acc.names)
    # Every recorded step is a row: the reductions of one statistic share one matrix.
    by_stat: dict[str, np.ndarray] = {}
    if canonical(rows, cols, uniq.size, n_layers):
        shape = (uniq.size, n_layers)
        for stat in dict.fromkeys(s.stat for s in acc.stats):
            by_stat[stat] = vals[stat].reshape(shape).astype(np.float64)
        return Block(uniq, uniq, {s: by_stat[s.stat] for s in acc.stats}, None)
    cells = rows * n_layers + cols
    keep = last_write(cells, uniq.size * n_layers)
    if keep is not None:
        cells = cells[keep]
    written = np.zeros((uniq.size, n_layers), bool)
    written.ravel()[cells] = True
    for stat in dict.fromkeys(s.stat for s in acc.stats):
        v = vals[stat] if keep is None else vals[stat][keep]
        m = np.full((uniq.size, n_layers), np.nan)
        m.ravel()[cells] = v
        by_stat[stat] = m
    return Block(uniq, uniq, {s: by_stat[s.stat] for s in acc.stats}, written)


def window_block(
    steps: np.ndarray,
    win: np.ndarray,
    cols: np.ndarray,
    vals: dict[str, np.ndarray],
    acc: KindRows,
) -> Block:
    """Window levels of complete windows. Each window's recorded steps get a slot, so
    the arrays hold (steps per window) × (windows × layers) cells: the chunk's own size,
    one contiguous vector per slot."""
    uniq, rows = unique_steps(steps)
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
    if uniq.size == n_win * n_slots and canonical(rows, cols, uniq.size, n_layers):
        # Every window full, every step every layer in order: reshapes, no scatter.
        values = {}
        for stat, wanted in by_stat(acc.stats).items():
            a = vals[stat].reshape(n_win, n_slots, n_layers).transpose(1, 0, 2)
            a = np.array(a, order="C").reshape(n_slots, n_cells)  # a copy: sorted in place
            levels = reduce_all(a, None, None, [s.reduce for s in wanted])
            for s in wanted:
                values[s] = levels[s.reduce].astype(np.float64, copy=False).reshape(n_win, -1)
        return Block(keys, shown, values, None)
    win_row = np.cumsum(change, dtype=np.int64) - 1
    slot = np.arange(uniq.size, dtype=np.int64) - starts[win_row]
    cells = slot[rows] * n_cells + win_row[rows] * n_layers + cols
    size = n_slots * n_cells
    keep = last_write(cells, size)
    if keep is not None:
        cells = cells[keep]
    written = np.zeros(size, bool)
    written[cells] = True
    written = written.reshape(n_slots, n_cells)
    n_written = written.sum(axis=0)
    values = {}
    for stat, wanted in by_stat(acc.stats).items():
        v = vals[stat] if keep is None else vals[stat][keep]
        a = np.full(size, np.nan)
        a[cells] = v
        levels = reduce_all(
            a.reshape(n_slots, n_cells), written, n_written, [s.reduce for s in wanted]
        )
        for s in wanted:
            values[s] = levels[s.reduce].reshape(n_win, n_layers)
    return Block(keys, shown, values, (n_written > 0).reshape(n_win, n_layers))


NETWORK_SLOTS = 16
"""Windows of at most this many steps are sorted by a vectorized sorting network (a few
min/max passes over contiguous vectors); longer ones by numpy's sort."""


def sorted_slots(a: np.ndarray) -> np.ndarray:
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


def by_stat(stats: list[LayerStat]) -> dict[str, list[LayerStat]]:
    """The planned statistics of a kind grouped by column (one window array each)."""
    out: dict[str, list[LayerStat]] = {}
    for s in stats:
        out.setdefault(s.stat, []).append(s)
    return out


def reduce_all(
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
            srt = sorted_slots(a)
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
        srt = sorted_slots(np.where(fin, a, np.inf))
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


def merge(acc: KindRows) -> tuple[np.ndarray, dict[LayerStat, np.ndarray]]:
    """The blocks of one kind as one matrix per statistic (keys sorted; a key written in
    several blocks keeps, per cell, the last write)."""
    n_layers = len(acc.names)
    blocks = acc.blocks
    in_order = all(a.keys[-1] < b.keys[0] for a, b in itertools.pairwise(blocks))
    if in_order:
        steps = np.concatenate([b.steps for b in blocks])
        out = {}
        for s in acc.stats:
            parts = [pad(b.values[s], n_layers) for b in blocks]
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


def pad(m: np.ndarray, n_layers: int) -> np.ndarray:
    """``m`` widened to ``n_layers`` columns (layers first seen in a later chunk: NaN)."""
    if m.shape[1] == n_layers:
        return m
    out = np.full((m.shape[0], n_layers), np.nan)
    out[:, : m.shape[1]] = m
    return out
