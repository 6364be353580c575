"""Sample runs of data and train/eval-mode bugs (docs/silent-bugs.md), each with its fixed
twin: the line that is wrong in the bug run is the line fixed in the twin. See
``bug_scenarios.py`` for the optimizer-side bugs and the shared helpers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, get_worker_info

from sample_runs.bug_scenarios import batches, ce, collector, validate
from sample_runs.common import (
    CLASSES,
    DIM,
    Data,
    Scenario,
    classifier_config,
    classifier_data,
    mlp,
    seeded,
)

# -- duplicate-batches --------------------------------------------------------------------------


class RandomBatches(IterableDataset):
    """An endless stream of augmented batches drawn at random from an in-memory set: the
    random generator is built once, in ``__init__`` — and so copied, with the same state,
    into every DataLoader worker process."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y = x.numpy(), y.numpy()
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)

    def __iter__(self):
        while True:
            i = self.rng.integers(len(self.x), size=self.batch_size)
            noise = self.rng.normal(0.0, 0.3, (self.batch_size, self.x.shape[1]))
            x = (self.x[i] + noise).astype(np.float32)
            yield torch.from_numpy(x), torch.from_numpy(self.y[i])


def seed_worker(worker_id: int) -> None:
    """The fix: give each worker's copy of the dataset its own generator (PyTorch seeds
    ``torch``, ``random`` and the global numpy RNG per worker, not a generator the dataset
    holds)."""
    info = get_worker_info()
    info.dataset.rng = np.random.default_rng(info.seed % 2**32)


def _workers(run_dir: Path, *, seeded_workers: bool) -> None:
    seeded(50)
    data = classifier_data(50)
    loader = DataLoader(
        RandomBatches(data.x, data.y, batch_size=64, seed=50),
        batch_size=None,  # the dataset yields whole batches
        num_workers=2,
        worker_init_fn=seed_worker if seeded_workers else None,
        generator=torch.Generator().manual_seed(50),
    )
    # Wide enough that a step's compute outlasts a worker's hand-over of a batch (a few ms
    # between processes): the twin must not be input-bound.
    model = mlp([DIM, 512, 512, CLASSES])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    config = classifier_config(lr=1e-3, batch_size=64, num_workers=2)
    with collector(model, opt, run_dir, config) as col:
        for step, (x, y) in enumerate(loader):
            if step == 240:
                break
            model.train()
            opt.zero_grad()
            loss = ce(model(x), y)
            loss.backward()
            opt.step()
            col.step(loss=loss)
            if step % 10 == 0:
                model.eval()
                col.log(validate(model, data))


def dataloader_worker_rng(run_dir: Path) -> None:
    """IterableDataset drawing batches and augmentation noise from a numpy Generator made in
    __init__, read by a DataLoader with num_workers=2 and no worker_init_fn: both workers
    yield the same stream, so every batch is trained on twice in a row."""
    _workers(run_dir, seeded_workers=False)


def dataloader_worker_seeded(run_dir: Path) -> None:
    """Fixed twin of dataloader-worker-rng: worker_init_fn reseeds each worker's generator
    from get_worker_info().seed."""
    _workers(run_dir, seeded_workers=True)


# -- train-eval-mode ----------------------------------------------------------------------------


def _bn_dropout_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(DIM, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Dropout(0.05),
        nn.Linear(64, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Dropout(0.05),
        nn.Linear(64, CLASSES),
    )


def _modes(run_dir: Path, *, eval_mode_in_validation: bool, train_mode_every_step: bool) -> None:
    seeded(51)
    data = classifier_data(51)
    model = _bn_dropout_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    it = batches(data, 64, seed=51)

    def evaluate() -> dict[str, float]:
        if eval_mode_in_validation:
            model.eval()
        return validate(model, data)  # under torch.no_grad()

    config = classifier_config(lr=2e-3, batch_size=64)
    with collector(model, opt, run_dir, config) as col:
        model.train()
        for step in range(300):
            if train_mode_every_step:
                model.train()
            x, y = next(it)
            opt.zero_grad()
            loss = ce(model(x), y)
            loss.backward()
            opt.step()
            col.step(loss=loss)
            if step % 10 == 0 or step == 299:
                col.log(evaluate())


def eval_without_eval_mode(run_dir: Path) -> None:
    """BatchNorm + dropout MLP whose validation runs under torch.no_grad() but without
    model.eval(): dropout drops units at evaluation and BatchNorm normalizes with the
    validation batch's statistics (and updates its running averages with them)."""
    _modes(run_dir, eval_mode_in_validation=False, train_mode_every_step=True)


def train_after_eval_mode(run_dir: Path) -> None:
    """BatchNorm + dropout MLP: model.train() is called once before the loop and the
    validation function calls model.eval(), so from the first validation on every training
    step runs in eval mode (dropout off, BatchNorm frozen at its running statistics)."""
    _modes(run_dir, eval_mode_in_validation=True, train_mode_every_step=False)


def eval_train_modes(run_dir: Path) -> None:
    """Fixed twin of eval-without-eval-mode and train-after-eval-mode: model.eval() in the
    validation function, model.train() at the start of every training step."""
    _modes(run_dir, eval_mode_in_validation=True, train_mode_every_step=True)


def _spectral(run_dir: Path, *, parametrization: bool) -> None:
    seeded(52)
    data = classifier_data(52)
    sn = (
        torch.nn.utils.parametrizations.spectral_norm
        if parametrization
        else torch.nn.utils.spectral_norm
    )
    model = nn.Sequential(
        sn(nn.Linear(DIM, 64)),
        nn.ReLU(),
        sn(nn.Linear(64, 64)),
        nn.ReLU(),
        sn(nn.Linear(64, CLASSES)),
    )
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    it = batches(data, 64, seed=52)
    config = classifier_config(lr=2e-3, batch_size=64, spectral_norm=True)
    with collector(model, opt, run_dir, config) as col:
        # A sanity evaluation before training (Lightning's num_sanity_val_steps, HF's
        # eval_on_start): logged at step 0.
        model.eval()
        col.log(validate(model, data))
        for step in range(300):
            model.train()
            x, y = next(it)
            opt.zero_grad()
            loss = ce(model(x), y)
            loss.backward()
            opt.step()
            col.step(loss=loss)
            if step % 10 == 9 or step == 299:
                model.eval()
                col.log(validate(model, data))


def spectral_norm_eval_first(run_dir: Path) -> None:
    """MLP with torch.nn.utils.spectral_norm layers evaluated before the first training
    step: the power iteration has never run (it runs only in training mode), so every layer
    divides its weight by u·Wv of two random vectors and the first val loss is absurd."""
    _spectral(run_dir, parametrization=False)


def spectral_norm_parametrization(run_dir: Path) -> None:
    """Fixed twin of spectral-norm-eval-first: torch.nn.utils.parametrizations.spectral_norm,
    which runs its power iteration at registration; the same evaluation first."""
    _spectral(run_dir, parametrization=True)


# -- loss-spike (recurring single-step spikes) --------------------------------------------------


def _spikes(run_dir: Path, *, corrupt: bool) -> None:
    seeded(53)
    data = classifier_data(53)
    # The data on disk: 8-bit quantized features, normalized when loaded.
    raw = (data.x * 32 + 128).clamp(0, 255).round().to(torch.uint8)

    def normalize(r: torch.Tensor) -> torch.Tensor:
        return (r.float() - 128) / 32

    val = Data(normalize(raw), data.y, data.xv, data.yv)
    model = mlp([DIM, 64, 64, CLASSES])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(53)
    perm_gen = torch.Generator().manual_seed(54)
    n = raw.shape[0]
    config = classifier_config(lr=2e-3, batch_size=64, grad_clip=1.0)
    with collector(model, opt, run_dir, config) as col:
        perm, pos = torch.randperm(n, generator=perm_gen), 0
        for step in range(400):
            if pos + 64 > n:
                perm, pos = torch.randperm(n, generator=perm_gen), 0
            idx = perm[pos : pos + 64]
            pos += 64
            x = normalize(raw[idx])
            # The bug: about 1 batch in 20 comes through a path that skips normalization
            # (raw 0-255 values), as a decode fallback or a stale staging buffer would.
            hit = bool(torch.rand((), generator=g) < 0.05)
            if corrupt and hit and step > 30:
                x = raw[idx].float()
            model.train()
            opt.zero_grad()
            loss = ce(model(x), data.y[idx])
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            col.step(loss=loss)
            if step % 10 == 0 or step == 399:
                model.eval()
                col.log(validate(model, val))


def corrupted_batches(run_dir: Path) -> None:
    """MLP on 8-bit features normalized at load time, with gradient clipping; about 5% of
    the batches skip normalization (raw 0-255 values): a single-step loss spike each time,
    from which the clipped model recovers at once."""
    _spikes(run_dir, corrupt=True)


def clean_batches(run_dir: Path) -> None:
    """Fixed twin of corrupted-batches: every batch normalized."""
    _spikes(run_dir, corrupt=False)


# -- batch-collapse -------------------------------------------------------------------------------


def _collapse(run_dir: Path, *, index_first: bool) -> None:
    seeded(54)
    data = classifier_data(54)
    # Features stored as one row per example (N, 1, DIM), labels as (N, 1).
    ds = TensorDataset(data.x.unsqueeze(1), data.y.unsqueeze(1))
    loader = DataLoader(
        ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(54)
    )
    model = mlp([DIM, 64, 64, CLASSES])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    config = classifier_config(lr=2e-3, batch_size=32)
    with collector(model, opt, run_dir, config) as col:
        step = 0
        while step < 300:
            for x, y in loader:
                if index_first:
                    x, y = x[0], y[0]  # meant to drop the extra dimension
                else:
                    x, y = x.squeeze(1), y.squeeze(1)
                model.train()
                opt.zero_grad()
                loss = ce(model(x), y)
                loss.backward()
                opt.step()
                col.step(loss=loss)
                if step % 10 == 0:
                    model.eval()
                    col.log(validate(model, data))
                step += 1
                if step == 300:
                    break


def one_example_per_batch(run_dir: Path) -> None:
    """A loader of (32, 1, 16) batches whose extra dimension is dropped with x[0] instead of
    x.squeeze(1): one example of each batch of 32 reaches the model."""
    _collapse(run_dir, index_first=True)


def squeezed_batches(run_dir: Path) -> None:
    """Fixed twin of one-example-per-batch: x.squeeze(1), the whole batch reaches the model."""
    _collapse(run_dir, index_first=False)


SCENARIOS: list[Scenario] = [
    Scenario(
        "dataloader-worker-rng",
        dataloader_worker_rng.__doc__ or "",
        ("duplicate-batches",),
        dataloader_worker_rng,
    ),
    Scenario(
        "dataloader-worker-seeded",
        dataloader_worker_seeded.__doc__ or "",
        (),
        dataloader_worker_seeded,
    ),
    Scenario(
        "eval-without-eval-mode",
        eval_without_eval_mode.__doc__ or "",
        ("train-eval-mode",),
        eval_without_eval_mode,
    ),
    Scenario(
        "train-after-eval-mode",
        train_after_eval_mode.__doc__ or "",
        ("train-eval-mode",),
        train_after_eval_mode,
    ),
    Scenario("eval-train-modes", eval_train_modes.__doc__ or "", (), eval_train_modes),
    Scenario(
        "spectral-norm-eval-first",
        spectral_norm_eval_first.__doc__ or "",
        ("train-eval-mode", "bad-initial-loss"),
        spectral_norm_eval_first,
    ),
    Scenario(
        "spectral-norm-parametrization",
        spectral_norm_parametrization.__doc__ or "",
        (),
        spectral_norm_parametrization,
    ),
    Scenario(
        "corrupted-batches", corrupted_batches.__doc__ or "", ("loss-spike",), corrupted_batches
    ),
    Scenario("clean-batches", clean_batches.__doc__ or "", (), clean_batches),
    Scenario(
        "one-example-per-batch",
        one_example_per_batch.__doc__ or "",
        ("batch-collapse",),
        one_example_per_batch,
    ),
    Scenario("squeezed-batches", squeezed_batches.__doc__ or "", (), squeezed_batches),
]
