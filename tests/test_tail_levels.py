"""One definition of a layer's tail level (runlens.levels.tail_levels), used by the layer
health table of ``analyze`` and by compare's per-layer differences, so the two can no
longer disagree on the same layer (they used to treat NaN differently)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from runlens_collect import format as fmt

import runlens
from runlens.compare import CompareOptions
from runlens.compare.loading import GRAD_NORM_STAT, load_one
from runlens.engine import make_context
from runlens.health import TAIL_FRACTION, module_of
from runlens.layerscan import LayerMatrix
from runlens.levels import tail_levels
from runlens.run import load_run

SAMPLES = Path(__file__).resolve().parent.parent / "sample_runs"


def test_tail_level_rule() -> None:
    nan, inf = math.nan, math.inf
    values = np.array(
        [
            [1.0, 1.0, 1.0, 5.0],
            [2.0, nan, inf, 6.0],
            [3.0, nan, nan, 7.0],
            [4.0, 8.0, 2.0, nan],
        ]
    )
    m = LayerMatrix("grad", "norm", np.arange(4), ("a", "b", "c", "d"), values)
    got = tail_levels(m, 0.75)  # the last 3 rows
    assert got["a"] == 3.0
    assert math.isnan(got["b"])  # 1 finite of 3: gone non-finite
    assert math.isnan(got["c"])
    assert got["d"] == 6.5  # 2 of 3 finite: their median
    assert tail_levels(None, 0.5) == {}


def test_analyze_and_compare_read_the_same_tail() -> None:
    """On a run whose gradients went NaN (non-finite in the last steps), the health table
    and compare's per-layer levels come from the same numbers."""
    path = SAMPLES / "nan-inf"
    ctx = make_context(load_run(path))
    report = runlens.analyze(ctx)
    levels = tail_levels(ctx.layer(fmt.KIND_GRAD, "norm"), TAIL_FRACTION)
    assert any(math.isnan(v) for v in levels.values())  # the case that used to differ
    loaded = load_one(load_run(path), None, CompareOptions(layer_tail=TAIL_FRACTION))
    cmp = loaded.layer_tails[GRAD_NORM_STAT]
    assert cmp.keys() == levels.keys()
    for k in levels:
        assert cmp[k] == levels[k] or (math.isnan(cmp[k]) and math.isnan(levels[k]))
    for row in report.layers:
        params = [v for k, v in levels.items() if module_of(k) == row.layer and math.isfinite(v)]
        want = float(np.sqrt(np.sum(np.square(params)))) if params else None
        assert row.grad_norm == want
