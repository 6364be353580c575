"""The typed layout between the training thread and the writer: every kind of section
packed by the real transfer and decoded by the real writer round-trips to the statistics
of the tensors; packages that disagree with their layout are rejected with one warning,
never a crash; and the probe seam records what probes contribute."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from runlens_collect import Collector, layout, stats, transfer
from runlens_collect import format as fmt
from runlens_collect.activation_stats import dead_fraction
from runlens_collect.layout import LayoutError, Section, StepLayout
from runlens_collect.writer import Package, Writer
from torch import nn

LAYERS = ["a", "b", "c", "relu", "output"]


def _table(run_dir: Path, table: str) -> list[dict[str, Any]]:
    files = sorted((run_dir / table).glob(fmt.SEGMENT_GLOB))
    assert files, f"no {table} segments"
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


def _writer(run_dir: Path, free: Any, reports: list[tuple]) -> Writer:
    return Writer(
        run_dir,
        0,
        list(LAYERS),
        flush_steps=100,
        flush_seconds=60.0,
        max_queue=4,
        free_slots=free,
        on_flush=lambda last: None,
        report=lambda site, msg, exc, event=True: reports.append((site, msg, exc)),
        write_events=False,
    )


def _flat(kind: str, ts: list[torch.Tensor], **kw: Any) -> tuple[Section, torch.Tensor]:
    """A flat section of several tensors, as the parameter statistics build it."""
    lay = stats.FlatLayout([t.numel() for t in ts], torch.device("cpu"))
    torch._foreach_copy_(lay.views, [t.reshape(-1) for t in ts])
    hist = stats.flat_hist(lay).reshape(-1)
    data = torch.cat([stats.flat_raw(lay).reshape(-1), hist])
    sec = Section(
        kw.pop("name", kind),
        kind,
        np.arange(len(ts), dtype=np.int32),
        np.array([t.numel() for t in ts], np.int64),
        hist=True,
        pads=lay.pads_array,
        **kw,
    )
    return sec, data


def _expect(x: torch.Tensor) -> dict[str, Any]:
    v = x.detach().double().reshape(-1).numpy()
    return {
        "mean": v.mean(),
        "std": v.std(ddof=1),
        "norm": np.sqrt((v * v).sum()),
        "absmax": np.abs(v).max(),
        "frac_zero": (v == 0).mean(),
        "frac_nonfinite": 0.0,
        "numel": v.size,
        "hist": np.bincount(fmt.hist_bin_index(v), minlength=fmt.HIST_NUM_BINS).tolist(),
    }


def _check(row: dict[str, Any], want: dict[str, Any]) -> None:
    for k, v in want.items():
        if k == "hist" or k == "numel":
            assert row[k] == v, k
        else:
            assert math.isclose(row[k], v, rel_tol=2e-5, abs_tol=1e-6), (k, row[k], v)


def test_every_section_kind_round_trips_through_transfer_and_writer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    w_before = [torch.randn(5, 7), torch.randn(300), torch.zeros(4)]
    w_before[1][:50] = 0
    w_after = [w - 0.01 * torch.randn_like(w) for w in w_before]
    grads = [torch.randn(5, 7), torch.randn(300) * 3, torch.randn(4)]
    upd = [a - b for a, b in zip(w_after, w_before, strict=True)]
    act = torch.relu(torch.randn(16, 8) - 0.5)
    act[:, 2] = 0  # a dead unit
    out = torch.randn(16, 3)

    sec_w, d_w = _flat(fmt.KIND_WEIGHT, w_before)
    sec_g, d_g = _flat(fmt.KIND_GRAD, grads, grad_norm=True, has_missing=True)
    # The update as the collector measures it: before - after, negated back by the writer.
    neg = [-u for u in upd]
    sec_u, d_u = _flat(
        fmt.KIND_UPDATE, neg, negate=True, ratio_ref=fmt.KIND_WEIGHT, has_missing=True
    )
    raw_a, shape_a = stats.tensor_raw(act)
    dead = dead_fraction(act, channel_first=False)
    d_a = torch.cat([raw_a, dead.reshape(1).double(), stats.tensor_hist(act)])
    sec_a = Section(
        "activation:relu",
        fmt.KIND_ACTIVATION,
        np.array([3], np.int32),
        np.array([act.numel()], np.int64),
        extra=("frac_dead_units",),
        hist=True,
        single=shape_a,
    )
    raw_o, shape_o = stats.tensor_raw(out, out.reshape(-1, 3))
    sec_o = Section(
        "output",
        fmt.KIND_OUTPUT,
        np.array([4], np.int32),
        np.array([out.numel()], np.int64),
        single=shape_o,
        derived=("min", "max", "row_sum_mean"),
    )
    gmiss = np.array([False, True, False])
    umiss = np.array([False, False, True])
    parts = [
        (sec_a, d_a, None),
        (sec_o, raw_o, None),
        (sec_g, d_g, gmiss),
        (sec_w, d_w, None),
        (sec_u, d_u, umiss),
    ]
    tr = transfer.Transfer(torch.device("cpu"), 4, 1 << 20)
    reports: list[tuple] = []
    w = _writer(tmp_path, tr.free, reports)
    for step in range(3):
        pkg = Package(step, 100.0 + step)
        dev = [(step, "train/loss", torch.tensor([2.5 + step]))]
        if step == 1:
            dev.append((0, "val/loss", torch.tensor([7.0])))  # logged at the step before
        assert tr.send_step(pkg, parts, dev)
        assert pkg.layout is not None and pkg.size == pkg.layout.size
        w._consume(pkg)
    # The same sections every step: one layout object (different scalars: another one).
    w._decode_pending()
    w.flush()
    assert reports == []

    rows = _table(tmp_path, fmt.LAYERS_DIR)
    assert len(rows) == 3 * (3 + 3 + 3 + 1 + 1)
    by = {(r["step"], r["kind"], r["layer"]): r for r in rows}
    for step in range(3):
        for i, name in enumerate(LAYERS[:3]):
            _check(by[step, fmt.KIND_WEIGHT, name], _expect(w_before[i]))
            g = by[step, fmt.KIND_GRAD, name]
            u = by[step, fmt.KIND_UPDATE, name]
            for row, miss, t in ((g, gmiss[i], grads[i]), (u, umiss[i], upd[i])):
                assert row["missing"] == miss
                if miss:
                    assert math.isnan(row["mean"]) and row["hist"] is None
                else:
                    _check(row, _expect(t))
            if not umiss[i]:
                ratio = upd[i].double().norm() / w_before[i].double().norm()
                assert u["update_ratio"] == pytest.approx(float(ratio), rel=1e-5)
        a = by[step, fmt.KIND_ACTIVATION, "relu"]
        _check(a, _expect(act))
        assert a["frac_dead_units"] == pytest.approx(1 / 8)
        o = by[step, fmt.KIND_OUTPUT, "output"]
        _check(o, {k: v for k, v in _expect(out).items() if k != "hist"})
        assert o["hist"] is None
        assert o["min"] == pytest.approx(float(out.min()))
        assert o["max"] == pytest.approx(float(out.max()))
        assert o["row_sum_mean"] == pytest.approx(float(out.sum()) / 16, abs=1e-6)

    scalars = {(r["step"], r["name"]): r["value"] for r in _table(tmp_path, fmt.SCALARS_DIR)}
    gn = math.sqrt(sum(float(grads[i].double().norm()) ** 2 for i in (0, 2)))
    for step in range(3):
        assert scalars[step, "train/loss"] == 2.5 + step
        assert scalars[step, fmt.GRAD_NORM] == pytest.approx(gn, rel=1e-6)
    assert scalars[0, "val/loss"] == 7.0


def _one_section() -> tuple[Section, torch.Tensor]:
    return _flat(fmt.KIND_GRAD, [torch.randn(10), torch.randn(3)], has_missing=True)


@pytest.mark.parametrize("fault", ["size", "missing", "scalar_steps"])
def test_writer_rejects_a_package_that_disagrees_with_its_layout(
    tmp_path: Path, fault: str
) -> None:
    """A mismatch is reported as an internal error and that step's device data dropped;
    its host scalars and the other steps are written."""
    sec, data = _one_section()
    tr = transfer.Transfer(torch.device("cpu"), 4, 1 << 20)
    reports: list[tuple] = []
    w = _writer(tmp_path, tr.free, reports)
    for step in range(3):
        pkg = Package(step, 1.0, host_scalars=[(step, "train/loss", 1.0)])
        tr.send_step(pkg, [(sec, data, np.zeros(2, bool))], [(step, "x", torch.ones(1))])
        if step == 1:
            if fault == "size":
                pkg.size -= 1
            elif fault == "missing":
                pkg.missing = (np.zeros(3, bool),)
            else:
                pkg.scalar_steps = ()
        w._consume(pkg)
    w._decode_pending()
    w.flush()
    assert len(reports) == 1
    site, msg, exc = reports[0]
    assert site == "writer" and "step 1" in msg and isinstance(exc, LayoutError)
    assert "internal error" in str(exc)
    layer_steps = {r["step"] for r in _table(tmp_path, fmt.LAYERS_DIR)}
    assert layer_steps == {0, 2}
    losses = {r["step"] for r in _table(tmp_path, fmt.SCALARS_DIR) if r["name"] == "train/loss"}
    assert losses == {0, 1, 2}


def test_layout_rejects_inconsistent_sections() -> None:
    sec, _ = _one_section()
    with pytest.raises(LayoutError, match="twice"):
        StepLayout((sec, sec))
    upd = Section(
        "update", fmt.KIND_UPDATE, sec.layers, sec.numels, ratio_ref="weight", negate=True
    )
    with pytest.raises(LayoutError, match="ratio_ref"):
        StepLayout((upd,))
    with pytest.raises(LayoutError, match="kind"):
        Section("x", "bogus", sec.layers, sec.numels)
    lay = StepLayout((sec,), ("a", "b"))
    assert lay.size == sec.size + 2 and lay.scalar_offset == sec.size
    assert layout.LayoutCache().get((sec,), ("a",)) is not lay
    cache = layout.LayoutCache()
    assert cache.get((sec,), ("a",)) is cache.get((sec,), ("a",))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _train(col: Collector, model: nn.Module, opt: Any, n: int) -> list[torch.Tensor]:
    torch.manual_seed(1)
    xs = []
    for _ in range(n):
        x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
        xs.append(x)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        col.step(loss=loss)
    return xs


def test_a_packing_mismatch_on_the_training_side_drops_the_step_not_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training thread checks the packed size against the layout before the copy."""
    orig = layout.LayoutCache.get
    calls = {"n": 0}

    def wrong_at_step_3(self, sections, scalars):
        calls["n"] += 1
        return orig(self, sections, scalars + (("extra",) if calls["n"] == 4 else ()))

    monkeypatch.setattr(layout.LayoutCache, "get", wrong_at_step_3)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.warns(RuntimeWarning, match="internal error"),
        Collector(model, opt, run_dir=tmp_path) as col,
    ):
        _train(col, model, opt, 6)
    assert len(col.warnings) == 1 and "step: recording a step failed" in col.warnings[0]
    assert {r["step"] for r in _table(tmp_path, fmt.LAYERS_DIR)} == {0, 1, 2, 4, 5}


class _InputProbe:
    """Records the sum of each training batch (kept on the device) and a host counter."""

    name = "input-sum"

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None
        self.calls = 0

    def attach(self, model: nn.Module, optimizer: Any) -> list[Any]:
        def pre(module: nn.Module, args: Any) -> None:
            self.last = args[0].detach().sum()

        return [model.register_forward_pre_hook(pre)]

    def end_step(self, step: int, flags: Any, parts: Any) -> None:
        self.calls += 1
        if self.last is not None:
            parts.device_scalar(step, "input/sum", self.last)
        parts.host_scalar(step, "input/calls", self.calls)


class _BrokenProbe:
    name = "broken"

    def attach(self, model: nn.Module, optimizer: Any) -> list[Any]:
        return []

    def end_step(self, step: int, flags: Any, parts: Any) -> None:
        raise RuntimeError("probe bug")


def test_probes_add_per_step_scalars_and_a_failing_probe_is_switched_off(
    tmp_path: Path,
) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = _InputProbe()
    with (
        pytest.warns(RuntimeWarning, match="probe:broken"),
        Collector(model, opt, run_dir=tmp_path, probes=[_BrokenProbe(), probe]) as col,
    ):
        xs = _train(col, model, opt, 5)
    assert len(col.warnings) == 1
    sc = {(r["step"], r["name"]): r["value"] for r in _table(tmp_path, fmt.SCALARS_DIR)}
    for step, x in enumerate(xs):
        assert sc[step, "input/sum"] == pytest.approx(float(x.sum()), rel=1e-6)
        assert sc[step, "input/calls"] == step + 1
        assert (step, fmt.TRAIN_LOSS) in sc
    assert len({r["step"] for r in _table(tmp_path, fmt.LAYERS_DIR)}) == 5
