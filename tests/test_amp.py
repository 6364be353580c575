"""Mixed precision against ground truth: fp16 autocast with a GradScaler forced to overflow
(plain and fused optimizers), a scaler that never recovers, bf16 autocast, bf16 and fp16
parameters. The numbers the collector records are compared with what the training loop
itself computed (the scaler's decisions, the loss before scaling, clip_grad_norm_'s
return value, the gradients it applied)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from contract_helpers import (
    MLP,
    batches,
    blobs,
    grad_total_norm,
    healthy,
    steps_of,
    table,
    values_of,
)
from runlens_collect import Collector
from runlens_collect import format as fmt
from torch import nn

import runlens
from runlens.run import load_run

STEPS = 60


def _fp16_run(run_dir: Path, fused: bool, clip: bool, every: int = 1) -> dict[str, list]:
    """fp16 autocast + GradScaler(init 2**30): overflows for the first ~dozen steps (and
    at some later growth attempts); returns what the loop saw."""
    x, y = blobs()
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30, growth_interval=10)
    truth: dict[str, list] = {k: [] for k in ("loss", "scale", "skipped", "pre", "post")}
    with Collector(model, opt, run_dir=run_dir, hist_every=5, every=every) as col:
        for step in range(STEPS):
            xb, yb = batches(x, y, step)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            pre = None
            if clip:
                scaler.unscale_(opt)
                pre = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
                post = grad_total_norm(model.parameters())
            else:  # fused: the optimizer unscales inside its step; p.grad stays scaled
                post = grad_total_norm(model.parameters()) / scale
            scaler.step(opt)
            scaler.update()
            truth["loss"].append(float(loss.detach()))
            truth["scale"].append(scale)
            truth["skipped"].append(scaler.get_scale() < scale)
            truth["pre"].append(pre)
            truth["post"].append(post)
            col.step()  # no loss given: the collector's own, unscaled
    assert col.warnings == []
    return truth


@pytest.mark.parametrize("fused", [False, True], ids=["unscale-clip", "fused-no-unscale"])
def test_fp16_grad_scaler_overflows_are_skipped_steps(tmp_path: Path, fused: bool) -> None:
    truth = _fp16_run(tmp_path, fused=fused, clip=not fused)
    skipped = np.array(truth["skipped"])
    assert 5 <= skipped.sum() < STEPS // 2  # the forced overflows happened, then recovery
    run = load_run(tmp_path)
    # Each step says whether it was applied, exactly as the scaler decided.
    assert steps_of(run, fmt.STEP_SKIPPED) == list(range(STEPS))
    np.testing.assert_array_equal(values_of(run, fmt.STEP_SKIPPED) > 0.5, skipped)
    np.testing.assert_array_equal(run.skipped_steps, np.flatnonzero(skipped))
    np.testing.assert_allclose(values_of(run, fmt.LOSS_SCALE), truth["scale"])
    # The loss before scaling (the collector's view of backward, mapped back from
    # scaler.scale), never multiplied by 2**30.
    np.testing.assert_allclose(values_of(run, fmt.TRAIN_LOSS), truth["loss"], rtol=1e-6)
    ok = ~skipped
    gn = run.scalar(fmt.GRAD_NORM)
    grads = [r for r in table(tmp_path, fmt.LAYERS_DIR) if r["kind"] == fmt.KIND_GRAD]
    if not fused:
        # Host-known skips: no gradient statistics of a step that applied none.
        assert gn.steps.tolist() == np.flatnonzero(ok).tolist()
        assert {r["step"] for r in grads} == set(np.flatnonzero(ok).tolist())
        np.testing.assert_allclose(gn.values, np.array(truth["post"])[ok], rtol=1e-4)
        pre = run.scalar(fmt.GRAD_NORM_PRECLIP)
        assert pre.steps.tolist() == np.flatnonzero(ok).tolist()
        np.testing.assert_allclose(pre.values, np.array(truth["pre"], float)[ok], rtol=1e-5)
        assert (gn.values <= pre.values * (1 + 1e-5)).all()  # clipped to at most 1
    else:
        # Only the device knew (found_inf): every step is read, the grads unscaled by the
        # optimizer's grad_scale; the analyzer drops the skipped ones.
        np.testing.assert_allclose(gn.values[ok], np.array(truth["post"])[ok], rtol=1e-4)
        assert not np.isfinite(gn.values[skipped]).all()
        assert run.scalar(fmt.GRAD_NORM_PRECLIP) is None
    report = healthy(tmp_path)
    assert "nan-inf" in report.coverage.clean
    assert report.summary.skipped_steps == int(skipped.sum())


def test_off_step_grad_norm_is_unscaled_for_a_fused_optimizer(tmp_path: Path) -> None:
    truth = _fp16_run(tmp_path, fused=True, clip=False, every=3)
    ok = ~np.array(truth["skipped"])
    gn = load_run(tmp_path).scalar(fmt.GRAD_NORM)
    assert gn.steps.tolist() == list(range(STEPS))
    np.testing.assert_allclose(gn.values[ok], np.array(truth["post"])[ok], rtol=1e-4)


def test_an_overflow_that_never_recovers_is_reported_with_its_cause(tmp_path: Path) -> None:
    """sqrt(0 * w) is 0, its gradient 0 * inf = NaN: every step overflows at every scale.
    The GradScaler skips them all while its scale collapses; that is a failure."""
    x, y = blobs()
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with Collector(model, opt, run_dir=tmp_path) as col:
        for step in range(40):
            xb, yb = batches(x, y, step)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss = loss + torch.sqrt(model.fc1.bias.sum() * 0)  # NaN gradient
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            col.step()
    assert scaler.get_scale() < 1e-4
    run = load_run(tmp_path)
    assert run.skipped_steps.tolist() == list(range(40))
    assert np.isfinite(values_of(run, fmt.TRAIN_LOSS)).all()  # the loss itself is fine
    report = runlens.analyze(run)
    (f,) = [f for f in report.findings if f.signature == "nan-inf"]
    assert f.severity == "error" and f.steps == (0, 39)
    assert "skipped every optimizer step" in f.summary and "40 in a row" in f.summary
    ev = {e.name: e.value for e in f.evidence}
    assert ev["lowest loss scale while skipping"] < 1e-4
    assert any("no loss scale can fix" in c for c in f.causes)


def test_bf16_autocast_records_the_loss_and_stays_healthy(tmp_path: Path) -> None:
    x, y = blobs()
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, norms = [], []
    with Collector(model, opt, run_dir=tmp_path, activation_every=5) as col:
        for step in range(STEPS):
            xb, yb = batches(x, y, step)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(xb)
                loss = nn.functional.cross_entropy(out, yb)
            assert out.dtype == torch.bfloat16
            opt.zero_grad()
            loss.backward()
            norms.append(grad_total_norm(model.parameters()))
            opt.step()
            losses.append(float(loss.detach()))
            col.step(loss=loss)
    assert col.warnings == []
    run = load_run(tmp_path)
    np.testing.assert_allclose(values_of(run, fmt.TRAIN_LOSS), losses, rtol=1e-6)
    np.testing.assert_allclose(values_of(run, fmt.GRAD_NORM), norms, rtol=1e-4)
    assert run.scalar(fmt.STEP_SKIPPED) is None  # no scaler: nothing is ever skipped
    out = [r for r in table(tmp_path, fmt.LAYERS_DIR) if r["kind"] == fmt.KIND_OUTPUT]
    assert out and all(np.isfinite(r["norm"]) for r in out)
    healthy(tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_are_recorded_exactly(tmp_path: Path, dtype) -> None:
    """Parameters and gradients in bf16/fp16: statistics of their exact values (float32
    copies), updates of the low-precision weights as they changed."""
    x, y = blobs()
    model = MLP().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    names = [n for n, _ in model.named_parameters()]
    weights, updates = [], []
    with Collector(model, opt, run_dir=tmp_path, activation_every=1) as col:
        for step in range(8):
            xb, yb = batches(x, y, step)
            loss = nn.functional.cross_entropy(model(xb.to(dtype)).float(), yb)
            opt.zero_grad()
            loss.backward()
            before = [p.detach().float().clone() for p in model.parameters()]
            weights.append([float(b.norm()) for b in before])
            opt.step()
            after = [p.detach().float() for p in model.parameters()]
            updates.append([float((a - b).norm()) for a, b in zip(after, before, strict=True)])
            col.step(loss=loss)
    assert col.warnings == []
    run = load_run(tmp_path)
    w = run.layer_matrix(fmt.KIND_WEIGHT, "norm")
    u = run.layer_matrix(fmt.KIND_UPDATE, "norm")
    assert list(w.layers) == names
    np.testing.assert_allclose(w.values, weights, rtol=1e-5)
    np.testing.assert_allclose(u.values, updates, rtol=1e-5, atol=1e-7)
    assert np.isfinite(run.layer_matrix(fmt.KIND_GRAD, "norm").values).all()
    assert np.isfinite(run.layer_matrix(fmt.KIND_ACTIVATION, "norm").values).all()
