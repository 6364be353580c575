"""Which parameters the optimizer holds, against those the model trains.

Checked at setup, at the end of the first step (code often freezes or replaces layers
after building the optimizer and the collector) and whenever the optimizer's param groups
change (their number or size: ``add_param_group`` when unfreezing). Host-only: a loop over
the parameter tensors at those moments, never per step. The per-step picture (which
parameters got a gradient, which were updated) is in the layer statistics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from runlens_collect.probes._base import ProbeBase, unwrap
from runlens_collect.step import StepFlags, StepParts

MAX_NAMES = 20
"""Parameter names kept per list in run.json."""


class OptimizerProbe(ProbeBase):
    """Optimizer membership against the model's parameters (run.json only)."""

    name = "optimizer"

    def __init__(self) -> None:
        super().__init__()
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._shape: tuple[int, int] | None = None
        self._facts: dict[str, Any] = {"present": False, "checked_at": []}

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[Any]:
        self._model = unwrap(model)
        self._optimizer = optimizer
        self._check(-1)
        return []

    def _groups_shape(self) -> tuple[int, int]:
        assert self._optimizer is not None
        groups = self._optimizer.param_groups
        return len(groups), sum(len(g["params"]) for g in groups)

    def _check(self, step: int) -> None:
        opt, model = self._optimizer, self._model
        assert model is not None
        checked = [*self._facts.get("checked_at", []), step][-MAX_NAMES:]
        if opt is None:
            self._facts = {"present": False, "checked_at": checked}
            self.changed = True
            return
        self._shape = self._groups_shape()
        held = [p for g in opt.param_groups for p in g["params"]]
        held_ids = {id(p) for p in held}
        named = list(model.named_parameters())
        model_ids = {id(p) for _, p in named}
        foreign = [p for p in held if id(p) not in model_ids]
        frozen_held = [n for n, p in named if id(p) in held_ids and not p.requires_grad]
        outside = [n for n, p in named if p.requires_grad and id(p) not in held_ids]
        self._facts = {
            "present": True,
            "tensors": len(held),
            "foreign": len(foreign),
            "foreign_numel": int(sum(p.numel() for p in foreign)),
            "frozen_held": frozen_held[:MAX_NAMES],
            "n_frozen_held": len(frozen_held),
            "trainable_outside": outside[:MAX_NAMES],
            "n_trainable_outside": len(outside),
            "checked_at": checked,
        }
        self.changed = True

    def end_step(self, step: int, flags: StepFlags, parts: StepParts) -> None:
        if self._optimizer is None:
            return
        if step == 0 or self._groups_shape() != self._shape:
            self._check(step)

    def run_json(self) -> dict[str, Any]:
        return dict(self._facts)
