"""The overhead budget: the collector keeps its own time within a share of the step time.

The collector times itself on the training thread (its hooks and ``step()``) with an
injectable clock and charges each interval to what it was doing:

* ``param`` — weight/gradient/update statistics on stat steps (their histograms on
  histogram steps, frozen parameters on full steps);
* ``act`` — activation and model-output statistics on activation steps;
* ``base`` — everything recorded every step whatever the cadence (loss, learning rates,
  the total gradient norm, timings, packing and queueing the step).

From these it keeps a running estimate (exponential moving average, ``EMA``) of the cost
of each *optional* thing — a stat step, an activation step, the histograms on either, a
full step — and of the step time without the collector. Right after ``WARMUP_STEPS`` and
then every ``DECIDE_EVERY`` steps it picks, for each of the four cadences, a power-of-two
multiple of its knob (``every``, ``activation_every``, ``hist_every``, ``frozen_every``; at most
``MAX_SCALE``) such that

    base + param/every' + act/activation_every' + histograms/... + full/...
        <= HEADROOM * overhead * (step time without the collector)

thinning first what matters least to the analysis (histograms, then frozen weights and
activations, then the per-layer statistics); it goes back to denser cadences only when
they fit with room to spare (``DENSER_AT``), so the cadence does not flap. Loss, learning
rates, grad_norm and timings are never thinned: when they alone exceed the budget every
optional cadence sits at ``MAX_SCALE``.

What is not measured: the device time of the statistics' kernels on CUDA (the host clock
sees their launch, not their run; on CPU they are the same) and the writer thread's
share of a shared CPU. ``HEADROOM`` leaves room for both.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from runlens_collect import format as fmt
from runlens_collect.config import CollectorConfig
from runlens_collect.step import StepFlags

Clock = Callable[[], float]

MAX_SCALE = 64
"""The most an optional cadence is thinned (64 x its knob): beyond, the analysis would
have too few points to work with; the overhead may then exceed the budget (the ``base``
cost alone can, on tiny models), which the ``cadence`` events and run.json show."""
WARMUP_STEPS = 3
"""Steps at the knobs' cadences before the first decision (step 0, whose first-time
allocations are not what a step costs, and then the steps whose costs are measured). Kept
short: on a fast step every step at the knobs' cadences costs many times the budget, and
a too-thin first guess is corrected by the next decisions."""
DECIDE_EVERY = 8
"""Steps between decisions after the first."""
EMA = 0.25
"""Weight of a new measurement in the running cost estimates."""
HEADROOM = 0.8
"""Share of the overhead budget the estimate may fill (unmeasured costs, noise)."""
DENSER_AT = 0.7
"""A denser cadence is adopted only when its estimate fills at most this share of the
room (hysteresis)."""
CATEGORIES = ("hist", "full", "act", "param")
"""Optional work, in the order it is thinned first when savings are equal."""
_WEIGHT = {"hist": 4.0, "full": 2.0, "act": 2.0, "param": 1.0}
"""How much a saving counts when choosing what to thin: histograms cheapest to lose."""
PRIOR = {"hist": 2.0, "full": 1.0}
"""Costs not measured yet, relative to the statistics they come with (see _costs)."""


@dataclass(frozen=True)
class Cadence:
    """The cadences in effect: record on steps where ``step % N == 0``."""

    every: int
    activation_every: int
    hist_every: int
    full_every: int  # in steps (a multiple of ``every``)

    def as_json(self) -> dict[str, int]:
        return {
            "every": self.every,
            "activation_every": self.activation_every,
            "hist_every": self.hist_every,
            "frozen_every": self.full_every,
        }


class _Avg:
    """An exponential moving average that starts at its first sample."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float | None = None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + EMA * (x - self.value)

    def get(self, default: float = 0.0) -> float:
        return default if self.value is None else self.value


class OverheadController:
    """Decides each step's flags; adapts the cadences to the ``overhead`` budget.

    ``charge(category, seconds)`` during a step, ``end_step(step, flags, step_seconds)``
    after it; ``flags_for(step)`` gives the next step's flags. With ``overhead=None`` the
    cadences are the knobs', fixed (``StepFlags.for_step``).
    """

    def __init__(self, settings: CollectorConfig, kinds: set[str], clock: Clock | None = None):
        self.settings = settings
        self.kinds = kinds
        self.clock: Clock = clock or time.perf_counter
        self.target = settings.overhead
        self.scale = dict.fromkeys(CATEGORIES, 1)
        self.cadence = self._cadence(self.scale)
        self.changes: list[tuple[int, Cadence]] = [(0, self.cadence)]
        self._acc = dict.fromkeys(("param", "act", "base"), 0.0)
        self._cost = {k: _Avg() for k in ("param", "act", "hist_param", "hist_act", "full")}
        self._base = _Avg()
        self._bare = _Avg()  # step time without the collector
        self._steps = 0
        self.own_total = 0.0  # seconds on the training thread, all steps
        self.step_total = 0.0  # seconds of the timed steps (between step() calls)
        self.own_timed = 0.0  # own seconds within the timed steps

    # -- measuring (training thread) -----------------------------------------------------

    def charge(self, category: str, seconds: float) -> None:
        """Add ``seconds`` of collector time on the training thread to ``category``
        (``param``, ``act`` or ``base``)."""
        self._acc[category] += seconds

    def end_step(self, step: int, flags: StepFlags, step_seconds: float | None) -> Cadence | None:
        """Account the step just ended; the new cadence when it changed (else None).
        ``step_seconds``: time since the previous step() (None for the first step)."""
        acc = self._acc
        param, act, base = acc["param"], acc["act"], acc["base"]
        acc["param"] = acc["act"] = acc["base"] = 0.0
        own = param + act + base
        self.own_total += own
        self._steps += 1
        if step_seconds is not None and step_seconds > 0:
            self.step_total += step_seconds
            self.own_timed += own
            if step > 0:
                self._bare.add(max(0.0, step_seconds - own))
        if step == 0:
            return None  # first-time allocations: not what a step costs
        if not flags.stat:
            base += param  # the off-step grad_norm
        if not (flags.out or flags.act):
            base += act  # disarming the activation hooks after an activation step
        self._base.add(base)
        self._attribute(flags, param, act)
        if self.target is None or self._steps <= WARMUP_STEPS:
            return None
        if self._steps > WARMUP_STEPS + 1 and step % DECIDE_EVERY:
            return None  # the first decision right after the warm-up, then every DECIDE_EVERY
        return self._decide(step)

    def _attribute(self, flags: StepFlags, param: float, act: float) -> None:
        """Update the cost estimates: a stat step's extra over a plain one is its
        histograms' and/or the frozen parameters' (one of them known: the other gets the
        rest); an activation step's extra on a histogram step is its histograms'."""
        c = self._cost
        if flags.stat:
            if not flags.hist and not flags.full:
                c["param"].add(param)
            elif c["param"].value is not None:
                extra = max(0.0, param - c["param"].get())
                if not flags.full:
                    c["hist_param"].add(extra)
                elif not flags.hist:
                    c["full"].add(extra)
                elif c["full"].value is not None:
                    c["hist_param"].add(max(0.0, extra - c["full"].get()))
                elif c["hist_param"].value is not None:
                    c["full"].add(max(0.0, extra - c["hist_param"].get()))
        if flags.out or flags.act:
            if not flags.hist:
                c["act"].add(act)
            elif c["act"].value is not None:
                c["hist_act"].add(max(0.0, act - c["act"].get()))

    # -- deciding ------------------------------------------------------------------------

    def room(self) -> float:
        """Seconds per step the optional statistics may take."""
        assert self.target is not None
        return HEADROOM * self.target * self._bare.get() - self._base.get()

    def estimate(self, scale: dict[str, int]) -> float:
        """Seconds per step of the optional statistics at these scales."""
        cad = self._cadence(scale)
        c = self._costs()
        kinds = self.kinds
        param_on = bool(kinds & {fmt.KIND_WEIGHT, fmt.KIND_GRAD, fmt.KIND_UPDATE})
        act_on = bool(kinds & {fmt.KIND_ACTIVATION, fmt.KIND_OUTPUT})
        est = 0.0
        if param_on:
            est += c["param"] / cad.every
            est += c["hist_param"] / math.lcm(cad.every, cad.hist_every)
            est += c["full"] / cad.full_every
        if act_on:
            est += c["act"] / cad.activation_every
            est += c["hist_act"] / math.lcm(cad.activation_every, cad.hist_every)
        return est

    def _costs(self) -> dict[str, float]:
        """The cost estimates; what was never measured is guessed from what was
        (``PRIOR``: histograms of a kind cost about twice its statistics, frozen
        parameters about as much as the trainable ones)."""
        c = {k: v.value for k, v in self._cost.items()}
        param, act = c["param"] or 0.0, c["act"] or 0.0
        guess = {
            "hist_param": PRIOR["hist"] * param,
            "hist_act": PRIOR["hist"] * act,
            "full": PRIOR["full"] * param,
        }
        return {k: (guess.get(k, 0.0) if v is None else v) for k, v in c.items()}

    def choose(self) -> dict[str, int]:
        """The densest scales (greedy from the knobs) whose estimate fits the room; all
        at MAX_SCALE when the always-recorded scalars alone fill it."""
        room = self.room()
        if room <= 0:
            return dict.fromkeys(CATEGORIES, MAX_SCALE)
        scale = dict.fromkeys(CATEGORIES, 1)
        est = self.estimate(scale)
        while est > room:
            best, best_gain = None, 0.0
            for cat in CATEGORIES:
                if scale[cat] >= MAX_SCALE:
                    continue
                trial = {**scale, cat: scale[cat] * 2}
                gain = (est - self.estimate(trial)) * _WEIGHT[cat]
                if gain > best_gain:
                    best, best_gain = cat, gain
            if best is None:
                break  # nothing left to thin: the base cost alone is over the budget
            scale[best] *= 2
            est = self.estimate(scale)
        # Then as dense as the room allows, most useful first (greedy steps can overshoot).
        for cat in reversed(CATEGORIES):
            while scale[cat] > 1:
                trial = {**scale, cat: scale[cat] // 2}
                if self.estimate(trial) > room:
                    break
                scale = trial
        return scale

    def _decide(self, step: int) -> Cadence | None:
        room = self.room()
        new = self.choose()
        if new == self.scale:
            return None
        if self.estimate(self.scale) <= room:
            # The cadence fits: change only to a denser one that fits with room to spare.
            denser = all(new[c] <= self.scale[c] for c in CATEGORIES)
            if not denser or self.estimate(new) > DENSER_AT * room:
                return None
        self.scale = new
        self.cadence = self._cadence(new)
        self.changes.append((step + 1, self.cadence))
        return self.cadence

    def _cadence(self, scale: dict[str, int]) -> Cadence:
        s = self.settings
        every = s.every * scale["param"]
        act = s.activation_every * scale["act"]
        hist = s.hist_every * scale["hist"]
        full = every * max(1, math.ceil(s.frozen_every * scale["full"]))
        return Cadence(every, act, hist, full)

    def flags_for(self, step: int) -> StepFlags:
        """What step ``step`` records at the cadence in effect."""
        c = self.cadence
        stat = step % c.every == 0
        out = step % c.activation_every == 0
        return StepFlags.make(
            stat,
            out,
            out and fmt.KIND_ACTIVATION in self.kinds,
            step % c.hist_every == 0,
            stat and step % c.full_every == 0,
        )

    # -- the record ----------------------------------------------------------------------

    def summary(self) -> dict[str, object]:
        """run.json ``collector.sampling`` (see format.COLLECTOR_SAMPLING_KEYS)."""
        cads = [c for _, c in self.changes]

        def span(attr: str) -> list[int]:
            vals = [getattr(c, attr) for c in cads]
            return [min(vals), max(vals)]

        bare = self.step_total - self.own_timed
        return {
            "overhead_target": self.target,
            "adaptive": self.target is not None,
            "changes": len(self.changes) - 1,
            "every": span("every"),
            "activation_every": span("activation_every"),
            "hist_every": span("hist_every"),
            "frozen_every": span("full_every"),
            "last": {"step": self.changes[-1][0], **self.cadence.as_json()},
            "measured_overhead": (self.own_timed / bare) if bare > 0 else None,
        }
