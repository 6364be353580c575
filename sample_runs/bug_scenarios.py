"""Sample runs of bugs in the training code (docs/silent-bugs.md), each with its fixed twin.

Every bug is written the way real code writes it — the line that is wrong is the line a
forum post or an issue tracker shows — and every twin is the same script with that line
fixed. The bug run must be flagged by its signature; the twin must analyze with no warning
or error at all. This file holds the optimizer-side bugs (gradients, optimizer membership,
the LR schedule, precision); ``bug_data_scenarios.py`` the data and mode bugs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from sample_runs.common import (
    CLASSES,
    COLLECTOR_OPTIONS,
    DIM,
    Data,
    Scenario,
    classifier_config,
    classifier_data,
    mlp,
    seeded,
)

ce = nn.functional.cross_entropy


def batches(data: Data, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled mini-batches, epoch after epoch (drop_last)."""
    g = torch.Generator().manual_seed(seed)
    n = data.x.shape[0]
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield data.x[idx], data.y[idx]


@torch.no_grad()
def validate(model: nn.Module, data: Data) -> dict[str, float]:
    """Validation loss and accuracy; the caller sets the model's mode (the bugs are there)."""
    out = model(data.xv)
    return {
        "val/loss": float(ce(out, data.yv)),
        "val/accuracy": float((out.argmax(1) == data.yv).float().mean()),
    }


def collector(model: nn.Module, opt: torch.optim.Optimizer | None, run_dir: Path, config: dict):
    from runlens_collect import Collector  # torch-side; imported when recording

    return Collector(model, opt, run_dir=str(run_dir), config=config, **COLLECTOR_OPTIONS)


# -- gradient-not-reset -----------------------------------------------------------------------


def _zero_grad_run(run_dir: Path, *, reset: bool, accumulate: int) -> None:
    seeded(40)
    data = classifier_data(40)
    model = mlp([DIM, 64, 64, CLASSES])
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    micro = 64 // accumulate
    it = batches(data, micro, seed=40)
    config = classifier_config(lr=0.02, batch_size=64, accumulation=accumulate)
    with collector(model, opt, run_dir, config) as col:
        for step in range(200):
            model.train()
            total = torch.zeros(())
            for _ in range(accumulate):
                x, y = next(it)
                loss = ce(model(x), y) / accumulate
                loss.backward()
                total += loss.detach()
            opt.step()
            if reset:
                opt.zero_grad()
            col.step(loss=total)
            if step % 10 == 0 or step == 199:
                model.eval()
                col.log(validate(model, data))


def no_zero_grad(run_dir: Path) -> None:
    """SGD+momentum MLP whose loop never calls optimizer.zero_grad(): every backward adds
    into .grad, so step t applies the sum of all gradients so far."""
    _zero_grad_run(run_dir, reset=False, accumulate=1)


def grad_accumulation(run_dir: Path) -> None:
    """Fixed twin of no-zero-grad, and legitimate accumulation: 4 backward passes of 16
    examples (loss / 4), then optimizer.step() and optimizer.zero_grad()."""
    _zero_grad_run(run_dir, reset=True, accumulate=4)


class _Finetune(nn.Module):
    """A backbone and a head trained by two optimizers (a smaller LR for the backbone)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = mlp([DIM, 64, 64])
        self.act = nn.ReLU()
        self.head = nn.Linear(64, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.backbone(x)))


def _two_optimizers(run_dir: Path, *, wrong: bool) -> None:
    seeded(41)
    data = classifier_data(41)
    model = _Finetune()
    opt_backbone = torch.optim.SGD(model.backbone.parameters(), lr=0.02, momentum=0.9)
    opt_head = torch.optim.Adam(model.head.parameters(), lr=2e-3)
    it = batches(data, 64, seed=41)
    config = classifier_config(lr_backbone=0.02, lr_head=2e-3, batch_size=64)
    with collector(model, opt_head, run_dir, config) as col:
        for step in range(300):
            model.train()
            x, y = next(it)
            opt_backbone.zero_grad()
            if wrong:
                opt_backbone.zero_grad()  # copy-paste slip: meant opt_head
            else:
                opt_head.zero_grad()
            loss = ce(model(x), y)
            loss.backward()
            opt_backbone.step()
            opt_head.step()
            col.step(loss=loss)
            if step % 10 == 0 or step == 299:
                model.eval()
                col.log(validate(model, data))


def zero_grad_wrong_optimizer(run_dir: Path) -> None:
    """Backbone (SGD) and head (Adam) with two optimizers; the loop zeroes the backbone's
    optimizer twice and the head's never, so the head's gradients pile up."""
    _two_optimizers(run_dir, wrong=True)


def two_optimizers(run_dir: Path) -> None:
    """Fixed twin of zero-grad-wrong-optimizer: each optimizer zeroed once per step."""
    _two_optimizers(run_dir, wrong=False)


# -- optimizer-mismatch -------------------------------------------------------------------------


def _pretrained(seed: int, data: Data) -> nn.Sequential:
    """An MLP trained briefly on the task, standing in for a pretrained backbone."""
    model = mlp([DIM, 64, 64, CLASSES])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    it = batches(data, 64, seed=seed + 100)
    for _ in range(150):
        x, y = next(it)
        opt.zero_grad()
        ce(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)  # as loaded from a checkpoint: no .grad
    return model


def _head_swap(run_dir: Path, *, optimizer_first: bool) -> None:
    seeded(42)
    data = classifier_data(42)
    model = _pretrained(42, data)
    if optimizer_first:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # Fine-tune: freeze the backbone, put a fresh head on it.
    for p in model.parameters():
        p.requires_grad = False
    model[4] = nn.Linear(64, CLASSES)
    if not optimizer_first:
        opt = torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9
        )
    it = batches(data, 64, seed=42)
    with collector(model, opt, run_dir, classifier_config(lr=0.05, batch_size=64)) as col:
        for step in range(200):
            model.train()
            x, y = next(it)
            opt.zero_grad()
            loss = ce(model(x), y)
            loss.backward()
            opt.step()
            col.step(loss=loss)
            if step % 10 == 0 or step == 199:
                model.eval()
                col.log(validate(model, data))


def optimizer_before_head_swap(run_dir: Path) -> None:
    """Fine-tuning a pretrained MLP: the optimizer is built from model.parameters(), then
    the backbone is frozen and the head replaced: the optimizer holds the frozen backbone and
    the old head, the new head gets gradients but no optimizer. Nothing trains."""
    _head_swap(run_dir, optimizer_first=True)


def optimizer_after_head_swap(run_dir: Path) -> None:
    """Fixed twin of optimizer-before-head-swap: the optimizer is built after the swap, from
    the parameters that require gradients (the new head); the backbone stays frozen."""
    _head_swap(run_dir, optimizer_first=False)


# -- stalled-optimizer ------------------------------------------------------------------------


def _schedule(run_dir: Path, *, total_steps_of_one_epoch: bool) -> None:
    seeded(43)
    data = classifier_data(43)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.x, data.y),
        batch_size=64,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(43),
    )
    epochs = 5
    model = mlp([DIM, 64, 64, CLASSES])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    # Linear decay to 0 over the training steps, stepped every batch (the HF recipe).
    total = len(loader) if total_steps_of_one_epoch else epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))
    config = classifier_config(lr=2e-3, batch_size=64, epochs=epochs, schedule="linear")
    with collector(model, opt, run_dir, config) as col:
        step = 0
        for _ in range(epochs):
            for x, y in loader:
                model.train()
                opt.zero_grad()
                loss = ce(model(x), y)
                loss.backward()
                opt.step()
                sched.step()
                col.step(loss=loss)
                if step % 10 == 0:
                    model.eval()
                    col.log(validate(model, data))
                step += 1


def lr_schedule_one_epoch(run_dir: Path) -> None:
    """AdamW with a linear-decay schedule stepped every batch whose num_training_steps is
    len(loader) — one epoch — while training runs 5 epochs: the LR is exactly 0 from the
    second epoch on and every update is 0, gradients unchanged."""
    _schedule(run_dir, total_steps_of_one_epoch=True)


def lr_schedule_all_epochs(run_dir: Path) -> None:
    """Fixed twin of lr-schedule-one-epoch: num_training_steps = epochs * len(loader)."""
    _schedule(run_dir, total_steps_of_one_epoch=False)


# -- bf16-stagnation ----------------------------------------------------------------------------


def _bf16(run_dir: Path, *, pure: bool) -> None:
    seeded(44)
    data = classifier_data(44)
    model = mlp([DIM, 128, 128, CLASSES])
    if pure:
        model = model.to(torch.bfloat16)  # weights, gradients and optimizer state in bf16
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    it = batches(data, 64, seed=44)
    config = classifier_config(lr=1e-4, batch_size=64, precision="bf16" if pure else "amp-bf16")
    with collector(model, opt, run_dir, config) as col:
        for step in range(300):
            model.train()
            x, y = next(it)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = ce(model(x.to(torch.bfloat16) if pure else x).float(), y)
            loss.backward()
            opt.step()
            col.step(loss=loss)
            if step % 10 == 0 or step == 299:
                model.eval()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    col.log(validate(model, data))


def pure_bf16(run_dir: Path) -> None:
    """MLP converted with model.to(torch.bfloat16) and trained by Adam at LR 1e-4 without
    float32 master weights: most updates are under bf16's resolution and round away."""
    _bf16(run_dir, pure=True)


def bf16_autocast(run_dir: Path) -> None:
    """Fixed twin of pure-bf16: float32 weights, bf16 compute under torch.autocast."""
    _bf16(run_dir, pure=False)


SCENARIOS: list[Scenario] = [
    Scenario("no-zero-grad", no_zero_grad.__doc__ or "", ("gradient-not-reset",), no_zero_grad),
    Scenario("grad-accumulation", grad_accumulation.__doc__ or "", (), grad_accumulation),
    Scenario(
        "zero-grad-wrong-optimizer",
        zero_grad_wrong_optimizer.__doc__ or "",
        ("gradient-not-reset",),
        zero_grad_wrong_optimizer,
    ),
    Scenario("two-optimizers", two_optimizers.__doc__ or "", (), two_optimizers),
    Scenario(
        "optimizer-before-head-swap",
        optimizer_before_head_swap.__doc__ or "",
        ("optimizer-mismatch",),
        optimizer_before_head_swap,
    ),
    Scenario(
        "optimizer-after-head-swap",
        optimizer_after_head_swap.__doc__ or "",
        (),
        optimizer_after_head_swap,
    ),
    Scenario(
        "lr-schedule-one-epoch",
        lr_schedule_one_epoch.__doc__ or "",
        ("stalled-optimizer",),
        lr_schedule_one_epoch,
    ),
    Scenario(
        "lr-schedule-all-epochs", lr_schedule_all_epochs.__doc__ or "", (), lr_schedule_all_epochs
    ),
    Scenario("pure-bf16", pure_bf16.__doc__ or "", ("bf16-stagnation",), pure_bf16),
    Scenario("bf16-autocast", bf16_autocast.__doc__ or "", (), bf16_autocast),
]
