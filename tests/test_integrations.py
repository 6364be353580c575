"""Framework callbacks on tiny models with the real packages: Lightning and HF Trainer."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from contract_helpers import grad_total_norm, healthy
from runlens_collect import format as fmt
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


def test_hf_causal_lm_logits_task_and_clip_norms(hf_run):
    """The GPT-2 run above: the output rows are the logits (batch x seq x vocab), never the
    loss; the task is language modeling (no chance level); HF's logged grad_norm (before
    clipping) is grad_norm_preclip at every step, and grad_norm is after clipping."""
    run, history = hf_run
    out = run.layer_frame("output", ("numel",))
    assert set(out["numel"].to_list()) == {8 * 12 * 32}
    assert run.meta["model"]["output_shape"] == [8, 12, 32]
    assert fmt.read_task(run.meta) == {
        "type": "language-modeling", "num_classes": 32, "source": "model:GPT2LMHeadModel",
    }  # fmt: skip
    pre = run.scalar(fmt.GRAD_NORM_PRECLIP)
    assert pre.steps.tolist() == list(range(6))
    np.testing.assert_allclose(pre.values, [h["grad_norm"] for h in history if "loss" in h])
    post = run.scalar(fmt.GRAD_NORM).values
    np.testing.assert_allclose(post, np.minimum(pre.values, 1.0), rtol=1e-5)
    report = healthy(run.path)
    assert report.coverage.task.type == "language-modeling"
    assert report.coverage.task.chance_level is None


def _hf_trainer(out, model, data, **kw):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from runlens_collect.integrations.hf import RunlensTrainerCallback

    args = dict(
        output_dir=str(out),
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    args.update(kw)
    return transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(**args),
        train_dataset=data,
        callbacks=[RunlensTrainerCallback()],
    )


def test_hf_sequence_classifier_with_accumulation(tmp_path):
    """GPT2ForSequenceClassification, 3 labels, 2 micro-batches per step: the recorded loss
    is the Trainer's (log_history at logging_steps=1), the logits are 3 per example, the
    chance level is ln(3)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, num_labels=3,
        pad_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2ForSequenceClassification(config)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 32, (96, 12), generator=gen)
    data = [{"input_ids": r, "labels": int(r[0]) % 3} for r in ids]
    trainer = _hf_trainer(
        tmp_path, model, data, max_steps=6, logging_steps=1, gradient_accumulation_steps=2
    )
    trainer.train()
    run = load_run(tmp_path / "runlens")
    want = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    np.testing.assert_allclose(run.scalar("train/loss").values, want, rtol=1e-5)
    assert set(run.layer_frame("output", ("numel",))["numel"].to_list()) == {8 * 3}
    report = healthy(run.path)
    t = report.coverage.task
    assert (t.type, t.num_classes) == ("classification", 3)
    assert t.chance_level == pytest.approx(np.log(3))
    assert "bad-initial-loss" in report.coverage.ran


def test_hf_default_logging_still_records_every_step(tmp_path):
    """logging_steps=500 (the default) on a 10-step run: HF logs no step loss at all, the
    collector records one per step; their mean is the Trainer's training_loss."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0
    )
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": r, "labels": r} for r in torch.randint(0, 32, (80, 12), generator=gen)]
    trainer = _hf_trainer(tmp_path, transformers.GPT2LMHeadModel(config), data, max_steps=10)
    result = trainer.train()
    assert not [h for h in trainer.state.log_history if "loss" in h]
    loss = load_run(tmp_path / "runlens").scalar("train/loss")
    assert loss.steps.tolist() == list(range(10))
    assert float(np.mean(loss.values)) == pytest.approx(result.training_loss, rel=1e-5)


def test_hf_resume_from_checkpoint_continues_the_run(tmp_path):
    """Train 6 steps with checkpoints every 3, then resume from checkpoint-3 to step 9:
    one run of 9 steps, steps 3..8 from the resumed training (its log_history)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0
    )
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": r, "labels": r} for r in torch.randint(0, 32, (80, 12), generator=gen)]
    torch.manual_seed(0)
    first = _hf_trainer(
        tmp_path, transformers.GPT2LMHeadModel(config), data, max_steps=6, logging_steps=1,
        save_strategy="steps", save_steps=3,
    )  # fmt: skip
    first.train()
    torch.manual_seed(0)
    second = _hf_trainer(
        tmp_path, transformers.GPT2LMHeadModel(config), data, max_steps=9, logging_steps=1,
        save_strategy="no",
    )  # fmt: skip
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    run = load_run(tmp_path / "runlens")
    loss = run.scalar("train/loss")
    assert loss.steps.tolist() == list(range(9))
    want_first = [h["loss"] for h in first.state.log_history if "loss" in h][:3]
    # The resumed Trainer's history starts with the checkpoint's 3 steps.
    want_second = [(h["step"], h["loss"]) for h in second.state.log_history if "loss" in h]
    assert [s for s, _ in want_second[3:]] == [4, 5, 6, 7, 8, 9]  # = runlens steps 3..8
    want_second = [v for _, v in want_second[3:]]
    np.testing.assert_allclose(loss.values, want_first + want_second, rtol=1e-5)
    assert run.resumes == (3,)
    assert run.layer_matrix("weight", "norm").steps.tolist() == list(range(9))
    report = healthy(run.path)
    assert report.summary.resumed_at == (3,)


# -- Lightning: accumulation, clipping, bf16 ---------------------------------------------


def _lightning_fit(root, precision: str, accumulate: int, clip: float | None, steps: int):
    L = pytest.importorskip("lightning.pytorch")
    from runlens_collect.integrations.lightning import RunlensCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
            self.own_losses: list[float] = []  # what the module computed, as it saw it

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.own_losses.append(float(loss.detach().float()))
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    class Norms(L.Callback):
        """Gradient norms before clipping (Lightning's hook) and after it (the optimizer's
        own post-step hook: what it applied)."""

        def __init__(self):
            self.pre, self.post = [], []

        def on_train_start(self, trainer, pl_module):
            def post(opt, args, kwargs):
                self.post.append(grad_total_norm(pl_module.parameters()))

            trainer.optimizers[0].register_step_post_hook(post)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.pre.append(grad_total_norm(pl_module.parameters()))

    torch.manual_seed(0)
    x = torch.randn(32 * accumulate * steps // 4, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    norms = Norms()
    module = Module()
    trainer = L.Trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
        precision=precision,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[RunlensCallback(), norms],
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    own = np.array(module.own_losses).reshape(steps, accumulate).mean(1)
    return load_run(root / "runlens"), own, norms


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_accumulation_records_the_modules_own_loss(tmp_path, precision):
    run, own, norms = _lightning_fit(tmp_path, precision, accumulate=4, clip=0.5, steps=8)
    loss = run.scalar("train/loss")
    assert loss.steps.tolist() == list(range(8))
    # Lightning hands over loss / 4; the recorded loss is the module's own (mean of 4).
    np.testing.assert_allclose(loss.values, own, rtol=1e-5)
    # Before clipping under its own name; grad_norm is what the optimizer applied.
    np.testing.assert_allclose(run.scalar(fmt.GRAD_NORM_PRECLIP).values, norms.pre, rtol=1e-4)
    np.testing.assert_allclose(run.scalar(fmt.GRAD_NORM).values, norms.post, rtol=1e-4)
    assert max(norms.pre) > 0.5 >= max(norms.post) - 1e-6  # clipping happened
    grads = run.layer_matrix("grad", "norm").values
    np.testing.assert_allclose(np.sqrt((grads**2).sum(1)), norms.post, rtol=1e-4)
    healthy(run.path)


def test_lightning_resume_from_a_checkpoint_continues_the_run(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from runlens_collect.integrations.lightning import RunlensCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
            self.own_losses: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.own_losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    x = torch.randn(64, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    data = DataLoader(TensorDataset(x, y), batch_size=8)

    def trainer(steps):
        return L.Trainer(
            max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
            callbacks=[RunlensCallback()],
        )  # fmt: skip

    first, module = trainer(4), Module()
    first.fit(module, data)
    first.save_checkpoint(tmp_path / "step4.ckpt")
    second, resumed = trainer(8), Module()
    second.fit(resumed, data, ckpt_path=tmp_path / "step4.ckpt")
    run = load_run(tmp_path / "runlens")
    loss = run.scalar("train/loss")
    assert loss.steps.tolist() == list(range(8))
    np.testing.assert_allclose(loss.values, module.own_losses + resumed.own_losses, rtol=1e-6)
    assert run.resumes == (4,)
    healthy(run.path)
