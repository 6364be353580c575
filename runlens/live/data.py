"""The data of a live run, grown one segment at a time, and immutable snapshots of it.

What is incremental (docs/watch.md):

* every segment is read once, when it lands (work proportional to new data);
* scalars are kept per series in append-only arrays: a new segment is sorted and
  de-duplicated on its own and appended (a step written again, e.g. after a resume, makes
  that one series re-merge);
* layer rows are kept for the first ``head_steps`` recorded layer steps (the baseline of
  "since the start" comparisons) and a trailing window of ``window_steps`` recorded layer
  steps, so memory and the cost of a layer pass stay bounded however long the run is.

:meth:`LiveData.snapshot` returns a :class:`~runlens.run.Run` over the data so far. It
shares the append-only arrays (views that later appends never write into), so taking one
costs no copy, and it is never changed afterwards: analysis runs on snapshots and holds
no state between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from runlens_collect import format as fmt

from runlens.ranks import ROOT_SUM_SQUARES, merge_layers, merge_scalars, read_layout
from runlens.run import Run, Series


class _Growing:
    """One scalar series in append-only arrays (capacity doubles; old views stay valid)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.n = 0
        self.steps = np.empty(0, np.int64)
        self.values = np.empty(0, np.float64)
        self.wall = np.empty(0, np.float64)

    def append(self, steps: np.ndarray, values: np.ndarray, wall: np.ndarray) -> None:
        if steps.size == 0:
            return
        if self.n and steps[0] <= self.steps[self.n - 1]:
            # A step written again (resume) or out of order: merge; the later write wins.
            steps, values, wall = _last_per_step(
                np.concatenate([self.steps[: self.n], steps]),
                np.concatenate([self.values[: self.n], values]),
                np.concatenate([self.wall[: self.n], wall]),
            )
            self.n = 0
            self.steps, self.values, self.wall = (
                np.empty(0, a.dtype) for a in (steps, values, wall)
            )
        need = self.n + steps.size
        if need > self.steps.size:
            cap = max(need, 2 * self.steps.size, 256)
            self.steps = _grown(self.steps, cap, self.n)
            self.values = _grown(self.values, cap, self.n)
            self.wall = _grown(self.wall, cap, self.n)
        self.steps[self.n : need] = steps
        self.values[self.n : need] = values
        self.wall[self.n : need] = wall
        self.n = need

    def series(self) -> Series:
        return Series(
            self.name,
            _frozen(self.steps[: self.n]),
            _frozen(self.values[: self.n]),
            _frozen(self.wall[: self.n]),
        )


def _grown(a: np.ndarray, cap: int, n: int) -> np.ndarray:
    out = np.empty(cap, a.dtype)
    out[:n] = a[:n]
    return out


def _frozen(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


def _last_per_step(
    steps: np.ndarray, values: np.ndarray, wall: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted by step, one row per step: the last one in input order (as run.py does)."""
    order = np.argsort(steps, kind="stable")
    s = steps[order]
    last = np.ones(s.size, bool)
    last[:-1] = s[1:] != s[:-1]
    keep = order[last]
    return steps[keep], values[keep], wall[keep]


@dataclass
class LiveSnapshot(Run):
    """A :class:`Run` whose scalar series come ready-made from :class:`LiveData` (no
    query over all the rows seen so far); everything else is the ordinary Run."""

    series: dict[str, Series] = field(default_factory=dict)
    by_rank: dict[str, pl.LazyFrame] = field(default_factory=dict)
    """Every rank's rows (scalars, layers) when the view merges several."""
    layer_steps_dropped: int = 0
    """Recorded layer steps outside the head and window (not in ``layers``)."""

    @cached_property
    def scalar_names(self) -> tuple[str, ...]:
        return tuple(sorted(self.series))

    def scalar(self, name: str) -> Series | None:
        s = self.series.get(name)
        return s if s is not None and len(s) else None

    def rank_frame(self, table: str) -> pl.LazyFrame | None:
        return self.by_rank.get(table)


class LiveData:
    """Rows of one run (one rank) as they land; see the module docstring."""

    def __init__(self, path: Path, head_steps: int = 20, window_steps: int | None = 2000) -> None:
        self.path = path
        self.head_steps = head_steps
        self.window_steps = window_steps
        self.meta: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self.rank: int | None = None
        """The lowest rank; with several (``ranks``) the snapshot merges them."""
        self.ranks: list[int] = []
        self._by_rank: dict[int, dict[str, _Growing]] = {}
        self._last_by_rank: dict[int, int] = {}
        self._scalars: dict[str, _Growing] = {}
        self._scalar_chunks: list[pl.DataFrame] = []
        self._head: list[pl.DataFrame] = []
        self._head_steps: np.ndarray = np.empty(0, np.int64)
        self._tail: list[pl.DataFrame] = []
        self._tail_steps: np.ndarray = np.empty(0, np.int64)
        self.layer_steps_dropped = 0
        self.layer_rows = 0
        self.last_step: int | None = None

    # -- growing ----------------------------------------------------------------------
    def add_scalars(self, df: pl.DataFrame, rank: int | None = None) -> None:
        """One scalars segment (``run.read_segment``) of ``rank``, in write order."""
        if df.height == 0:
            return
        rank = self.rank or 0 if rank is None else rank
        self._scalar_chunks.append(df.with_columns(pl.lit(rank, pl.Int64).alias("rank")))
        series = self._by_rank.setdefault(rank, {})
        for (name,), part in df.partition_by("name", as_dict=True, maintain_order=True).items():
            if name is None:
                continue
            steps, values, wall = _last_per_step(
                part["step"].to_numpy().astype(np.int64),
                part["value"].cast(pl.Float64).fill_null(float("nan")).to_numpy(),
                part["wall_time"].cast(pl.Float64).fill_null(float("nan")).to_numpy(),
            )
            series.setdefault(str(name), _Growing(str(name))).append(steps, values, wall)
        self._scalars = self._by_rank[min(self._by_rank)]
        top = int(df["step"].max())  # type: ignore[arg-type]
        self._last_by_rank[rank] = max(top, self._last_by_rank.get(rank, top))
        # Several ranks: the merged view reaches the step every rank has reached.
        self.last_step = min(self._last_by_rank.values())

    @property
    def merged(self) -> bool:
        return len(self.ranks) > 1

    def add_layers(self, df: pl.DataFrame, rank: int | None = None) -> None:
        """One layers segment of ``rank``: rows of the first ``head_steps`` layer steps are
        kept for good, the rest enter the trailing window (older steps fall out of it)."""
        if df.height == 0:
            return
        rank = self.rank or 0 if rank is None else rank
        df = df.with_columns(pl.lit(rank, pl.Int64).alias("rank"))
        self.layer_rows += df.height
        steps = np.unique(df["step"].to_numpy())
        room = self.head_steps - self._head_steps.size
        if room > 0:
            self._head_steps = np.union1d(
                self._head_steps, np.setdiff1d(steps, self._head_steps)[:room]
            )
        if self._head_steps.size and np.isin(steps, self._head_steps).any():
            in_head = pl.col("step").is_in(self._head_steps.tolist())
            self._head.append(df.filter(in_head))
            df = df.filter(~in_head)
            steps = np.setdiff1d(steps, self._head_steps)
        if df.height == 0:
            return
        self._tail.append(df)
        self._tail_steps = np.union1d(self._tail_steps, steps)
        w = self.window_steps
        if w is not None and self._tail_steps.size > w:
            cut = int(self._tail_steps[-w])
            self.layer_steps_dropped += int(self._tail_steps.size - w)
            self._tail_steps = self._tail_steps[-w:]
            kept = []
            for chunk in self._tail:
                lo, hi = chunk["step"].min(), chunk["step"].max()
                if hi < cut:  # type: ignore[operator]
                    continue
                kept.append(chunk if lo >= cut else chunk.filter(pl.col("step") >= cut))  # type: ignore[operator]
            self._tail = kept

    # -- reading ----------------------------------------------------------------------
    def scalar(self, name: str) -> Series | None:
        g = self._scalars.get(name)
        return g.series() if g is not None and g.n else None

    @property
    def n_steps(self) -> int:
        """Steps of the training loss so far (of any series when there is none)."""
        g = self._scalars.get(fmt.TRAIN_LOSS) or max(
            self._scalars.values(), key=lambda s: s.n, default=None
        )
        return g.n if g is not None else 0

    def snapshot(self) -> LiveSnapshot:
        """An immutable Run over the data so far (see the module docstring); with several
        ranks, the ranks merged as ``load_run`` merges them (runlens.ranks), up to the
        step every rank has reached."""
        scalars = _concat(self._scalar_chunks, fmt.SCALARS_SCHEMA)
        # Later appends only add chunks; concatenating the list as it is now is a snapshot.
        self._scalar_chunks = [scalars] if len(self._scalar_chunks) > 64 else self._scalar_chunks
        layer_chunks = [*self._head, *self._tail]
        lf = scalars.lazy()
        layers = _concat(layer_chunks, fmt.LAYERS_SCHEMA).lazy() if layer_chunks else None
        series = {name: g.series() for name, g in self._scalars.items() if g.n}
        layout = None
        by_rank: dict[str, pl.LazyFrame] = {}
        if self.merged:
            layout = read_layout(self.meta, self.events, self.ranks)
            horizon = pl.col("step") <= (self.last_step or 0)
            by_rank[fmt.SCALARS_DIR] = lf = lf.filter(horizon)
            lf = merge_scalars(lf, layout)
            if layers is not None:
                by_rank[fmt.LAYERS_DIR] = layers = layers.filter(horizon)
                layers = merge_layers(layers, layout)
            series = self._merged_series(layout.sharded)
        return LiveSnapshot(
            path=self.path,
            meta=dict(self.meta),
            scalars=lf,
            layers=layers,
            events=list(self.events),
            warnings=list(self.warnings),
            rank=self.rank,
            ranks=tuple(self.ranks),
            merged=self.merged,
            layout=layout,
            series=series,
            by_rank=by_rank,
            layer_steps_dropped=self.layer_steps_dropped,
        )

    def _merged_series(self, sharded: bool) -> dict[str, Series]:
        """Each scalar averaged over the ranks that wrote it (the root of the sum of
        squares for ``grad_norm`` of a sharded model), up to ``last_step``."""
        horizon = self.last_step if self.last_step is not None else -1
        names = sorted({n for s in self._by_rank.values() for n in s})
        out = {}
        for name in names:
            parts = [s[name].series() for s in self._by_rank.values() if name in s]
            parts = [p for p in parts if len(p)]
            if not parts:
                continue
            steps = np.unique(np.concatenate([p.steps for p in parts]))
            steps = steps[steps <= horizon]
            vals = np.full((len(parts), steps.size), np.nan)
            wall = np.full((len(parts), steps.size), np.nan)
            for k, p in enumerate(parts):
                at = np.searchsorted(steps, p.steps)
                ok = (at < steps.size) & (steps[np.minimum(at, steps.size - 1)] == p.steps)
                vals[k, at[ok]], wall[k, at[ok]] = p.values[ok], p.wall_time[ok]
            have = ~np.isnan(wall)  # a NaN value that was written still counts (nan-inf)
            n = have.sum(axis=0)
            keep = n > 0
            with np.errstate(invalid="ignore", divide="ignore"):
                if sharded and name in ROOT_SUM_SQUARES:
                    merged = np.sqrt(np.where(have, vals**2, 0.0).sum(axis=0))
                else:
                    merged = np.where(have, vals, 0.0).sum(axis=0) / np.maximum(n, 1)
                latest = np.nanmax(np.where(have, wall, -np.inf), axis=0)
            if keep.any():
                out[name] = Series(name, steps[keep], merged[keep], latest[keep])
        return out


def _concat(chunks: list[pl.DataFrame], schema: Any) -> pl.DataFrame:
    if not chunks:
        empty = pl.from_arrow(schema.empty_table())
        assert isinstance(empty, pl.DataFrame)
        return empty.with_columns(pl.col(pl.Categorical).cast(pl.String))
    return pl.concat(chunks, how="vertical", rechunk=False)
