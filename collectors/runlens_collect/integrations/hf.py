"""Hugging Face ``transformers.Trainer``: ``RunlensTrainerCallback`` records the training.

Usage::

    from runlens_collect.integrations.hf import RunlensTrainerCallback

    trainer = Trainer(model=model, args=args, ..., callbacks=[RunlensTrainerCallback()])
    trainer.train()

The Collector is attached in ``on_train_begin`` to the ``model`` and ``optimizer`` the
Trainer passes (an accelerate-wrapped optimizer is unwrapped: the hooks go on the torch
optimizer, whose ``step`` sees the final, clipped gradients). Each ``on_step_end`` ends a
runlens step. The Trainer's ``logs`` are mapped: ``loss`` -> ``train/loss`` (the mean over
the logging interval, recorded at the step it is logged: set ``logging_steps=1`` for a
loss at every step), ``eval_loss`` -> ``val/loss``, ``eval_*`` -> ``val/*``, ``grad_norm``
(the norm *before* clipping) -> ``train/grad_norm_preclip``, ``learning_rate`` ->
``lr/0`` only when there is no optimizer to read it from; run-time counters are dropped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from runlens_collect.integrations import require, runlens_name

_transformers = require("transformers", "transformers")

from runlens_collect import format as fmt  # noqa: E402
from runlens_collect.collector import Collector  # noqa: E402

_DROPPED = ("epoch", "total_flos", "step")
_DROPPED_SUFFIXES = ("_runtime", "_per_second")


class RunlensTrainerCallback(_transformers.TrainerCallback):
    """Record ``Trainer.train`` into ``run_dir`` (default ``<output_dir>/runlens``).

    ``config`` is stored in run.json (with the model config's ``model_type`` and
    ``num_labels`` when present); other keyword arguments are Collector knobs.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        config: Mapping[str, Any] | None = None,
        **knobs: Any,
    ) -> None:
        self.run_dir = run_dir
        self.config = dict(config or {})
        self.knobs = knobs
        self.collector: Collector | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or self.collector is not None:
            return
        model = kwargs.get("model")
        if model is None:
            return
        optimizer = _unwrap(kwargs.get("optimizer"))
        config: dict[str, Any] = {}
        model_config = getattr(model, "config", None)
        for key in ("model_type", "num_labels"):
            v = getattr(model_config, key, None)
            if isinstance(v, int | str):
                config[key] = v
        config.update(
            learning_rate=args.learning_rate,
            per_device_train_batch_size=args.per_device_train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            max_grad_norm=args.max_grad_norm,
            weight_decay=args.weight_decay,
        )
        config.update(self.config)
        run_dir = self.run_dir or os.path.join(args.output_dir, "runlens")
        self.collector = Collector(model, optimizer, run_dir=run_dir, config=config, **self.knobs)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.collector is not None:
            self.collector.step()

    def on_log(
        self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kw: Any
    ) -> None:
        col = self.collector
        if col is None or not logs:
            return
        values = {}
        for key, v in logs.items():
            name = _map(str(key), has_optimizer=col.optimizer is not None)
            if name is not None and isinstance(v, int | float) and not isinstance(v, bool):
                values[name] = float(v)
        if values:
            col.log(values)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.collector is not None:
            self.collector.close(fmt.STATUS_FINISHED)


def _map(key: str, has_optimizer: bool) -> str | None:
    if key in _DROPPED or key.endswith(_DROPPED_SUFFIXES) or key.startswith("train_"):
        return None  # counters, and the end-of-training summary (train_loss, ...)
    if key == "loss":
        return fmt.TRAIN_LOSS
    if key == "grad_norm":
        return "train/grad_norm_preclip"
    if key == "learning_rate":
        return None if has_optimizer else fmt.lr_name(0)
    return runlens_name(key)


def _unwrap(optimizer: Any) -> Any:
    # accelerate's AcceleratedOptimizer (and similar) keep the torch optimizer in .optimizer
    import torch

    seen = 0
    while optimizer is not None and seen < 4:
        if type(optimizer).__module__.startswith("torch.optim"):
            return optimizer
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer, seen = inner, seen + 1
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
