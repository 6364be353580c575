"""Logs written the way real tools write them, from tiny real trainings.

``noisy_label_training`` trains a small MLP (torch, CPU) on a 4-class problem whose
training labels are 40% noise: the training loss falls to near zero while the loss on
clean validation data bottoms out and rises (overconfidence on memorized noise), and the
validation accuracy peaks elsewhere. The writers lay its numbers out as each tool does:

* Keras ``CSVLogger`` (``training.log``: ``epoch`` then the sorted log keys, excel
  dialect, no header when appending to an existing file);
* a Keras ``History`` saved with pandas ``to_csv`` (index column with an empty header,
  or ``index=False``);
* fastai's ``CSVLogger`` ``history.csv`` (``epoch,train_loss,valid_loss,<metrics>,time``
  with ``mm:ss`` times);
* the Hugging Face Trainer's ``checkpoint-N/trainer_state.json`` (training entries with
  the loss rounded to 4 digits, one evaluation entry per eval dataset, the closing
  summary entry);
* TensorBoard event files with the tags the HF Trainer's TensorBoard callback uses
  (``train/loss``, ``eval/loss``...) in ``runs/<date>_<host>/``, and Keras' layout
  (``logs/train``, ``logs/validation`` with ``epoch_*`` tags at step = epoch).

Lightning logs are written by the real ``lightning`` package (``lightning_csv_runs``).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

N_CLASSES = 4


@dataclass
class Training:
    """Per-step and per-evaluation records of one real training (steps from 1, as the
    HF Trainer's global step)."""

    steps: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    steps_per_epoch: int = 1
    lr: float = 1e-3

    def epochs(self) -> list[dict[str, float]]:
        """One row per epoch (0-based): mean training loss/accuracy of its steps and the
        evaluation at its last step, as Keras and fastai report them."""
        rows = []
        for e in range(len(self.steps) // self.steps_per_epoch):
            chunk = self.steps[e * self.steps_per_epoch : (e + 1) * self.steps_per_epoch]
            ev = next(v for v in self.evals if v["step"] == chunk[-1]["step"])
            rows.append(
                {
                    "epoch": e,
                    "loss": sum(c["loss"] for c in chunk) / len(chunk),
                    "accuracy": sum(c["acc"] for c in chunk) / len(chunk),
                    "val_loss": ev["val_loss"],
                    "val_accuracy": ev["val_acc"],
                    "learning_rate": self.lr,
                    "seconds": sum(c["seconds"] for c in chunk) + ev["seconds"],
                }
            )
        return rows


def _task(n: int, noise: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 20, generator=g)
    w = torch.randn(20, N_CLASSES, generator=torch.Generator().manual_seed(42))
    y = (x @ w).argmax(1)
    flip = torch.rand(n, generator=g) < noise
    return x, torch.where(flip, torch.randint(0, N_CLASSES, (n,), generator=g), y)


def noisy_label_training(
    steps: int = 600, eval_every: int = 20, lr: float = 1e-3, seed: int = 0
) -> Training:
    """Real training (see the module docstring); an epoch is ``eval_every`` steps."""
    import time

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend on a shared machine
    try:
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed + 1)
        xtr, ytr = _task(256, 0.4, g)
        xva, yva = _task(512, 0.0, g)
        xte, yte = _task(512, 0.0, g)
        model = torch.nn.Sequential(
            torch.nn.Linear(20, 256), torch.nn.ReLU(), torch.nn.Linear(256, N_CLASSES)
        )
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        tr = Training(steps_per_epoch=eval_every, lr=lr)
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            idx = torch.randint(0, 256, (32,), generator=g)
            out = model(xtr[idx])
            loss = torch.nn.functional.cross_entropy(out, ytr[idx])
            opt.zero_grad()
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9).item()
            opt.step()
            acc = (out.argmax(1) == ytr[idx]).float().mean().item()
            tr.steps.append({"step": step, "loss": loss.item(), "acc": acc, "grad_norm": gn,
                             "seconds": time.perf_counter() - t0})  # fmt: skip
            if step % eval_every == 0:
                t0 = time.perf_counter()
                with torch.no_grad():
                    ov, ot = model(xva), model(xte)
                    ev = {
                        "step": step,
                        "val_loss": torch.nn.functional.cross_entropy(ov, yva).item(),
                        "val_acc": (ov.argmax(1) == yva).float().mean().item(),
                        "test_loss": torch.nn.functional.cross_entropy(ot, yte).item(),
                        "test_acc": (ot.argmax(1) == yte).float().mean().item(),
                    }
                ev["seconds"] = time.perf_counter() - t0
                tr.evals.append(ev)
        return tr
    finally:
        torch.set_num_threads(threads)


# -- Keras ---------------------------------------------------------------------------------


def write_keras_csvlogger(path: Path, rows: list[dict[str, float]], append: bool = False) -> None:
    """``keras.callbacks.CSVLogger(path, append=append)``: ``epoch`` then the sorted log
    keys; the header only when the file is new or empty."""
    keys = sorted(["loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"])
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a" if append else "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["epoch", *keys], dialect=csv.excel)
        if new or not append:
            writer.writeheader()
        for r in rows:
            writer.writerow({"epoch": int(r["epoch"]), **{k: r[k] for k in keys}})


def write_keras_history(path: Path, rows: list[dict[str, float]], index: bool = True) -> None:
    """``pd.DataFrame(history.history).to_csv(path, index=index)``: History's keys in the
    order fit logged them; pandas' index column has an empty header."""
    keys = ["loss", "accuracy", "val_loss", "val_accuracy"]
    lines = [("," if index else "") + ",".join(keys)]
    for i, r in enumerate(rows):
        cells = [repr(float(r[k])) for k in keys]
        lines.append(",".join(([str(i)] if index else []) + cells))
    path.write_text("\n".join(lines) + "\n")


# -- fastai --------------------------------------------------------------------------------


def _fastai_time(seconds: float) -> str:
    """fastai.callback.progress's format_time: mm:ss, h:mm:ss past an hour."""
    t = int(seconds)
    h, m, s = t // 3600, (t // 60) % 60, t % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def write_fastai_history(path: Path, rows: list[dict[str, float]]) -> None:
    """fastai's ``CSVLogger``: ``epoch,train_loss,valid_loss,accuracy,error_rate,time``;
    the metrics are computed on the validation set (``error_rate = 1 - accuracy``)."""
    lines = ["epoch,train_loss,valid_loss,accuracy,error_rate,time"]
    for r in rows:
        vals = [r["epoch"], r["loss"], r["val_loss"], r["val_accuracy"], 1 - r["val_accuracy"]]
        lines.append(",".join([*(str(v) for v in vals), _fastai_time(r["seconds"])]))
    path.write_text("\n".join(lines) + "\n")


# -- Hugging Face Trainer ------------------------------------------------------------------


def hf_log_history(
    tr: Training, eval_sets: tuple[str, ...] | None = None, logging_steps: int = 5
) -> list[dict[str, Any]]:
    """``state.log_history`` as the Trainer writes it: a training entry every
    ``logging_steps`` steps, then one evaluation entry per eval dataset at eval steps
    (``eval_<set>_*`` keys for a dict of datasets), then the closing summary."""
    history: list[dict[str, Any]] = []
    evals = {e["step"]: e for e in tr.evals}
    last = tr.steps[-1]["step"]
    for s in tr.steps:
        step = int(s["step"])
        epoch = round(step / tr.steps_per_epoch, 4)
        if step % logging_steps == 0:
            history.append({"epoch": epoch, "grad_norm": s["grad_norm"],
                            "learning_rate": tr.lr, "loss": round(s["loss"], 4),
                            "step": step})  # fmt: skip
        if step in evals:
            e = evals[step]
            for name in eval_sets or ("",):
                pre = f"eval_{name}_" if name else "eval_"
                split = "test" if name == "test" else "val"
                loss, acc = e[f"{split}_loss"], e[f"{split}_acc"]
                history.append({"epoch": epoch, f"{pre}accuracy": acc, f"{pre}loss": loss,
                                f"{pre}runtime": 0.0123, f"{pre}samples_per_second": 41626.0,
                                f"{pre}steps_per_second": 1300.8, "step": step})  # fmt: skip
    history.append({"epoch": round(last / tr.steps_per_epoch, 4), "step": last,
                    "total_flos": 21504.0, "train_loss": 0.51, "train_runtime": 3.9,
                    "train_samples_per_second": 4923.1,
                    "train_steps_per_second": 153.8})  # fmt: skip
    return history


def write_hf_checkpoint(
    out_dir: Path,
    tr: Training,
    max_steps: int,
    eval_sets: tuple[str, ...] | None = None,
    history: list[dict[str, Any]] | None = None,
) -> Path:
    """``<out_dir>/checkpoint-<global_step>/trainer_state.json`` (the Trainer's layout)."""
    global_step = int(tr.steps[-1]["step"])
    d = out_dir / f"checkpoint-{global_step}"
    d.mkdir(parents=True, exist_ok=True)
    state = {
        "best_metric": None, "best_model_checkpoint": None,
        "epoch": global_step / tr.steps_per_epoch, "eval_steps": tr.steps_per_epoch,
        "global_step": global_step, "is_hyper_param_search": False,
        "is_local_process_zero": True, "is_world_process_zero": True,
        "log_history": history if history is not None else hf_log_history(tr, eval_sets),
        "logging_steps": 5, "max_steps": max_steps, "num_input_tokens_seen": 0,
        "num_train_epochs": math.ceil(max_steps / tr.steps_per_epoch), "save_steps": 500,
        "stateful_callbacks": {"TrainerControl": {"args": {"should_training_stop": True},
                                                  "attributes": {}}},
        "total_flos": 21504.0, "train_batch_size": 32, "trial_name": None,
        "trial_params": None,
    }  # fmt: skip
    (d / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    return d


# -- TensorBoard ---------------------------------------------------------------------------


def write_hf_tensorboard(run_dir: Path, tr: Training) -> None:
    """The HF Trainer's TensorBoard callback: ``train/*`` and ``eval/*`` tags."""
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(run_dir))
    for s in tr.steps:
        if int(s["step"]) % 5 == 0:
            w.add_scalar("train/loss", round(s["loss"], 4), int(s["step"]))
            w.add_scalar("train/learning_rate", tr.lr, int(s["step"]))
            w.add_scalar("train/grad_norm", s["grad_norm"], int(s["step"]))
            w.add_scalar("train/epoch", s["step"] / tr.steps_per_epoch, int(s["step"]))
    for e in tr.evals:
        w.add_scalar("eval/loss", e["val_loss"], int(e["step"]))
        w.add_scalar("eval/accuracy", e["val_acc"], int(e["step"]))
    w.close()


def write_keras_tensorboard(log_dir: Path, rows: list[dict[str, float]]) -> None:
    """Keras' TensorBoard callback layout: ``train/`` and ``validation/`` writers with
    ``epoch_*`` tags at step = epoch."""
    from torch.utils.tensorboard import SummaryWriter

    train, val = SummaryWriter(str(log_dir / "train")), SummaryWriter(str(log_dir / "validation"))
    for r in rows:
        e = int(r["epoch"])
        train.add_scalar("epoch_loss", r["loss"], e)
        train.add_scalar("epoch_accuracy", r["accuracy"], e)
        train.add_scalar("epoch_learning_rate", r["learning_rate"], e)
        val.add_scalar("epoch_loss", r["val_loss"], e)
        val.add_scalar("epoch_accuracy", r["val_accuracy"], e)
    train.close()
    val.close()


# -- Lightning (the real package) ----------------------------------------------------------


def lightning_csv_runs(save_dir: Path, lrs: tuple[float, ...] = (3e-3, 1e-3)) -> Path:
    """Train a LightningModule once per learning rate with ``CSVLogger(save_dir)``:
    ``lightning_logs/version_0``, ``version_1``... Each logs ``train_loss`` on step and
    epoch, ``val_loss``/``val_acc`` per epoch, and saves ``max_epochs=20`` in its
    hyper-parameters; EarlyStopping on ``val_loss`` ends it before that."""
    import warnings

    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    class Classifier(L.LightningModule):
        def __init__(self, lr: float, max_epochs: int) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(20, 256), torch.nn.ReLU(), torch.nn.Linear(256, N_CLASSES)
            )

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.net(x), y)
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            return loss

        def validation_step(self, batch: Any, _: int) -> None:
            x, y = batch
            out = self.net(x)
            self.log("val_loss", torch.nn.functional.cross_entropy(out, y))
            self.log("val_acc", (out.argmax(1) == y).float().mean())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for lr in lrs:
            L.seed_everything(0, verbose=False)
            g = torch.Generator().manual_seed(1)
            xtr, ytr = _task(256, 0.4, g)
            xva, yva = _task(512, 0.0, g)
            train = DataLoader(TensorDataset(xtr, ytr), batch_size=32, shuffle=True)
            val = DataLoader(TensorDataset(xva, yva), batch_size=512)
            trainer = L.Trainer(
                max_epochs=20,
                logger=CSVLogger(str(save_dir)),
                callbacks=[EarlyStopping("val_loss", patience=2)],
                log_every_n_steps=2,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                accelerator="cpu",
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "few workers", "small batch" advice
                trainer.fit(Classifier(lr, 20), train, val)
    finally:
        torch.set_num_threads(threads)
    return save_dir / "lightning_logs"
