"""Framework callbacks on tiny models with the real packages: Lightning and HF Trainer."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from runlens.run import load_run

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_integrations_are_optional_imports():
    code = (
        "import sys, runlens_collect, runlens_collect.integrations;"
        "print(any(m.split('.')[0] in ('lightning', 'transformers') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- Lightning ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    L = pytest.importorskip("lightning.pytorch")
    from runlens_collect.integrations.lightning import RunlensCallback

    class Classifier(L.LightningModule):
        def __init__(self, lr: float = 0.1):
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    class GradNorms(L.Callback):
        """What the optimizer receives, measured independently of runlens."""

        def __init__(self):
            self.norms = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad.detach().double().norm() for p in pl_module.parameters()]
            self.norms.append(float(torch.stack(grads).norm()))

    torch.manual_seed(0)
    x = torch.randn(64, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    train = DataLoader(TensorDataset(x, y), batch_size=8)
    val = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8)
    root = tmp_path_factory.mktemp("lightning")
    norms = GradNorms()
    trainer = L.Trainer(
        max_steps=6,
        accumulate_grad_batches=2,  # gradients summed over 2 batches per optimizer step
        val_check_interval=4,  # every 4 batches = every 2 optimizer steps
        limit_val_batches=2,
        num_sanity_val_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[RunlensCallback(), norms],
    )
    trainer.fit(Classifier(), train, val)
    return load_run(root / "runlens"), norms.norms


def test_lightning_callback_records_a_readable_run(lightning_run):
    run, norms = lightning_run
    assert run.status == "finished"
    loss = run.scalar("train/loss")
    assert loss.steps.tolist() == list(range(6))
    assert np.isfinite(loss.values).all()
    val = run.scalar("val/loss")
    assert val.steps.tolist() == [1, 3, 5]  # after optimizer steps 2, 4, 6; no sanity check
    assert np.isfinite(val.values).all()
    assert run.config["lr"] == 0.1
    assert {"weight", "grad", "update", "activation", "output"} <= set(run.layer_kinds)
    # Gradients as the optimizer received them (accumulated over 2 batches), not the
    # stale/empty ones seen when optimizer.step() starts, before Lightning's closure.
    grad = run.layer_matrix("grad", "norm")
    assert np.isfinite(grad.values).all()
    np.testing.assert_allclose(run.scalar("grad_norm").values, norms, rtol=1e-5)
    assert len(run.layer_matrix("update", "norm").steps) == 6


# -- Hugging Face Trainer ------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from runlens_collect.integrations.hf import RunlensTrainerCallback

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (48, 12), generator=gen)
    data = [{"input_ids": r, "labels": r} for r in ids]
    out = tmp_path_factory.mktemp("hf")
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=data[:40],
        eval_dataset=data[40:],
        callbacks=[RunlensTrainerCallback()],
    )
    trainer.train()
    return load_run(out / "runlens"), trainer.state.log_history


def test_hf_trainer_callback_records_a_readable_run(hf_run):
    run, history = hf_run
    assert run.status == "finished"
    loss = run.scalar("train/loss")
    assert loss.steps.tolist() == list(range(6))
    want = [h["loss"] for h in history if "loss" in h]
    np.testing.assert_allclose(loss.values, want, rtol=1e-6)
    val = run.scalar("val/loss")
    assert val.steps.tolist() == [2, 5]  # evaluated after global steps 3 and 6
    np.testing.assert_allclose(val.values, [h["eval_loss"] for h in history if "eval_loss" in h])
    assert run.scalar("lr/0") is not None and len(run.scalar("lr/0")) == 6
    assert run.config["model_type"] == "gpt2"
    assert {"weight", "grad", "update", "activation", "output"} <= set(run.layer_kinds)
    assert np.isfinite(run.layer_matrix("grad", "norm").values).all()
    updates = run.layer_matrix("update", "norm").values
    assert np.isfinite(updates).all() and (updates > 0).all()  # AdamW moved every tensor
