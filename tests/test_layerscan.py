"""The one-pass layer reader (runlens.layerscan) on runs recorded with the real Collector.

Exact mode must give, chunk by chunk, the same matrices as one read of the whole table
(which tests/test_run_loader.py checks against the raw rows); window mode must give, per
window and layer, the level defined in layerscan's docstring, checked here against a
reference computed row by row from the Parquet segments with pyarrow. And the layer
signatures must keep their verdicts on the recorded sample runs read at a coarse
resolution, which is what a long run gets.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from runlens_collect import Collector
from runlens_collect import format as fmt

import runlens
from runlens.context import Context
from runlens.layerscan import EXACT, LEVEL_ROWS, MIN_LEVEL_ROWS, Resolution, scan_layers
from runlens.needs import LayerStat
from runlens.run import load_run

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_runs"
STEPS = 60


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLP trained 60 steps, flushed every 7 steps (segments split mid-window), with
    an LR high enough that its last steps blow up (NaN/Inf rows)."""
    run_dir = tmp_path_factory.mktemp("layerscan") / "mlp"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    with Collector(
        model, opt, run_dir=run_dir, flush_steps=7, activation_every=2, compact=False
    ) as col:
        for step in range(STEPS):
            if step == 45:
                for g in opt.param_groups:
                    g["lr"] = 1e6
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
    assert len(list((run_dir / fmt.LAYERS_DIR).glob(fmt.SEGMENT_GLOB))) >= 8
    return run_dir


NEEDS = [
    LayerStat(fmt.KIND_GRAD, "norm"),
    LayerStat(fmt.KIND_GRAD, "norm", "max"),
    LayerStat(fmt.KIND_WEIGHT, "std", "mean"),
    LayerStat(fmt.KIND_UPDATE, "update_ratio"),
    LayerStat(fmt.KIND_ACTIVATION, "frac_dead_units"),
    LayerStat(fmt.KIND_ACTIVATION, "numel"),
]


def _rows(run_dir: Path, kind: str, stat: str) -> list[tuple[int, str, float]]:
    """(step, layer, value) of every row of ``kind``, in the order written."""
    out = []
    for seg in sorted((run_dir / fmt.LAYERS_DIR).glob(fmt.SEGMENT_GLOB)):
        t = pq.read_table(seg).to_pylist()
        for r in t:
            if r["kind"] == kind:
                v = r[stat]
                out.append((r["step"], r["layer"], math.nan if v is None else float(v)))
    return out


def _window_reference(rows: list[tuple[int, str, float]], window: int, origin: int, how: str):
    """Per window of ``window`` steps: (last step, {layer: level}) by the documented
    rule, from the raw rows (the last write of a (step, layer) wins)."""
    last: dict[tuple[int, str], float] = {}
    for step, layer, v in rows:
        last[(step, layer)] = v
    windows: dict[int, dict[str, list[float]]] = {}
    shown: dict[int, int] = {}
    for (step, layer), v in sorted(last.items()):
        w = (step - origin) // window
        windows.setdefault(w, {}).setdefault(layer, []).append(v)
        shown[w] = max(shown.get(w, step), step)
    out = []
    for w in sorted(windows):
        levels = {}
        for layer, vals in windows[w].items():
            a = np.array(vals)
            fin = a[np.isfinite(a)]
            if how == "max":
                levels[layer] = float(fin.max()) if fin.size else float(a[~np.isfinite(a)][-1])
            elif fin.size and 2 * fin.size >= a.size:
                levels[layer] = float(np.median(fin) if how == "median" else fin.mean())
            else:
                levels[layer] = float(a[~np.isfinite(a)][-1])
        out.append((shown[w], levels))
    return out


def test_exact_pass_in_small_chunks_equals_one_read(recorded: Path) -> None:
    run = load_run(recorded)
    whole = scan_layers(run.layers, NEEDS, resolution=EXACT)
    chunked = scan_layers(run.layers, NEEDS, resolution=Resolution(None, None, 37))
    assert whole.kinds == chunked.kinds == ("activation", "grad", "output", "update", "weight")
    for need in NEEDS:
        a, b = whole.matrices[need], chunked.matrices[need]
        assert a is not None and b is not None
        assert a.window == b.window == 1
        np.testing.assert_array_equal(a.steps, b.steps)
        assert a.layers == b.layers
        np.testing.assert_array_equal(a.values, b.values)
        m = run.layer_matrix(need.kind, need.stat)  # every reduction is the exact matrix
        np.testing.assert_array_equal(m.values, a.values)
    assert (~np.isfinite(whole.matrices[NEEDS[0]].values)).any()  # the blow-up is there


@pytest.mark.parametrize("max_rows", [20, 9])
def test_window_levels_match_the_rows(recorded: Path, max_rows: int) -> None:
    run = load_run(recorded)
    res = Resolution(max_rows, None, 53)  # chunks cut windows in two
    lp = scan_layers(run.layers, NEEDS, resolution=res, step_range=(0, STEPS - 1))
    for need in NEEDS:
        m = lp.matrices[need]
        assert m is not None
        assert m.window == math.ceil(STEPS / max_rows)
        assert len(m.steps) <= max_rows
        ref = _window_reference(_rows(recorded, need.kind, need.stat), m.window, 0, need.reduce)
        assert [s for s, _ in ref] == m.steps.tolist()
        for i, (_, levels) in enumerate(ref):
            for layer, v in levels.items():
                got = m.values[i, m.layers.index(layer)]
                assert got == pytest.approx(v, rel=1e-6, nan_ok=True), (need, i, layer)


def test_memory_setting_bounds_rows_and_chunks() -> None:
    small, big = Resolution.for_memory(64), Resolution.for_memory(4096)
    assert small.chunk_rows < big.chunk_rows
    for res in (small, big):
        for layers in (1, 50, 700, 5000):
            rows = res.rows_for(layers)
            assert rows is not None and MIN_LEVEL_ROWS <= rows <= LEVEL_ROWS
            assert rows * layers <= max(res.max_cells or 0, MIN_LEVEL_ROWS * layers)
    assert small.rows_for(700) < big.rows_for(700)
    assert EXACT.rows_for(700) is None


def test_nonfinite_rows_are_the_first_by_step(recorded: Path) -> None:
    run = load_run(recorded)
    ctx = Context(run, resolution=Resolution(None, None, 41))
    rows = ctx.nonfinite_rows()
    df = run.layers.filter(
        ~pl.col("missing") & ((pl.col("frac_nonfinite") > 0) | ~pl.col("norm").is_finite())
    ).collect()
    assert rows.height == df.height > 0
    assert rows["step"].to_list() == sorted(df["step"].to_list())
    assert rows["step"][0] >= 45


LAYER_SAMPLES = [
    "activation-explosion",
    "cannot-overfit-batch",
    "dead-relu",
    "exploding-gradients",
    "frozen-layer",
    "large-updates",
    "loss-divergence",
    "loss-flat",
    "saturated-activations",
    "tiny-updates",
    "vanishing-gradients",
    "healthy-cnn-bn",
    "healthy-transformer",
]


@pytest.mark.parametrize("name", LAYER_SAMPLES)
def test_verdicts_hold_at_a_coarse_resolution(name: str) -> None:
    """A long run is read as window levels; on the recorded samples read at 12 to 60 rows
    (windows of up to ~40 steps), every signature reaches the verdict it reaches at every
    step, with the same severity."""
    run = load_run(SAMPLES / name)
    exact = runlens.analyze(run)
    for rows in (60, 12):
        ctx = Context(run, resolution=Resolution(rows, None, 500))
        coarse = runlens.analyze(ctx)
        m = ctx.layer(fmt.KIND_GRAD, "norm")
        assert m is not None and len(m.steps) <= rows
        assert [(f.signature, f.severity) for f in coarse.findings] == [
            (f.signature, f.severity) for f in exact.findings
        ]


def _sample_runs_with_layers() -> list[str]:
    return sorted(p.name for p in SAMPLES.iterdir() if (p / fmt.LAYERS_DIR).is_dir())


def test_analysis_reads_the_layers_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layers statistic a signature reads is declared in its ``needs``: on each
    recorded sample run, an analysis makes exactly one pass over the layers table (an
    undeclared read costs a second full pass)."""
    import runlens.segments as segments

    passes: list[tuple[LayerStat, ...]] = []
    real = segments.scan_layers

    def counted(lf: pl.LazyFrame, stats: list[LayerStat], **kwargs: object) -> object:
        passes.append(tuple(stats))
        return real(lf, stats, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(segments, "scan_layers", counted)
    names = _sample_runs_with_layers()
    assert len(names) >= 10
    for name in names:
        run = load_run(SAMPLES / name)
        # As recorded, and as an older collector (no parameter sampling) wrote it: a
        # sampled run reads the gradients' missing flags anyway, an unsampled one must
        # have them declared.
        older = dataclasses.replace(
            run, meta={k: v for k, v in run.meta.items() if k != "collector"}
        )
        for view in (run, older):
            passes.clear()
            runlens.analyze(view)
            assert len(passes) == 1, f"{name}: passes {passes[1:]} read undeclared statistics"


def test_block_copies_take_the_same_rows_as_a_gather() -> None:
    """One kind's rows of a chunk are copied in blocks when they come in the collector's
    layout, cut anywhere by the chunk; any other pattern is gathered. Either way the
    values are exactly ``a[rows]``."""
    from runlens.layerscan import _taker

    kinds = np.repeat(np.arange(3), 4)  # per step: 3 kinds × 4 layers
    layout = np.tile(kinds, 50)
    a = np.arange(layout.size, dtype=np.float32) * 1.5
    patterns = []
    for start, stop in ((0, layout.size), (5, 590), (3, 30), (13, 14), (7, 19)):
        chunk = layout[start:stop]
        patterns += [start + np.flatnonzero(chunk == k) for k in range(3)]
    rng = np.random.default_rng(0)
    patterns += [
        np.sort(rng.choice(layout.size, 100, replace=False)),  # no pattern
        np.array([0, 1, 2, 12, 13, 14, 24, 25, 37, 38]),  # blocks of unequal length
        np.array([0, 1, 12, 13, 30, 31, 42, 43]),  # unequal spacing
        np.array([], dtype=np.int64),
    ]
    for rows in patterns:
        got = _taker(rows)(a)
        assert got.dtype == a.dtype and np.array_equal(got, a[rows]), rows
    assert _taker(None)(a) is a


def test_windows_come_from_the_real_extent_when_segments_are_out_of_order(
    recorded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The windows are set from the first and last segment's footers, a guess the pass
    checks: with the first and last segments swapped (their steps no longer grow from
    file to file) the guess is wrong, the pass reads again with the steps it saw, and
    every matrix is the one of the run in order; in order, one pass suffices."""
    import shutil

    import runlens.segments as segments

    swapped = tmp_path / "swapped"
    shutil.copytree(recorded, swapped)
    files = sorted((swapped / fmt.LAYERS_DIR).glob(fmt.SEGMENT_GLOB))
    first, last = files[0], files[-1]
    first.rename(first.with_suffix(".tmp"))
    last.rename(first)
    first.with_suffix(".tmp").rename(last)
    passes = []
    real = segments.scan_layers

    def counted(*args: object, **kwargs: object) -> object:
        passes.append(kwargs.get("step_range"))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(segments, "scan_layers", counted)
    # Windows of 5 steps; one chunk (rows out of step order are levelled per chunk).
    res = Resolution(12, None, 100_000)
    stats = [n for n in NEEDS if n.stat != "numel"]
    ordered = Context(load_run(recorded), resolution=res)
    ordered.prepare(stats)
    assert passes == [(0, STEPS - 1)]
    passes.clear()
    ctx = Context(load_run(swapped), resolution=res)
    ctx.prepare(stats)
    assert len(passes) == 2 and passes[0] != passes[1] == (0, STEPS - 1)
    for need in stats:
        a = ordered.layer(need.kind, need.stat, need.reduce)
        b = ctx.layer(need.kind, need.stat, need.reduce)
        assert a is not None and b is not None and a.window == b.window == 5
        np.testing.assert_array_equal(a.steps, b.steps)
        assert a.layers == b.layers
        # (rows out of order are levelled in float64, in order in float32: rounding)
        np.testing.assert_allclose(a.values, b.values, rtol=1e-6)
    assert len(passes) == 2  # the later reads kept the real extent: no new pass
