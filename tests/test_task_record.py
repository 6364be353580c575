"""run.json ``task`` as the collector writes it: from the loss functions a training step
calls and the model class, never from the output's shape; and the loss a step records
when the script does not give one (micro-batches, accumulation, scaling)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from contract_helpers import MLP, batches, blobs, steps_of, values_of
from runlens_collect import Collector
from runlens_collect import format as fmt
from torch import nn

import runlens
from runlens.run import load_run


def _task(tmp_path: Path, model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Collector(model, opt, run_dir=tmp_path) as col:
        for _ in range(3):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step()
            with torch.no_grad():  # an evaluation loss says nothing about training
                F.mse_loss(x, torch.zeros_like(x))
    assert col.warnings == []
    return fmt.read_task(load_run(tmp_path).meta)


class Seg(nn.Module):
    """Per-pixel 4-class logits (N, 4, H, W=32): the last dim is the width, not C."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Linear(8, 5)
        self.box = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls(x), self.box(x)


def test_task_from_the_loss_function_and_the_logits_class_dim(tmp_path: Path) -> None:
    x, y = blobs()
    got = _task(tmp_path / "ce", MLP(), F.cross_entropy, x, y)
    assert got == {"type": "classification", "num_classes": 3, "source": "loss:cross_entropy"}
    got = _task(tmp_path / "module", MLP(), nn.CrossEntropyLoss(), x, y)
    assert got["type"] == "classification" and got["num_classes"] == 3
    # nll on log-probabilities
    got = _task(tmp_path / "nll", MLP(), lambda o, t: F.nll_loss(o.log_softmax(-1), t), x, y)
    assert got == {"type": "classification", "num_classes": 3, "source": "loss:nll_loss"}
    # segmentation: C from dim 1, not the width 32 (the old guess read the last dim)
    imgs, masks = torch.randn(2, 3, 16, 32), torch.randint(0, 4, (2, 16, 32))
    got = _task(tmp_path / "seg", Seg(), F.cross_entropy, imgs, masks)
    assert got["type"] == "classification" and got["num_classes"] == 4
    # a 64-output regression is a regression, whatever its width
    targets = torch.randn(256, 64)
    got = _task(tmp_path / "reg", MLP(out=64), F.mse_loss, x, targets)
    assert got == {"type": "regression", "num_classes": None, "source": "loss:mse_loss"}
    # independent binary labels
    labels = (torch.rand(256, 5) > 0.5).float()
    got = _task(tmp_path / "bce", MLP(out=5), F.binary_cross_entropy_with_logits, x, labels)
    assert got["type"] == "multilabel" and got["num_classes"] == 5


def test_a_sum_of_losses_has_no_single_task_and_no_chance_level(tmp_path: Path) -> None:
    x = torch.randn(64, 8)
    y, boxes = torch.randint(0, 5, (64,)), torch.randn(64, 4)

    def detection_loss(out, _):
        logits, pred = out
        return F.cross_entropy(logits, y) + F.smooth_l1_loss(pred, boxes)

    got = _task(tmp_path, Detector(), detection_loss, x, y)
    assert got == {"type": "unknown", "num_classes": None,
                   "source": "losses:cross_entropy+smooth_l1_loss"}  # fmt: skip
    task = runlens.analyze(tmp_path).coverage.task
    assert task.type == "unknown" and task.chance_level is None
    assert any("cross_entropy+smooth_l1_loss" in i for i in task.ignored)


def test_the_config_overrides_what_the_collector_saw(tmp_path: Path) -> None:
    x, y = blobs()
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Collector(model, opt, run_dir=tmp_path, config={"task": "regression"}) as col:
        for _ in range(3):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
    assert fmt.read_task(load_run(tmp_path).meta)["type"] == "classification"
    task = runlens.analyze(tmp_path).coverage.task
    assert (task.type, task.source) == ("regression", "config task")


def test_task_from_hugging_face_model_classes() -> None:
    transformers = pytest.importorskip("transformers")
    from runlens_collect.taskinfer import from_model

    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    task, final = from_model(transformers.GPT2LMHeadModel(cfg))
    assert task == ("language-modeling", 32, "model:GPT2LMHeadModel") and final
    cfg.num_labels, cfg.pad_token_id = 3, 0
    task, final = from_model(transformers.GPT2ForSequenceClassification(cfg))
    assert task == ("classification", 3, "model:GPT2ForSequenceClassification") and not final
    cfg.num_labels = 1
    task, _ = from_model(transformers.GPT2ForSequenceClassification(cfg))
    assert task[0] == "regression"
    assert from_model(nn.Linear(2, 2)) == (None, False)


@pytest.mark.parametrize("accumulate", [1, 4])
def test_the_step_loss_from_backward_is_averaged_over_micro_batches(
    tmp_path: Path, accumulate: int
) -> None:
    """col.step() without a loss: the mean of the micro-batch losses, the usual
    ``loss / accumulate`` undone, never multiplied by a GradScaler's scale."""
    x, y = blobs()
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    truth = []
    with Collector(model, opt, run_dir=tmp_path) as col:
        for step in range(10):
            micro = []
            opt.zero_grad()
            for k in range(accumulate):
                xb, yb = batches(x, y, step * accumulate + k, size=16)
                loss = F.cross_entropy(model(xb), yb)
                micro.append(float(loss.detach()))
                scaler.scale(loss / accumulate).backward()
            scaler.step(opt)
            scaler.update()
            truth.append(float(np.mean(micro)))
            col.step()
    run = load_run(tmp_path)
    assert steps_of(run, fmt.TRAIN_LOSS) == list(range(10))
    np.testing.assert_allclose(values_of(run, fmt.TRAIN_LOSS), truth, rtol=1e-6)


_ZERO_CODE = """
import sys, torch
import torch.nn.functional as F
from torch import nn
torch.manual_seed(0)
mode = sys.argv[1]
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
if mode == "frozen":
    # An optimizer over frozen parameters (the trainable ones are stepped by hand).
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    for step in range(4):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(); opt.zero_grad()
else:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(6):
        opt.zero_grad()
        micro = []
        for k in range(4):
            xb, yb = x[k * 16:(k + 1) * 16], y[k * 16:(k + 1) * 16]
            loss = F.cross_entropy(model(xb), yb)
            micro.append(loss.item())
            scaler.scale(loss / 4).backward()
        scaler.step(opt); scaler.update()
        print("loss", sum(micro) / 4, flush=True)
"""


@pytest.mark.parametrize("mode", ["amp-accumulate", "frozen"])
def test_zero_code_records_the_unscaled_loss_and_keeps_layer_names(
    tmp_path: Path, mode: str
) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(_ZERO_CODE))
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-c", "from runlens.cli import main; main()", "collect",
         "--out", str(out), "--name", "r",
         "--", sys.executable, str(script), mode],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run = load_run(out / "r")
    if mode == "frozen":
        # The optimizer holds only frozen parameters: the model is still found by them,
        # and the layers keep their names (no ParameterList fallback).
        assert run.meta["model"]["class"] == "Sequential"
        assert run.layer_matrix(fmt.KIND_WEIGHT, "norm").layers == (
            "0.weight", "0.bias", "2.weight", "2.bias",
        )  # fmt: skip
        assert run.layer_matrix(fmt.KIND_OUTPUT, "norm") is not None
        return
    want = [float(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("loss")]
    assert len(want) == 6
    np.testing.assert_allclose(values_of(run, fmt.TRAIN_LOSS), want, rtol=1e-5)
    np.testing.assert_allclose(values_of(run, fmt.LOSS_SCALE), [2.0**8] * 6)
