"""Shared pieces of the sample runs: the Scenario record, seeded synthetic data, tiny
models and one training loop.

Everything runs on CPU in seconds and downloads nothing. Each scenario builds its data and
model here and records with the real collector through :func:`fit`. Scenario tables import
:class:`Scenario` from here (not from ``scenarios.py``, which imports the tables).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Coarse cadences keep every recorded run small (the committed folder stays < 20 MB);
# fixed ones (overhead=None) keep the runs reproducible: on these tiny models the
# collector's own time is a large share of a step, and the overhead budget would thin the
# cadence by wall-clock time, differently on every machine.
# Fixed cadences (overhead=None) and a deep queue: a recording is the same whatever the
# machine's load (a writer that falls behind on a busy machine drops steps).
COLLECTOR_OPTIONS: dict[str, Any] = {
    "activation_every": 20,
    "hist_every": 100,
    "overhead": None,
    "max_queue": 1024,
}


def seeded(seed: int) -> None:
    """Seed torch for one recording. One intra-op thread: these models are tiny and more
    threads only contend (several times slower on a busy 2-core machine); it also keeps
    the runs bit-reproducible."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Scenario:
    """One sample run and the diagnosis it must produce."""

    name: str
    description: str
    expect: tuple[str, ...]
    """Signatures that MUST be reported at warning/error severity; () means healthy: no
    warning or error at all."""
    record: Callable[[Path], None]
    """Trains and records the run into the given (new, empty) run directory."""


@dataclass
class Data:
    x: torch.Tensor
    y: torch.Tensor
    xv: torch.Tensor
    yv: torch.Tensor


def gaussian_mixture(
    n: int,
    n_val: int,
    dim: int,
    classes: int,
    seed: int,
    sep: float = 3.0,
    clusters_per_class: int = 1,
    label_noise: float = 0.0,
) -> Data:
    """Classes are unions of unit-variance Gaussian blobs whose centres are N(0, sep²)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes * clusters_per_class, dim, generator=g) * sep

    def draw(m: int, noisy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        blob = torch.randint(0, classes * clusters_per_class, (m,), generator=g)
        x = centres[blob] + torch.randn(m, dim, generator=g)
        y = blob % classes
        if noisy and label_noise > 0:
            flip = torch.rand(m, generator=g) < label_noise
            y = torch.where(flip, torch.randint(0, classes, (m,), generator=g), y)
        return x, y

    x, y = draw(n, True)
    xv, yv = draw(n_val, False)
    return Data(x, y, xv, yv)


CLASSES = 8
DIM = 16


def classifier_config(**kw: object) -> dict[str, object]:
    """run.json config of the shared 8-class task (the analyzer reads num_classes)."""
    return {"num_classes": CLASSES, "task": "classification", **kw}


def classifier_data(seed: int, sep: float = 1.0) -> Data:
    """The shared task of the classifier samples: an 8-class, 16-dim Gaussian mixture."""
    return gaussian_mixture(4096, 1024, DIM, CLASSES, seed=seed, sep=sep, clusters_per_class=2)


def smooth_regression(n: int, n_val: int, dim: int, seed: int, noise: float = 0.05) -> Data:
    """y = sin(x·a) + 0.5·cos(x·b) + noise: easy for a small MLP, not for a linear model."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, generator=g) / math.sqrt(dim)
    b = torch.randn(dim, generator=g) / math.sqrt(dim)

    def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(m, dim, generator=g)
        y = torch.sin(2 * x @ a) + 0.5 * torch.cos(2 * x @ b) + noise * torch.randn(m, generator=g)
        return x, y.unsqueeze(1)

    x, y = draw(n)
    xv, yv = draw(n_val)
    return Data(x, y, xv, yv)


def mlp(sizes: list[int], act: type[nn.Module] = nn.ReLU, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


Batch = tuple[torch.Tensor, torch.Tensor]


def fit(
    run_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    data: Data,
    *,
    steps: int,
    batch_size: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    config: dict[str, Any],
    seed: int,
    val_every: int = 10,
    classification: bool = True,
    scheduler: Any = None,
    batch_hook: Callable[[int, Batch], Batch] | None = None,
    train_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Train ``steps`` mini-batch steps and record them; validation every ``val_every``."""
    torch.set_num_threads(1)  # as seeded(): tiny models, one thread
    g = torch.Generator().manual_seed(seed + 1)
    n = data.x.shape[0]
    perm = torch.randperm(n, generator=g)
    pos = 0
    from runlens_collect import Collector  # torch-side; imported when recording

    with Collector(
        model, optimizer, run_dir=str(run_dir), config=config, **COLLECTOR_OPTIONS
    ) as col:
        for step in range(steps):
            if pos + batch_size > n:
                perm, pos = torch.randperm(n, generator=g), 0
            idx = perm[pos : pos + batch_size]
            pos += batch_size
            xb, yb = data.x[idx], data.y[idx]
            if batch_hook is not None:
                xb, yb = batch_hook(step, (xb, yb))
            if train_transform is not None:
                xb = train_transform(xb)
            model.train()
            loss = loss_fn(model(xb), yb)
            if optimizer is not None:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            col.step(loss=loss)
            if step % val_every == 0 or step == steps - 1:
                col.log(_validate(model, data, loss_fn, classification))


@torch.no_grad()
def _validate(
    model: nn.Module,
    data: Data,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    classification: bool,
) -> dict[str, float]:
    model.eval()
    out = model(data.xv)
    metrics = {"val/loss": float(loss_fn(out, data.yv))}
    if classification:
        metrics["val/accuracy"] = float((out.argmax(1) == data.yv).float().mean())
    model.train()
    return metrics
