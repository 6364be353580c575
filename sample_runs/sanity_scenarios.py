"""Sample runs of the debugging playbook (docs/playbook.md): sanity runs recorded with
``runlens_collect.lr_range_test`` / ``overfit_one_batch`` / ``init_check``.

Each trains (or, for the init check, runs forward/backward once) a tiny model on CPU, seeded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sample_runs.common import COLLECTOR_OPTIONS, Scenario, gaussian_mixture, mlp


def bad_initialization(run_dir: Path) -> None:
    """init_check of a 10-layer ReLU MLP whose weights are N(0, 1) instead of fan-in scaled:
    activations grow ~5.7× per layer and the initial loss is in the millions."""
    torch.manual_seed(0)
    model = mlp([16] + [64] * 10 + [8])
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 1.0)
    data = gaussian_mixture(64, 8, 16, 8, seed=3)
    from runlens_collect import init_check

    init_check(
        model,
        (data.x, data.y),
        run_dir=run_dir,
        loss_fn=F.cross_entropy,
        config={"num_classes": 8},
    )


def cannot_overfit_softmax(run_dir: Path) -> None:
    """overfit_one_batch of an MLP that ends in Softmax, trained with cross_entropy: the
    loss cannot go below log(1 + (C - 1)/e), so the test fails."""
    torch.manual_seed(0)
    model = nn.Sequential(mlp([16, 64, 64, 10]), nn.Softmax(dim=-1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = gaussian_mixture(32, 8, 16, 10, seed=4)
    from runlens_collect import overfit_one_batch

    overfit_one_batch(
        model,
        opt,
        (data.x, data.y),
        F.cross_entropy,
        run_dir=run_dir,
        steps=200,
        config={"num_classes": 10},
        **COLLECTOR_OPTIONS,
    )


def lr_range_test_mlp(run_dir: Path) -> None:
    """LR range test (1e-6 -> 10, 100 steps) of a small MLP with Adam on overlapping
    Gaussian blobs: the analysis suggests an LR and reports the divergence point
    (information only: no warning or error)."""
    torch.manual_seed(0)
    model = mlp([16, 64, 64, 10])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = gaussian_mixture(512, 8, 16, 10, seed=5, sep=1.0)
    batches = [(data.x[i : i + 32], data.y[i : i + 32]) for i in range(0, 512, 32)]
    from runlens_collect import lr_range_test

    lr_range_test(
        model,
        opt,
        batches,
        F.cross_entropy,
        run_dir=run_dir,
        start_lr=1e-6,
        end_lr=10.0,
        steps=100,
        config={"num_classes": 10},
        **COLLECTOR_OPTIONS,
    )


SCENARIOS: list[Scenario] = [
    Scenario(
        "bad-initialization",
        bad_initialization.__doc__ or "",
        ("bad-initialization", "bad-initial-loss"),
        bad_initialization,
    ),
    Scenario(
        "cannot-overfit-batch",
        cannot_overfit_softmax.__doc__ or "",
        ("cannot-overfit-batch",),
        cannot_overfit_softmax,
    ),
    Scenario("lr-range-test", lr_range_test_mlp.__doc__ or "", (), lr_range_test_mlp),
]
