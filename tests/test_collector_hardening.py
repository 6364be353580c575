"""Collector robustness: bounded-but-patient queue, drops counted once, Ctrl-C exit code,
closure-based optimizers, two collectors on one run directory. Real training on CPU."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from runlens_collect import Collector, writer
from runlens_collect import format as fmt
from torch import nn


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _table(run_dir: Path, table: str) -> pa.Table:
    files = sorted((run_dir / table).glob(fmt.SEGMENT_GLOB))
    return pa.concat_tables([pq.read_table(f) for f in files])


def _events(run_dir: Path) -> list[dict[str, Any]]:
    p = run_dir / fmt.EVENTS_JSONL
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _train(col: Collector, model: nn.Module, opt: Any, n: int) -> None:
    torch.manual_seed(1)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(n):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        col.step(loss=loss)


def _stall_writer(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The writer thread blocks in its first _consume until the returned gate is set."""
    gate = threading.Event()
    orig = writer.Writer._consume

    def slow(self: writer.Writer, pkg: writer.Package) -> None:
        gate.wait(60)
        orig(self, pkg)

    monkeypatch.setattr(writer.Writer, "_consume", slow)
    return gate


def _recorded_and_dropped(run_dir: Path) -> tuple[set[int], list[int], int]:
    recorded = set(_table(run_dir, fmt.LAYERS_DIR).column("step").to_pylist())
    skipped = [e for e in _events(run_dir) if e["kind"] == "skipped"]
    steps = [s for e in skipped for s in e["steps"]]
    total = skipped[-1]["total"] if skipped else 0
    return recorded, steps, total


def test_writer_briefly_behind_drops_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer stalled for 40 steps catches up afterwards: with the default bound every
    step's statistics are kept, and nothing is warned."""
    gate = _stall_writer(monkeypatch)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any collector warning fails the test
        col = Collector(model, opt, run_dir=tmp_path)
        _train(col, model, opt, 40)
        gate.set()
        col.close()
    assert col.warnings == []
    recorded, dropped, total = _recorded_and_dropped(tmp_path)
    assert recorded == set(range(40))
    assert dropped == [] and total == 0


def test_memory_budget_bounds_host_buffers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a byte budget below two buffers only one step's statistics can be in flight:
    while the writer is stalled the rest are dropped (and counted), never queued."""
    gate = _stall_writer(monkeypatch)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="fell behind"):
        col = Collector(model, opt, run_dir=tmp_path, max_queue_bytes=1)
        _train(col, model, opt, 20)
        ring = [b for b in col._ring if b is not None]
        gate.set()
        col.close()
    assert len(ring) == 1
    recorded, dropped, total = _recorded_and_dropped(tmp_path)
    assert len(recorded) <= 2  # the step held by the stalled writer (+ one after release)
    assert recorded | set(dropped) == set(range(20))
    assert total == len(dropped) == len(set(dropped))


def test_dropped_step_counted_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps that find neither a free buffer nor room in the queue are counted once."""
    gate = _stall_writer(monkeypatch)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = 30
    with pytest.warns(RuntimeWarning, match="fell behind"):
        col = Collector(model, opt, run_dir=tmp_path, max_queue=2)
        _train(col, model, opt, steps)
        # Both slots taken and the queue (2 x max_queue) full: the later steps hit both.
        assert col._writer.queue.full()
        gate.set()
        col.close()
    recorded, dropped, total = _recorded_and_dropped(tmp_path)
    assert len(dropped) == len(set(dropped)) == total
    assert recorded | set(dropped) == set(range(steps))
    assert not recorded & set(dropped)
    assert total >= steps - 2 * 2 - 1


_SIGINT_SCRIPT = """
import os, sys, torch
from torch import nn
use = sys.argv[1] == "collector"
if use:
    from runlens_collect import Collector
model = nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
col = Collector(model, opt, run_dir=sys.argv[2], flush_steps=1000) if use else None
step = 0
while True:
    loss = model(torch.randn(8, 4)).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    if col is not None:
        col.step(loss=loss)
    step += 1
    if step == 5:
        print("ready", flush=True)
"""


def _interrupted_exit_code(which: str, run_dir: Path) -> int:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_SIGINT_SCRIPT), which, str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert "KeyboardInterrupt" in err
    return proc.returncode


def test_ctrl_c_exit_code_same_as_plain_python(tmp_path: Path) -> None:
    plain = _interrupted_exit_code("plain", tmp_path / "plain")
    assert plain in (-signal.SIGINT, 130)
    assert _interrupted_exit_code("collector", tmp_path / "run") == plain
    # The unclosed collector still wrote what it had at exit.
    assert _table(tmp_path / "run", fmt.SCALARS_DIR).num_rows > 0


def test_read_gradients_with_lbfgs_closure(tmp_path: Path) -> None:
    """LBFGS computes gradients inside its closure, after the step pre-hook: the grad rows
    must be the closure's gradients when the closure calls read_gradients()."""
    model = _mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=1)
    torch.manual_seed(1)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    expected: list[dict[str, float]] = []
    with Collector(model, opt, run_dir=tmp_path) as col:
        for _ in range(4):

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                col.read_gradients()
                expected.append({n: p.grad.norm().item() for n, p in model.named_parameters()})
                return loss

            loss = opt.step(closure)
            col.step(loss=loss)
    assert len(expected) == 4  # max_iter=1: one closure call per step
    t = _table(tmp_path, fmt.LAYERS_DIR).to_pylist()
    grads = {(r["step"], r["layer"]): r for r in t if r["kind"] == fmt.KIND_GRAD}
    for step, norms in enumerate(expected):
        for name, norm in norms.items():
            row = grads[(step, name)]
            assert not row["missing"], (step, name)
            assert row["norm"] == pytest.approx(norm, rel=1e-4)
    gn = {
        r["step"]: r["value"]
        for r in _table(tmp_path, fmt.SCALARS_DIR).to_pylist()
        if r["name"] == fmt.GRAD_NORM
    }
    for step, norms in enumerate(expected):
        total = sum(v * v for v in norms.values()) ** 0.5
        assert gn[step] == pytest.approx(total, rel=1e-4)


@pytest.mark.parametrize("resume", [None, False])
def test_a_second_collector_on_a_run_dir_keeps_the_first_one(tmp_path: Path, resume) -> None:
    """A second collector on a used directory adds segments after the first one's (one
    warning), so every row of both is still on disk. By default it continues the step
    axis (a resume); with resume=False it records from step 0 beside it."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Collector(model, opt, run_dir=tmp_path, flush_steps=4) as col:
        _train(col, model, opt, 10)
    first = {
        t: sorted((tmp_path / t).glob(fmt.SEGMENT_GLOB)) for t in (fmt.SCALARS_DIR, fmt.LAYERS_DIR)
    }
    first_bytes = {f: f.read_bytes() for fs in first.values() for f in fs}
    with pytest.warns(RuntimeWarning, match="already holds a run") as rec:
        col2 = Collector(model, opt, run_dir=tmp_path, flush_steps=4, resume=resume)
        _train(col2, model, opt, 6)
        col2.close()
    assert len([w for w in rec if "runlens_collect" in str(w.message)]) == 1
    for f, b in first_bytes.items():
        assert f.read_bytes() == b  # the first run's segments are untouched
    layers = _table(tmp_path, fmt.LAYERS_DIR).to_pylist()
    weight_steps = [r["step"] for r in layers if r["kind"] == fmt.KIND_WEIGHT]
    n_params = len(list(model.parameters()))
    if resume is None:  # continued: steps 10..15 follow 0..9
        assert {s: weight_steps.count(s) for s in range(16)} == {s: n_params for s in range(16)}
    else:  # steps 0..5 from both runs, 6..9 from the first only
        assert {s: weight_steps.count(s) for s in range(10)} == {
            s: n_params * (2 if s < 6 else 1) for s in range(10)
        }
    scalars = _table(tmp_path, fmt.SCALARS_DIR).to_pylist()
    losses = [r for r in scalars if r["name"] == fmt.TRAIN_LOSS]
    assert len(losses) == 16


def test_no_warning_on_a_fresh_run_dir(tmp_path: Path) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Collector(model, opt, run_dir=tmp_path / "new") as col:
            _train(col, model, opt, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64])
def test_tensor_raw_counts_zeros_and_nonfinite_exactly(dtype: torch.dtype) -> None:
    from runlens_collect import stats

    torch.manual_seed(0)
    x = (torch.randn(3000) * 100).to(dtype)
    x[:7] = 0
    if dtype.is_floating_point:
        x[10], x[20], x[30] = float("nan"), float("inf"), -float("inf")
    single, shape = stats.tensor_raw(x)
    raw = stats.single_to_raw(single.numpy(), shape).tolist()
    xd = x.double()
    assert raw[2] == (xd != 0).sum().item()  # NaN and inf count as non-zero
    assert raw[3] == (~torch.isfinite(xd)).sum().item()
    fin = torch.isfinite(xd).all().item()
    if fin:
        assert raw[0] == pytest.approx(xd.sum().item(), rel=1e-5)
        assert raw[1] == pytest.approx((xd * xd).sum().item(), rel=1e-5)
        assert raw[4] == xd.abs().max().item()
    else:
        assert math.isnan(raw[4]) and not math.isfinite(raw[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_histograms_match_the_reference_binning_at_the_edges(dtype: torch.dtype) -> None:
    """The device histograms (float32 sign+exponent codes folded into bins) agree with the
    format's reference binning on bin edges, zeros, subnormals, overflow and non-finite
    values, for one tensor and for a flat layout of several."""
    from runlens_collect import stats

    edges = [2.0**k for k in range(fmt.HIST_LOG2_MIN - 2, fmt.HIST_LOG2_MAX + 3)]
    vals = [0.0, -0.0, 1e-45, 1e-40, 3.0e-8, 255.9, 256.0, 1e30, 7.0]
    vals += edges + [e * 0.999 for e in edges] + [e * 1.001 for e in edges]
    if dtype == torch.float64:
        vals += [1e300, 1e-300]
    vals += [-v for v in vals]
    torch.manual_seed(0)
    x = torch.cat([torch.tensor(vals, dtype=torch.float64), torch.randn(500, dtype=torch.float64)])
    x = x.to(dtype)
    finite = x.double()[torch.isfinite(x.double())].numpy()  # what the format counts
    want = np.bincount(fmt.hist_bin_index(finite), minlength=fmt.HIST_NUM_BINS)
    bad = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    got = stats.tensor_hist(torch.cat([x, bad]))
    assert got.tolist() == want.tolist()

    if dtype == torch.float32:
        parts = [torch.cat([x, bad]), x[:7], torch.zeros(3)]
        layout = stats.FlatLayout([t.numel() for t in parts], torch.device("cpu"))
        torch._foreach_copy_(layout.views, parts)
        flat = stats.flat_hist(layout).numpy()
        for i, t in enumerate(parts):
            ref = np.bincount(
                fmt.hist_bin_index(t.double()[torch.isfinite(t)].numpy()),
                minlength=fmt.HIST_NUM_BINS,
            )
            ref[fmt.HIST_ZERO_BIN] += layout.pads[i]  # padding: subtracted by the writer
            assert flat[i].tolist() == ref.tolist(), i


@pytest.mark.parametrize("bad_rows", [0, 3, 16, 40])
def test_single_tensor_counts_exact_up_to_the_gathered_rows(bad_rows: int) -> None:
    """Zero and non-finite counts of one tensor are exact while at most NONFINITE_CHUNKS
    rows hold inf/NaN; beyond that the extra bad rows count as wholly non-finite (an upper
    bound) and never below the truth."""
    from runlens_collect import stats

    torch.manual_seed(0)
    x = torch.randn(64, 256)
    x[x.abs() < 0.2] = 0
    for r in range(bad_rows):
        x[r, r % 7] = float("nan") if r % 2 else float("inf")
    values, shape = stats.tensor_raw(x, rows=x)  # rows of 256: one bad value each
    s1, s2, nonzero, nonfinite, absmax = stats.single_to_raw(values.numpy(), shape).tolist()
    true_nz = int((x != 0).sum())
    true_nf = int((~torch.isfinite(x)).sum())
    k = stats.NONFINITE_CHUNKS
    if bad_rows <= k:
        assert (nonzero, nonfinite) == (true_nz, true_nf)
    else:
        assert nonfinite == true_nf + (bad_rows - k) * (x.shape[1] - 1)
        assert nonzero >= true_nz
    if bad_rows == 0:
        assert s1 == pytest.approx(float(x.double().sum()), rel=1e-5, abs=1e-3)
        assert s2 == pytest.approx(float((x.double() ** 2).sum()), rel=1e-5)
        assert absmax == float(x.abs().max())
    else:
        assert not math.isfinite(s2) and not math.isfinite(absmax)


def test_code_counts_agree_on_both_paths() -> None:
    """The sync-free ``index_add_`` counting used off CPU (CUDA's bincount reads max() back
    to the host) gives exactly what CPU's bincount gives."""
    from runlens_collect import stats

    torch.manual_seed(0)
    codes = torch.randint(0, 300, (100_000,), dtype=torch.int32)
    codes[:5] = 511  # the last code, and codes absent from the data, still get a slot
    a = stats.count_codes(codes, 512, bincount=True)
    b = stats.count_codes(codes, 512, bincount=False)
    assert a.dtype == b.dtype == torch.float64
    assert a.tolist() == b.tolist() and a.sum().item() == codes.numel()


def test_free_host_buffers_are_reused_most_recent_first() -> None:
    """The ring reuses the buffers just freed instead of cycling through all of them (a
    cycle grows every buffer to the largest package and exhausts the byte budget)."""
    import queue

    slots = writer.FreeSlots(4)
    taken = [slots.get_nowait() for _ in range(4)]
    assert sorted(taken) == [0, 1, 2, 3]
    with pytest.raises(queue.Empty):
        slots.get_nowait()
    slots.put(2)
    slots.put(0)
    assert [slots.get_nowait(), slots.get_nowait()] == [0, 2]
