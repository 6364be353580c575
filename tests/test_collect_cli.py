"""`runlens collect -- COMMAND`: unmodified scripts recorded through the zero-code bootstrap.

Each test writes a plain training script (no runlens import) to a temporary directory and
runs it under the real CLI in a subprocess, then reads the run it produced.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import runlens_collect
import torch
from click.testing import CliRunner
from runlens_collect import Collector

from runlens.cli import cli
from runlens.run import load_run

# A plain training script: seeded, argparse, a validation loop under no_grad; `train` takes
# callbacks so the test can also drive it with an explicit Collector in-process.
TRAIN_PY = """
import argparse
import sys

import torch
from torch import nn


def train(lr, steps, on_start=None, on_step=None, on_val=None, mode="ok", gamma=0.5):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=gamma)
    if on_start:
        on_start(model, opt)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    xv = torch.randn(64, 8, generator=g)
    yv = (xv[:, 0] > 0).long() + (xv[:, 1] > 0).long()
    for step in range(steps):
        idx = torch.randint(0, 256, (32,), generator=g)
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if on_step:
            on_step(loss)
        sched.step()
        if step == 7 and mode == "crash":
            raise RuntimeError("boom at step 7")
        if step % 4 == 3:
            model.eval()
            with torch.no_grad():
                losses = [loss_fn(model(xv[i:i + 32]), yv[i:i + 32]) for i in (0, 32)]
                val = sum(v.item() for v in losses) / len(losses)
            model.train()
            if on_val:
                on_val(val)
    print(f"trained {steps} steps", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--mode", choices=["ok", "exit1", "crash"], default="ok")
    parser.add_argument("--gamma", type=float, default=0.5)
    args = parser.parse_args()
    train(args.lr, args.steps, mode=args.mode, gamma=args.gamma)
    if args.mode == "exit1":
        sys.exit(1)
"""

# Run with `python -m toypkg.workers`: a DataLoader with two worker processes whose
# worker_init_fn steps an optimizer of its own (an unguarded worker would start a
# collector), a GAN-like pair of optimizers, and runlens_collect.log from the script.
WORKERS_PY = """
import os
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def worker_init(worker_id):
    m = nn.Linear(2, 1)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.ones(1, 2)).sum().backward()
    opt.step()
    with open(os.path.join(os.environ["WORKER_LOG"], f"w{worker_id}-{os.getpid()}"), "w"):
        pass


def main():
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    disc = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-3)
    bce = nn.BCEWithLogitsLoss()
    data = TensorDataset(torch.randn(96, 4))
    loader = DataLoader(data, batch_size=16, num_workers=2, worker_init_fn=worker_init)
    for (real,) in loader:
        fake = gen(torch.randn(16, 4))
        d_loss = bce(disc(real), torch.ones(16, 1)) + bce(disc(fake.detach()), torch.zeros(16, 1))
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        g_loss = bce(disc(fake), torch.ones(16, 1))
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
        try:
            import runlens_collect
        except ImportError:
            pass
        else:
            runlens_collect.log({"custom/d_minus_g": float(d_loss - g_loss)})
    print("gan done")


if __name__ == "__main__":
    main()
"""

# A regression at lr 1e3: the loss overflows to inf, then NaN, within a few steps.
DIVERGE_PY = """
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=1e3)
x = torch.randn(64, 4)
y = x.sum(1, keepdim=True)
for step in range(40):
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
print("final loss", loss.item())
"""

# Trains until interrupted.
FOREVER_PY = """
import time
import torch
from torch import nn

m = nn.Linear(2, 1)
opt = torch.optim.SGD(m.parameters(), lr=0.1)
for i in range(10**9):
    m(torch.ones(4, 2)).pow(2).mean().backward()
    opt.step()
    if i == 3:
        print("ready", flush=True)
    time.sleep(0.01)
"""

# The CLI as the user runs it, in its own interpreter.
RUNLENS = [sys.executable, "-c", "from runlens.cli import main; main()"]
STATS = ("mean", "std", "norm", "absmax", "frac_zero", "frac_nonfinite")
PY = sys.executable


def collect(args: list[str], cwd: Path, env: dict[str, str] | None = None):
    return subprocess.run(
        [*RUNLENS, "collect", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def interrupt(cwd: Path) -> tuple[int, str]:
    """Start a run, SIGINT the runlens process once training is under way."""
    cmd = [*RUNLENS, "collect", "--out", "runs", "--name", "sigint", "--", PY, "forever.py"]
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline().strip()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc.returncode if ready == "ready" else -999, err


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("collect")
    (d / "train.py").write_text(TRAIN_PY)
    (d / "diverge.py").write_text(DIVERGE_PY)
    (d / "forever.py").write_text(FOREVER_PY)
    (d / "toypkg").mkdir()
    (d / "toypkg" / "__init__.py").write_text("")
    (d / "toypkg" / "workers.py").write_text(WORKERS_PY)
    (d / "worker_log").mkdir()
    return d


@pytest.fixture(scope="module")
def launched(work):
    """Every `runlens collect` of this module, started together: each one is a fresh
    interpreter importing torch, mostly single-threaded, so they overlap well."""
    jobs = {
        # fixed cadences (--overhead none) like the explicit reference: the overhead budget
        # would thin them by wall-clock time
        "plain": [
            *("--activation-every", "4", "--hist-every", "5", "--overhead", "none"),
            *("--", PY, "train.py"),
        ],
        "mode-exit1": ["--", PY, "train.py", "--mode", "exit1"],
        "mode-crash": ["--", PY, "train.py", "--mode", "crash"],
        "diverge": ["--analyze", "--", PY, "diverge.py"],
    }
    pool = ThreadPoolExecutor(max_workers=3)
    futures = {
        name: pool.submit(collect, ["--out", "runs", "--name", name, *args], work)
        for name, args in jobs.items()
    }
    workers_args = ["--out", "gan_runs", "--name", "gan", "--", PY, "-m", "toypkg.workers"]
    futures["gan"] = pool.submit(
        collect, workers_args, work, {"WORKER_LOG": str(work / "worker_log")}
    )
    futures["sigint"] = pool.submit(interrupt, work)
    yield futures
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def explicit(work, tmp_path_factory) -> Path:
    """The same script driven in-process with an explicit Collector: the reference."""
    spec = importlib.util.spec_from_file_location("plain_train", work / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run_dir = tmp_path_factory.mktemp("explicit") / "run"
    cols: list[Collector] = []
    threads = torch.get_num_threads()
    try:
        module.train(
            0.05,
            12,
            on_start=lambda model, opt: cols.append(
                Collector(model, opt, run_dir=run_dir, activation_every=4, hist_every=5)
            ),
            on_step=lambda loss: cols[0].step(loss=loss),
            on_val=lambda v: cols[0].log({"val/loss": v}),
        )
    finally:
        torch.set_num_threads(threads)
        for c in cols:
            c.close()
    return run_dir


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    run = load_run(run_dir)
    out = {}
    for name in run.scalar_names:
        s = run.scalar(name)
        out[name] = dict(zip(s.steps.tolist(), s.values.tolist(), strict=True))
    return out


def layer_rows(run_dir: Path) -> pl.DataFrame:
    run = load_run(run_dir)
    return (
        run.layers.select(
            "step",
            pl.col("layer").cast(pl.String),
            pl.col("kind").cast(pl.String),
            "numel",
            "missing",
            *STATS,
            "update_ratio",
            "frac_dead_units",
            "frac_saturated",
            "hist",
        )
        .collect()
        .sort("step", "kind", "layer")
    )


def test_zero_code_run_matches_explicit_collector(launched, work, explicit):
    proc, run_dir = launched["plain"].result(), work / "runs" / "plain"
    assert proc.returncode == 0, proc.stderr
    assert "trained 12 steps" in proc.stdout  # the child's stdout passes through
    assert f"run recorded in {run_dir.resolve()}" in proc.stderr
    assert "runlens analyze" in proc.stderr
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"

    got, want = scalars(run_dir), scalars(explicit)
    for name in ("train/loss", "lr/0", "val/loss", "grad_norm"):
        assert sorted(got[name]) == sorted(want[name]), name
        steps = sorted(want[name])
        np.testing.assert_allclose(
            [got[name][s] for s in steps], [want[name][s] for s in steps], rtol=1e-5, err_msg=name
        )
    assert sorted(got["val/loss"]) == [3, 7, 11]  # logged at the step the pass followed
    assert len(set(got["lr/0"].values())) == 3  # the StepLR schedule is seen

    a, b = layer_rows(run_dir), layer_rows(explicit)
    assert a.height == b.height and a.height > 0
    assert a.select("step", "layer", "kind").equals(b.select("step", "layer", "kind"))
    assert set(a["kind"]) == {"weight", "grad", "update", "activation", "output"}
    assert sorted(set(a.filter(pl.col("kind") == "activation")["step"])) == [0, 4, 8]
    for col in (*STATS, "update_ratio", "frac_dead_units", "frac_saturated"):
        np.testing.assert_allclose(
            a[col].to_numpy().astype(float),
            b[col].to_numpy().astype(float),
            rtol=1e-4,
            atol=1e-7,
            err_msg=col,
        )
    assert a["hist"].to_list() == b["hist"].to_list()


@pytest.mark.parametrize("mode, status", [("exit1", "finished"), ("crash", "crashed")])
def test_exit_code_and_status_propagate(launched, work, mode, status):
    proc = launched[f"mode-{mode}"].result()
    run_dir = work / "runs" / f"mode-{mode}"
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == status
    if mode == "exit1":
        assert proc.returncode == 1
        assert meta["last_step"] == 11
    else:
        assert proc.returncode == 1  # Python's status for an uncaught exception
        assert "Traceback (most recent call last)" in proc.stderr
        assert "RuntimeError: boom at step 7" in proc.stderr
        assert meta["last_step"] == 7
    assert f"run recorded in {run_dir.resolve()}" in proc.stderr
    assert len(load_run(run_dir).scalar("train/loss")) == meta["last_step"] + 1


def test_python_m_dataloader_workers_and_two_optimizers(launched, work):
    proc = launched["gan"].result()
    assert proc.returncode == 0, proc.stderr
    assert "gan done" in proc.stdout
    assert len(list((work / "worker_log").iterdir())) == 2  # both workers stepped...
    # ...and started no collector: one run per optimizer of the main process, nothing else.
    runs = sorted(p.name for p in (work / "gan_runs").iterdir())
    assert runs == ["gan", "gan-2"]
    batches = 96 // 16
    first, second = (load_run(work / "gan_runs" / r) for r in runs)
    for run in (first, second):
        assert run.status == "finished"
        assert len(run.scalar("train/loss")) == batches
        assert run.has_layers("update")
    # The generator's forward comes first, so its optimizer's run is the first one.
    assert first.config["optimizer"] == "Adam" and first.config["lr"] == 1e-3
    assert second.config["lr"] == 2e-3
    assert first.output_width == 4 and second.output_width == 1
    # runlens_collect.log from the script goes to the first run.
    assert len(first.scalar("custom/d_minus_g")) == batches
    assert not second.has_scalar("custom/d_minus_g")
    # Each optimizer's step gets the loss backwarded just before it.
    g, d = first.scalar("train/loss").values, second.scalar("train/loss").values
    assert not np.allclose(g, d)


def test_analyze_flag_diagnoses_divergence(launched):
    proc = launched["diverge"].result()
    assert proc.returncode == 0, proc.stderr
    assert "final loss nan" in proc.stdout
    report = proc.stdout.split("final loss nan", 1)[1]
    assert "runlens report" in report
    assert "ERROR  nan-inf" in report
    assert "non-finite points in train/loss" in report


def test_sigint_to_runlens_is_forwarded(launched, work):
    returncode, err = launched["sigint"].result()
    assert returncode == 128 + signal.SIGINT
    assert "KeyboardInterrupt" in err  # raised in the child by the forwarded signal
    meta = json.loads((work / "runs" / "sigint" / "run.json").read_text())
    assert meta["status"] == "preempted" and meta["last_step"] >= 3
    assert "run recorded in" in err


def test_usage_errors_are_one_line(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["collect", "--kinds", "weight,bogus", "--", "python", "x.py"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        "runlens: error: --kinds: unknown kind(s) bogus; choose from "
        "weight,grad,update,activation,output"
    ]
    res = runner.invoke(cli, ["collect", "--out", str(tmp_path), "--", "no-such-command-xyz"])
    assert res.exit_code == 2
    assert "runlens: error: cannot run 'no-such-command-xyz'" in res.output
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "run.json").write_text("{}")
    res = runner.invoke(cli, ["collect", "--out", str(tmp_path), "--name", "taken", "--", "true"])
    assert res.exit_code == 2 and "exists and is not empty" in res.output


def test_log_is_a_noop_without_a_collector(tmp_path):
    assert runlens_collect._active.get_active() is None
    runlens_collect.log({"val/loss": 1.0})  # nothing collecting: nothing happens, no error
    assert runlens_collect._active.get_active() is None
    assert list(tmp_path.iterdir()) == []
