"""What a signature sees: the run plus derived series, read once and cached here.

The :class:`Context` owns every cache of an analysis; the :class:`~runlens.run.Run` it
wraps is a read-only view. :meth:`Context.prepare` reads what the analysis declared it
needs (runlens.needs) in one pass over the layers table and one over the scalars, before
any signature runs; after that the shared state only grows by idempotent additions (a
statistic nobody declared is read on first use and stored with ``dict.setdefault``), so
signatures can run in parallel threads without locks. Each signature gets its own
:meth:`Context.fork`, which shares the caches and keeps its own coverage notes.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import polars as pl
from runlens_collect import format as fmt

from runlens import levels as L
from runlens import series as S
from runlens.errors import RunLoadError
from runlens.findings import SkipKind, Skipped
from runlens.layerscan import DEFAULT_MEMORY_MB, NONFINITE_SCHEMA, LayerPass, Resolution
from runlens.levels import Levels
from runlens.metrics import Mode, direction, is_schedule, task_metric
from runlens.needs import NONFINITE_ROWS, LayerStat, Need, NonFiniteRows, Reduce
from runlens.run import (
    SAMPLED_KINDS,
    LayerMatrix,
    Run,
    Series,
    all_series,
    collect_tolerant,
    layer_columns,
    model_param_names,
    read_layers,
    scan_segments,
    skipped_steps_of,
)
from runlens.segments import footer_extent
from runlens.task import TaskInfo, resolve_task

T = TypeVar("T")


@dataclass(frozen=True)
class Curve:
    """A scalar series with its debiased-EMA smoothing (non-finite points passed through)."""

    name: str
    steps: np.ndarray
    raw: np.ndarray
    smooth: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def finite(self) -> np.ndarray:
        return np.isfinite(self.raw)

    def last_finite(self, smoothed: bool = True) -> tuple[int, float] | None:
        idx = np.flatnonzero(self.finite)
        if idx.size == 0:
            return None
        i = int(idx[-1])
        return int(self.steps[i]), float((self.smooth if smoothed else self.raw)[i])

    def levels(self, mode: Mode | None, window: int | None = None) -> Levels | None:
        """First/final/best level and best step: the one definition of runlens.levels."""
        return L.levels(self.steps, self.raw, mode, window)

    def between(self, start: int, end: int) -> Curve:
        m = (self.steps >= start) & (self.steps <= end)
        return Curve(self.name, self.steps[m], self.raw[m], self.smooth[m])


@dataclass
class _Shared:
    """The caches of one analysis, shared by the Context and its forks."""

    run: Run
    """The view of the run the analysis reads (see Context.run)."""
    series: dict[str, Series] | None = None
    curves: dict[str, Curve | None] = field(default_factory=dict)
    levels: dict[str, Levels | None] = field(default_factory=dict)
    matrices: dict[LayerStat, LayerMatrix | None] = field(default_factory=dict)
    nonfinite: dict[NonFiniteRows, pl.DataFrame] = field(default_factory=dict)
    memo: dict[Any, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """Warnings found after prepare() (a segment unreadable for one more query)."""
    prepared: bool = False


class Context:
    """Derived data for signatures; everything is computed on first use and cached.

    ``memory_mb`` bounds the memory of the layers pass: runs whose step × layer matrices
    would not fit are read as window levels (runlens.layerscan)."""

    def __init__(
        self,
        run: Run,
        smoothing: float = S.DEFAULT_SMOOTHING,
        task: TaskInfo | None = None,
        *,
        memory_mb: float = DEFAULT_MEMORY_MB,
        resolution: Resolution | None = None,
        final: bool = True,
    ) -> None:
        self.final = final
        """True when the data is the whole run: its last step is the end of the run
        (post-hoc analysis, a run that ended). False while more steps may come (the live
        passes of ``runlens watch``): a signature that judges *the end of the run* (a late
        level, a last quarter, a rise since the best) must not take the end of the data
        for it; it asks for the confirmation its docstring states, or defers to the
        final analysis."""
        self.smoothing = smoothing
        self._stated_task = task
        self.resolution = resolution or Resolution.for_memory(memory_mb)
        """How finely the layers are read (from ``memory_mb`` unless given)."""
        self._shared = _Shared(run)
        self._signature = ""
        self._parts: list[Skipped] = []

    @property
    def run(self) -> Run:
        """The run as the analysis sees it: the loaded :class:`Run`, and after
        :meth:`prepare` a copy that also knows its layer kinds and names, without the
        layers segments the pass found unreadable (and a warning for each)."""
        return self._shared.run

    # -- planning ---------------------------------------------------------------------------
    def prepare(self, needs: Iterable[Need] = ()) -> None:
        """Read everything in ``needs`` (one pass over the layers, one over the scalars).
        Call it before running signatures in parallel; calling it again reads only what
        was not read yet."""
        sh = self._shared
        self._all_series()
        run = sh.run
        stats = [n for n in dict.fromkeys(needs) if isinstance(n, LayerStat)]
        if run.samples_params:
            # Which cells a sampled kind wrote (see _finish), read in the same pass.
            stats += [
                LayerStat(s.kind, "missing", s.reduce)
                for s in stats
                if s.kind in SAMPLED_KINDS and s.stat != "missing"
            ]
            stats = list(dict.fromkeys(stats))
        stats = [s for s in stats if s not in sh.matrices]
        probes = [n for n in needs if isinstance(n, NonFiniteRows) and n not in sh.nonfinite]
        if run.layers is not None and (stats or probes or not sh.prepared):
            lp, files, notes = self._read(stats + probes[:1])
            self._keep(lp, stats, probes[:1])
            if not sh.prepared:
                sh.run = self._view(run, lp, files, notes)
            else:
                sh.notes.extend(notes)
        sh.prepared = True

    def _read(self, needs: list[Any]) -> tuple[LayerPass, list[Any], list[str]]:
        run = self._shared.run
        steps, rows, exact = self.cached("layer_extent", self._layer_extent)
        files = run.segment_files(fmt.LAYERS_DIR)
        opts = {"resolution": self.resolution, "step_range": steps, "total_rows": rows}
        lp, kept, notes = read_layers(run, needs, files=files, **opts)
        if not exact and lp.steps != steps:
            # The footers' guess was not the table's extent: read again with the real
            # one, and keep it for every later pass (their windows must be the same).
            self._shared.memo["layer_extent"] = (lp.steps, lp.rows, True)
            opts.update(step_range=lp.steps, total_rows=lp.rows)
            lp, kept, more = read_layers(run, needs, files=kept, **opts)
            notes = notes + more
        return lp, kept, notes

    def _layer_extent(self) -> tuple[tuple[int, int] | None, int | None, bool]:
        """First and last step and row count of the layers table (they set the windows
        of the pass), and whether they are exact: one rank with no resume, from the first
        and last segment's footers (a guess Context._read checks), else from every
        segment's footer (polars, ~0.1 ms per segment)."""
        run = self._shared.run
        if run.facts.layer_steps is not None:
            return run.facts.layer_steps, run.facts.layer_rows, True
        if run.layers is None:
            return None, 0, True
        if not run.merged and not run.cuts.get(fmt.LAYERS_DIR):
            guess = footer_extent(run.segment_files(fmt.LAYERS_DIR))
            if guess is not None:
                return guess[0], guess[1], False
        try:
            df, _, _ = collect_tolerant(
                run,
                fmt.LAYERS_DIR,
                lambda lf: lf.select(
                    pl.col("step").min().alias("a"), pl.col("step").max().alias("b"), pl.len()
                ),
            )
        except RunLoadError:
            return None, None, True  # the pass finds out what is wrong, and says it
        a, b, n = df.row(0)
        return ((int(a), int(b)) if a is not None and b is not None else None), int(n), True

    def _keep(self, lp: LayerPass, stats: list[LayerStat], probes: list[NonFiniteRows]) -> None:
        sh = self._shared
        # "missing" first: _finish of the other statistics of a sampled kind reads it.
        for s in sorted(stats, key=lambda s: s.stat != "missing"):
            sh.matrices.setdefault(s, self._finish(s, lp.matrices.get(s)))
        for pr in probes:
            if lp.nonfinite is not None:
                sh.nonfinite.setdefault(pr, lp.nonfinite)
        sh.memo.setdefault("layer_kinds", lp.kinds)

    def _view(self, run: Run, lp: LayerPass, files: list[Any], notes: list[str]) -> Run:
        weight = lp.layers.get(fmt.KIND_WEIGHT)
        if weight:
            names: tuple[str, ...] | None = weight
        elif fmt.KIND_WEIGHT in lp.kinds:
            names = None  # weight rows the pass did not plan: Run.layer_names reads them
        else:
            names = model_param_names(run.meta)
        facts = dataclasses.replace(run.facts, layer_kinds=lp.kinds, layer_names=names)
        if not notes:
            return dataclasses.replace(run, facts=facts)
        # Segments left out for good: the rest of the analysis reads without them.
        kept = list(files)
        if not kept:
            facts = dataclasses.replace(facts, layer_kinds=(), layer_names=())
        return dataclasses.replace(
            run,
            facts=facts,
            warnings=[*run.warnings, *notes],
            layers=(
                scan_segments(kept, run.rank, fmt.LAYERS_SCHEMA, run.cuts.get(fmt.LAYERS_DIR))
                if kept
                else None
            ),
            _files={**run._files, fmt.LAYERS_DIR: kept},
        )

    def fork(self, signature: str) -> Context:
        """A Context for running ``signature``: the same caches, its own coverage notes."""
        other = copy.copy(self)
        other._signature = signature
        other._parts = []
        return other

    def cached(self, key: Any, compute: Callable[[], T]) -> T:
        """``compute()`` once per analysis under ``key`` (helpers' derived data)."""
        memo = self._shared.memo
        if key not in memo:
            memo.setdefault(key, compute())
        return memo[key]

    @property
    def notes(self) -> list[str]:
        """Warnings found after :meth:`prepare` (e.g. a segment unreadable for a query)."""
        return list(self._shared.notes)

    # -- coverage -----------------------------------------------------------------------
    def begin(self, signature: str) -> None:
        """The engine is about to run ``signature``: later part notes are its."""
        self._signature = signature

    def not_checked_part(self, part: str, reason: str, kind: SkipKind) -> None:
        """A signature ran but could not check ``part`` of its job (see signatures.base)."""
        note = Skipped(self._signature, reason, kind, part)
        if note not in self._parts:
            self._parts.append(note)

    def take_parts(self) -> list[Skipped]:
        """The part notes recorded since the last call (the engine collects them)."""
        out, self._parts = self._parts, []
        return out

    # -- availability ---------------------------------------------------------------------
    def available(self, requirement: str) -> bool:
        """True when a ``requires`` entry is satisfied (see signatures.base)."""
        return any(self._available_one(r.strip()) for r in requirement.split("|"))

    def _available_one(self, req: str) -> bool:
        if req.startswith("layers:"):
            return req.split(":", 1)[1] in self.layer_kinds
        if req.endswith("*"):
            return any(n.startswith(req[:-1]) for n in self.run.scalar_names)
        c = self.curve(req)
        return c is not None and len(c) > 0

    def missing(self, requires: tuple[str, ...]) -> list[str]:
        return [r for r in requires if not self.available(r)]

    # -- scalars ------------------------------------------------------------------------------
    def _all_series(self) -> dict[str, Series]:
        sh = self._shared
        if sh.series is None:
            run = sh.run
            if type(run).scalar is not Run.scalar:  # a Run serving its own series (live)
                found = {n: run.scalar(n) for n in run.scalar_names}
                sh.series = {n: s for n, s in found.items() if s is not None}
            else:
                sh.series = all_series(run.scalars)
        return sh.series

    def scalar(self, name: str) -> Series | None:
        """The series ``name`` (as :meth:`Run.scalar`), read once with all the others."""
        return self._all_series().get(name)

    # -- curves -----------------------------------------------------------------------------
    @property
    def skipped_steps(self) -> np.ndarray:
        """Steps whose optimizer update did not happen (as :attr:`Run.skipped_steps`),
        read once per analysis."""

        return self.cached("skipped_steps", lambda: skipped_steps_of(self.scalar(fmt.STEP_SKIPPED)))

    def curve(self, name: str) -> Curve | None:
        curves = self._shared.curves
        if name not in curves:
            s = self.scalar(name)
            if s is None:
                c = None
            else:
                steps, values = s.steps, s.values
                if name in fmt.SKIP_SENSITIVE and self.skipped_steps.size:
                    # Gradients of a skipped step (inf under an AMP overflow) were never
                    # applied: not part of the run's gradient history.
                    keep = ~np.isin(steps, self.skipped_steps)
                    steps, values = steps[keep], values[keep]
                # A schedule is set, not measured: never smoothed (its "smooth" is the raw).
                schedule = is_schedule(name, self.run.meta)
                smooth = values.copy() if schedule else S.ema_debiased(values, self.smoothing)
                c = Curve(name, steps, values, smooth)
            curves.setdefault(name, c)
        return curves[name]

    def levels(self, name: str) -> Levels | None:
        """Levels of a curve as every report shows them (runlens.levels): raw values for a
        schedule, lowest-is-best for losses, highest for accuracy-like names."""
        cache = self._shared.levels
        if name not in cache:
            c = self.curve(name)
            schedule = is_schedule(name, self.run.meta)
            mode = None if schedule else direction(name)
            cache.setdefault(
                name, None if c is None else c.levels(mode, window=1 if schedule else None)
            )
        return cache[name]

    @property
    def task_metric(self) -> str | None:
        """The validation metric checkpoints are chosen by (``val/wer``, ``val/accuracy``...;
        see runlens.metrics.task_metric), or None."""
        return self.cached("task_metric", lambda: task_metric(self.run.scalar_names))

    @property
    def x_unit(self) -> str:
        """What the step axis counts: ``step``, or ``epoch`` for logs indexed by epoch."""
        return self.run.x_axis

    @property
    def train_loss(self) -> Curve | None:
        return self.curve(fmt.TRAIN_LOSS)

    @property
    def val_loss(self) -> Curve | None:
        return self.curve(fmt.VAL_LOSS)

    @property
    def lr(self) -> Curve | None:
        """Learning rate of param group 0 (or ``lr`` when imported from other loggers)."""
        return self.cached("lr", lambda: self.curve(fmt.lr_name(0)) or self.curve("lr"))

    @property
    def steps(self) -> tuple[int, int] | None:
        """First and last step of the run, over the training loss or any scalar."""
        return self.cached("steps", self._steps)

    def _steps(self) -> tuple[int, int] | None:
        c = self.train_loss
        if c is not None and len(c):
            return int(c.steps[0]), int(c.steps[-1])
        for name in self.run.scalar_names:
            s = self.scalar(name)
            if s is not None and len(s):
                return int(s.steps[0]), int(s.steps[-1])
        return None

    @property
    def transient_end(self) -> int:
        """Last step of early-training transients: the LR warm-up if there is one, and at
        least the first 5% of the run (and 10 steps; on an epoch axis the first epoch
        only), at most half the run. Signatures about sustained behaviour ignore steps up
        to here."""
        return self.cached("transient_end", self._transient_end)

    def _transient_end(self) -> int:
        if self.steps is None:
            return 0
        first, last = self.steps
        # Each point of an epoch-indexed log averages a whole epoch: the optimizer's early
        # transient lies inside the first one, and 10 "steps" would be 10 epochs.
        epoch = self.x_unit == "epoch"
        end = first if epoch else first + max(10, int(0.05 * (last - first)))
        lr = self.lr
        if lr is not None and len(lr) > 2 and np.isfinite(lr.raw).any():
            peak = float(np.nanmax(lr.raw))
            if peak > 0 and lr.raw[0] < 0.5 * peak:  # rising start: warm-up
                i = int(np.argmax(lr.raw >= 0.95 * peak))
                end = max(end, int(lr.steps[i]))
        # An LR still rising past mid-run is not a warm-up to wait out (ExponentialLR with
        # gamma > 1, an LR sweep): what it does to the loss is the run itself.
        return min(end, max(first + (last - first) // 2, first + 10), last)

    # -- layers -------------------------------------------------------------------------
    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """Kinds of layers rows in the run (read by the pass, else once here)."""
        known = self._shared.run.facts.layer_kinds
        if known is not None:
            return known
        return self.cached("layer_kinds", lambda: self.run.layer_kinds)

    @property
    def has_layers(self) -> bool:
        return bool(self.layer_kinds)

    def layer(self, kind: str, stat: str, reduce: Reduce = "median") -> LayerMatrix | None:
        """The step × layer matrix of ``stat`` of ``kind`` rows at the analysis'
        resolution (runlens.layerscan; exact for runs within it). Declared statistics
        were read by :meth:`prepare`; any other is read now, once."""
        need = LayerStat(kind, stat, reduce)
        mats = self._shared.matrices
        if need not in mats:
            run = self.run
            if run.layers is None or kind not in self.layer_kinds:
                mats.setdefault(need, None)
            else:
                if stat not in self.cached("layer_columns", lambda: layer_columns(run.layers)):
                    raise RunLoadError(f"{run.path}: layers have no statistic {stat!r}")
                lp, _, notes = self._read([need])
                self._shared.notes.extend(notes)
                mats.setdefault(need, self._finish(need, lp.matrices.get(need)))
        return mats[need]

    def _finish(self, need: LayerStat, m: LayerMatrix | None) -> LayerMatrix | None:
        """A matrix as signatures see it. Parameter kinds of a run whose collector samples
        them (run.json ``collector.memory``: frozen parameters between full steps, the
        update's rotating subsets) hold each layer's last sampled value where a row was
        not written: not sampled is not missing (a recorded missing row stays NaN).
        Gradient and update rows of skipped steps (an AMP overflow the optimizer never
        applied) are dropped."""
        if m is None:
            return None
        run = self.run
        if need.kind in SAMPLED_KINDS and need.stat != "missing" and run.samples_params:
            written = self.layer(need.kind, "missing", need.reduce)
            if (
                written is not None
                and written.values.shape == m.values.shape
                and np.array_equal(written.steps, m.steps)
            ):
                m = dataclasses.replace(m, values=_hold_last(m.values, np.isfinite(written.values)))
        skipped = self.skipped_steps
        if need.kind in (fmt.KIND_GRAD, fmt.KIND_UPDATE) and skipped.size:
            keep = ~np.isin(m.steps, skipped)
            if not keep.all():
                m = dataclasses.replace(m, steps=m.steps[keep], values=m.values[keep])
        return m

    def nonfinite_rows(self, need: NonFiniteRows = NONFINITE_ROWS) -> pl.DataFrame:
        """``step, layer, kind`` of the first layers rows with a non-finite statistic
        (runlens.needs.NonFiniteRows), by step."""
        rows = self._shared.nonfinite
        if need not in rows:
            if self.run.layers is None:
                rows.setdefault(need, pl.DataFrame(schema=NONFINITE_SCHEMA))
            else:
                lp, _, notes = self._read([need])
                self._shared.notes.extend(notes)
                assert lp.nonfinite is not None
                rows.setdefault(need, lp.nonfinite)
        return rows[need]

    def query(self, table: str, build: Callable[[pl.LazyFrame], pl.LazyFrame]) -> pl.DataFrame:
        """A query of one's own on the run's table (as :meth:`Run.query`); a segment found
        unreadable is left out and reported in :attr:`notes`."""
        df, _, notes = collect_tolerant(self.run, table, build)
        self._shared.notes.extend(notes)
        return df

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Parameter names in model order (Run.layer_names, known after the pass)."""
        return self.cached("layer_names", lambda: self.run.layer_names)

    def module_type(self, layer: str) -> str:
        """Class name of the module at path ``layer`` (or owning parameter ``layer``)."""
        types = self.cached("module_types", lambda: self.run.module_types)
        if layer in types:
            return types[layer]
        return types.get(layer.rsplit(".", 1)[0], "") if "." in layer else types.get("", "")

    # -- model facts --------------------------------------------------------------------
    @property
    def task(self) -> TaskInfo:
        """What the model is trained to do, from what was stated (see runlens.task)."""
        return self.cached(
            "task", lambda: resolve_task(self.run.meta, self.run.config, self._stated_task)
        )

    @property
    def num_classes(self) -> int | None:
        """Classes of a single-label classification (None for other or unknown tasks)."""
        t = self.task
        return t.num_classes if t.type == "classification" else None


def _hold_last(values: np.ndarray, written: np.ndarray) -> np.ndarray:
    """``values`` with each cell not ``written`` holding its column's last written value
    (NaN before the first)."""
    if written.all():
        return values
    last = np.where(written, np.arange(values.shape[0])[:, None], -1)
    last = np.maximum.accumulate(last, axis=0)
    out = values[np.maximum(last, 0), np.arange(values.shape[1])]
    out[last < 0] = np.nan
    return out
