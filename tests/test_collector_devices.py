"""The collector's step path on every device at hand (CPU always; CUDA when there is one:
``benchmarks/gpu_check.py`` runs this module there).

On CUDA the step runs under ``torch.cuda.set_sync_debug_mode("error")``, so any host sync
the collector makes fails (the bare step is checked first: a sync of the model's own is
not ours); on CPU the same code runs with the host reads patched to fail on the training
thread. The statistics are compared with torch's own, computed on the device, and the
device memory the collector allocates is measured (CUDA: ``torch.cuda.memory_allocated``)
against its budget.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from runlens_collect import Collector
from runlens_collect import format as fmt
from torch import nn

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


@contextlib.contextmanager
def no_host_sync(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail on any host sync: CUDA's sync debug mode, or (CPU) the host reads patched to
    raise on the training thread."""
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return
    main = threading.main_thread()
    with monkeypatch.context() as mp:
        for name in ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__"):
            orig = getattr(torch.Tensor, name)

            def wrapper(self, *a, _orig=orig, _name=name, **k):
                if threading.current_thread() is main:
                    raise AssertionError(f"Tensor.{_name} on the training thread")
                return _orig(self, *a, **k)

            mp.setattr(torch.Tensor, name, wrapper)
        yield


class Net(nn.Module):
    """Conv + BN (channel-first dead units), a frozen embedding, a tanh MLP head: every
    kind of statistic and a frozen parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.emb = nn.Embedding(10, 16)
        self.emb.requires_grad_(False)
        self.fc = nn.Linear(8 * 8 * 8 + 16, 64)
        self.tanh = nn.Tanh()
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn(self.conv(x))).flatten(1)
        return self.head(self.tanh(self.fc(torch.cat([h, self.emb(tok)], 1))))


def _batches(device: torch.device, n: int) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(16, 3, 8, 8, generator=g)
        tok = torch.randint(0, 10, (16,), generator=g)
        y = torch.randint(0, 5, (16,), generator=g)
        out.append((x.to(device), tok.to(device), y.to(device)))
    return out


def _step(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple) -> torch.Tensor:
    x, tok, y = batch
    loss = nn.functional.cross_entropy(model(x, tok), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    files = sorted((run_dir / fmt.LAYERS_DIR).glob(fmt.SEGMENT_GLOB))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


@pytest.mark.parametrize("budget", [None, 512 << 10])
def test_step_path_never_syncs_and_statistics_match(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: torch.device, budget: int | None
) -> None:
    torch.manual_seed(0)
    model = Net().to(device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    batches = _batches(device, 6)
    bare = Net().to(device)
    bare_opt = torch.optim.SGD([p for p in bare.parameters() if p.requires_grad], lr=0.05)
    with no_host_sync(device, monkeypatch):
        _step(bare, bare_opt, batches[0])  # the model's own step does not sync
    knobs = {"activation_every": 1, "hist_every": 2, "frozen_every": 2, "memory_budget": budget}
    seen: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None]] = {}
    with Collector(model, opt, run_dir=tmp_path, **knobs) as col:
        for step, batch in enumerate(batches):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            with no_host_sync(device, monkeypatch):
                # the reads happen in the optimizer hooks: what they saw is what we keep
                loss = _step(model, opt, batch)
                col.step(loss=loss)
            for n, p in model.named_parameters():
                seen[step, n] = (before[n], p.grad.detach().clone() if p.grad is not None else None)
    assert col.warnings == []
    rows = _rows(tmp_path)
    checked = 0
    for r in rows:
        if r["kind"] not in ("weight", "grad") or r["missing"]:
            continue
        w, g = seen[r["step"], r["layer"]]
        t = (w if r["kind"] == "weight" else g).double()
        assert math.isclose(r["norm"], t.norm().item(), rel_tol=1e-4), r
        assert math.isclose(r["mean"], t.mean().item(), rel_tol=1e-3, abs_tol=1e-6), r
        if r["hist"] is not None:
            v = t.cpu().numpy().reshape(-1)
            want = np.bincount(fmt.hist_bin_index(v), minlength=fmt.HIST_NUM_BINS)
            assert r["hist"] == want.tolist(), r
        checked += 1
    assert checked > 0
    frozen = sorted({r["step"] for r in rows if r["layer"] == "emb.weight"})
    assert frozen == [0, 2, 4]
    kinds = {r["kind"] for r in rows}
    assert kinds == set(fmt.KINDS)


def test_collector_device_memory_within_budget(tmp_path: Path, device: torch.device) -> None:
    """CUDA: the memory the collector's buffers and temporaries take beyond the training's
    own peak stays within its budget (torch.cuda.max_memory_allocated). CPU: the
    workspace's own count (the op-by-op count is test_collector_budget's)."""
    budget = 1 << 20
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 40000), nn.Tanh(), nn.Linear(40000, 4)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, 8, device=device)

    def step(col: Collector | None) -> None:
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if col is not None:
            col.step(loss=loss)

    if device.type == "cuda":
        step(None)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step(None)
        torch.cuda.synchronize()
        bare_peak = torch.cuda.max_memory_allocated()
    knobs = {"activation_every": 1, "hist_every": 1, "memory_budget": budget}
    with Collector(model, opt, run_dir=tmp_path, **knobs) as col:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step(col)
        if device.type == "cuda":
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - bare_peak
            assert extra <= budget, (extra, budget)
    assert col.warnings == []
    assert col._workspace.peak_bytes <= budget
