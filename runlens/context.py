"""What a signature sees: the run plus derived series, computed once and cached."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from runlens_collect import format as fmt

from runlens import levels as L
from runlens import series as S
from runlens.findings import SkipKind, Skipped
from runlens.levels import Levels
from runlens.metrics import Mode, direction, is_schedule, task_metric
from runlens.run import LayerMatrix, Run
from runlens.task import TaskInfo, resolve_task


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


class Context:
    """Derived data for signatures; every property is computed on first use and cached."""

    def __init__(
        self,
        run: Run,
        smoothing: float = S.DEFAULT_SMOOTHING,
        task: TaskInfo | None = None,
        final: bool = True,
    ) -> None:
        self.run = run
        self.final = final
        """True when the data is the whole run: its last step is the end of the run
        (post-hoc analysis, a run that ended). False while more steps may come (the live
        passes of ``runlens watch``): a signature that judges *the end of the run* (a late
        level, a last quarter, a rise since the best) must not take the end of the data
        for it; it asks for the confirmation its docstring states, or defers to the
        final analysis."""
        self.smoothing = smoothing
        self._stated_task = task
        self._curves: dict[str, Curve | None] = {}
        self._signature = ""
        self._parts: list[Skipped] = []
        self._levels: dict[str, Levels | None] = {}

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
            return self.run.has_layers(req.split(":", 1)[1])
        if req.endswith("*"):
            return any(n.startswith(req[:-1]) for n in self.run.scalar_names)
        c = self.curve(req)
        return c is not None and len(c) > 0

    def missing(self, requires: tuple[str, ...]) -> list[str]:
        return [r for r in requires if not self.available(r)]

    # -- curves -----------------------------------------------------------------------------
    def curve(self, name: str) -> Curve | None:
        if name not in self._curves:
            s = self.run.scalar(name)
            if s is None:
                self._curves[name] = None
            else:
                steps, values = s.steps, s.values
                if name in fmt.SKIP_SENSITIVE and self.run.skipped_steps.size:
                    # Gradients of a skipped step (inf under an AMP overflow) were never
                    # applied: not part of the run's gradient history.
                    keep = ~np.isin(steps, self.run.skipped_steps)
                    steps, values = steps[keep], values[keep]
                # A schedule is set, not measured: never smoothed (its "smooth" is the raw).
                schedule = is_schedule(name, self.run.meta)
                smooth = values.copy() if schedule else S.ema_debiased(values, self.smoothing)
                self._curves[name] = Curve(name, steps, values, smooth)
        return self._curves[name]

    def levels(self, name: str) -> Levels | None:
        """Levels of a curve as every report shows them (runlens.levels): raw values for a
        schedule, lowest-is-best for losses, highest for accuracy-like names."""
        if name not in self._levels:
            c = self.curve(name)
            schedule = is_schedule(name, self.run.meta)
            mode = None if schedule else direction(name)
            self._levels[name] = (
                None if c is None else c.levels(mode, window=1 if schedule else None)
            )
        return self._levels[name]

    @cached_property
    def task_metric(self) -> str | None:
        """The validation metric checkpoints are chosen by (``val/wer``, ``val/accuracy``...;
        see runlens.metrics.task_metric), or None."""
        return task_metric(self.run.scalar_names)

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

    @cached_property
    def lr(self) -> Curve | None:
        """Learning rate of param group 0 (or ``lr`` when imported from other loggers)."""
        return self.curve(fmt.lr_name(0)) or self.curve("lr")

    @cached_property
    def steps(self) -> tuple[int, int] | None:
        """First and last step of the run, over the training loss or any scalar."""
        c = self.train_loss
        if c is not None and len(c):
            return int(c.steps[0]), int(c.steps[-1])
        for name in self.run.scalar_names:
            s = self.run.scalar(name)
            if s is not None and len(s):
                return int(s.steps[0]), int(s.steps[-1])
        return None

    @cached_property
    def transient_end(self) -> int:
        """Last step of early-training transients: the LR warm-up if there is one, and at
        least the first 5% of the run (and 10 steps; on an epoch axis the first epoch
        only), at most half the run. Signatures about sustained behaviour ignore steps up
        to here."""
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
    def layer(self, kind: str, stat: str) -> LayerMatrix | None:
        """A step × layer matrix; gradient and update rows of skipped steps (an AMP
        overflow the optimizer never applied) are dropped."""
        m = self.run.layer_matrix(kind, stat)
        skipped = self.run.skipped_steps
        if m is None or kind not in (fmt.KIND_GRAD, fmt.KIND_UPDATE) or not skipped.size:
            return m
        keep = ~np.isin(m.steps, skipped)
        if keep.all():
            return m
        return LayerMatrix(m.kind, m.stat, m.steps[keep], m.layers, m.values[keep])

    def module_type(self, layer: str) -> str:
        """Class name of the module at path ``layer`` (or owning parameter ``layer``)."""
        types = self.run.module_types
        if layer in types:
            return types[layer]
        return types.get(layer.rsplit(".", 1)[0], "") if "." in layer else types.get("", "")

    # -- model facts --------------------------------------------------------------------
    @cached_property
    def task(self) -> TaskInfo:
        """What the model is trained to do, from what was stated (see runlens.task)."""
        return resolve_task(self.run.meta, self.run.config, self._stated_task)

    @property
    def num_classes(self) -> int | None:
        """Classes of a single-label classification (None for other or unknown tasks)."""
        t = self.task
        return t.num_classes if t.type == "classification" else None
