"""PyTorch Lightning: ``RunlensCallback`` records a run while ``Trainer.fit`` trains.

Usage::

    from runlens_collect.integrations.lightning import RunlensCallback

    trainer = L.Trainer(callbacks=[RunlensCallback("runs/exp1")], ...)
    trainer.fit(model, train_loader, val_loader)

The Collector is attached in ``on_train_start`` (the optimizers exist then, and a
checkpoint's ``global_step`` is restored: the step axis continues from it) to the
LightningModule and its first optimizer. Lightning runs forward and backward *inside*
``optimizer.step(closure)``, so the gradients are read again in
``on_before_optimizer_step``: there they are accumulated over ``accumulate_grad_batches``
and unscaled by mixed precision, but not yet clipped; when Lightning then clips
(``gradient_clip_val``), the collector records ``clip_grad_norm_``'s return value as
``grad_norm_preclip`` and reads the clipped gradients again after ``optimizer.step``:
``grad_norm`` is what the optimizer applied, as everywhere.

A step ends at ``on_train_batch_end`` after a batch whose optimizer stepped; its loss is
the mean of the module's own ``training_step`` losses since the previous step. Lightning
divides each by ``accumulate_grad_batches`` before backward (and hands that to
``on_train_batch_end``); the division is undone. Logged validation metrics
(``trainer.callback_metrics`` after each validation run, not the sanity check) are mapped
to runlens names: ``val_loss``/``val/loss`` -> ``val/loss``, ``val_acc`` ->
``val/accuracy``, other ``val_*`` -> ``val/*``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from runlens_collect.integrations import require, runlens_name

_pl = require("lightning.pytorch", "lightning")

import torch  # noqa: E402 - after the dependency check, for its clear message

from runlens_collect import format as fmt  # noqa: E402
from runlens_collect.collector import Collector  # noqa: E402


class RunlensCallback(_pl.Callback):
    """Record the fit into ``run_dir`` (default: ``<trainer.default_root_dir>/runlens``).

    ``config`` is stored in run.json (the LightningModule's ``hparams`` are added);
    other keyword arguments are Collector knobs (``every``, ``activation_every``, ...).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        config: Mapping[str, Any] | None = None,
        **knobs: Any,
    ) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.config = dict(config or {})
        self.knobs = knobs
        self.collector: Collector | None = None
        self._stepped = False
        self._losses: list[torch.Tensor] = []
        self._accumulate = 1

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_rank != 0 or self.collector is not None:
            return
        opts = list(trainer.optimizers)
        config = {**_jsonable(getattr(pl_module, "hparams", {})), **self.config}
        run_dir = self.run_dir or os.path.join(trainer.default_root_dir, "runlens")
        self.collector = Collector(
            pl_module,
            opts[0] if opts else None,
            run_dir=run_dir,
            config=config,
            start_step=int(trainer.global_step or 0),
            _watch_backward=False,  # the loss comes from training_step's outputs
            **self.knobs,
        )
        self._accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        col = self.collector
        if col is None:
            return
        self._stepped = True
        # The Collector's own pre-step hook ran before Lightning's closure computed these
        # gradients; read them again now that they are final.
        col.read_gradients()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        col = self.collector
        if col is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            # Lightning hands over the loss divided by accumulate_grad_batches: undo it.
            self._losses.append(loss.detach().reshape(()) * self._accumulate)
        if not self._stepped:
            return  # accumulating gradients: the optimizer has not stepped yet
        self._stepped = False
        losses, self._losses = self._losses, []
        mean = None
        if losses:
            mean = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        col.step(loss=mean)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        col = self.collector
        if col is None or trainer.sanity_checking or trainer.global_rank != 0:
            return
        values = {}
        for name, v in trainer.callback_metrics.items():
            target = runlens_name(str(name))
            if target.startswith("val/") and _is_scalar(v):
                values[target] = v
        if values:
            col.log(values)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._close(fmt.STATUS_FINISHED)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close(fmt.STATUS_CRASHED)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._close(fmt.STATUS_FINISHED)

    def _close(self, status: str) -> None:
        if self.collector is not None:
            self.collector.close(status)


def _is_scalar(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.numel() == 1
    return isinstance(v, int | float) and not isinstance(v, bool)


def _jsonable(hparams: Any) -> dict[str, Any]:
    try:
        items = dict(hparams).items()
    except (TypeError, ValueError):
        return {}
    return {str(k): v for k, v in items if isinstance(v, bool | int | float | str) or v is None}
