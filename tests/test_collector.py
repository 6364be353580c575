"""The collector end to end on CPU: what it records, and that it equals torch's own numbers."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import runlens_collect
import torch
from runlens_collect import Collector
from runlens_collect import format as fmt
from torch import nn

RTOL = 1e-4


def read_table(run_dir, table: str) -> dict[str, list]:
    """All segments of one table, read with pyarrow directly, as columns of Python values."""
    files = sorted((run_dir / table).glob(fmt.SEGMENT_GLOB))
    assert files, f"no {table} segments"
    t = pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")
    return {name: t.column(name).to_pylist() for name in t.column_names}


def scalar_values(run_dir) -> dict[tuple[int, str], float]:
    """(step, name) -> value of every scalar row (read_table's columns)."""
    cols = read_table(run_dir, fmt.SCALARS_DIR)
    return {(s, n): v for s, n, v in zip(cols["step"], cols["name"], cols["value"], strict=True)}


def rows(cols, **where):
    n = len(cols["step"])
    out = []
    for i in range(n):
        if all(cols[k][i] == v for k, v in where.items()):
            out.append({k: cols[k][i] for k in cols})
    return out


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
    )


def direct(t: torch.Tensor) -> dict[str, float]:
    x = t.detach().double().reshape(-1)
    return {
        "mean": x.mean().item(),
        "std": x.std().item(),
        "norm": x.norm().item(),
        "absmax": x.abs().max().item(),
        "frac_zero": (x == 0).double().mean().item(),
    }


def close(a: float, b: float, rtol: float = RTOL, atol: float = 1e-7) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)


def test_records_everything_and_matches_torch(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    names = [n for n, _ in model.named_parameters()]
    expected: dict[tuple[int, str, str], dict[str, float]] = {}
    hists: dict[tuple[int, str, str], np.ndarray] = {}
    relu_outs: dict[int, torch.Tensor] = {}
    model[1].register_forward_hook(lambda m, a, o: relu_outs.__setitem__(0, o.detach().clone()))
    outputs: dict[int, torch.Tensor] = {}
    steps = 7
    gen = torch.Generator().manual_seed(1)
    with Collector(model, opt, run_dir=tmp_path, activation_every=3, hist_every=3) as col:
        for step in range(steps):
            x = torch.randn(16, 6, generator=gen)
            y = torch.randint(0, 3, (16,), generator=gen)
            out = model(x)
            outputs[step] = out.detach().clone()
            loss = nn.functional.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            opt.step()
            for n, p in model.named_parameters():
                upd = p.detach() - before[n]
                expected[(step, n, "weight")] = direct(before[n])
                expected[(step, n, "grad")] = direct(grads[n])
                expected[(step, n, "update")] = {
                    **direct(upd),
                    "update_ratio": (upd.double().norm() / before[n].double().norm()).item(),
                }
                if step % 3 == 0:
                    for kind, t in (("weight", before[n]), ("grad", grads[n]), ("update", upd)):
                        idx = fmt.hist_bin_index(t.double().numpy().reshape(-1))
                        hists[(step, n, kind)] = np.bincount(idx, minlength=fmt.HIST_NUM_BINS)
            expected[(step, "total", "grad_norm")] = {
                "v": torch.cat([g.reshape(-1) for g in grads.values()]).double().norm().item()
            }
            if step % 3 == 0:
                r = relu_outs[0]
                expected[(step, "1", "dead")] = {"v": (r == 0).all(0).double().mean().item()}
                expected[(step, "1", "relu")] = direct(r)
            col.step(loss=loss, acc=torch.tensor(0.25))
            col.log({"val/loss": 2.0 * step})
    assert col.warnings == []

    layers = read_table(tmp_path, fmt.LAYERS_DIR)
    for step in range(steps):
        for n in names:
            for kind in ("weight", "grad", "update"):
                (row,) = rows(layers, step=step, layer=n, kind=kind)
                assert row["missing"] is False
                for stat, want in expected[(step, n, kind)].items():
                    assert close(row[stat], want), (step, n, kind, stat, row[stat], want)
                if step % 3 == 0:
                    assert row["hist"] == hists[(step, n, kind)].tolist(), (step, n, kind)
                else:
                    assert row["hist"] is None
        out = rows(layers, step=step, kind="output")
        if step % 3:  # the model output is recorded at the activation cadence
            assert out == [] and rows(layers, step=step, kind="activation") == []
            continue
        assert len(out) == 1 and out[0]["layer"] == fmt.OUTPUT_LAYER
        o = outputs[step].double()
        want = {
            **direct(o),
            "min": o.min().item(),
            "max": o.max().item(),
            "row_sum_mean": o.sum(-1).mean().item(),
        }
        for stat, v in want.items():
            assert close(out[0][stat], v), (step, "output", stat, out[0][stat], v)
        acts = rows(layers, step=step, kind="activation")
        if step % 3 == 0:
            assert {a["layer"] for a in acts} == {"0", "1", "2", "3", "4"}
            (relu,) = rows(layers, step=step, kind="activation", layer="1")
            assert close(relu["frac_dead_units"], expected[(step, "1", "dead")]["v"])
            for stat, v in expected[(step, "1", "relu")].items():
                assert close(relu[stat], v), (step, "relu", stat, relu[stat], v)
            assert relu["frac_zero"] > 0
        else:
            assert acts == []

    scalars = read_table(tmp_path, fmt.SCALARS_DIR)
    by_name: dict[str, dict[int, float]] = {}
    for s, n, v in zip(scalars["step"], scalars["name"], scalars["value"], strict=True):
        by_name.setdefault(n, {})[s] = v
    for step in range(steps):
        assert close(by_name["grad_norm"][step], expected[(step, "total", "grad_norm")]["v"])
        assert by_name["lr/0"][step] == 0.05
        assert by_name["train/acc"][step] == 0.25
        assert by_name["val/loss"][step] == 2.0 * step
    assert set(by_name["time/step"]) == set(range(1, steps))
    assert all(v >= 0 for v in by_name["time/data"].values())
    assert len(by_name["train/loss"]) == steps

    meta = json.loads((tmp_path / fmt.RUN_JSON).read_text())
    assert set(meta) >= set(fmt.RUN_JSON_KEYS)
    assert meta["status"] == fmt.STATUS_FINISHED and meta["last_step"] == steps - 1
    assert meta["model"]["output_shape"] == [16, 3]
    assert set(meta["model"]) >= set(fmt.MODEL_SUMMARY_KEYS)
    assert {"argv", "git_commit", "torch_initial_seed"} <= set(meta["repro"])
    events = [json.loads(line) for line in (tmp_path / fmt.EVENTS_JSONL).read_text().splitlines()]
    assert [e["kind"] for e in events] == ["start", "close"]


def test_no_host_sync_on_training_thread(tmp_path, monkeypatch):
    main = threading.main_thread()

    def forbid(name):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            if threading.current_thread() is main:
                raise AssertionError(f"Tensor.{name} called on the training thread")
            return orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    model = mlp()
    # SGD: Adam reads its step counter with .item() on CPU, which is not ours to test.
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(6)]
    for name in ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__"):
        forbid(name)

    def no_sync(*a, **k):
        raise AssertionError("cuda.synchronize on the training thread")

    monkeypatch.setattr(torch.cuda, "synchronize", no_sync)
    with Collector(model, opt, run_dir=tmp_path, activation_every=2, hist_every=2) as col:
        for x, y in data:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss, acc=(loss * 0 + 1))
            runlens_collect.log({"val/loss": loss.detach() * 2})
    monkeypatch.undo()
    assert col.warnings == []
    layers = read_table(tmp_path, fmt.LAYERS_DIR)
    n_params = len(list(model.parameters()))
    for step in range(len(data)):
        for kind in ("weight", "grad", "update"):
            got = rows(layers, step=step, kind=kind)
            assert len(got) == n_params and not any(r["missing"] for r in got)
    scalars = read_table(tmp_path, fmt.SCALARS_DIR)
    assert scalars["name"].count("train/loss") == len(data)
    assert scalars["name"].count("val/loss") == len(data)


def test_no_host_sync_with_amp_accumulation_and_clipping(tmp_path, monkeypatch):
    """The step contract's paths (GradScaler outputs mapped back, accumulation undone,
    the loss scale, a fused optimizer's grad_scale and found_inf, the pre-clip norm) read
    no device value on the training thread either."""
    main = threading.main_thread()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(8)]
    col = Collector(model, opt, run_dir=tmp_path, activation_every=2, hist_every=2)
    for name in ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__"):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, _orig=orig, _name=name, **k):
            if threading.current_thread() is main:
                raise AssertionError(f"Tensor.{_name} called on the training thread")
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    for step in range(4):
        opt.zero_grad()
        for x, y in data[2 * step : 2 * step + 2]:
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)  # (scaled: a no-op clip)
        scaler.step(opt)
        scaler.update()
        col.step()
    monkeypatch.undo()
    col.close()
    assert col.warnings == []
    scalars = read_table(tmp_path, fmt.SCALARS_DIR)
    for name in (fmt.TRAIN_LOSS, fmt.LOSS_SCALE, fmt.STEP_SKIPPED, fmt.GRAD_NORM_PRECLIP):
        assert scalars["name"].count(name) == 4, name


@pytest.mark.parametrize("frozen_every", [1, 100])
def test_frozen_unoptimized_integer_and_none_grads(tmp_path, frozen_every):
    """Frozen parameters (requires_grad=False) are recorded on full steps only (step 0,
    then every frozen_every stat steps): weights, and missing grad/update rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 2))
    model[0].requires_grad_(False)  # frozen
    model.register_parameter("counter", nn.Parameter(torch.arange(5), requires_grad=False))
    model.register_buffer("ints", torch.arange(3))
    opt = torch.optim.SGD(list(model[2].parameters()) + list(model[3].parameters()), lr=0.1)
    # model[3] gets no gradient in odd steps (its output is unused there)
    knobs = {"activation_every": 1, "frozen_every": frozen_every}
    with Collector(model, opt, run_dir=tmp_path, **knobs) as col:
        for step in range(4):
            h = model[2](model[1](model[0](torch.randn(5, 4))))
            loss = (model[3](h) if step % 2 == 0 else h).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
    assert col.warnings == []
    layers = read_table(tmp_path, fmt.LAYERS_DIR)
    for step in range(4):
        for n in ("0.weight", "0.bias", "counter"):
            if step % frozen_every:  # not sampled: no rows at all
                assert rows(layers, step=step, layer=n) == []
                continue
            (g,) = rows(layers, step=step, layer=n, kind="grad")
            assert g["missing"] is True and math.isnan(g["norm"])
            (u,) = rows(layers, step=step, layer=n, kind="update")
            assert u["missing"] is True
            (w,) = rows(layers, step=step, layer=n, kind="weight")
            assert w["missing"] is False
        (g,) = rows(layers, step=step, layer="3.weight", kind="grad")
        (u,) = rows(layers, step=step, layer="3.weight", kind="update")
        assert g["missing"] is (step % 2 == 1)
        assert u["missing"] is False
        if step % 2 == 1:
            assert u["update_ratio"] == 0.0  # in the optimizer, no grad: unchanged
    (w,) = rows(layers, step=0, layer="counter", kind="weight")
    assert w["mean"] == 2.0 and w["numel"] == 5
    (t,) = rows(layers, step=0, layer="1", kind="activation")
    assert t["frac_saturated"] is not None and 0.0 <= t["frac_saturated"] <= 1.0


def test_exception_in_stats_is_swallowed_once(tmp_path, monkeypatch):
    from runlens_collect import stats

    def boom(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(stats, "row_partials", boom)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.warns(RuntimeWarning, match="injected") as record,
        Collector(model, opt, run_dir=tmp_path) as col,
    ):
        for _ in range(5):
            loss = model(torch.randn(4, 6)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
    ours = [w for w in record if "runlens_collect" in str(w.message)]
    assert len(ours) == 1
    events = [json.loads(line) for line in (tmp_path / fmt.EVENTS_JSONL).read_text().splitlines()]
    assert any(e["kind"] == "warning" and "injected" in e["message"] for e in events)
    assert events[-1]["kind"] == "close"
    scalars = read_table(tmp_path, fmt.SCALARS_DIR)
    assert scalars["name"].count("train/loss") == 5  # the rest still recorded


def test_writer_oserror_is_reported_and_training_continues(tmp_path, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fmt, "write_segment", full)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.warns(RuntimeWarning, match="No space left") as record,
        Collector(model, opt, run_dir=tmp_path, flush_steps=2) as col,
    ):
        for _ in range(6):
            loss = model(torch.randn(4, 6)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
    assert len([w for w in record if "runlens_collect" in str(w.message)]) == 1
    events = [json.loads(line) for line in (tmp_path / fmt.EVENTS_JSONL).read_text().splitlines()]
    assert any(e["kind"] == "warning" and "No space" in e["message"] for e in events)
    assert json.loads((tmp_path / fmt.RUN_JSON).read_text())["status"] == fmt.STATUS_FINISHED


def test_writer_behind_drops_steps_without_blocking(tmp_path, monkeypatch):
    from runlens_collect import writer

    gate = threading.Event()
    orig = writer.Writer._consume

    def slow(self, pkg):
        gate.wait(10)
        orig(self, pkg)

    monkeypatch.setattr(writer.Writer, "_consume", slow)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="fell behind"):
        col = Collector(model, opt, run_dir=tmp_path, max_queue=2)
        for _ in range(10):
            loss = model(torch.randn(4, 6)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
        gate.set()
        col.close()
    events = [json.loads(line) for line in (tmp_path / fmt.EVENTS_JSONL).read_text().splitlines()]
    skipped = [e for e in events if e["kind"] == "skipped"]
    assert skipped and skipped[0]["total"] >= 1


def test_nonfinite_event_and_eval_not_recorded(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Collector(model, opt, run_dir=tmp_path, activation_every=1) as col:
        for step in range(3):
            loss = model(torch.randn(4, 6)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss * float("nan") if step == 1 else loss)
            model.eval()
            with torch.no_grad():
                model(torch.randn(100, 6))  # must not replace the training activations
            model.train()
    events = [json.loads(line) for line in (tmp_path / fmt.EVENTS_JSONL).read_text().splitlines()]
    nf = [e for e in events if e["kind"] == "nonfinite"]
    assert (
        nf and nf[0]["step"] == 1 and nf[0]["where"] == "scalar" and nf[0]["name"] == "train/loss"
    )
    layers = read_table(tmp_path, fmt.LAYERS_DIR)
    assert {r["numel"] for r in rows(layers, kind="output")} == {12}


def test_no_optimizer_reads_grads_at_step(tmp_path):
    model = mlp()
    with Collector(model, None, run_dir=tmp_path) as col:
        for _ in range(3):
            model.zero_grad()
            model(torch.randn(4, 6)).sum().backward()
            col.step()
    layers = read_table(tmp_path, fmt.LAYERS_DIR)
    assert set(layers["kind"]) == {"weight", "grad", "activation", "output"}
    assert not any(r["missing"] for r in rows(layers, kind="grad"))


def test_tied_parameters_recorded_once(tmp_path):
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Collector(model, opt, run_dir=tmp_path) as col:
        loss = model(torch.randint(0, 10, (3,))).sum()
        loss.backward()
        opt.step()
        col.step(loss=loss)
    layers = read_table(tmp_path, fmt.LAYERS_DIR)
    assert {r["layer"] for r in rows(layers, kind="grad")} == {"0.weight"}


def test_log_is_noop_without_collector():
    from runlens_collect import _active

    assert _active.get_active() is None
    runlens_collect.log({"val/loss": torch.tensor(1.0)})


def test_compiled_model(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        compiled = torch.compile(model, backend="eager")
        compiled(torch.randn(2, 6))
    except Exception as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"torch.compile unavailable: {exc}")
    with Collector(compiled, opt, run_dir=tmp_path, activation_every=1) as col:
        for _ in range(3):
            loss = compiled(torch.randn(4, 6)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
    assert col.warnings == []
    layers = read_table(tmp_path, fmt.LAYERS_DIR)
    assert "0.weight" in set(layers["layer"])
    assert len(rows(layers, kind="output")) == 3


def test_flat_stats_count_nonfinite_and_zeros_exactly():
    from runlens_collect import stats

    torch.manual_seed(0)
    nan, inf = float("nan"), float("inf")
    ts = [
        torch.randn(3000),
        torch.tensor([1.0, nan, inf, -inf, 0.0, 1e-30, -300.0, 256.0]),
        torch.zeros(7),
    ]
    layout = stats.FlatLayout([t.numel() for t in ts], torch.device("cpu"))
    torch._foreach_copy_(layout.views, ts)
    raw = stats.flat_raw(layout)
    for i, t in enumerate(ts):
        # sum, sumsq, nonzero, nonfinite, absmax
        assert raw[i, 2].item() == (t != 0).sum().item()
        assert raw[i, 3].item() == (~torch.isfinite(t)).sum().item()
        values, shape = stats.tensor_raw(t)
        single = stats.single_to_raw(values.numpy(), shape)
        assert raw[i].tolist()[:4] == pytest.approx(single.tolist()[:4], nan_ok=True)


@pytest.mark.parametrize("clip_all", [True, False])
def test_off_step_grad_norm_after_a_clip_equals_the_clipped_gradients_norm(tmp_path, clip_all):
    """Off stat steps, a clip of every gradient gives grad_norm without reading them (the
    clip's norm times its factor); a clip of some of them does not. Either way grad_norm
    is the norm of the gradients the optimizer applied, computed here from the gradients
    themselves."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    truth, pre, post = [], [], []  # post: the clipped parameters' norm after the clip
    with Collector(model, opt, run_dir=tmp_path, every=4, overhead=None) as col:
        for step in range(12):
            x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            params = list(model.parameters()) if clip_all else list(model[0].parameters())
            # max_norm below the norm on even steps only: both branches of the clip
            pre.append(float(torch.nn.utils.clip_grad_norm_(params, 0.05 if step % 2 else 50.0)))
            post.append(math.sqrt(sum(float(p.grad.double().square().sum()) for p in params)))
            truth.append(
                math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))
            )
            opt.step()
            col.step(loss=0.0)
    assert col.warnings == []
    scalars = scalar_values(tmp_path)
    norms = [scalars[s, fmt.GRAD_NORM] for s in range(12)]
    np.testing.assert_allclose(norms, truth, rtol=1e-5)
    np.testing.assert_allclose(
        [scalars[s, fmt.GRAD_NORM_PRECLIP] for s in range(12)], pre, rtol=1e-6
    )
    assert any(q < p * 0.9 for q, p in zip(post, pre, strict=True))  # some steps did clip


def test_off_step_grad_norm_without_a_clip_is_the_norm_of_the_gradients_present(tmp_path):
    """Off stat steps without a clip, grad_norm is computed from the gradients (on a CPU
    run the writer thread combines the per-tensor norms): the 2-norm of every gradient
    there, also on steps where one parameter got none (its ``.grad`` is None: a branch the
    step did not use) and after it gets one again."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    side = nn.Linear(8, 4)  # used on odd steps only
    params = [*model.parameters(), *side.parameters()]
    opt = torch.optim.SGD(params, lr=0.05)
    truth = []
    with Collector(
        nn.ModuleList([model, side]), opt, run_dir=tmp_path, every=5, overhead=None
    ) as col:
        for step in range(12):
            x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
            opt.zero_grad()
            out = model(x) + (side(x) if step % 2 else 0.0)
            nn.functional.cross_entropy(out, y).backward()
            truth.append(
                math.sqrt(
                    sum(float(p.grad.double().square().sum()) for p in params if p.grad is not None)
                )
            )
            opt.step()
            col.step(loss=0.0)
    assert col.warnings == []
    scalars = scalar_values(tmp_path)
    np.testing.assert_allclose([scalars[s, fmt.GRAD_NORM] for s in range(12)], truth, rtol=1e-6)


def test_a_bare_model_stepped_quietly_is_not_seen_by_the_collector(tmp_path):
    """The overhead benchmarks train a bare twin in the collector's process: inside
    ``observe.quiet()`` its loss and backward reach no collector, so the loss recorded
    from the observed backward passes is the collected model's alone."""
    from runlens_collect import observe

    torch.manual_seed(0)
    seen, bare = nn.Linear(4, 2), nn.Linear(4, 2)
    opt_s, opt_b = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (seen, bare))
    losses = []
    with Collector(seen, opt_s, run_dir=tmp_path) as col:
        for _ in range(5):
            x = torch.randn(8, 4)
            with observe.quiet():
                opt_b.zero_grad()
                nn.functional.mse_loss(bare(x), torch.ones(8, 2) * 5).backward()
                opt_b.step()
            opt_s.zero_grad()
            loss = nn.functional.mse_loss(seen(x), torch.zeros(8, 2))
            loss.backward()
            opt_s.step()
            col.step()  # the loss: the mean of the step's observed backward passes
            losses.append(float(loss))
    rows = [r for f in sorted((tmp_path / fmt.SCALARS_DIR).glob(fmt.SEGMENT_GLOB))
            for r in pq.read_table(f).to_pylist() if r["name"] == fmt.TRAIN_LOSS]  # fmt: skip
    np.testing.assert_allclose(
        [r["value"] for r in sorted(rows, key=lambda r: r["step"])], losses, rtol=1e-6
    )
