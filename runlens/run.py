"""Loading a run directory into polars frames: the only place the analyzer reads files.

The data model (what signatures see) is:

* ``Run.meta``: the parsed ``run.json`` (an empty-ish dict when it was missing/corrupt).
* ``Run.scalars``: LazyFrame ``step:i64, wall_time:f64, name:str, value:f64, rank:i64``.
* ``Run.layers``: LazyFrame with the columns of ``format.LAYERS_SCHEMA`` plus ``rank``, or
  ``None`` when the run has no layer statistics.
* ``Run.events``: the parsed lines of ``events.jsonl`` and of the other ranks' event
  files (``events-rank<N>.jsonl``), in time order.
* ``Run.warnings``: one line per problem tolerated while loading (a skipped segment...).

Code that needs its own polars query on ``scalars``/``layers`` runs it through
:meth:`Run.query`, which drops a segment whose data turns out unreadable (with a warning)
instead of failing the analysis.

Helpers return numpy arrays: :meth:`Run.scalar` one series (sorted by step, one value per
step: the last one written wins), :meth:`Run.layer_matrix` a step × layer matrix of one
statistic. Both are cached, so signatures can ask freely.

A run resumed into the same directory reads as one run: rows that the continuation
superseded (at or after its first step, in segments written before it: the attempt the
checkpoint replaced) are dropped (``Run.resumes``, run.json ``resumed``). Steps whose
optimizer update was skipped (AMP overflow) are listed in ``Run.skipped_steps``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from runlens_collect import format as fmt

from runlens.errors import RunLoadError
from runlens.ranks import RankLayout, merge_layers, merge_scalars, read_layout


@dataclass(frozen=True)
class Series:
    """One scalar series: strictly increasing ``steps`` and their ``values`` (float64)."""

    name: str
    steps: np.ndarray
    values: np.ndarray
    wall_time: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)


@dataclass(frozen=True)
class LayerMatrix:
    """``values[i, j]`` is the statistic of ``layers[j]`` at ``steps[i]`` (NaN if absent).

    Parameter kinds (weight, grad, update) of a run whose collector samples them (run.json
    ``collector.memory``: frozen parameters between full steps, the update's rotating
    subsets) hold each layer's last sampled value where a step did not sample it: not
    sampled is not missing (a missing row, e.g. a parameter without a gradient, is
    recorded as such and stays NaN)."""

    kind: str
    stat: str
    steps: np.ndarray
    layers: tuple[str, ...]
    values: np.ndarray

    def column(self, layer: str) -> np.ndarray:
        return self.values[:, self.layers.index(layer)]


@dataclass
class Run:
    path: Path
    meta: dict[str, Any]
    scalars: pl.LazyFrame
    layers: pl.LazyFrame | None
    events: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    source_format: str = "runlens"
    rank: int | None = None
    """Rank whose layer/scalar data is analyzed (the lowest present, or the one asked);
    in the merged view of several ranks, the lowest (see ``merged``); None if no data."""
    ranks: tuple[int, ...] = ()
    """Every rank that wrote segments."""
    merged: bool = False
    """``scalars``/``layers`` are the ranks merged (runlens.ranks), not one rank's."""
    layout: Any = None
    """runlens.ranks.RankLayout of a run with ranks (None before loading)."""
    origin: str | None = None
    """Where the run was read from when that is not ``path``: the URL of a run on object
    storage (``path`` is then its local mirror, see runlens.storage)."""

    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)
    _files: dict[str, list[Path]] = field(default_factory=dict, repr=False)
    """Segments behind ``scalars`` / ``layers`` (empty for in-memory runs)."""
    _files_all: dict[str, list[Path]] = field(default_factory=dict, repr=False)
    """Every rank's segments (the rank signatures' frames)."""

    # -- identity ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.path.name)

    @property
    def status(self) -> str:
        return str(self.meta.get("status") or "unknown")

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind") or "train")

    @property
    def config(self) -> dict[str, Any]:
        cfg = self.meta.get("config")
        return cfg if isinstance(cfg, dict) else {}

    @property
    def x_axis(self) -> str:
        """What steps count: ``step``, or ``epoch`` for an imported log indexed by epochs
        (``run.json`` ``imported.x_axis``, written by the importer)."""
        imported = self.meta.get("imported")
        axis = imported.get("x_axis") if isinstance(imported, dict) else None
        return "epoch" if axis == "epoch" else "step"

    @property
    def clean_close(self) -> bool:
        return any(e.get("kind") == "close" for e in self.events)

    @property
    def resumes(self) -> tuple[int, ...]:
        """Steps at which training continued into this run (resumed from a checkpoint)."""
        steps = {int(r["step"]) for r in fmt.read_resumed(self.meta)}
        steps |= {step for step, _ in _resume_cuts(self.events, self.rank, fmt.SCALARS_DIR)}
        return tuple(sorted(steps))

    @cached_property
    def skipped_steps(self) -> np.ndarray:
        """Steps whose optimizer update did not happen (``optim/skipped`` is 1: an AMP
        GradScaler found inf/NaN gradients, or ``optimizer.step()`` was not called).
        Their gradient statistics were never applied; readers ignore them."""
        s = self.scalar(fmt.STEP_SKIPPED)
        if s is None:
            return np.zeros(0, np.int64)
        return s.steps[np.nan_to_num(s.values, nan=0.0) > 0.5]

    # -- ranks ------------------------------------------------------------------------
    def rank_frame(self, table: str) -> pl.LazyFrame | None:
        """Every rank's rows of ``table`` (``scalars`` / ``layers``) with their ``rank``
        column, each rank's resumes applied: what the rank signatures compare. None when
        the table has no segments."""
        files = self._files_all.get(table, [])
        if not files:
            return None
        schema = fmt.SCALARS_SCHEMA if table == fmt.SCALARS_DIR else fmt.LAYERS_SCHEMA
        return _scan_ranks(files, schema, self.events, table)

    def rank_query(
        self, table: str, build: Callable[[pl.LazyFrame], pl.LazyFrame], key: Any = None
    ) -> pl.DataFrame:
        """:meth:`query` over every rank's rows (see :meth:`rank_frame`); cached under
        ``key`` when one is given (what ``build`` selects)."""
        if key is None:
            lf = self.rank_frame(table)
            return pl.DataFrame() if lf is None else self._rank_collect(table, build, lf)
        key = ("rank_query", table, key)
        if key not in self._cache:
            lf = self.rank_frame(table)
            df = pl.DataFrame() if lf is None else self._rank_collect(table, build, lf)
            self._cache[key] = df
        return self._cache[key]

    def _rank_collect(
        self, table: str, build: Callable[[pl.LazyFrame], pl.LazyFrame], lf: pl.LazyFrame
    ) -> pl.DataFrame:
        try:
            return build(lf).collect()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise RunLoadError(f"{self.path}: cannot read {table}: {_short(exc)}") from None

    # -- scalars ----------------------------------------------------------------------
    def query(self, table: str, build: Callable[[pl.LazyFrame], pl.LazyFrame]) -> pl.DataFrame:
        """Run ``build`` on the scalars (``table="scalars"``) or layers frame and collect it
        (an empty frame when the run has no layers). A segment whose footer read but whose
        data does not (corrupt pages) is dropped with a warning and the query retried, so
        one bad file never stops an analysis."""
        for _ in range(len(self._files.get(table, ())) + 1):
            lf = self.scalars if table == fmt.SCALARS_DIR else self.layers
            if lf is None:
                return pl.DataFrame()
            try:
                return build(lf).collect()
            except (pl.exceptions.PolarsError, OSError) as exc:
                if not self._drop_unreadable(table):
                    raise RunLoadError(f"{self.path}: cannot read {table}: {_short(exc)}") from None
        raise RunLoadError(f"{self.path}: cannot read {table}")

    def _drop_unreadable(self, table: str) -> bool:
        """Read each segment of ``table`` in full; drop the ones that fail. True if any."""
        files = self._files.get(table, [])
        good = []
        for f in files:
            try:
                pl.scan_parquet(f).collect()
            except Exception as exc:
                self.warnings.append(
                    f"skipped unreadable segment {f.relative_to(self.path)}: {_short(exc)}"
                )
                continue
            good.append(f)
        if len(good) == len(files):
            return False
        self._files[table] = good
        lf = _view(good, table, self.events, self.rank, self.merged, self.layout)
        if table == fmt.SCALARS_DIR:
            self.scalars = lf
        else:
            self.layers = lf if good else None
        self._cache.clear()
        self.__dict__.pop("scalar_names", None)
        self.__dict__.pop("layer_kinds", None)
        return True

    @cached_property
    def scalar_names(self) -> tuple[str, ...]:
        names = self.query(fmt.SCALARS_DIR, lambda lf: lf.select(pl.col("name").unique()))
        return tuple(sorted(str(n) for n in names["name"].to_list() if n is not None))

    def has_scalar(self, name: str) -> bool:
        return name in self.scalar_names

    def scalar(self, name: str) -> Series | None:
        """The series ``name`` sorted by step, one value per step (last write wins)."""
        key = ("scalar", name)
        if key not in self._cache:
            self._cache[key] = self._load_scalar(name) if self.has_scalar(name) else None
        return self._cache[key]

    def _load_scalar(self, name: str) -> Series | None:
        df = self.query(
            fmt.SCALARS_DIR,
            lambda lf: lf.filter(pl.col("name") == name).select("step", "wall_time", "value"),
        )
        if df.height == 0:
            return None
        # Sort stably on step only, so for duplicated steps the last written row wins.
        df = df.with_row_index("_i").sort(["step", "_i"]).unique("step", keep="last")
        df = df.sort("step")
        return Series(
            name=name,
            steps=df["step"].to_numpy().astype(np.int64),
            values=df["value"].cast(pl.Float64).fill_null(float("nan")).to_numpy(),
            wall_time=df["wall_time"].cast(pl.Float64).fill_null(float("nan")).to_numpy(),
        )

    # -- layers -----------------------------------------------------------------------
    @cached_property
    def layer_kinds(self) -> tuple[str, ...]:
        if self.layers is None:
            return ()
        kinds = self.query(fmt.LAYERS_DIR, lambda lf: lf.select(pl.col("kind").unique()))
        if self.layers is None:  # every layers segment turned out unreadable
            return ()
        return tuple(sorted(str(k) for k in kinds["kind"].to_list() if k is not None))

    def has_layers(self, kind: str | None = None) -> bool:
        return bool(self.layer_kinds) if kind is None else kind in self.layer_kinds

    def layer_frame(self, kind: str, columns: tuple[str, ...]) -> pl.DataFrame:
        """Rows of one kind: ``step, layer`` plus ``columns``; duplicates resolved (last)."""
        key = ("frame", kind, columns)
        if key not in self._cache:
            if self.layers is None:
                df = pl.DataFrame()
            else:
                df = self.query(
                    fmt.LAYERS_DIR,
                    lambda lf: lf.filter(pl.col("kind") == kind).select(
                        "step", pl.col("layer").cast(pl.String), *columns
                    ),
                )
                if df.height:
                    df = df.unique(["step", "layer"], keep="last", maintain_order=True)
            self._cache[key] = df
        return self._cache[key]

    def layer_matrix(self, kind: str, stat: str) -> LayerMatrix | None:
        """A step × layer matrix of one statistic, layers in first-seen (model) order."""
        key = ("matrix", kind, stat)
        if key in self._cache:
            return self._cache[key]
        result = None
        if self.has_layers(kind):
            if stat not in self._layer_columns:
                raise RunLoadError(f"{self.path}: layers have no statistic {stat!r}")
            index = self._kind_index(kind, stat)
            if index is not None:
                column = index.pending.pop(stat, None)
                if column is None:  # not among the columns loaded with the kind
                    column = self._kind_column(kind, stat, index)
                if column is not None:
                    fill = kind in SAMPLED_KINDS and self.samples_params
                    result = index.matrix(kind, stat, column, fill)
        self._cache[key] = result
        return result

    def _kind_index(self, kind: str, stat: str) -> _KindIndex | None:
        """Row -> matrix cell mapping of one kind, built by a single scan that also
        loads the statistics usually asked of that kind (``PRELOAD_STATS``)."""
        key = ("index", kind)
        if key not in self._cache:
            names = self._layer_columns
            stats = [c for c in dict.fromkeys((stat, *PRELOAD_STATS.get(kind, ()))) if c in names]
            df = self.query(
                fmt.LAYERS_DIR,
                lambda lf: lf.filter(pl.col("kind") == kind).select("step", "layer", *stats),
            )
            index = _KindIndex.build(df) if df.height else None
            if index is not None:
                index.pending = {c: df[c] for c in stats}
            self._cache[key] = index
        return self._cache[key]

    def _kind_column(self, kind: str, stat: str, index: _KindIndex) -> pl.Series | None:
        """One more statistic of a kind, in the row order the index was built from."""
        df = self.query(fmt.LAYERS_DIR, lambda lf: lf.filter(pl.col("kind") == kind).select(stat))
        if df.height != index.n:  # a segment was dropped meanwhile: rebuild everything
            self._cache.pop(("index", kind), None)
            index = self._kind_index(kind, stat)
            return None if index is None else index.pending.pop(stat, None)
        return df[stat]

    @property
    def samples_params(self) -> bool:
        """The collector sampled parameter rows (run.json ``collector.memory``): steps it
        did not sample hold the last sampled value in layer matrices."""
        collector = self.meta.get("collector")
        return isinstance(collector, dict) and isinstance(collector.get("memory"), dict)

    @cached_property
    def _layer_columns(self) -> tuple[str, ...]:
        return tuple(self.layers.collect_schema().names()) if self.layers is not None else ()

    @cached_property
    def layer_names(self) -> tuple[str, ...]:
        """Parameter names in model order (from the weight rows, else run.json)."""
        m = self.layer_matrix(fmt.KIND_WEIGHT, "norm")
        if m is not None:
            return m.layers
        names: list[str] = []
        for mod in (self.meta.get("model") or {}).get("modules", []) or []:
            if not isinstance(mod, dict):
                continue
            for p in mod.get("params", []) or []:
                if isinstance(p, dict) and "name" in p:
                    names.append(full_param_name(str(mod.get("path") or ""), str(p["name"])))
        return tuple(names)

    @cached_property
    def module_types(self) -> dict[str, str]:
        """Module path -> class name, from run.json's model summary."""
        out: dict[str, str] = {}
        for mod in (self.meta.get("model") or {}).get("modules", []) or []:
            if isinstance(mod, dict) and "path" in mod:
                out[str(mod["path"])] = str(mod.get("type", ""))
        return out

    @cached_property
    def output_width(self) -> int | None:
        shape = (self.meta.get("model") or {}).get("output_shape")
        if isinstance(shape, list) and shape and isinstance(shape[-1], int):
            return int(shape[-1])
        return None


SAMPLED_KINDS = (fmt.KIND_WEIGHT, fmt.KIND_GRAD, fmt.KIND_UPDATE)
"""Kinds whose rows the collector may sample (see LayerMatrix)."""

PRELOAD_STATS: dict[str, tuple[str, ...]] = {
    fmt.KIND_WEIGHT: ("norm", "std"),
    fmt.KIND_GRAD: ("norm",),
    fmt.KIND_UPDATE: ("update_ratio", "missing"),
    fmt.KIND_ACTIVATION: ("norm", "std", "numel", "frac_dead_units", "frac_saturated"),
    fmt.KIND_OUTPUT: ("min", "max", "row_sum_mean", "numel"),
}
"""Statistics loaded together with the first matrix asked of a kind: what the signatures
and the health table read, so each kind is scanned once. Any other statistic still works
(one more scan of that column)."""


@dataclass
class _KindIndex:
    """Where each layers row of one kind goes in its step × layer matrix."""

    steps: np.ndarray
    layers: tuple[str, ...]
    cells: np.ndarray
    """Flat matrix index of each kept row."""
    keep: np.ndarray | None
    """Rows kept (the last write of each (step, layer)); None when there are no
    duplicates, the usual case."""
    n: int
    """Rows of the scan the index was built from (later scans must line up)."""
    pending: dict[str, pl.Series] = field(default_factory=dict)
    """Columns loaded with the index and not yet turned into matrices."""
    last: np.ndarray | None = None
    """Row of the last written cell at or before each cell (-1: none yet), when some cell
    was not written; empty when every cell was (built on the first filled matrix)."""

    @classmethod
    def build(cls, df: pl.DataFrame) -> _KindIndex:
        # int32 indices where they fit: half the memory traffic on 10M-row runs
        step = df["step"].to_numpy()
        if step.size < 2 or bool(np.all(step[1:] >= step[:-1])):  # segments in order
            change = np.empty(step.size, bool)
            change[:1] = True
            np.not_equal(step[1:], step[:-1], out=change[1:])
            steps = step[change]
            rows = np.cumsum(change, dtype=np.int64 if step.size >= 1 << 31 else np.int32)
            rows -= 1
        else:
            steps, rows = np.unique(step, return_inverse=True)
        layer = df["layer"]
        if not isinstance(layer.dtype, pl.Categorical):
            layer = layer.cast(pl.String).cast(pl.Categorical)
        codes = layer.to_physical()
        # Model order = order of first appearance (the collector writes in model order).
        first = codes.arg_unique().to_numpy()
        names = tuple(str(x) for x in layer.gather(first).cast(pl.String).to_list())
        codes_np = codes.to_numpy()
        uniq = codes_np[first].astype(np.int64)
        if uniq.max(initial=0) < 1 << 22:
            lookup = np.zeros(int(uniq.max(initial=0)) + 1, np.int32)
            lookup[uniq] = np.arange(uniq.size, dtype=np.int32)
            cols = lookup[codes_np]
        else:  # sparse code space: sort-based lookup
            order = np.argsort(uniq)
            cols = order[np.searchsorted(uniq[order], codes_np)]
        size = steps.size * len(names)
        cells = rows.astype(np.int64 if size >= 1 << 31 else np.int32, copy=False)
        cells *= len(names)
        cells += cols
        seen = np.zeros(size, bool)
        seen[cells] = True
        keep = None
        if np.count_nonzero(seen) < cells.size:
            # Duplicated (step, layer): the last row written wins, as for scalars.
            _, last_rev = np.unique(cells[::-1], return_index=True)
            keep = np.sort(cells.size - 1 - last_rev)
            cells = cells[keep]
        return cls(steps.astype(np.int64), names, cells, keep, df.height)

    def matrix(self, kind: str, stat: str, column: pl.Series, fill: bool = False) -> LayerMatrix:
        """The step × layer matrix of ``column``; ``fill``: cells no row wrote hold the
        layer's last written value (NaN before its first)."""
        if column.dtype.is_float():
            vals = column.to_numpy()  # nulls come out as NaN
        else:
            vals = column.cast(pl.Float64).fill_null(float("nan")).to_numpy()
        if self.keep is not None:
            vals = vals[self.keep]
        values = np.full((len(self.steps), len(self.layers)), np.nan)
        values.ravel()[self.cells] = vals
        if fill:
            values = self._hold_last(values)
        return LayerMatrix(kind, stat, self.steps, self.layers, values)

    def _hold_last(self, values: np.ndarray) -> np.ndarray:
        if self.last is None:
            written = np.zeros(values.size, bool)
            written[self.cells] = True
            written = written.reshape(values.shape)
            if written.all():
                self.last = np.empty(0, np.int64)
            else:
                last = np.where(written, np.arange(values.shape[0])[:, None], -1)
                self.last = np.maximum.accumulate(last, axis=0)
        if not self.last.size:
            return values
        out = values[np.maximum(self.last, 0), np.arange(values.shape[1])]
        out[self.last < 0] = np.nan
        return out


# -- loading ------------------------------------------------------------------------------


def full_param_name(module_path: str, name: str) -> str:
    """The ``named_parameters()`` name of a parameter listed in run.json's model summary.

    The collector writes full names there (``0.0.weight`` under module ``0.0``), the same
    names the weight/grad/update rows carry; a bare name (``weight``, as other writers may
    give) gets the module path prepended. Bare names never contain a dot.
    """
    if not module_path or name.startswith(module_path + "."):
        return name
    return f"{module_path}.{name}"


def load_run(path: str | os.PathLike[str], rank: int | None = None) -> Run:
    """Open a run directory lazily. Raises :class:`RunLoadError` with a one-line message.

    A run with several ranks (torch.distributed) is seen merged (runlens.ranks), or as
    rank ``rank`` alone when given."""
    root = Path(path)
    if not root.exists():
        raise RunLoadError(f"no such run directory: {root}")
    if not root.is_dir():
        raise RunLoadError(f"not a run directory: {root} (a file; see `runlens import`)")

    warnings: list[str] = []
    n_warnings = len(warnings)
    meta = _read_meta(root, warnings)
    # A corrupt run.json gets defaults and a warning; the data segments are still analyzed.
    meta_unreadable = len(warnings) > n_warnings
    scalar_files = _good_segments(root, fmt.SCALARS_DIR, fmt.SCALARS_SCHEMA.names, warnings)
    layer_files = _good_segments(root, fmt.LAYERS_DIR, ("step", "layer", "kind"), warnings)
    if (meta is None or meta_unreadable) and not scalar_files and not layer_files:
        children = child_runs(root)
        if children and meta is None:
            raise RunLoadError(directory_of_runs_message(root, children))
        what = "an unreadable run.json" if meta_unreadable else "no run.json"
        raise RunLoadError(f"not a runlens run: {root} has {what} and no segments")
    if meta is None:
        warnings.append("run.json missing; using defaults (name from the directory)")
        meta = {"name": root.name, "status": "unknown"}
    elif not meta_unreadable:
        try:
            fmt.check_schema_version(meta)
        except fmt.SchemaVersionError as exc:
            raise RunLoadError(f"{root}: {exc}") from None

    ranks = sorted({_rank_of(f) for f in scalar_files + layer_files})
    asked = rank
    if asked is not None and asked not in ranks:
        have = ", ".join(map(str, ranks)) or "none"
        raise RunLoadError(f"{root}: no rank {asked} in this run (ranks: {have})")
    rank = asked if asked is not None else (ranks[0] if ranks else None)
    merged = asked is None and len(ranks) > 1
    events = _read_events(root, warnings)
    for r in fmt.read_resumed(meta):  # rank 0's, in case its events file was lost
        if not any(e.get("kind") == "resume" and e.get("step") == r["step"] for e in events):
            events.append({"kind": "resume", "rank": 0, **r})
    layout = read_layout(meta, events, ranks)
    scalars = _view(scalar_files, fmt.SCALARS_DIR, events, rank, merged, layout)
    layers = (
        _view(layer_files, fmt.LAYERS_DIR, events, rank, merged, layout) if layer_files else None
    )
    if not scalar_files and not layer_files:
        warnings.append("run has no data segments yet")
    # A log converted by `runlens import` says so in run.json, with its import warnings.
    imported = meta.get("imported")
    if isinstance(imported, dict):
        warnings.extend(str(w) for w in imported.get("warnings") or [])
    # Every rank writes start events (with its own id before a resume adopted rank 0's):
    # count the runs of one rank.
    first_rank = min((_event_rank(e) for e in events if e.get("kind") == "start"), default=0)
    run_ids = list(
        dict.fromkeys(
            str(e.get("run_id"))
            for e in events
            if e.get("kind") == "start" and _event_rank(e) == first_rank
        )
    )
    if len(run_ids) > 1:
        warnings.append(
            f"this directory holds {len(run_ids)} runs (run ids {', '.join(run_ids)}); their "
            "segments may be mixed: record each run in its own directory"
        )
    run = Run(
        path=root,
        meta=meta,
        scalars=scalars,
        layers=layers,
        events=events,
        warnings=warnings,
        source_format=str(meta.get("source_format") or "runlens"),
        rank=rank,
        ranks=tuple(ranks),
        merged=merged,
        layout=layout,
        _files={
            fmt.SCALARS_DIR: [f for f in scalar_files if merged or _rank_of(f) == rank],
            fmt.LAYERS_DIR: [f for f in layer_files if merged or _rank_of(f) == rank],
        },
    )
    run._files_all = {fmt.SCALARS_DIR: scalar_files, fmt.LAYERS_DIR: layer_files}
    _check_steps(run)
    return run


def child_runs(root: Path, limit: int = 5) -> list[Path]:
    """Sub-directories of ``root`` that are run directories (up to ``limit``)."""
    out: list[Path] = []
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return out
    for p in children:
        if (p / fmt.RUN_JSON).is_file() or (p / fmt.SCALARS_DIR).is_dir():
            out.append(p)
            if len(out) >= limit:
                break
    return out


def directory_of_runs_message(root: Path, children: list[Path]) -> str:
    names = ", ".join(p.name for p in children[:3]) + (", ..." if len(children) > 3 else "")
    return (
        f"{root} looks like a directory of runs ({names}); use `runlens compare {root}` "
        "or pick one run"
    )


def _check_steps(run: Run) -> None:
    """Warn about steps recorded more than once with different values (a resumed run,
    two runs in one directory): the loader keeps the last write, which may not be what
    was meant. The same value written twice at one step (a logger that repeats the epoch
    counter on its train and eval records) changes nothing and is not reported."""
    try:
        dup = run.query(
            fmt.SCALARS_DIR,
            lambda lf: (
                lf.group_by("name", "step")
                .agg(pl.col("value").n_unique().alias("values"))
                .filter(pl.col("values") > 1)
                .group_by("name")
                .agg(pl.len().alias("n"))
            ),
        )
    except RunLoadError as exc:
        run.warnings.append(str(exc))
        return
    if dup.height:
        worst = dup.sort(["n", "name"])[-1]
        run.warnings.append(
            f"{dup.height} series have steps recorded more than once with different values "
            f"(e.g. {worst['name'][0]}: {worst['n'][0]} steps); the last value written is used"
        )


def _read_meta(root: Path, warnings: list[str]) -> dict[str, Any] | None:
    p = root / fmt.RUN_JSON
    if not p.exists():
        return None
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        warnings.append(f"run.json unreadable ({type(exc).__name__}); using defaults")
        return {"name": root.name, "status": "unknown"}
    if not isinstance(meta, dict):
        warnings.append("run.json is not an object; using defaults")
        return {"name": root.name, "status": "unknown"}
    return meta


def _good_segments(
    root: Path, table: str, required: tuple[str, ...] | list[str], warnings: list[str]
) -> list[Path]:
    """Segments whose Parquet footer reads and whose columns are the required ones, of
    the format's types."""
    expected = fmt.SCALARS_SCHEMA if table == fmt.SCALARS_DIR else fmt.LAYERS_SCHEMA
    good = []
    for f in sorted((root / table).glob(fmt.SEGMENT_GLOB)):
        try:
            schema = pq.read_schema(f)
        except Exception as exc:  # truncated / not parquet: skip, say which
            warnings.append(f"skipped unreadable segment {f.relative_to(root)}: {_short(exc)}")
            continue
        missing = [c for c in required if c not in schema.names]
        if missing:
            warnings.append(f"skipped segment {f.relative_to(root)}: missing columns {missing}")
            continue
        bad = _type_mismatch(schema, expected)
        if bad:
            warnings.append(f"skipped segment {f.relative_to(root)}: {bad}")
            continue
        good.append(f)
    return good


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


def _scan(
    files: list[Path],
    rank: int | None,
    schema: Any,
    cuts: list[tuple[int, int]] | None = None,
) -> pl.LazyFrame:
    """The segments of one rank as one LazyFrame. ``cuts`` are the resumes (step, first
    segment number of the continuation): a segment written before a resume keeps only
    its rows before that resume's step (the rest belong to the superseded attempt)."""
    files = [f for f in files if rank is None or _rank_of(f) == rank]
    if not files:
        empty = pl.from_arrow(schema.empty_table())
        assert isinstance(empty, pl.DataFrame)
        return empty.with_columns(pl.lit(0, pl.Int64).alias("rank")).lazy()
    groups: list[tuple[int | None, list[str]]] = []  # consecutive files with one cap
    for f in files:
        seq = _seq_of(f)
        caps = [step for step, first in cuts or () if seq is not None and seq < first]
        cap = min(caps) if caps else None
        if groups and groups[-1][0] == cap:
            groups[-1][1].append(str(f))
        else:
            groups.append((cap, [str(f)]))
    frames = []
    for cap, paths in groups:
        lf = pl.scan_parquet(paths, missing_columns="insert", extra_columns="ignore")
        frames.append(lf if cap is None else lf.filter(pl.col("step") < cap))
    lf = frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical_relaxed")
    return lf.with_columns(pl.lit(rank, pl.Int64).alias("rank"))


def _scan_ranks(
    files: list[Path], schema: Any, events: list[dict[str, Any]], table: str
) -> pl.LazyFrame:
    """Every rank's segments, each with its own resumes applied, one frame."""
    ranks = sorted({_rank_of(f) for f in files})
    frames = [_scan(files, r, schema, _resume_cuts(events, r, table)) for r in ranks]
    if not frames:
        return _scan([], None, schema)
    return frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical_relaxed")


def _view(
    files: list[Path],
    table: str,
    events: list[dict[str, Any]],
    rank: int | None,
    merged: bool,
    layout: RankLayout | None,
) -> pl.LazyFrame:
    """The frame of ``table`` a Run shows: one rank's, or every rank's merged."""
    schema = fmt.SCALARS_SCHEMA if table == fmt.SCALARS_DIR else fmt.LAYERS_SCHEMA
    # Without shards the merged layers are one replica's: scanning only that rank keeps
    # the analyzer's filters pushed down to the files (as for a single process).
    one = not merged or layout is None or (table == fmt.LAYERS_DIR and not layout.sharded)
    if one:
        return _scan(files, rank, schema, _resume_cuts(events, rank, table))
    lf = _scan_ranks(files, schema, events, table)
    return merge_scalars(lf, layout) if table == fmt.SCALARS_DIR else merge_layers(lf, layout)


def _seq_of(f: Path) -> int | None:
    try:
        return int(f.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return None


def _event_rank(e: dict[str, Any]) -> int:
    r = e.get("rank", 0)
    return r if isinstance(r, int) and not isinstance(r, bool) else 0


def _resume_cuts(
    events: list[dict[str, Any]], rank: int | None, table: str
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


def _read_events(root: Path, warnings: list[str]) -> list[dict[str, Any]]:
    """Every rank's events (``events.jsonl``, ``events-rank<N>.jsonl``), by time."""
    paths = [root / fmt.EVENTS_JSONL, *sorted(root.glob(fmt.EVENTS_RANK_GLOB))]
    events: list[dict[str, Any]] = []
    for p in paths:
        if not p.exists():
            continue
        bad = 0
        try:
            with open(p, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        ev = json.loads(line)
                    except json.JSONDecodeError:
                        bad += 1
                        continue
                    if isinstance(ev, dict):
                        events.append(ev)
        except OSError as exc:
            warnings.append(f"{p.name} unreadable: {_short(exc)}")
        if bad:
            warnings.append(f"{p.name}: skipped {bad} malformed line(s)")
    if len(paths) > 1:
        events.sort(key=lambda e: e.get("time") if isinstance(e.get("time"), int | float) else 0)
    return events


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__


# -- following a live run (runlens.live): one segment, one event line at a time -------------


def read_meta(root: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """``run.json`` of ``root`` (None when absent) and the problems tolerated reading it.
    The collector rewrites it atomically, so it can be read at any moment."""
    warnings: list[str] = []
    return _read_meta(root, warnings), warnings


def read_segment(path: Path, table: str) -> pl.DataFrame:
    """One complete segment of ``table`` (``scalars`` / ``layers``) with every column of
    the format in order (absent optional ones as nulls) and the dictionary columns as
    strings, so segments read one by one concatenate. Raises RunLoadError when the file
    is not a readable segment of that table."""
    schema = fmt.SCALARS_SCHEMA if table == fmt.SCALARS_DIR else fmt.LAYERS_SCHEMA
    try:
        bad = _type_mismatch(pq.read_schema(path), schema)
        if bad:
            raise RunLoadError(f"segment {path.name}: {bad}")
        df = pl.read_parquet(path)
    except RunLoadError:
        raise
    except Exception as exc:
        raise RunLoadError(f"unreadable segment {path.name}: {_short(exc)}") from None
    empty = pl.from_arrow(schema.empty_table())
    assert isinstance(empty, pl.DataFrame)
    cols = []
    for name, dtype in empty.schema.items():
        target = pl.String if isinstance(dtype, pl.Categorical) else dtype
        if name in df.columns:
            cols.append(pl.col(name).cast(target))
        elif name in ("step", "layer", "kind", "name"):
            raise RunLoadError(f"segment {path.name}: missing column {name}")
        else:
            cols.append(pl.lit(None, target).alias(name))
    return df.select(cols)


def read_events_from(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Complete lines of ``events.jsonl`` from byte ``offset`` on, and the offset after
    the last complete line (a line still being appended is left for the next call).
    Malformed lines are skipped, as in :func:`load_run`."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].splitlines():
        try:
            ev = json.loads(line.decode("utf-8", "replace"))
        except json.JSONDecodeError:
            continue
        if isinstance(ev, dict):
            events.append(ev)
    return events, offset + end
