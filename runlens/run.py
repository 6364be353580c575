"""Loading a run directory into polars frames: the only place the analyzer reads files.

The data model (what signatures see) is:

* ``Run.meta``: the parsed ``run.json`` (an empty-ish dict when it was missing/corrupt).
* ``Run.scalars``: LazyFrame ``step:i64, wall_time:f64, name:str, value:f64, rank:i64``,
  read (and checked) in full when the run is loaded: scalars are small.
* ``Run.layers``: LazyFrame with the columns of ``format.LAYERS_SCHEMA`` plus ``rank``, or
  ``None`` when the run has no layer statistics; a scan of the segment files, read by the
  analysis in one pass (runlens.layerscan via runlens.context).
* ``Run.events``: the parsed lines of ``events.jsonl`` and of the other ranks' event
  files (``events-rank<N>.jsonl``), in time order.
* ``Run.warnings``: one line per problem tolerated while loading (a skipped segment...).

A :class:`Run` is a read-only view: nothing in it changes after :func:`load_run` returns,
and it caches nothing. Which segments are unreadable is decided once: at load for the
footers and schemas of every segment and the data of the scalars, and for the data of the
layers by the analysis' pass over them (runlens.context.Context, whose view of the run
then lists them as skipped). Derived data and every cache live in the Context.

Helpers return numpy arrays: :meth:`Run.scalar` one series (sorted by step, one value per
step: the last one written wins), :meth:`Run.layer_matrix` a step × layer matrix of one
statistic at every recorded step. Each call reads again: an analysis goes through
:class:`~runlens.context.Context`, which reads once and keeps what it read.

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
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from runlens_collect import format as fmt

from runlens.errors import RunLoadError
from runlens.layerscan import LayerMatrix
from runlens.needs import LayerStat
from runlens.ranks import RankLayout, merge_layers, merge_scalars, read_layout
from runlens.segments import (  # noqa: F401 (re-exported: the readers' helpers)
    LIST_RETRIES,
    REQUIRED,
    SegmentsChanged,
    _event_rank,
    _footer_problem,
    _rank_of,
    _rel,
    _short,
    _split_readable,
    _type_mismatch,
    collect_tolerant,
    layer_columns,
    read_layers,
    resume_cuts,
    scan_segments,
    segment_listing,
)

__all__ = ["LayerMatrix", "Run", "RunFacts", "Series", "load_run"]


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
class RunFacts:
    """Facts about a run's data, known without reading it again (None: not known, the
    Run reads it when asked). :func:`load_run` knows the scalar names and, from the
    segments' footers, the size and step range of the layers table; an analysis'
    Context knows the rest once it has read the layers."""

    scalar_names: tuple[str, ...] | None = None
    layer_kinds: tuple[str, ...] | None = None
    layer_names: tuple[str, ...] | None = None
    layer_rows: int | None = None
    layer_steps: tuple[int, int] | None = None
    """First and last step in the layers table (from the segments' statistics)."""


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

    facts: RunFacts = field(default_factory=RunFacts, repr=False)
    _files: dict[str, list[Path]] = field(default_factory=dict, repr=False)
    """Segments behind ``scalars`` / ``layers`` (empty for in-memory runs)."""
    cuts: dict[str, list[tuple[int, int]]] = field(default_factory=dict, repr=False)
    """Per table, the resumes (step, first segment number of the continuation): rows of
    earlier segments at or after that step are superseded (segments.scan_segments)."""
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

    def segment_files(self, table: str) -> list[Path]:
        """The segment files behind ``table`` (``scalars`` / ``layers``), in row order."""
        return list(self._files.get(table, ()))

    # -- queries ------------------------------------------------------------------------

    @property
    def resumes(self) -> tuple[int, ...]:
        """Steps at which training continued into this run (resumed from a checkpoint)."""
        steps = {int(r["step"]) for r in fmt.read_resumed(self.meta)}
        steps |= {step for step, _ in resume_cuts(self.events, self.rank, fmt.SCALARS_DIR)}
        return tuple(sorted(steps))

    @property
    def skipped_steps(self) -> np.ndarray:
        """Steps whose optimizer update did not happen (``optim/skipped`` is 1: an AMP
        GradScaler found inf/NaN gradients, or ``optimizer.step()`` was not called).
        Their gradient statistics were never applied; readers ignore them."""
        return skipped_steps_of(self.scalar(fmt.STEP_SKIPPED))

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
        """:meth:`query` over every rank's rows (see :meth:`rank_frame`). ``key`` is kept
        for callers that name what ``build`` selects; the Run caches nothing (the analysis'
        Context does)."""
        lf = self.rank_frame(table)
        if lf is None:
            return pl.DataFrame()
        try:
            return build(lf).collect()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise RunLoadError(f"{self.path}: cannot read {table}: {_short(exc)}") from None

    def query(self, table: str, build: Callable[[pl.LazyFrame], pl.LazyFrame]) -> pl.DataFrame:
        """Run ``build`` on the scalars (``table="scalars"``) or layers frame and collect it
        (an empty frame when the run has no layers). A layers segment whose footer read but
        whose data does not (corrupt pages) is left out of this query, so one bad file
        never stops an analysis (the Context's pass reports it as skipped)."""
        return collect_tolerant(self, table, build)[0]

    # -- scalars ----------------------------------------------------------------------
    @property
    def scalar_names(self) -> tuple[str, ...]:
        if self.facts.scalar_names is not None:
            return self.facts.scalar_names
        return _scalar_names(self.scalars)

    def has_scalar(self, name: str) -> bool:
        return name in self.scalar_names

    def scalar(self, name: str) -> Series | None:
        """The series ``name`` sorted by step, one value per step (last write wins)."""
        if not self.has_scalar(name):
            return None
        df = self.scalars.filter(pl.col("name") == name).select("step", "wall_time", "value")
        return series_of(name, df.collect())

    # -- layers -----------------------------------------------------------------------
    @property
    def layer_kinds(self) -> tuple[str, ...]:
        if self.facts.layer_kinds is not None:
            return self.facts.layer_kinds
        if self.layers is None:
            return ()
        kinds = self.query(fmt.LAYERS_DIR, lambda lf: lf.select(pl.col("kind").unique()))
        return tuple(sorted(str(k) for k in kinds["kind"].to_list() if k is not None))

    def has_layers(self, kind: str | None = None) -> bool:
        return bool(self.layer_kinds) if kind is None else kind in self.layer_kinds

    def layer_frame(self, kind: str, columns: tuple[str, ...]) -> pl.DataFrame:
        """Rows of one kind: ``step, layer`` plus ``columns``; duplicates resolved (last)."""
        if self.layers is None:
            return pl.DataFrame()
        df = self.query(
            fmt.LAYERS_DIR,
            lambda lf: lf.filter(pl.col("kind") == kind).select(
                "step", pl.col("layer").cast(pl.String), *columns
            ),
        )
        return df.unique(["step", "layer"], keep="last", maintain_order=True) if df.height else df

    def layer_matrix(self, kind: str, stat: str) -> LayerMatrix | None:
        """A step × layer matrix of one statistic at every recorded step, layers in
        first-seen (model) order; None when the run has no rows of ``kind``."""
        if self.layers is None:
            return None
        if stat not in layer_columns(self.layers):
            if self.has_layers(kind):
                raise RunLoadError(f"{self.path}: layers have no statistic {stat!r}")
            return None
        need = LayerStat(kind, stat)
        lp = read_layers(self, [need], files=self.segment_files(fmt.LAYERS_DIR))[0]
        return lp.matrices.get(need)

    @property
    def samples_params(self) -> bool:
        """The collector sampled parameter rows (run.json ``collector.memory``): steps it
        did not sample hold the last sampled value in the analysis' layer matrices
        (Context.layer)."""
        collector = self.meta.get("collector")
        return isinstance(collector, dict) and isinstance(collector.get("memory"), dict)

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Parameter names in model order (from the weight rows, else run.json)."""
        if self.facts.layer_names is not None:
            return self.facts.layer_names
        if self.layers is not None:
            df = self.query(
                fmt.LAYERS_DIR,
                lambda lf: lf.filter(pl.col("kind") == fmt.KIND_WEIGHT).select(
                    pl.col("layer").cast(pl.String).unique(maintain_order=True)
                ),
            )
            if df.height:
                return tuple(str(x) for x in df["layer"].to_list())
        return model_param_names(self.meta)

    @property
    def module_types(self) -> dict[str, str]:
        """Module path -> class name, from run.json's model summary."""
        out: dict[str, str] = {}
        for mod in (self.meta.get("model") or {}).get("modules", []) or []:
            if isinstance(mod, dict) and "path" in mod:
                out[str(mod["path"])] = str(mod.get("type", ""))
        return out

    @property
    def output_width(self) -> int | None:
        shape = (self.meta.get("model") or {}).get("output_shape")
        if isinstance(shape, list) and shape and isinstance(shape[-1], int):
            return int(shape[-1])
        return None


def model_param_names(meta: dict[str, Any]) -> tuple[str, ...]:
    """Parameter names listed in run.json's model summary, in its order."""
    names: list[str] = []
    for mod in (meta.get("model") or {}).get("modules", []) or []:
        if not isinstance(mod, dict):
            continue
        for p in mod.get("params", []) or []:
            if isinstance(p, dict) and "name" in p:
                names.append(full_param_name(str(mod.get("path") or ""), str(p["name"])))
    return tuple(names)


def series_of(name: str, df: pl.DataFrame) -> Series | None:
    """``step, wall_time, value`` rows of one series (in the order written) as a
    :class:`Series`: sorted by step, the last row written winning for a repeated step."""
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


SAMPLED_KINDS = (fmt.KIND_WEIGHT, fmt.KIND_GRAD, fmt.KIND_UPDATE)
"""Kinds whose rows the collector may sample (run.json ``collector.memory``): a step that
did not sample a parameter holds its last sampled value (Context.layer)."""


def skipped_steps_of(marks: Series | None) -> np.ndarray:
    """The steps an ``optim/skipped`` series marks as skipped (value 1)."""
    if marks is None:
        return np.zeros(0, np.int64)
    return marks.steps[np.nan_to_num(marks.values, nan=0.0) > 0.5]


def all_series(scalars: pl.LazyFrame) -> dict[str, Series]:
    """Every series of a scalars table, read in one query (what :meth:`Run.scalar`
    gives for each name)."""
    df = scalars.select(pl.col("name").cast(pl.String), "step", "wall_time", "value").collect()
    out: dict[str, Series] = {}
    if df.height == 0:
        return out
    for (name,), part in df.group_by("name", maintain_order=True):
        if name is None:
            continue
        s = series_of(str(name), part.select("step", "wall_time", "value"))
        if s is not None:
            out[str(name)] = s
    return out


def _scalar_names(scalars: pl.LazyFrame) -> tuple[str, ...]:
    names = scalars.select(pl.col("name").unique()).collect()
    return tuple(sorted(str(n) for n in names["name"].to_list() if n is not None))


def full_param_name(module_path: str, name: str) -> str:
    """The ``named_parameters()`` name of a parameter listed in run.json's model summary.

    The collector writes full names there (``0.0.weight`` under module ``0.0``), the same
    names the weight/grad/update rows carry; a bare name (``weight``, as other writers may
    give) gets the module path prepended. Bare names never contain a dot.
    """
    if not module_path or name.startswith(module_path + "."):
        return name
    return f"{module_path}.{name}"


# -- loading ------------------------------------------------------------------------------


def load_run(path: str | os.PathLike[str], rank: int | None = None) -> Run:
    """Open a run directory lazily. Raises :class:`RunLoadError` with a one-line message.

    A run with several ranks (torch.distributed) is seen merged (runlens.ranks), or as
    rank ``rank`` alone when given. A segment merged away while loading (a live run's
    rolling compaction) makes it list the segments again (segments.SegmentsChanged)."""
    for attempt in range(LIST_RETRIES):
        try:
            return _load_run(path, rank)
        except SegmentsChanged:
            if attempt == LIST_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


def _load_run(path: str | os.PathLike[str], rank: int | None) -> Run:
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
    # Segments are listed, not opened: the scalars are read whole below and the layers by
    # the analysis' pass, and a segment that turns out unreadable is left out then.
    scalar_files = segment_listing(root, fmt.SCALARS_DIR)
    layer_files = segment_listing(root, fmt.LAYERS_DIR)
    if (meta is None or meta_unreadable) and not _any_segment(root, scalar_files, layer_files):
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
    all_files = {fmt.SCALARS_DIR: scalar_files, fmt.LAYERS_DIR: layer_files}
    if not merged:
        scalar_files = [f for f in scalar_files if _rank_of(f) == rank]
        layer_files = [f for f in layer_files if _rank_of(f) == rank]
    cuts = {t: resume_cuts(events, rank, t) for t in (fmt.SCALARS_DIR, fmt.LAYERS_DIR)}
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
    # Scalars are small: read them whole now, so an unreadable segment is found (and left
    # out, with a warning) here, once, and the analysis reads them from memory.
    if merged and layout is not None:
        # Several ranks: their mean (runlens.ranks.merge_scalars), each rank's resumes
        # applied; an unreadable segment fails the load here (not left out).
        try:
            view = _view(scalar_files, fmt.SCALARS_DIR, events, rank, merged, layout)
            scalars = view.collect().lazy()
        except (pl.exceptions.PolarsError, OSError, pa.ArrowException) as exc:
            gone = next((f for f in scalar_files if not f.exists()), None)
            if gone is not None:
                raise SegmentsChanged(f"segment {gone.name} was merged while being read") from None
            raise RunLoadError(f"{root}: cannot read scalars: {_short(exc)}") from None
    else:
        scalars, scalar_files = _read_scalars(
            root, scalar_files, rank, warnings, cuts[fmt.SCALARS_DIR]
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
        facts=RunFacts(scalar_names=_scalar_names(scalars)),
        _files={fmt.SCALARS_DIR: scalar_files, fmt.LAYERS_DIR: layer_files},
        cuts=cuts,
        ranks=tuple(ranks),
        merged=merged,
        layout=layout,
        _files_all=all_files,
    )
    _check_steps(run)
    return run


def _read_scalars(
    root: Path,
    files: list[Path],
    rank: int | None,
    warnings: list[str],
    cuts: list[tuple[int, int]] | None = None,
) -> tuple[pl.LazyFrame, list[Path]]:
    """The scalars of ``files`` in memory (rows superseded by a resume dropped); a segment
    that cannot be read (footer, schema or data) is left out with a warning."""
    try:
        df = scan_segments(files, rank, fmt.SCALARS_SCHEMA, cuts).collect()
        return df.lazy(), files
    except (pl.exceptions.PolarsError, OSError, pa.ArrowException):
        pass
    good, notes = _split_readable(root, files, lambda lf: lf, fmt.SCALARS_SCHEMA, rank)
    warnings.extend(notes)
    try:
        df = scan_segments(good, rank, fmt.SCALARS_SCHEMA, cuts).collect()
    except (pl.exceptions.PolarsError, OSError, pa.ArrowException) as exc:
        raise RunLoadError(f"{root}: cannot read scalars: {_short(exc)}") from None
    return df.lazy(), good


def _any_segment(root: Path, *listings: list[Path]) -> bool:
    """Whether any listed segment has a readable footer with the required columns."""
    for table, files in zip((fmt.SCALARS_DIR, fmt.LAYERS_DIR), listings, strict=True):
        schema = fmt.SCALARS_SCHEMA if table == fmt.SCALARS_DIR else fmt.LAYERS_SCHEMA
        if any(_footer_problem(root, f, REQUIRED[table], schema) is None for f in files):
            return True
    return False


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
    except SegmentsChanged:
        raise  # load_run lists again
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


def _scan_ranks(
    files: list[Path], schema: Any, events: list[dict[str, Any]], table: str
) -> pl.LazyFrame:
    """Every rank's segments, each with its own resumes applied, one frame."""
    ranks = sorted({_rank_of(f) for f in files})
    frames = [scan_segments(files, r, schema, resume_cuts(events, r, table)) for r in ranks]
    if not frames:
        return scan_segments([], None, schema)
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
        return scan_segments(files, rank, schema, resume_cuts(events, rank, table))
    lf = _scan_ranks(files, schema, events, table)
    return merge_scalars(lf, layout) if table == fmt.SCALARS_DIR else merge_layers(lf, layout)


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
