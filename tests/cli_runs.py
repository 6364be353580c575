"""Tiny training runs recorded with the real Collector, shared by the CLI/report tests.

Each run is recorded once per pytest session (the first test module that asks records it
under the session's base temp dir; later modules reuse it).
"""

from __future__ import annotations

import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from runlens_collect import Collector

HOSTILE = "</script><b>[red]x|y"
"""A module name that is rich markup, HTML and a Markdown table separator at once."""
NAN_STEP = 40
STEPS = 60
WIDE_DEPTH = 45
WIDE_NAN_LAYER = 40


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    return x, (x @ torch.randn(8, 3, generator=g)).argmax(1)


def _mlp() -> torch.nn.Module:
    torch.manual_seed(1)
    # The first layer carries the hostile name, so it shows in tables and findings.
    return torch.nn.Sequential(
        OrderedDict(
            [
                (HOSTILE, torch.nn.Linear(8, 16)),
                ("act", torch.nn.ReLU()),
                ("head", torch.nn.Linear(16, 3)),
            ]
        )
    )


def record_mlp(run_dir: Path, nan_at: int | None = None, **knobs: object) -> Path:
    """SGD on a learnable 3-class problem; from step ``nan_at`` the batch holds a NaN
    (bad input data), which sends the loss and every gradient to NaN."""
    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    config = {"lr": 0.1, "num_classes": 3, "note": HOSTILE}
    knobs = {"activation_every": 5, "max_queue": 64, **knobs}  # deep queue: drop nothing
    with Collector(model, opt, run_dir=run_dir, config=config, **knobs) as col:
        for step in range(STEPS):
            xb = x.clone()
            if nan_at is not None and step >= nan_at:
                xb[0, 0] = float("nan")
            loss = torch.nn.functional.cross_entropy(model(xb), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
            if step % 10 == 0:
                with torch.no_grad():
                    col.log({"val/loss": torch.nn.functional.cross_entropy(model(x), y)})
    return run_dir


def record_wide(run_dir: Path) -> Path:
    """A deep stack of tiny layers (more modules than the health table shows); layer
    WIDE_NAN_LAYER's weight is set to NaN mid-run, so nan-inf points at a late layer."""
    torch.manual_seed(3)
    layers: list[torch.nn.Module] = []
    for _ in range(WIDE_DEPTH):
        layers += [torch.nn.Linear(4, 4), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(4))
    # A deep queue: activation rows of 90 modules per step must not be dropped.
    settings = {"activation_every": 1, "max_queue": 64}
    with Collector(model, opt, run_dir=run_dir, config={}, **settings) as col:
        for step in range(20):
            if step == 10:
                with torch.no_grad():
                    model[2 * WIDE_NAN_LAYER].weight[0, 0] = float("nan")
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
    return run_dir


RECORDERS = {
    "healthy": lambda d: record_mlp(d),
    "nan": lambda d: record_mlp(d, nan_at=NAN_STEP),
    "no_layers": lambda d: record_mlp(d, kinds=()),
    "wide": record_wide,
}


def recorded(factory: pytest.TempPathFactory, name: str) -> Path:
    """The run ``name``, recorded on first use in this session."""
    root = factory.getbasetemp() / "cli-runs"
    run_dir = root / name
    done = root / f"{name}.done"
    if not done.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        # Tiny models: intra-op threads only add contention (10x slower on a busy 2-core box).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            RECORDERS[name](run_dir)
        finally:
            torch.set_num_threads(threads)
        done.touch()
    return run_dir
