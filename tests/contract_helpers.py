"""Shared pieces of the step-contract tests: a learnable problem, a small MLP, readers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from runlens_collect import format as fmt
from torch import nn

import runlens
from runlens.findings import Report

CLASSES = 3


def blobs(n: int = 256, seed: int = 0, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs: learnable, so a healthy run's loss falls."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, dim, generator=g) * 2
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


class MLP(nn.Module):
    """A user-defined module (torch.compile compiles its forward: built-in containers
    such as nn.Sequential are not compiled on their own)."""

    def __init__(self, dim: int = 8, hidden: int = 32, out: int = CLASSES, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


def batches(x: torch.Tensor, y: torch.Tensor, step: int, size: int = 32):
    """The step's batch of a shuffled epoch (a new seeded order every epoch, as
    ``DataLoader(shuffle=True)``: the same batches in the same order every epoch would be
    a duplicate-batches finding)."""
    per = max(1, len(x) // size)
    epoch, j = divmod(step, per)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
    idx = order[j * size : (j + 1) * size]
    return x[idx], y[idx]


def table(run_dir: Path, name: str) -> list[dict[str, Any]]:
    files = sorted((Path(run_dir) / name).glob(fmt.SEGMENT_GLOB))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []


def problems(report: Report) -> list[tuple[str, str, str]]:
    """Findings of severity warning or error (a healthy run has none)."""
    return [(f.signature, f.severity, f.summary) for f in report.findings if f.severity != "info"]


def healthy(run_dir: Path) -> Report:
    """Analyze a run that must be healthy: no warning or error finding, no run warning."""
    report = runlens.analyze(run_dir)
    assert problems(report) == [], problems(report)
    assert list(report.warnings) == [], report.warnings
    return report


def grad_total_norm(params: Any) -> float:
    norms = [p.grad.detach().double().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else float("nan")


def steps_of(run: Any, name: str) -> list[int]:
    s = run.scalar(name)
    return [] if s is None else s.steps.tolist()


def values_of(run: Any, name: str) -> np.ndarray:
    s = run.scalar(name)
    assert s is not None, f"no {name}"
    return s.values
