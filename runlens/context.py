"""What a signature sees: the run plus derived series, computed once and cached."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from runlens_collect import format as fmt

from runlens import series as S
from runlens.findings import SkipKind, Skipped
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

    def level(self, window: int) -> tuple[float, tuple[int, float]] | None:
        """(final, (step, best)) of the trailing median of ``window`` finite raw points:
        the level the run ended at and the lowest level it reached. The EMA's last value
        carries a late spike or blow-up for many steps (0.9^n takes 1e7 down to ~1e2 only
        after ~100 steps), and on a falling curve its minimum lags behind the raw values;
        a median over the same window does neither, and final >= best by construction."""
        med = S.trailing_median(self.raw, window)
        ok = np.isfinite(med)
        if not ok.any():
            return None
        i = int(np.nanargmin(med))
        return float(med[ok][-1]), (int(self.steps[i]), float(med[i]))

    def best(self, mode: str = "min") -> tuple[int, float] | None:
        """(step, value) of the best smoothed value."""
        vals = np.where(self.finite, self.smooth, np.nan)
        if not np.isfinite(vals).any():
            return None
        i = int(np.nanargmin(vals) if mode == "min" else np.nanargmax(vals))
        return int(self.steps[i]), float(vals[i])

    def between(self, start: int, end: int) -> Curve:
        m = (self.steps >= start) & (self.steps <= end)
        return Curve(self.name, self.steps[m], self.raw[m], self.smooth[m])


class Context:
    """Derived data for signatures; every property is computed on first use and cached."""

    def __init__(
        self, run: Run, smoothing: float = S.DEFAULT_SMOOTHING, task: TaskInfo | None = None
    ) -> None:
        self.run = run
        self.smoothing = smoothing
        self._stated_task = task
        self._curves: dict[str, Curve | None] = {}
        self._signature = ""
        self._parts: list[Skipped] = []

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
            self._curves[name] = (
                None
                if s is None
                else Curve(name, s.steps, s.values, S.ema_debiased(s.values, self.smoothing))
            )
        return self._curves[name]

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
        least the first 5% of the run (and 10 steps), at most half the run. Signatures
        about sustained behaviour ignore steps up to here."""
        if self.steps is None:
            return 0
        first, last = self.steps
        end = first + max(10, int(0.05 * (last - first)))
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
        return self.run.layer_matrix(kind, stat)

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
