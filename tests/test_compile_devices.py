"""torch.compile without graph breaks, a model split across devices, statistics shipped as
float32 (devices without float64), and the model output a collector takes.

Graph breaks are counted by dynamo itself (``torch._dynamo.utils.counters``); the
backend is ``eager`` (dynamo's tracing decides graph breaks, whatever the backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from contract_helpers import MLP, batches, blobs, grad_total_norm, healthy, table, values_of
from runlens_collect import Collector, stats
from runlens_collect import collector as collector_mod
from runlens_collect import format as fmt
from runlens_collect.activation_stats import model_output
from torch import nn

from runlens.run import load_run

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

STEPS = 12


def _compiled_training(run_dir: Path | None, how: str) -> tuple[dict, list[float], nn.Module]:
    """Train a compiled MLP (with a collector unless run_dir is None); dynamo's counters."""
    dynamo.reset()
    counters.clear()
    x, y = blobs()
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if how == "in-place":
        model.compile(backend="eager")
        m = model
    else:
        m = torch.compile(model, backend="eager")
    losses = []
    col = Collector(m, opt, run_dir=run_dir, activation_every=1, hist_every=3) if run_dir else None
    for step in range(STEPS):
        xb, yb = batches(x, y, step)
        loss = nn.functional.cross_entropy(m(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if col is not None:
            col.step()
    if col is not None:
        col.close()
        assert col.warnings == []
    return {k: dict(v) for k, v in counters.items()}, losses, model


@pytest.mark.parametrize("how", ["in-place", "torch.compile"])
def test_compiled_model_records_without_graph_breaks(tmp_path: Path, how: str) -> None:
    bare, _, _ = _compiled_training(None, how)
    got, losses, model = _compiled_training(tmp_path, how)
    assert got.get("graph_break", {}) == {}, list(got.get("graph_break", {}))
    # The same graphs as without the collector: one for the forward, nothing retraced.
    assert got["stats"]["unique_graphs"] == bare["stats"]["unique_graphs"] == 1
    run = load_run(tmp_path)
    np.testing.assert_allclose(values_of(run, fmt.TRAIN_LOSS), losses, rtol=1e-6)
    assert run.meta["collector"]["compiled"] is True
    assert set(run.layer_kinds) == {"weight", "grad", "update", "output"}  # no activations
    out = run.layer_matrix(fmt.KIND_OUTPUT, "norm")
    assert out.steps.tolist() == list(range(STEPS))  # recorded around the compiled call
    assert len(values_of(run, fmt.TIME_DATA)) == STEPS - 1
    assert list(run.layer_matrix(fmt.KIND_WEIGHT, "norm").layers) == [
        n for n, _ in model.named_parameters()
    ]
    if how == "in-place":
        assert model._compiled_call_impl is not None  # restored, still compiled
        assert getattr(model._compiled_call_impl, "__name__", "") != "call"
    healthy(tmp_path)


def test_a_training_step_compiled_whole_drops_no_step(tmp_path: Path) -> None:
    """A script that compiles its whole step (forward, backward, optimizer.step): the
    collector's hooks are never traced, every step is recorded with its statistics."""
    dynamo.reset()
    x, y = blobs()
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    col = Collector(model, opt, run_dir=tmp_path)

    @torch.compile(backend="eager")
    def train_step(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        return loss

    losses, norms = [], []
    for step in range(STEPS):
        xb, yb = batches(x, y, step)
        opt.zero_grad()
        loss = train_step(xb, yb)
        norms.append(grad_total_norm(model.parameters()))
        losses.append(float(loss.detach()))
        col.step(loss=loss)
    col.close()
    assert col.warnings == []
    run = load_run(tmp_path)
    np.testing.assert_allclose(values_of(run, fmt.TRAIN_LOSS), losses, rtol=1e-6)
    np.testing.assert_allclose(values_of(run, fmt.GRAD_NORM), norms, rtol=1e-4)
    assert run.scalar(fmt.STEP_SKIPPED) is None  # the optimizer step ran: none skipped
    assert run.layer_matrix(fmt.KIND_UPDATE, "norm").steps.tolist() == list(range(STEPS))
    healthy(tmp_path)


class TwoStages(nn.Module):
    """A pipeline of two stages, as device_map="auto" or a pipeline split would place them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stage0 = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage1(self.stage0(x))


def test_a_model_split_across_two_devices(tmp_path: Path, monkeypatch) -> None:
    """CPU has one device, so the second stage's parameters are declared to be on another
    one (the collector groups parameters by ``_device_of``): each device then gets its own
    statistics, sections and flat buffers, as on two GPUs, and their results meet in one
    step. Nothing is dropped: every parameter has rows, grad_norm is the total over both
    devices (on statistics steps and off them), the loss is recorded at every step."""
    model = TwoStages()
    second = {id(p) for p in model.stage1.parameters()}
    real = collector_mod._device_of
    monkeypatch.setattr(
        collector_mod,
        "_device_of",
        lambda p: torch.device("cpu", 1) if id(p) in second else real(p),
    )
    x, y = blobs()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, norms = [], []
    with Collector(model, opt, run_dir=tmp_path, every=2, hist_every=4) as col:
        for step in range(STEPS):
            xb, yb = batches(x, y, step)
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            norms.append(grad_total_norm(model.parameters()))
            opt.step()
            losses.append(float(loss.detach()))
            col.step(loss=loss)
    assert col.warnings == []
    assert len(col._groups) == 2 and col._groups[1].names["grad"] == "grad@cpu:1"
    run = load_run(tmp_path)
    assert run.meta["collector"]["devices"] == {"cpu": 2, "cpu:1": 4}
    assert run.meta["collector"]["skipped_params"] == []
    np.testing.assert_allclose(values_of(run, fmt.TRAIN_LOSS), losses, rtol=1e-6)
    gn = run.scalar(fmt.GRAD_NORM)
    assert gn.steps.tolist() == list(range(STEPS))
    np.testing.assert_allclose(gn.values, norms, rtol=1e-4)
    names = [n for n, _ in model.named_parameters()]
    for kind in (fmt.KIND_WEIGHT, fmt.KIND_GRAD, fmt.KIND_UPDATE):
        m = run.layer_matrix(kind, "norm")
        assert sorted(m.layers) == sorted(names) and m.steps.tolist() == list(range(0, STEPS, 2))
        assert np.isfinite(m.values).all()
    healthy(tmp_path)


def test_statistics_ship_as_float32_where_a_device_has_no_float64(
    tmp_path: Path, monkeypatch
) -> None:
    """MPS has no float64. The float32 path, run on CPU, records the same statistics (to
    float32 precision) and histograms as the float64 one."""
    x, y = blobs()

    def record(run_dir: Path) -> Collector:
        model = MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with Collector(model, opt, run_dir=run_dir, activation_every=2, hist_every=2) as col:
            for step in range(8):
                xb, yb = batches(x, y, step)
                loss = nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                col.step(loss=loss)
        assert col.warnings == []
        return col

    record(tmp_path / "f64")
    monkeypatch.setattr(stats, "NO_FLOAT64_DEVICES", {"cpu"})
    col = record(tmp_path / "f32")
    assert {b.dtype for b in col._ring if b is not None} == {torch.float32}
    assert load_run(tmp_path / "f32").meta["collector"]["wire_dtype"] == "float32"
    assert load_run(tmp_path / "f64").meta["collector"]["wire_dtype"] == "float64"
    a, b = table(tmp_path / "f64", fmt.LAYERS_DIR), table(tmp_path / "f32", fmt.LAYERS_DIR)
    assert [(r["step"], r["layer"], r["kind"]) for r in a] == [
        (r["step"], r["layer"], r["kind"]) for r in b
    ]
    for col_name in ("mean", "norm", "absmax", "frac_zero", "update_ratio", "frac_dead_units"):
        va = np.array([r[col_name] for r in a], float)
        vb = np.array([r[col_name] for r in b], float)
        np.testing.assert_allclose(vb, va, rtol=2e-5, atol=1e-7, err_msg=col_name)
    assert [r["hist"] for r in a] == [r["hist"] for r in b]
    sa, sb = load_run(tmp_path / "f64"), load_run(tmp_path / "f32")
    np.testing.assert_allclose(
        values_of(sb, fmt.TRAIN_LOSS), values_of(sa, fmt.TRAIN_LOSS), rtol=1e-6
    )


def test_model_output_is_the_logits_never_the_loss() -> None:
    """Hugging Face returns (loss, logits, ...) as a ModelOutput or a tuple: the output
    statistics must describe the logits."""
    loss, logits = torch.tensor(2.3), torch.randn(4, 5)
    assert model_output({"loss": loss, "logits": logits}) is logits
    assert model_output((loss, logits)) is logits
    assert model_output([loss, (logits,)]) is logits
    assert model_output(logits) is logits
    assert model_output({"loss": loss}) is loss  # nothing else: the only tensor
    transformers = pytest.importorskip("transformers")
    out = transformers.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)
    assert model_output(out) is logits
