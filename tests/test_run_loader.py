"""Loader semantics of ``Run.layer_matrix`` on runs recorded with the real Collector.

Every matrix is checked against a reference built independently, row by row, from the
Parquet segments with pyarrow: cell (step, layer) holds the last row written for it
(segments in file order, rows in file order), steps sorted, layers in first-seen order.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from runlens_collect import Collector
from runlens_collect import format as fmt

from runlens.errors import RunLoadError
from runlens.run import load_run

STEPS = 30
STATS = ("norm", "std", "mean", "absmax", "numel", "missing", "update_ratio")


class Branchy(torch.nn.Module):
    """An MLP whose ``aux`` branch runs on even steps only, so its gradient, update and
    activation rows are absent or missing on odd steps."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(6, 12)
        self.act = torch.nn.ReLU()
        self.aux = torch.nn.Linear(12, 12)
        self.head = torch.nn.Linear(12, 3)
        self.use_aux = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.inp(x))
        if self.use_aux:
            h = h + self.aux(h)
        return self.head(h)


@pytest.fixture(scope="session")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("loader") / "branchy"
    torch.manual_seed(0)
    model = Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    # flush every 7 steps: several segments (kept: no compaction on close), with a step
    # range split across them
    with Collector(
        model, opt, run_dir=run_dir, flush_steps=7, activation_every=3, compact=False
    ) as col:
        for step in range(STEPS):
            model.use_aux = step % 2 == 0
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
    return run_dir


def _segments(run_dir: Path, rank: int = 0) -> list[Path]:
    return sorted((run_dir / fmt.LAYERS_DIR / f"rank={rank}").glob("part-*.parquet"))


def _reference(run_dir: Path, kind: str, stat: str, rank: int = 0):
    """(steps, layers, values) from the raw rows, last write per cell winning."""
    cells: dict[tuple[int, str], float] = {}
    layers: list[str] = []
    for seg in _segments(run_dir, rank):
        t = pq.read_table(seg)
        t = t.filter(pc.equal(t["kind"].cast(pa.string()), kind))
        for step, layer, v in zip(
            t["step"].to_pylist(),
            t["layer"].cast(pa.string()).to_pylist(),
            t[stat].to_pylist(),
            strict=True,
        ):
            if layer not in layers:
                layers.append(layer)
            cells[(step, layer)] = math.nan if v is None else float(v)
    steps = sorted({s for s, _ in cells})
    values = np.full((len(steps), len(layers)), np.nan)
    for (s, lay), v in cells.items():
        values[steps.index(s), layers.index(lay)] = v
    return np.array(steps), tuple(layers), values


def _assert_matches(run_dir: Path, kind: str, stat: str, rank: int = 0) -> np.ndarray:
    m = load_run(run_dir).layer_matrix(kind, stat)
    steps, layers, values = _reference(run_dir, kind, stat, rank)
    assert m is not None
    assert m.layers == layers
    np.testing.assert_array_equal(m.steps, steps)
    np.testing.assert_array_equal(m.values, values)  # NaN == NaN here
    assert m.values.dtype == np.float64
    return m.values


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / run_dir.name
    shutil.copytree(run_dir, dst)
    return dst


def _rewrite(t: pa.Table, path: Path, scale: float) -> None:
    """Write ``t`` as a new segment with every float statistic multiplied by ``scale``."""
    cols = {}
    for name in t.column_names:
        col = t[name]
        if pa.types.is_float32(col.type):
            col = pc.multiply(col, pa.scalar(scale, pa.float32()))
        cols[name] = col
    fmt.write_segment(pa.table(cols, schema=t.schema), path)


def test_every_matrix_matches_the_rows(recorded: Path) -> None:
    assert len(_segments(recorded)) >= 4
    run = load_run(recorded)
    for kind in run.layer_kinds:
        for stat in STATS:
            _assert_matches(recorded, kind, stat)


def test_layer_absent_at_some_steps_is_nan_there(recorded: Path) -> None:
    run = load_run(recorded)
    g = run.layer_matrix(fmt.KIND_GRAD, "norm")
    assert g is not None
    aux = g.column("aux.weight")
    even = g.steps % 2 == 0
    # the branch has a gradient on the steps it ran, and none on the others
    assert np.isfinite(aux[even]).all() and (aux[even] > 0).all()
    assert not np.isfinite(aux[~even]).any()
    assert np.isfinite(g.column("head.weight")).all()
    # layers keep model order whatever rows are absent
    assert (
        g.layers.index("inp.weight") < g.layers.index("aux.weight") < g.layers.index("head.weight")
    )


def test_a_stat_loaded_after_the_kind_lines_up(recorded: Path) -> None:
    run = load_run(recorded)
    first = run.layer_matrix(fmt.KIND_GRAD, "norm")
    later = run.layer_matrix(fmt.KIND_GRAD, "absmax")  # not preloaded: its own scan
    assert first is not None and later is not None
    assert later.layers == first.layers
    _, _, ref = _reference(recorded, fmt.KIND_GRAD, "absmax")
    np.testing.assert_array_equal(later.values, ref)


def test_duplicated_steps_last_write_wins(recorded: Path, tmp_path: Path) -> None:
    run_dir = _copy(recorded, tmp_path)
    segs = _segments(run_dir)
    before = load_run(run_dir).layer_matrix(fmt.KIND_WEIGHT, "norm")
    assert before is not None
    # A resumed run rewrites steps 5..11 in a later segment, with other values.
    t = pa.concat_tables(pq.read_table(s) for s in segs)
    again = t.filter(pc.and_(pc.greater_equal(t["step"], 5), pc.less_equal(t["step"], 11)))
    _rewrite(again, fmt.segment_path(run_dir, fmt.LAYERS_DIR, 0, len(segs)), 3.0)
    after = _assert_matches(run_dir, fmt.KIND_WEIGHT, "norm")
    redone = (before.steps >= 5) & (before.steps <= 11)
    np.testing.assert_allclose(after[redone], 3.0 * before.values[redone], rtol=1e-6)
    np.testing.assert_array_equal(after[~redone], before.values[~redone])
    _assert_matches(run_dir, fmt.KIND_ACTIVATION, "std")


def test_duplicates_inside_one_segment_and_steps_out_of_order(
    recorded: Path, tmp_path: Path
) -> None:
    run_dir = _copy(recorded, tmp_path)
    segs = _segments(run_dir)
    # Swap the first two segments' contents: steps now go 7..13, 0..6, 14...
    a, b = pq.read_table(segs[0]), pq.read_table(segs[1])
    fmt.write_segment(b, segs[0])
    # ...and the second holds its steps twice: the second copy, scaled, wins.
    tail = pa.table(
        {
            n: pc.multiply(a[n], pa.scalar(5.0, pa.float32()))
            if pa.types.is_float32(a[n].type)
            else a[n]
            for n in a.column_names
        },
        schema=a.schema,
    )
    fmt.write_segment(pa.concat_tables([a, tail]), segs[1])
    first_steps = set(a["step"].to_pylist())
    for kind, stat in [(fmt.KIND_GRAD, "norm"), (fmt.KIND_UPDATE, "update_ratio")]:
        values = _assert_matches(run_dir, kind, stat)
        m = load_run(run_dir).layer_matrix(kind, stat)
        assert m is not None and np.all(np.diff(m.steps) > 0)
        orig = load_run(recorded).layer_matrix(kind, stat)
        assert orig is not None
        early = np.isin(m.steps, list(first_steps))
        assert early.any() and not early.all()
        np.testing.assert_allclose(values[early], 5.0 * orig.values[early], rtol=1e-6)


def test_replicated_layers_come_from_the_lowest_rank(recorded: Path, tmp_path: Path) -> None:
    # Several ranks, no shards in the layout: the merged view's layer rows are one
    # replica's (the lowest rank); --rank R shows rank R's (runlens.ranks).
    run_dir = _copy(recorded, tmp_path)
    for seg in _segments(run_dir):
        dst = run_dir / fmt.LAYERS_DIR / "rank=1" / seg.name
        dst.parent.mkdir(exist_ok=True)
        _rewrite(pq.read_table(seg), dst, 10.0)
    run = load_run(run_dir)
    assert run.rank == 0 and run.merged and run.ranks == (0, 1)
    for kind in (fmt.KIND_WEIGHT, fmt.KIND_GRAD, fmt.KIND_ACTIVATION):
        _assert_matches(run_dir, kind, "norm", rank=0)
    one = load_run(run_dir, rank=1)
    m0 = run.layer_matrix(fmt.KIND_WEIGHT, "norm")
    m1 = one.layer_matrix(fmt.KIND_WEIGHT, "norm")
    assert not one.merged and m0.layers == m1.layers
    np.testing.assert_allclose(m1.values, 10.0 * m0.values, rtol=1e-6)


def test_unknown_statistic_is_a_clear_error(recorded: Path) -> None:
    with pytest.raises(RunLoadError, match="no statistic 'gradnorm'"):
        load_run(recorded).layer_matrix(fmt.KIND_GRAD, "gradnorm")
    assert load_run(recorded).layer_matrix("no-such-kind", "norm") is None
