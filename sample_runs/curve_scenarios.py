"""Sample runs for the curve signatures: healthy runs and one run per curve problem.

Each run is a tiny real model trained on seeded synthetic data, and each problem is caused
the way it is caused in practice (a learning rate far too high, a batch of one, a badly
scaled last layer...), so the diagnosis is tested against real training dynamics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from sample_runs.common import (
    CLASSES,
    DIM,
    Batch,
    Data,
    Scenario,
    classifier_config,
    classifier_data,
    fit,
    gaussian_mixture,
    mlp,
    smooth_regression,
)


def healthy_classifier(run_dir: Path) -> None:
    """MLP on an 8-class Gaussian mixture, Adam 1e-3: smooth, converging, val tracks train."""
    torch.manual_seed(0)
    data = classifier_data(0)
    model = mlp([DIM, 64, 64, CLASSES])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=400,
        batch_size=64,
        loss_fn=nn.functional.cross_entropy,
        config=classifier_config(lr=2e-3, batch_size=64),
        seed=0,
    )


def healthy_regression(run_dir: Path) -> None:
    """MLP regression with MSE, Adam 3e-3: loss falls by two orders of magnitude."""
    torch.manual_seed(1)
    data = smooth_regression(4096, 1024, DIM, seed=1)
    model = mlp([DIM, 64, 64, 1], act=nn.Tanh)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=400,
        batch_size=64,
        loss_fn=nn.functional.mse_loss,
        config={"task": "regression", "lr": 3e-3},
        seed=1,
        classification=False,
    )


def healthy_schedule(run_dir: Path) -> None:
    """SGD+momentum with linear warm-up then step decay: warm-up transient and LR drops."""
    torch.manual_seed(2)
    data = classifier_data(2)
    model = mlp([DIM, 64, 64, CLASSES])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / 40)
        return warm * (0.1 if step >= 300 else 1.0) * (0.1 if step >= 400 else 1.0)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=480,
        batch_size=32,
        loss_fn=nn.functional.cross_entropy,
        config=classifier_config(lr=0.1, batch_size=32, schedule="warmup+step"),
        seed=2,
        scheduler=sched,
    )


def nan_inf(run_dir: Path) -> None:
    """A hand-written softmax (exp without max-subtraction) overflows on one batch with
    large inputs: the loss becomes Inf/NaN and NaN weights poison every later step."""
    torch.manual_seed(3)
    data = classifier_data(3)
    model = mlp([DIM, 64, 64, CLASSES])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def naive_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        e = torch.exp(logits)
        return -torch.log(e.gather(1, y[:, None]) / e.sum(1, keepdim=True)).mean()

    def hook(step: int, b: Batch) -> Batch:
        return (b[0] * 200.0, b[1]) if step == 150 else b

    fit(
        run_dir,
        model,
        opt,
        data,
        steps=200,
        batch_size=64,
        loss_fn=naive_ce,
        config=classifier_config(lr=2e-3),
        seed=3,
        batch_hook=hook,
    )


def loss_divergence(run_dir: Path) -> None:
    """SGD with momentum and a learning rate ~30x too high on an unnormalized MLP."""
    torch.manual_seed(4)
    data = classifier_data(4)
    model = mlp([DIM, 64, 64, CLASSES])
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=300,
        batch_size=64,
        loss_fn=nn.functional.cross_entropy,
        config=classifier_config(lr=0.5),
        seed=4,
    )


def loss_oscillation(run_dir: Path) -> None:
    """Plain SGD at a learning rate past the stability edge of this MLP (lr=2.2, batch 64):
    the loss keeps jumping up and falling back around a level it never improves on."""
    torch.manual_seed(5)
    data = classifier_data(5)
    model = mlp([DIM, 64, 64, CLASSES])
    opt = torch.optim.SGD(model.parameters(), lr=2.2)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=400,
        batch_size=64,
        loss_fn=nn.functional.cross_entropy,
        config=classifier_config(lr=2.2),
        seed=5,
    )


def loss_flat(run_dir: Path) -> None:
    """A learning rate of 1e-7 (a typo'd exponent): the loss never leaves its start."""
    torch.manual_seed(6)
    data = classifier_data(6)
    model = mlp([DIM, 64, 64, CLASSES])
    opt = torch.optim.Adam(model.parameters(), lr=1e-7)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=300,
        batch_size=64,
        loss_fn=nn.functional.cross_entropy,
        config=classifier_config(lr=1e-7),
        seed=6,
    )


def not_learning(run_dir: Path) -> None:
    """The labels were shuffled apart from their inputs (a misaligned label file): nothing
    links x to y, so the loss stays at the chance level ln(8) for the whole run."""
    torch.manual_seed(13)
    data = classifier_data(13)
    g = torch.Generator().manual_seed(113)
    data.y = data.y[torch.randperm(len(data.y), generator=g)]
    data.yv = data.yv[torch.randperm(len(data.yv), generator=g)]
    model = mlp([DIM, 64, 64, CLASSES])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=400,
        batch_size=64,
        loss_fn=nn.functional.cross_entropy,
        config=classifier_config(lr=1e-3),
        seed=13,
    )


def lr_too_high_warmup(run_dir: Path) -> None:
    """SGD+momentum warmed up over 100 steps to lr 0.5, too high for this LeakyReLU MLP,
    then cosine decay: the loss climbs several-fold as the rate peaks and comes back down
    as it decays."""
    torch.manual_seed(14)
    data = classifier_data(14)
    model = mlp([DIM, 64, 64, CLASSES], act=nn.LeakyReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    total, warm = 400, 100

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))

    fit(
        run_dir,
        model,
        opt,
        data,
        steps=total,
        batch_size=64,
        loss_fn=nn.functional.cross_entropy,
        config=classifier_config(lr=0.5, schedule="warmup+cosine", warmup_steps=warm),
        seed=14,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, factor),
    )


def loss_collapse_zero(run_dir: Path) -> None:
    """The label leaked into the inputs (a one-hot copy of y appended to x, in both
    splits): Adam at 3e-2 drives the cross-entropy to exactly 0.0 in float32 within a few
    dozen steps."""
    torch.manual_seed(15)
    data = classifier_data(15)

    def leak(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, 10.0 * nn.functional.one_hot(y, CLASSES).float()], 1)

    data = Data(leak(data.x, data.y), data.y, leak(data.xv, data.yv), data.yv)
    model = mlp([DIM + CLASSES, 64, 64, CLASSES])
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=400,
        batch_size=64,
        loss_fn=nn.functional.cross_entropy,
        config=classifier_config(lr=3e-2, leak="one-hot label in the inputs"),
        seed=15,
    )


def loss_spike(run_dir: Path) -> None:
    """The healthy classifier, but three batches are corrupted (inputs scaled x8, labels
    shuffled), as a broken shard would: isolated spikes that recover."""
    torch.manual_seed(7)
    data = classifier_data(7)
    model = mlp([DIM, 64, 64, CLASSES])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    bad = {140, 220, 310}

    def hook(step: int, b: Batch) -> Batch:
        if step in bad:
            g = torch.Generator().manual_seed(step)
            return b[0] * 8.0, b[1][torch.randperm(len(b[1]), generator=g)]
        return b

    fit(
        run_dir,
        model,
        opt,
        data,
        steps=400,
        batch_size=64,
        loss_fn=nn.functional.cross_entropy,
        config=classifier_config(lr=2e-3),
        seed=7,
        batch_hook=hook,
    )


def val_spike(run_dir: Path) -> None:
    """An MLP with BatchNorm (momentum 0.5: fast running statistics) meets one corrupted
    training batch at step 200 (inputs x30, a broken shard). In training mode the batch is
    normalized by its own statistics, so the training loss barely notices; the running
    statistics are polluted, so the evaluation right after jumps ~14x, and 10 steps later
    they have washed out."""
    torch.manual_seed(16)
    data = classifier_data(16)
    model = nn.Sequential(
        nn.Linear(DIM, 64),
        nn.BatchNorm1d(64, momentum=0.5),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.BatchNorm1d(64, momentum=0.5),
        nn.ReLU(),
        nn.Linear(64, CLASSES),
    )
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def hook(step: int, b: Batch) -> Batch:
        return (b[0] * 30.0, b[1]) if step == 200 else b

    fit(
        run_dir,
        model,
        opt,
        data,
        steps=400,
        batch_size=64,
        loss_fn=nn.functional.cross_entropy,
        config=classifier_config(lr=2e-3, bn_momentum=0.5),
        seed=16,
        batch_hook=hook,
    )


def noisy_loss(run_dir: Path) -> None:
    """Batch size 1: each step's loss is one example's, so the curve is mostly noise."""
    torch.manual_seed(8)
    data = classifier_data(8)
    model = mlp([DIM, 64, 64, CLASSES])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=400,
        batch_size=1,
        loss_fn=nn.functional.cross_entropy,
        config=classifier_config(lr=0.01, batch_size=1),
        seed=8,
    )


def bad_initial_loss(run_dir: Path) -> None:
    """The last layer is initialised 100x too large: confident random logits at step 0."""
    torch.manual_seed(9)
    data = classifier_data(9)
    model = mlp([DIM, 64, 64, CLASSES])
    with torch.no_grad():
        model[-1].weight.mul_(100.0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=300,
        batch_size=64,
        loss_fn=nn.functional.cross_entropy,
        config=classifier_config(lr=2e-3),
        seed=9,
    )


def overfitting(run_dir: Path) -> None:
    """A wide MLP on 128 examples with 30% wrong labels: it memorizes, val gets worse."""
    torch.manual_seed(10)
    data = gaussian_mixture(
        128, 1024, DIM, CLASSES, seed=10, sep=1.0, clusters_per_class=2, label_noise=0.3
    )
    model = mlp([DIM, 512, 512, CLASSES])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=400,
        batch_size=32,
        loss_fn=nn.functional.cross_entropy,
        config=classifier_config(lr=1e-3, train_size=128),
        seed=10,
    )


def underfitting(run_dir: Path) -> None:
    """A linear model on classes made of several blobs each: it plateaus high."""
    torch.manual_seed(11)
    data = gaussian_mixture(4096, 1024, DIM, CLASSES, seed=11, sep=1.0, clusters_per_class=4)
    model = nn.Sequential(nn.Linear(DIM, CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=400,
        batch_size=64,
        loss_fn=nn.functional.cross_entropy,
        config=classifier_config(lr=1e-2),
        seed=11,
    )


def val_below_train(run_dir: Path) -> None:
    """The validation split is a copy of the 512 training examples (a split bug) and dropout
    0.5 keeps the training loss up: the model memorizes them, so the eval-mode validation
    loss falls far below the dropout-mode training loss, further than dropout or
    augmentation alone take it (a 0.6 dropout with train-only input noise gave a 41% gap)."""
    torch.manual_seed(12)
    train = gaussian_mixture(512, 16, DIM, CLASSES, seed=12, sep=1.0, clusters_per_class=2)
    data = Data(train.x, train.y, train.x.clone(), train.y.clone())
    model = mlp([DIM, 256, 256, CLASSES], dropout=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=400,
        batch_size=64,
        loss_fn=nn.functional.cross_entropy,
        config=classifier_config(lr=2e-3, dropout=0.5, val_split="copy of train"),
        seed=12,
    )


def _scenario(fn: Callable[[Path], None], expect: tuple[str, ...]) -> Scenario:
    doc = " ".join((fn.__doc__ or "").split())
    return Scenario(fn.__name__.replace("_", "-"), doc, expect, fn)


SCENARIOS: list[Scenario] = [
    _scenario(healthy_classifier, ()),
    _scenario(healthy_regression, ()),
    _scenario(healthy_schedule, ()),
    _scenario(nan_inf, ("nan-inf",)),
    _scenario(loss_divergence, ("loss-divergence",)),
    _scenario(lr_too_high_warmup, ("lr-too-high-warmup",)),
    _scenario(loss_oscillation, ("loss-oscillation",)),
    _scenario(loss_flat, ("loss-flat",)),
    _scenario(not_learning, ("not-learning",)),
    _scenario(loss_collapse_zero, ("loss-collapse-zero",)),
    _scenario(loss_spike, ("loss-spike",)),
    _scenario(val_spike, ("val-spike",)),
    _scenario(noisy_loss, ("noisy-loss",)),
    _scenario(bad_initial_loss, ("bad-initial-loss",)),
    _scenario(overfitting, ("overfitting",)),
    _scenario(underfitting, ("underfitting",)),
    _scenario(val_below_train, ("val-below-train",)),
]
