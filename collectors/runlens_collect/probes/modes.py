"""Training/evaluation mode: which forwards ran in which mode, and modules out of step.

The root module's forward pre-hook counts forwards by (grad enabled, ``model.training``):
host values, no device work. At the first train-mode and the first eval-mode forward of a
step it also counts the *mode-dependent* modules whose own ``training`` flag differs from
the root's (a Python loop over those modules only: dropout with p > 0, BatchNorm and
InstanceNorm with running statistics, modules under ``torch.nn.utils.spectral_norm``).
Until the end of the first step it counts no-grad eval-mode forwards that ran before the
run's first train-mode forward: a spectral-norm layer evaluated then has never run a power
iteration.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from runlens_collect import format as fmt
from runlens_collect.probes._base import ProbeBase, unwrap
from runlens_collect.step import StepFlags, StepParts

MAX_NAMES = 20
"""Module paths kept per list in run.json."""

_COUNTS = (
    ((True, True), fmt.MODE_TRAIN_GRAD),
    ((False, True), fmt.MODE_TRAIN_NOGRAD),
    ((True, False), fmt.MODE_EVAL_GRAD),
    ((False, False), fmt.MODE_EVAL_NOGRAD),
)


def _mode_dependent(mod: nn.Module) -> bool:
    """Modules whose forward changes with ``training``."""
    if isinstance(mod, nn.modules.dropout._DropoutNd):
        return mod.p > 0
    if isinstance(mod, nn.MultiheadAttention):
        return mod.dropout > 0
    if isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return bool(mod.track_running_stats)
    return _spectral_norm(mod)


def _spectral_norm(mod: nn.Module) -> bool:
    """``torch.nn.utils.spectral_norm``: its power iteration runs only in training mode, so
    an eval-mode forward before any training one divides by an estimate from random
    vectors. (The parametrization version iterates at registration: not listed.)"""
    from torch.nn.utils.spectral_norm import SpectralNorm

    return any(isinstance(h, SpectralNorm) for h in mod._forward_pre_hooks.values())


class ModeProbe(ProbeBase):
    """Forwards by mode, modules disagreeing with the root, evaluations before training."""

    name = "modes"

    def __init__(self) -> None:
        super().__init__()
        self._sensitive: list[tuple[str, nn.Module]] = []
        self._classes: dict[str, int] = {}
        self._spectral: list[str] = []
        self._counts = {k: 0 for k, _ in _COUNTS}
        self._disagree = {True: -1, False: -1}  # -1: not looked at this step
        self._names: dict[bool, list[str]] = {True: [], False: []}
        self._trained = False  # a train-mode forward has run
        self._evals_before: int | None = 0  # None once recorded

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[Any]:
        for path, mod in unwrap(model).named_modules():
            if _mode_dependent(mod):
                self._sensitive.append((path, mod))
                cls = type(mod).__name__
                self._classes[cls] = self._classes.get(cls, 0) + 1
                if _spectral_norm(mod):
                    self._spectral.append(path)
        return [model.register_forward_pre_hook(self._on_forward_pre)]

    def _on_forward_pre(self, module: nn.Module, args: Any) -> None:
        if self.off:
            return None
        try:
            grad, training = torch.is_grad_enabled(), bool(module.training)
            self._counts[grad, training] += 1
            if training:
                self._trained = True
            elif not grad and not self._trained and self._evals_before is not None:
                self._evals_before += 1
            if self._disagree[training] < 0:
                odd = [p for p, m in self._sensitive if m.training != training]
                self._disagree[training] = len(odd)
                names = self._names[training]
                for p in odd:
                    if p not in names and len(names) < MAX_NAMES:
                        names.append(p)
                        self.changed = True
        except Exception as exc:
            self._fail(exc)
        return None

    def end_step(self, step: int, flags: StepFlags, parts: StepParts) -> None:
        self._raise_pending()
        for key, name in _COUNTS:
            parts.host_scalar(step, name, self._counts[key])
            self._counts[key] = 0
        for training, name in ((True, fmt.MODE_DISAGREE_TRAIN), (False, fmt.MODE_DISAGREE_EVAL)):
            if self._disagree[training] >= 0:
                parts.host_scalar(step, name, self._disagree[training])
            self._disagree[training] = -1
        if self._evals_before is not None:
            parts.host_scalar(step, fmt.MODE_EVALS_BEFORE_TRAIN, self._evals_before)
            self._evals_before = None

    def run_json(self) -> dict[str, Any]:
        return {
            "sensitive": dict(self._classes),
            "spectral_norm": self._spectral[:MAX_NAMES],
            "disagree_train": list(self._names[True]),
            "disagree_eval": list(self._names[False]),
        }
