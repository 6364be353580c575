"""Patterns of real logs (issue 15) on real tiny trainings: a late divergence, short
epoch-level logs, an evaluation logged after the last training loss, a loss rounded to 4
decimals, YOLO-style component losses.

Each run trains a small model on CPU and is recorded with the real Collector or written the
way the tool writes its log (tests/log_writers.py), then analyzed by the real engine.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import runlens
from runlens import series as S
from runlens.sources import open_run

sys.path.insert(0, str(Path(__file__).parent))
from log_writers import (
    hf_log_history,
    noisy_label_training,
    write_hf_checkpoint,
    write_keras_csvlogger,
)

SERIOUS = ("warning", "error")


@pytest.fixture(autouse=True)
def _cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("RUNLENS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def serious(report: runlens.Report) -> dict[str, runlens.Finding]:
    return {f.signature: f for f in report.findings if f.severity in SERIOUS}


def evidence(f: runlens.Finding, name: str) -> float:
    return next(e.value for e in f.evidence if e.name == name)


# -- a transformer whose loss rose 3x over the last 60 of 400 steps -----------------------


def _markov_lm_run(run_dir: Path) -> list[float]:
    """A 2-layer transformer LM on a 32-token Markov chain, Adam at lr 0.3 with a linear
    warm-up planned over 3700 steps: the rate is still rising when the run stops at 400,
    and past step ~340 it is too high, so the loss climbs ~3x in the last 60 steps."""
    from runlens_collect import Collector

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        vocab, length, width = 32, 32, 64
        g = torch.Generator().manual_seed(0)
        probs = torch.softmax(torch.randn(vocab, vocab, generator=g) * 3, dim=1)

        def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.empty(n, length + 1, dtype=torch.long)
            x[:, 0] = torch.randint(0, vocab, (n,), generator=g)
            for t in range(length):
                x[:, t + 1] = torch.multinomial(probs[x[:, t]], 1, generator=g).squeeze(1)
            return x[:, :-1], x[:, 1:]

        class LM(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.emb = nn.Embedding(vocab, width)
                self.pos = nn.Parameter(torch.zeros(length, width))
                layer = nn.TransformerEncoderLayer(
                    width, 4, 4 * width, dropout=0.0, batch_first=True
                )
                self.enc = nn.TransformerEncoder(layer, 2)
                self.head = nn.Linear(width, vocab)
                self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                h = self.enc(self.emb(x) + self.pos, mask=self.mask, is_causal=True)
                return self.head(h)

        model = LM()
        opt = torch.optim.Adam(model.parameters(), lr=0.3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3700))
        losses = []
        config = {"task": "language-modeling", "lr": 0.3, "warmup_steps": 3700}
        with Collector(model, opt, run_dir=str(run_dir), config=config) as col:
            for _ in range(400):
                x, y = batch(32)
                loss = nn.functional.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                col.step(loss=loss)
                losses.append(loss.item())
        return losses
    finally:
        torch.set_num_threads(threads)


def test_late_divergence_of_a_transformer_is_an_error(tmp_path: Path) -> None:
    losses = np.array(_markov_lm_run(tmp_path / "lm"))
    best_before = float(np.median(losses[280:330]))
    end = float(np.median(losses[-30:]))
    assert end > 2.0 * best_before  # the recorded run really rose late (~3x)
    assert float(np.median(losses[:330][-40:])) < 1.5 * best_before  # and not before
    report = runlens.analyze(tmp_path / "lm")
    f = serious(report)["loss-divergence"]
    assert f.severity == "error"
    assert f.steps is not None and 320 <= f.steps[0] <= 399 and f.steps[1] == 399
    assert evidence(f, "late level") > 2.0 * evidence(f, "best level")
    assert f.series == ("train/loss",)
    assert "ended far above its best" in f.summary


# -- short epoch-level logs and sparse evaluations -----------------------------------------


@pytest.fixture(scope="module")
def six_epochs() -> object:
    """Real noisy-label training, 6 epochs of 100 steps: validation bottoms out at epoch 1
    and ends ~20% above it while the training loss keeps falling."""
    return noisy_label_training(steps=600, eval_every=100)


def test_six_epoch_keras_log_is_checked_for_overfitting(six_epochs, tmp_path: Path) -> None:
    rows = six_epochs.epochs()
    val = [r["val_loss"] for r in rows]
    best = int(np.argmin(val))
    assert 0 < best < 5 and val[-1] > 1.1 * val[best]
    write_keras_csvlogger(tmp_path / "training.log", rows)
    report = runlens.analyze(tmp_path / "training.log")
    f = serious(report)["overfitting"]
    assert f.steps == (best, 5)  # epochs, each one its own level
    assert evidence(f, "best val loss") == pytest.approx(val[best])
    assert evidence(f, "final val loss") == pytest.approx(val[-1])
    assert evidence(f, "val loss rise / best") == pytest.approx(val[-1] / val[best] - 1)
    assert report.summary.best_val_step == best  # the header names the same epoch
    # The first 3 epochs: val is flat (best at the last one), nothing to report, and the
    # 3-epoch log is checked, not skipped.
    write_keras_csvlogger(tmp_path / "short.log", rows[:2])
    short = runlens.analyze(tmp_path / "short.log")
    assert "overfitting" not in serious(short)
    assert any(s.signature == "overfitting" for s in short.skipped)  # 2 evals: says why


def test_last_eval_after_the_last_logged_loss_still_pairs(six_epochs, tmp_path: Path) -> None:
    """HF Trainer logging the loss every 7 steps and evaluating every 100: the last
    evaluation (step 600) comes after the last loss entry (step 595)."""
    history = hf_log_history(six_epochs, logging_steps=7)
    losses = [h["step"] for h in history if "loss" in h]
    evals = [h["step"] for h in history if "eval_loss" in h]
    assert losses[-1] == 595 and evals[-1] == 600
    ckpt = write_hf_checkpoint(tmp_path / "out", six_epochs, max_steps=600, history=history)
    report = runlens.analyze(ckpt)
    f = serious(report)["overfitting"]
    assert f.steps is not None and f.steps[1] == 600
    final_train = evidence(f, "final train loss")
    assert final_train == pytest.approx(
        float(np.median([h["loss"] for h in history if "loss" in h][-6:])), rel=0.2
    )


# -- a loss written with 4 decimals ----------------------------------------------------------


def test_rounding_steps_are_not_spikes(tmp_path: Path) -> None:
    """A linear model converging to its noise floor (~1.2e-4 MSE), its per-step loss
    written with 4 decimals as many loggers do: once converged the loss reads 0.0001 with
    the odd 0.0002, a rounding step, not a spike."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(8, 1, generator=g)
    x = torch.randn(4096, 8, generator=g)
    y = x @ w + 0.011 * torch.randn(4096, 1, generator=g)
    model = nn.Linear(8, 1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    rows = []
    for step in range(600):
        idx = torch.randint(0, 4096, (128,), generator=g)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        rows.append((step, f"{loss.item():.4f}"))
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([("step", "train_loss"), *rows])
    tail = np.array([float(v) for _, v in rows[300:]])
    assert set(tail) == {0.0001, 0.0002} and 0 < np.mean(tail == 0.0002) < 0.1
    report = runlens.analyze(path)
    assert "loss-spike" not in serious(report)
    steps = np.arange(300, 600)
    assert S.resolution(tail) == pytest.approx(1e-4)
    assert S.find_spikes(steps, tail, threshold=6.0, min_rel=0.5) == []
    # Below the rounding, the same steps would score as huge spikes: the floor decides.
    jitter = tail + np.linspace(0, 1e-9, tail.size)
    assert S.find_spikes(steps, jitter, threshold=6.0, min_rel=0.5)


# -- YOLO: the loss is logged only as its components -----------------------------------------


def test_yolo_results_csv_loss_is_the_sum_of_its_components(tmp_path: Path) -> None:
    """A tiny real model trained on the sum of a box (L1), a class (cross-entropy) and a
    distribution (cross-entropy over bins) loss, each logged per epoch under ultralytics'
    column names, as results.csv writes them: the imported train/loss is the objective
    that was backpropagated, and val/box_loss is a component, not an evaluation set."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 10, generator=g)
    box = x[:, :4] @ torch.randn(4, 4, generator=g)
    cls = (x[:, 4:] @ torch.randn(6, 3, generator=g)).argmax(1)
    bins = (x[:, :2].sum(1) * 2 + 8).clamp(0, 15).long()
    model = nn.Linear(10, 4 + 3 + 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def losses(xb: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = model(xb)
        return (
            nn.functional.l1_loss(out[:, :4], box[i]),
            nn.functional.cross_entropy(out[:, 4:7], cls[i]),
            nn.functional.cross_entropy(out[:, 7:], bins[i]),
        )

    header = ["epoch", "train/box_loss", "train/cls_loss", "train/dfl_loss",
              "metrics/mAP50(B)", "val/box_loss", "val/cls_loss", "val/dfl_loss",
              "lr/pg0", "lr/pg1", "lr/pg2"]  # fmt: skip
    rows, totals = [], []
    tr, va = torch.arange(0, 384), torch.arange(384, 512)
    for epoch in range(1, 13):
        lr = 0.05 * min(1.0, epoch / 3)
        for group in opt.param_groups:
            group["lr"] = lr
        comp, tot = np.zeros(3), 0.0
        for b in tr.split(32):
            parts = losses(x[b], b)
            total = sum(parts)
            opt.zero_grad()
            total.backward()
            opt.step()
            comp += [p.item() for p in parts]
            tot += total.item()
        n = len(tr.split(32))
        totals.append(tot / n)
        with torch.no_grad():
            vparts = [p.item() for p in losses(x[va], va)]
        rows.append([epoch, *(comp / n), 0.5, *vparts, lr, lr, lr])
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as fh:
        fh.write(",".join(f"{h:>20}" for h in header) + "\n")  # YOLOv5-style padding
        for r in rows:
            fh.write(",".join(f"{v:>20.5g}" for v in r) + "\n")
    run = open_run(path)
    got = run.scalar("train/loss")
    assert got is not None and list(got.steps) == list(range(1, 13))
    assert np.allclose(got.values, totals, rtol=1e-3)  # what was backpropagated
    val = run.scalar("val/loss")
    assert val is not None and np.allclose(val.values, [sum(r[5:8]) for r in rows], rtol=1e-3)
    assert run.scalar("val/box_loss") is not None  # the component keeps its name
    assert run.scalar("lr/0") is not None
    report = runlens.analyze(run)
    assert any("sum of train/box_loss" in w for w in report.warnings)
    # the report's final level: the median of the last 2 of 12 points (runlens.levels)
    assert report.summary.final_train_loss == pytest.approx(np.median(totals[-2:]), rel=1e-3)
    assert not serious(report)  # a healthy short run
    meta = json.loads((run.path / "run.json").read_text())
    assert meta["imported"]["names"]["train/loss"] == "train/loss"
    assert math.isfinite(report.summary.final_val_loss or float("nan"))
