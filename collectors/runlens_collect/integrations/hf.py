"""Hugging Face ``transformers.Trainer``: ``RunlensTrainerCallback`` records the training.

Usage::

    from runlens_collect.integrations.hf import RunlensTrainerCallback

    trainer = Trainer(model=model, args=args, ..., callbacks=[RunlensTrainerCallback()])
    trainer.train()

The Collector is attached in ``on_train_begin`` to the ``model`` and ``optimizer`` the
Trainer passes (an accelerate-wrapped optimizer is unwrapped: the hooks go on the torch
optimizer, whose ``step`` sees the final, clipped gradients), numbering its first step
``state.global_step`` (0, or the step of the checkpoint a run resumes from). Each
``on_step_end`` ends a runlens step.

Every step records the collector's own view, whatever ``logging_steps`` is:
``train/loss`` is the Trainer's definition of a step's loss (the sum over the step's
micro-batches of what ``training_step`` backwarded, i.e. after its division by the
accumulation steps, never multiplied by an fp16 loss scale), so at ``logging_steps=1`` it
equals ``state.log_history``; ``grad_norm_preclip`` is what ``clip_grad_norm_`` returned
(HF's logged ``grad_norm``), ``grad_norm`` the norm after clipping; the task comes from the
model class (``...ForCausalLM`` is a language model; ``...ForSequenceClassification``
classifies into ``num_labels``), never from ``num_labels`` alone.

The Trainer's ``logs`` add what the collector does not see: ``eval_loss`` -> ``val/loss``,
``eval_*`` -> ``val/*``; ``loss``, ``grad_norm`` and ``learning_rate`` only when the
collector could not record them itself; run-time counters are dropped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from runlens_collect.integrations import require, runlens_name

_transformers = require("transformers", "transformers")

from runlens_collect import format as fmt  # noqa: E402
from runlens_collect.collector import Collector  # noqa: E402
from runlens_collect.contract import SUM  # noqa: E402

_DROPPED = ("epoch", "total_flos", "step")
_DROPPED_SUFFIXES = ("_runtime", "_per_second")


class RunlensTrainerCallback(_transformers.TrainerCallback):
    """Record ``Trainer.train`` into ``run_dir`` (default ``<output_dir>/runlens``).

    ``config`` is stored in run.json (with the model config's ``model_type``); other
    keyword arguments are Collector knobs.
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
        # num_labels is on every HF config (default 2): the collector's task record says
        # whether the model classifies (its class), not this.
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if isinstance(model_type, str):
            config["model_type"] = model_type
        config.update(
            learning_rate=args.learning_rate,
            per_device_train_batch_size=args.per_device_train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            max_grad_norm=args.max_grad_norm,
            weight_decay=args.weight_decay,
        )
        config.update(self.config)
        run_dir = self.run_dir or os.path.join(args.output_dir, "runlens")
        self.collector = Collector(
            model,
            optimizer,
            run_dir=run_dir,
            config=config,
            start_step=int(state.global_step or 0),
            _loss_reduction=SUM,  # the Trainer's own definition of a step's loss
            **self.knobs,
        )

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
            name = _map(str(key), col)
            if name is not None and isinstance(v, int | float) and not isinstance(v, bool):
                values[name] = float(v)
        if values:
            col.log(values)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.collector is not None:
            self.collector.close(fmt.STATUS_FINISHED)


def _map(key: str, col: Collector) -> str | None:
    """The runlens name of a Trainer log key; None when dropped (a counter, or a value the
    collector records itself at every step)."""
    if key in _DROPPED or key.endswith(_DROPPED_SUFFIXES) or key.startswith("train_"):
        return None  # counters, and the end-of-training summary (train_loss, ...)
    seen = col.recorded
    if key == "loss":
        return None if fmt.TRAIN_LOSS in seen else fmt.TRAIN_LOSS
    if key == "grad_norm":  # HF's is before clipping
        return None if fmt.GRAD_NORM_PRECLIP in seen else fmt.GRAD_NORM_PRECLIP
    if key == "learning_rate":
        return None if col.optimizer is not None else fmt.lr_name(0)
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
