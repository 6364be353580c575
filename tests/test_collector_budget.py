"""The memory budget: statistics streamed through bounded buffers equal torch's own, every
trainable tensor's update is covered within K steps, and the collector never holds or
allocates more device memory than its budget (allocations tracked op by op)."""

from __future__ import annotations

import json
import math
import threading
import weakref
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from runlens_collect import Collector, activation_stats, budget, param_stats, stats, stream
from runlens_collect import format as fmt
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

TINY = 32 << 10
"""A budget far below these models' trainable bytes: streaming in several groups, tensors
cut into pieces, the update snapshot rotating over several subsets."""


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    files = sorted((run_dir / fmt.LAYERS_DIR).glob(fmt.SEGMENT_GLOB))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


def _direct(t: torch.Tensor) -> dict[str, Any]:
    v = t.detach().double().reshape(-1)
    return {
        "mean": v.mean().item(),
        "std": v.std().item() if v.numel() > 1 else math.nan,
        "norm": v.norm().item(),
        "absmax": v.abs().max().item(),
        "frac_zero": (v == 0).double().mean().item(),
        "numel": v.numel(),
        "hist": np.bincount(fmt.hist_bin_index(v.numpy()), minlength=fmt.HIST_NUM_BINS).tolist(),
    }


def _same(row: dict[str, Any], want: dict[str, Any], where: Any) -> None:
    rms = want["norm"] / math.sqrt(want["numel"])
    for stat in ("mean", "std", "norm", "absmax", "frac_zero"):
        # std comes from float32 sums and sums of squares (as it always has): when the
        # elements are nearly equal it is exact to ~1e-3 of their rms, not relatively.
        tol = 1e-3 * rms if stat == "std" else 1e-7
        assert math.isclose(row[stat], want[stat], rel_tol=1e-4, abs_tol=tol), (where, stat)
    assert row["numel"] == want["numel"], where
    if row["hist"] is not None:
        assert row["hist"] == want["hist"], where


class Wide(nn.Module):
    """Tensors of many sizes: ``big`` (300 rows) is cut into row runs, ``wide`` (2 rows of
    5000) into flat runs, the linears fit whole; ``frozen`` never trains."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.big = nn.Parameter(torch.randn(300, 40) * 0.1)
        self.wide = nn.Parameter(torch.randn(2, 5000) * 0.1)
        self.frozen = nn.Parameter(torch.randn(50, 20), requires_grad=False)
        self.a = nn.Linear(16, 64)
        self.b = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x)) + 1e-3 * (self.big.pow(2).sum() + self.wide.pow(2).sum())
        return self.b(h)


def _train(model: nn.Module, col: Collector | None, steps: int, record: dict | None = None):
    opt = col.optimizer if col is not None else None
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x, y = torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        col.step(loss=loss)
        if record is not None:
            for n, p in model.named_parameters():
                record[step, n] = (before[n], grads.get(n), p.detach() - before[n])


def test_streamed_statistics_equal_torch_under_a_tiny_budget(tmp_path: Path) -> None:
    model = Wide()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    seen: dict = {}
    knobs = {"memory_budget": TINY, "hist_every": 2, "frozen_every": 3, "activation_every": 1}
    with Collector(model, opt, run_dir=tmp_path, **knobs) as col:
        _train(model, col, 9, seen)
    assert col.warnings == []
    memory = json.loads((tmp_path / fmt.RUN_JSON).read_text())["collector"]["memory"]
    assert memory["update_subsets"] > 2 and set(memory["update_cut_tensors"]) == {"big", "wide"}
    plan = col._params._splan
    rows = _rows(tmp_path)
    updates: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        if r["kind"] == "update" and not r["missing"]:
            updates[r["step"]].append(r)
            continue
        if r["kind"] not in ("weight", "grad"):
            continue
        before, grad, _ = seen[r["step"], r["layer"]]
        if r["missing"]:
            assert r["kind"] == "grad" and r["layer"] == "frozen"
            continue
        _same(r, _direct(before if r["kind"] == "weight" else grad), (r["step"], r["layer"]))
    # frozen: weight rows on full steps only (0, 3, 6), gradient/update rows there missing
    frozen = sorted((r["step"], r["kind"], r["missing"]) for r in rows if r["layer"] == "frozen")
    assert frozen == [
        (s, k, k != "weight") for s in (0, 3, 6) for k in ("grad", "update", "weight")
    ]
    # updates: one subset per step, in turn; each row is its piece of the update
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for step in range(9):
        region = plan.regions[step % len(plan.regions)]
        got = updates[step]
        assert [r["layer"] for r in got] == [names[p.item] for p in region.pieces]
        for r, p in zip(got, region.pieces, strict=True):
            before, _, upd = seen[step, r["layer"]]
            part = stream.piece_of(upd, p)
            _same(r, _direct(part), (step, r["layer"], p))
            ratio = part.double().norm() / stream.piece_of(before, p).double().norm()
            assert math.isclose(r["update_ratio"], ratio.item(), rel_tol=1e-4)


def test_every_trainable_tensor_is_updated_within_k_stat_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)], nn.Linear(64, 3))
    trainable = sum(p.numel() * 4 for p in model.parameters())
    assert trainable > 2 * TINY  # the snapshot of all of them does not fit half the budget
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Collector(model, opt, run_dir=tmp_path, memory_budget=TINY, every=2) as col:
        for _ in range(40):
            loss = model(torch.randn(8, 64)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
    k = json.loads((tmp_path / fmt.RUN_JSON).read_text())["collector"]["memory"]["update_subsets"]
    assert k > 1
    covered: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in _rows(tmp_path):
        if r["kind"] == "update":
            assert r["step"] % 2 == 0
            covered[r["step"]][r["layer"]] += r["numel"]
    stat_steps = sorted(covered)
    numel = {n: p.numel() for n, p in model.named_parameters()}
    for i in range(len(stat_steps) - k + 1):
        window: dict[str, int] = defaultdict(int)
        for s in stat_steps[i : i + k]:
            for layer, n in covered[s].items():
                window[layer] += n
        assert dict(window) == numel, stat_steps[i : i + k]


class _Tracker(TorchDispatchMode):
    """Live bytes of the storages that ops allocate while the mode is on (an output that
    aliases no input is a new allocation), tracked by weak references until freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[Any, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        self.held()  # forget freed storages first: their addresses get reused
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr not in inputs and ptr not in self.live and st.nbytes():
                    self.live[ptr] = (weakref.ref(t), st.nbytes())
        self.peak = max(self.peak, self.held())
        return out

    def held(self) -> int:
        # a storage outlives the tensor that made it only through views: close enough
        self.live = {k: v for k, v in self.live.items() if v[0]() is not None}
        return sum(n for _, n in self.live.values())


def _tracked(mode: _Tracker, fn):
    def wrapper(*a, **k):
        with mode:
            return fn(*a, **k)

    return wrapper


@pytest.mark.parametrize("memory_budget", [512 << 10, 1 << 20])
def test_device_memory_never_exceeds_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, memory_budget: int
) -> None:
    """Every op the statistics run is watched: the bytes of tensors they allocate and that
    are still alive never exceed the budget (buffers included), on a model whose trainable
    parameters take 2-4x the budget (K > 1 subsets) and an activation (32 x 40000,
    transposed) larger than the spare buffer. (Below ~0.5 MiB a step's small tensors, ~1 KB
    per tensor and kind, outgrow the reserve kept for them: see runlens_collect.budget.)"""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.inp = nn.Linear(8, 40000)
            self.act = nn.Tanh()
            self.out = nn.Linear(40000, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.act(self.inp(x)).t().contiguous().t())

    mode = _Tracker()
    for cls, names in (
        (param_stats.ParamStats, ("__init__", "read_grads", "read_weights", "read_update")),
        (activation_stats.ActivationStats, ("record", "record_output")),
    ):
        for name in names:
            monkeypatch.setattr(cls, name, _tracked(mode, getattr(cls, name)))
    monkeypatch.setattr(budget.Workspace, "alloc", _tracked(mode, budget.Workspace.alloc))
    model = Net()
    assert sum(p.numel() * 4 for p in model.parameters()) > memory_budget
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    knobs = {"activation_every": 1, "hist_every": 1, "memory_budget": memory_budget}
    with Collector(model, opt, run_dir=tmp_path, **knobs) as col:
        for _ in range(4):
            loss = model(torch.randn(32, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
    assert col.warnings == []
    assert 0 < mode.peak <= memory_budget, (mode.peak, memory_budget)
    assert col.meta["collector"]["memory"]["update_subsets"] > 1
    assert col._workspace.peak_bytes <= memory_budget
    kinds = {r["kind"] for r in _rows(tmp_path)}
    assert kinds == set(fmt.KINDS)


def test_allocation_over_the_budget_is_refused() -> None:
    ws = budget.Workspace(torch.device("cpu"), 1000)
    ws.alloc("a", 200)  # 800 bytes
    with pytest.raises(budget.BudgetError):
        ws.alloc("b", 100)
    ws.alloc("a", 250)  # replacing a buffer frees the old one first
    assert ws.held_bytes == 1000 and ws.peak_bytes == 1000


def test_default_budget() -> None:
    assert budget.default_budget(0) == 64 << 20
    assert budget.default_budget(100 << 20) == 64 << 20
    assert budget.default_budget(28 << 30) == (28 << 30) // 64  # 7B bfloat16 x 2: 448 MiB


@pytest.mark.parametrize("spare_elems", [None, 4096, 700])
def test_one_tensor_in_blocks_equals_the_whole(spare_elems: int | None) -> None:
    """Activation statistics through a small spare buffer (many blocks) equal torch's,
    for contiguous, transposed and channels_last tensors, with inf/NaN rows spread over
    the blocks counted exactly."""
    torch.manual_seed(0)
    x = torch.randn(64, 96)
    x[::3, 5] = math.nan  # 22 bad rows, at most 16 per block of at least 2 rows... below
    x[1, 7] = math.inf
    x[2, :] = 0.0
    conv = torch.randn(4, 8, 6, 5).to(memory_format=torch.channels_last)
    spare = None if spare_elems is None else torch.empty(spare_elems)
    for t, row_len in ((x, None), (x.t(), None), (x, 96), (conv, None), (conv, 5)):
        vals, shape, h = stream.single_stats(t, spare, row_len, hist=True)
        raw = stats.single_to_raw(vals.numpy(), shape)
        v = t.double().reshape(-1)
        fin = v[torch.isfinite(v)]
        assert raw[2] == (v != 0).sum().item()
        assert raw[3] == (~torch.isfinite(v)).sum().item()
        assert math.isclose(raw[0], t.double().nansum().item(), rel_tol=1e-6) or not math.isfinite(
            raw[0]
        )
        want = np.bincount(fmt.hist_bin_index(fin.numpy()), minlength=fmt.HIST_NUM_BINS)
        assert h.tolist() == want.tolist()
        if row_len:
            assert shape[0] == t.numel() // row_len
    y = torch.randn(50, 70)
    vals, shape, _ = stream.single_stats(y, spare)
    raw = stats.single_to_raw(vals.numpy(), shape)
    assert math.isclose(raw[0], y.double().sum().item(), rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(raw[1], y.double().pow(2).sum().item(), rel_tol=1e-5)
    assert raw[4] == y.abs().max().item()
    assert vals[6].item() == y.min().item() and vals[7].item() == y.max().item()
    lo_hi = stream.saturated_fraction(y, -0.5, 0.5, spare).item()
    assert math.isclose(lo_hi, ((y <= -0.5) | (y >= 0.5)).double().mean().item(), rel_tol=1e-6)
    for cf, t in ((False, torch.relu(y)), (True, torch.relu(conv))):
        dims = (0, 2, 3) if cf else (0,)
        want = (t.abs().amax(dim=dims) == 0).double().mean().item()
        assert math.isclose(activation_stats.dead_fraction(t, cf).item(), want)


def test_no_host_sync_under_a_tiny_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The streamed, rotating, blocked path (as it runs on CUDA) never reads a value back
    on the training thread."""
    main = threading.main_thread()

    def forbid(name: str) -> None:
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            if threading.current_thread() is main:
                raise AssertionError(f"Tensor.{name} called on the training thread")
            return orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    model = Wide()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for name in ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__"):
        forbid(name)
    knobs = {"memory_budget": TINY, "hist_every": 2, "frozen_every": 2, "activation_every": 1}
    with Collector(model, opt, run_dir=tmp_path, **knobs) as col:
        _train(model, col, 6)
    monkeypatch.undo()
    assert col.warnings == []
    steps = {r["step"] for r in _rows(tmp_path) if r["kind"] == "update"}
    assert steps == set(range(6))
