"""Sanity runs of the debugging playbook, recorded like any run: the LR range test, the
one-batch overfit test and the initialization check.

Each function records a run directory with the normal :class:`~runlens_collect.Collector`
(per-layer statistics included) whose run.json ``kind`` says what it was. The verdict is
the analyzer's job: ``runlens analyze RUN_DIR`` reports the suggested learning rate, the
overfit pass/fail with its likely cause, or a bad initialization. Call them before real
training: :func:`lr_range_test` and :func:`overfit_one_batch` restore the model's and the
optimizer's state (deep copies of their state_dicts), the parameters' ``.grad``, the
model's train/eval mode and torch's CPU random state when they return, even on error.

Batches are ``(inputs, targets)`` pairs; the loss is ``loss_fn(model(inputs), targets)``.
Tensors are moved to the device of the model's first parameter.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runlens_collect import format as fmt
from runlens_collect.collector import Collector

KIND_LR_RANGE_TEST = "lr_range_test"
KIND_OVERFIT_ONE_BATCH = "overfit_one_batch"
KIND_INIT_CHECK = "init_check"

DIVERGE_FACTOR = 4.0
"""The LR range test stops once the smoothed loss exceeds this multiple of its best value
(fastai's ``LRFinder`` uses 4)."""
LR_SMOOTHING = 0.9
"""Weight of the debiased EMA of the loss used for the divergence stop. fastai uses 0.98;
0.9 reacts within ~10 steps, which matters on a 100-step sweep. The analyzer smooths with
the same default."""

Batch = tuple[Any, Any]
LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass(frozen=True)
class LRRangeTestResult:
    """What the sweep did. The suggestion itself comes from ``runlens analyze``."""

    run_dir: Path
    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    diverged_at: int | None
    """Step at which the smoothed loss passed ``diverge_factor`` × its best (or went
    non-finite) and the sweep stopped; None if it ran to ``end_lr``."""


@dataclass(frozen=True)
class OverfitResult:
    """Raw facts of the overfit run; ``runlens analyze`` gives the verdict."""

    run_dir: Path
    initial_loss: float
    final_loss: float
    steps: int
    params_without_grad: tuple[str, ...]
    """Parameters held by the optimizer that never received a non-zero gradient."""


@dataclass(frozen=True)
class InitCheckResult:
    run_dir: Path
    loss: float | None


def lr_range_test(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[Batch],
    loss_fn: LossFn,
    run_dir: str | os.PathLike[str] = "runs/lr",
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    *,
    diverge_factor: float = DIVERGE_FACTOR,
    config: Mapping[str, Any] | None = None,
    **collector_knobs: Any,
) -> LRRangeTestResult:
    """Sweep the learning rate exponentially from ``start_lr`` to ``end_lr`` over ``steps``
    training steps (Smith 2017, "Cyclical Learning Rates", §3.3; fastai's ``lr_find``),
    one batch per step, cycling through ``loader``; stop early when the smoothed loss
    exceeds ``diverge_factor`` × its best or goes non-finite.

    Every param group gets the swept rate times its ratio to group 0's current rate (so
    discriminative rates keep their proportions). ``lr/0`` of the recorded run is the
    swept rate; ``runlens analyze`` reads it against the loss.
    """
    if not (0 < start_lr < end_lr) or not math.isfinite(end_lr):
        raise ValueError(f"need 0 < start_lr < end_lr, got {start_lr} and {end_lr}")
    if steps < 2:
        raise ValueError("steps must be >= 2")
    if diverge_factor <= 1:
        raise ValueError("diverge_factor must be > 1")
    device = _device(model)
    base = optimizer.param_groups[0]["lr"] or 1.0
    ratios = [g["lr"] / base if base else 1.0 for g in optimizer.param_groups]
    sweep = {
        "start_lr": start_lr,
        "end_lr": end_lr,
        "steps": steps,
        "diverge_factor": diverge_factor,
        "smoothing": LR_SMOOTHING,
    }
    lrs: list[float] = []
    losses: list[float] = []
    diverged_at = None
    with (
        _restored(model, optimizer),
        _collector(
            model, optimizer, run_dir, KIND_LR_RANGE_TEST, config, sweep, collector_knobs
        ) as col,
    ):
        model.train()
        batches = _cycle(loader)
        avg, best = 0.0, math.inf
        for i in range(steps):
            lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
            for g, r in zip(optimizer.param_groups, ratios, strict=True):
                g["lr"] = lr * r
            x, y = _to(next(batches), device)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            col.step(loss=loss)
            # The stop rule needs the value on the host: one sync per step is the price of
            # stopping a sweep that is already diverging.
            value = float(loss.detach())
            lrs.append(lr)
            losses.append(value)
            avg = LR_SMOOTHING * avg + (1 - LR_SMOOTHING) * value
            smooth = avg / (1 - LR_SMOOTHING ** (i + 1))
            if not math.isfinite(smooth) or smooth > diverge_factor * best:
                diverged_at = i
                break
            best = min(best, smooth)
    return LRRangeTestResult(Path(run_dir), tuple(lrs), tuple(losses), diverged_at)


def overfit_one_batch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    loss_fn: LossFn,
    run_dir: str | os.PathLike[str] = "runs/overfit",
    steps: int = 300,
    *,
    config: Mapping[str, Any] | None = None,
    **collector_knobs: Any,
) -> OverfitResult:
    """Train ``steps`` steps on the single ``batch`` and record it: a model that cannot
    drive one batch toward zero loss has a bug (Karpathy 2019, "overfit one batch").

    Weight decay is set to 0 in every param group for the test (restored afterwards).
    Dropout stays as the model has it (train mode): the test checks the model you will
    train; with heavy dropout the loss floor is higher and the analyzer says so.
    Gradient flow is checked on the way: every parameter the optimizer holds must receive
    a non-zero gradient at some step (the names are recorded in the run's config, so the
    analyzer can tell which did not).
    """
    if steps < 2:
        raise ValueError("steps must be >= 2")
    device = _device(model)
    names = {id(p): n for n, p in model.named_parameters()}
    held = [p for g in optimizer.param_groups for p in g["params"]]
    held_names = [names.get(id(p), f"<param {i}>") for i, p in enumerate(held)]
    info = {"steps": steps, "optimizer_params": held_names, "weight_decay": 0.0}
    x, y = _to(batch, device)
    losses: list[torch.Tensor] = []
    with (
        _restored(model, optimizer),
        _collector(
            model, optimizer, run_dir, KIND_OVERFIT_ONE_BATCH, config, info, collector_knobs
        ) as col,
    ):
        for g in optimizer.param_groups:
            if "weight_decay" in g:
                g["weight_decay"] = 0.0
        model.train()
        got = [torch.zeros((), dtype=torch.bool, device=p.device) for p in held]
        for _ in range(steps):
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            with torch.no_grad():  # accumulated on device: no host sync per step
                for j, p in enumerate(held):
                    if p.grad is not None:
                        got[j] |= (p.grad != 0).any()
            optimizer.step()
            col.step(loss=loss)
            losses.append(loss.detach())
        no_grad = tuple(n for n, g in zip(held_names, got, strict=True) if not bool(g))
    values = [float(v) for v in losses]
    return OverfitResult(Path(run_dir), values[0], values[-1], steps, no_grad)


def init_check(
    model: nn.Module,
    batch: Any,
    run_dir: str | os.PathLike[str] = "runs/init",
    loss_fn: LossFn | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    **collector_knobs: Any,
) -> InitCheckResult:
    """Record one forward pass (and, with ``loss_fn``, one backward pass) of the untouched
    model on ``batch``: weights, activations, output and gradients at step 0. No weight
    changes. ``batch`` is ``(inputs, targets)`` or, without ``loss_fn``, the inputs alone.
    ``runlens analyze`` then checks activation scale through depth, weight scale against
    fan-in (He / Glorot) and the initial loss against ln(C)."""
    device = _device(model)
    if loss_fn is not None:
        x, y = _to(batch, device)
    else:
        x, y = _to((batch, None), device)[0], None
    knobs = {"activation_every": 1, "hist_every": 1, **collector_knobs}
    loss_value = None
    with (
        _restored(model, None),
        _collector(
            model, None, run_dir, KIND_INIT_CHECK, config, {"loss": loss_fn is not None}, knobs
        ) as col,
    ):
        model.train()  # the collector records activations of training forwards only
        out = model(x)
        loss = None
        if loss_fn is not None:
            loss = loss_fn(out, y)
            loss.backward()
            loss_value = float(loss.detach())
        col.step(loss=loss)
    return InitCheckResult(Path(run_dir), loss_value)


# -- helpers ------------------------------------------------------------------------------


@contextmanager
def _collector(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    run_dir: str | os.PathLike[str],
    kind: str,
    config: Mapping[str, Any] | None,
    info: dict[str, Any],
    knobs: dict[str, Any],
) -> Iterator[Collector]:
    cfg = {**dict(config or {}), "sanity": {"kind": kind, **info}}
    with Collector(model, optimizer, run_dir=run_dir, config=cfg, **knobs) as col:
        meta = getattr(col, "meta", None)
        if meta is not None:  # None when the collector's setup failed (it warned)
            meta["kind"] = kind
            fmt.write_json_atomic(meta, Path(run_dir) / fmt.RUN_JSON)
        yield col


@contextmanager
def _restored(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
    """Put model, optimizer, grads, mode and the CPU RNG back as they were on exit."""
    model_state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    grads = {p: (None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    rng = torch.get_rng_state()
    try:
        yield
    finally:
        model.load_state_dict(model_state)
        if optimizer is not None and opt_state is not None:
            optimizer.load_state_dict(opt_state)
        for p, g in grads.items():
            p.grad = g
        for m, training in modes.items():
            m.training = training
        torch.set_rng_state(rng)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to(batch: Any, device: torch.device) -> tuple[Any, Any]:
    if not isinstance(batch, list | tuple) or len(batch) != 2:
        raise ValueError("a batch must be an (inputs, targets) pair")

    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, list | tuple):
            return type(v)(move(u) for u in v)
        if isinstance(v, dict):
            return {k: move(u) for k, u in v.items()}
        return v

    return move(batch[0]), move(batch[1])


def _cycle(loader: Iterable[Batch]) -> Iterator[Batch]:
    while True:
        empty = True
        for b in loader:
            empty = False
            yield b
        if empty:
            raise ValueError("the loader yielded no batches")
