"""The overhead budget, with a fake clock: the collector thins what it records until its own
time fits the budget (histograms first, the per-layer statistics last), never thins loss,
learning rate, grad_norm and timings, goes back to denser cadences when they fit with
room to spare, and says what it did (cadence events, run.json, the report header)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from runlens_collect import Collector
from runlens_collect import format as fmt
from runlens_collect import overhead as oh
from runlens_collect.config import CollectorConfig
from runlens_collect.step import StepFlags
from torch import nn

import runlens

KINDS = set(fmt.KINDS)


def _feed(ctl: oh.OverheadController, steps: range, work: float, costs: dict[str, float]):
    """Steps of ``work`` seconds of training plus what ``costs`` says the collector spends:
    base every step, param on stat steps (+hist on histogram steps, +full on full steps),
    act on activation steps (+hist_act). Returns the cadence changes."""
    changes = []
    for step in steps:
        flags = ctl.flags_for(step)
        own = costs.get("base", 0.0)
        if flags.stat:
            own += costs["param"] + (costs.get("hist", 0.0) if flags.hist else 0.0)
            own += costs.get("full", 0.0) if flags.full else 0.0
            ctl.charge("param", own - costs.get("base", 0.0))
        if flags.act:
            a = costs["act"] + (costs.get("hist_act", 0.0) if flags.hist else 0.0)
            own += a
            ctl.charge("act", a)
        ctl.charge("base", costs.get("base", 0.0))
        new = ctl.end_step(step, flags, work + own)
        if new is not None:
            changes.append((step + 1, new))
    return changes


def _ctl(**knobs) -> oh.OverheadController:
    return oh.OverheadController(CollectorConfig(**{"overhead": 0.03, **knobs}), KINDS)


def test_costs_within_the_budget_keep_the_knobs_cadence() -> None:
    ctl = _ctl()
    # 10 ms steps, room ~ 0.8 * 3% * 10 ms = 240 us a step; stats 50 us every step,
    # activations 0.5 ms every 10, histograms 1 ms + 1 ms every 50: 160 us a step in all.
    costs = {"base": 20e-6, "param": 50e-6, "act": 5e-4, "hist": 1e-3, "hist_act": 1e-3}
    assert _feed(ctl, range(400), 0.010, costs) == []
    assert ctl.cadence == oh.Cadence(1, 10, 50, 100)
    assert ctl.summary()["changes"] == 0


def test_expensive_statistics_are_thinned_histograms_first() -> None:
    ctl = _ctl()
    # 10 ms steps, room ~ 0.8 * 3% * 10 ms = 240 us a step. Histograms 40 ms each (0.8 ms a
    # step at every 50), activations 1 ms every 10 (100 us), stats 100 us every step.
    costs = {"base": 20e-6, "param": 100e-6, "act": 1e-3, "hist": 40e-3, "hist_act": 0.0}
    changes = _feed(ctl, range(2000), 0.010, costs)
    assert changes, "the cadence never adapted"
    final = ctl.cadence
    assert final.hist_every > 50  # what costs most per step goes first
    assert final.every <= 2  # per-layer statistics last: ~100 us fits
    assert ctl.estimate(ctl.scale) <= ctl.room()
    # the densest cadence that fits: halving any thinned one would not
    for cat in oh.CATEGORIES:
        if ctl.scale[cat] > 1:
            denser = {**ctl.scale, cat: ctl.scale[cat] // 2}
            assert ctl.estimate(denser) > ctl.room(), cat


def test_base_cost_over_the_budget_thins_everything_to_the_cap() -> None:
    ctl = _ctl()
    costs = {"base": 1e-3, "param": 100e-6, "act": 1e-3, "hist": 1e-3, "hist_act": 1e-3}
    _feed(ctl, range(800), 0.010, costs)  # base alone: 10% of the step
    assert ctl.scale == dict.fromkeys(oh.CATEGORIES, oh.MAX_SCALE)
    s = CollectorConfig()
    assert ctl.cadence == oh.Cadence(
        s.every * oh.MAX_SCALE,
        s.activation_every * oh.MAX_SCALE,
        s.hist_every * oh.MAX_SCALE,
        s.every * oh.MAX_SCALE * s.frozen_every * oh.MAX_SCALE,
    )


def test_cheaper_steps_bring_the_cadence_back_without_flapping() -> None:
    ctl = _ctl()
    heavy = {"base": 20e-6, "param": 2e-3, "act": 5e-3, "hist": 20e-3, "hist_act": 20e-3}
    _feed(ctl, range(1000), 0.010, heavy)
    thinned = dict(ctl.scale)
    assert thinned["param"] > 1
    light = {"base": 20e-6, "param": 20e-6, "act": 100e-6, "hist": 100e-6, "hist_act": 100e-6}
    changes = _feed(ctl, range(1000, 6000), 0.010, light)
    assert ctl.scale == dict.fromkeys(oh.CATEGORIES, 1)
    assert 0 < len(changes) <= 8  # densified in a few steps, then stays
    _assert_stable(ctl, light)


def _assert_stable(ctl: oh.OverheadController, costs: dict[str, float]) -> None:
    assert _feed(ctl, range(6000, 7000), 0.010, costs) == []


def test_no_decision_during_warm_up_and_fixed_cadence_without_a_budget() -> None:
    ctl = _ctl()
    heavy = {"base": 5e-3, "param": 5e-3, "act": 5e-3}
    assert _feed(ctl, range(oh.WARMUP_STEPS), 0.010, heavy) == []
    fixed = oh.OverheadController(CollectorConfig(overhead=None, every=3), KINDS)
    assert _feed(fixed, range(500), 0.010, heavy) == []
    s = CollectorConfig(every=3)
    for step in range(300):
        assert fixed.flags_for(step) == StepFlags.for_step(step, s, KINDS)


class FakeClock:
    """Each reading advances the clock by ``tick`` (the collector's own work between two
    readings); the training loop advances it by the step's work."""

    def __init__(self, tick: float) -> None:
        self.t = 0.0
        self.tick = tick

    def __call__(self) -> float:
        self.t += self.tick
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def _record(run_dir: Path, tick: float, work: float, steps: int = 400) -> Collector:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    clock = FakeClock(tick)
    g = torch.Generator().manual_seed(1)
    with Collector(model, opt, run_dir=run_dir, clock=clock, overhead=0.03) as col:
        for _ in range(steps):
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
            clock.advance(work)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
    assert col.warnings == []
    return col


def _table(run_dir: Path, table: str) -> list[dict]:
    files = sorted((run_dir / table).glob(fmt.SEGMENT_GLOB))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


def test_collector_thins_to_its_budget_with_a_fake_clock(tmp_path: Path) -> None:
    """Every reading of the clock inside the collector costs 1 ms against 20 ms of
    training per step: far over 3%. The cadence thins to the cap; the scalars that are
    always recorded still are, every step; layer rows follow the cadence events."""
    steps = 400
    _record(tmp_path, tick=1e-3, work=20e-3, steps=steps)
    events = [json.loads(x) for x in (tmp_path / fmt.EVENTS_JSONL).read_text().splitlines()]
    cadence = [e for e in events if e["kind"] == "cadence"]
    assert cadence and cadence[0]["step"] == oh.WARMUP_STEPS + 1
    meta = json.loads((tmp_path / fmt.RUN_JSON).read_text())
    sampling = meta["collector"]["sampling"]
    assert sampling["adaptive"] and sampling["changes"] == len(cadence)
    assert sampling["every"] == [1, cadence[-1]["every"]] and cadence[-1]["every"] > 8
    assert sampling["measured_overhead"] > 0.03  # the base cost alone is over the budget
    scalars = _table(tmp_path, fmt.SCALARS_DIR)
    for name in (fmt.TRAIN_LOSS, "lr/0", fmt.GRAD_NORM):
        assert sorted(r["step"] for r in scalars if r["name"] == name) == list(range(steps))
    assert sorted(r["step"] for r in scalars if r["name"] == fmt.TIME_STEP) == list(range(1, steps))
    # layer rows exactly on the steps the cadence in effect says
    starts = [(0, 1)] + [(e["step"], e["every"]) for e in cadence]
    want = set()
    for (a, every), (b, _) in zip(starts, [*starts[1:], (steps, 0)], strict=True):
        want |= {s for s in range(a, b) if s % every == 0}
    got = {r["step"] for r in _table(tmp_path, fmt.LAYERS_DIR) if r["kind"] == "grad"}
    assert got == want
    text = runlens.analyze(tmp_path).summary.extras["layer sampling"]
    assert f"adapted {len(cadence)}×" in text and "within 3% of the step" in text


def test_collector_within_its_budget_keeps_the_knobs(tmp_path: Path) -> None:
    """1 us per clock reading against 100 ms of training: nothing to thin."""
    _record(tmp_path, tick=1e-6, work=0.1, steps=200)
    meta = json.loads((tmp_path / fmt.RUN_JSON).read_text())
    assert meta["collector"]["sampling"]["changes"] == 0
    steps = {r["step"] for r in _table(tmp_path, fmt.LAYERS_DIR) if r["kind"] == "grad"}
    assert steps == set(range(200))
    acts = {r["step"] for r in _table(tmp_path, fmt.LAYERS_DIR) if r["kind"] == "activation"}
    assert acts == set(range(0, 200, 10))


def test_probe_hooks_are_charged_to_the_budget() -> None:
    """A probe's hook time counts as the collector's own (``base``: probes record every
    step), read on the collector's clock."""
    from runlens_collect.probes import InputProbe

    probe = InputProbe()
    readings = iter([1.0, 1.25])
    charged: list[tuple[str, float]] = []
    probe.timed(lambda: next(readings), lambda cat, s: charged.append((cat, s)))
    model = nn.Linear(6, 3)
    handles = probe.attach(model, None)
    model(torch.randn(4, 6))
    for h in handles:
        h.remove()
    assert charged == [("base", 0.25)]
