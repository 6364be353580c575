"""Gradients carried over from one optimizer step to the next.

A tensor hook on a few parameters (in up to ``MAX_PARAMS`` modules spread over the model,
the smallest tensor of each, usually its bias) runs when a backward pass delivers a
gradient for that parameter, *before* autograd adds it to ``p.grad``. At the first such
call after an optimizer step, ``p.grad`` should be ``None`` or zero
(``optimizer.zero_grad()`` ran); if it still holds the previous step's gradient, every
update uses the sum of all past gradients. When ``p.grad`` is ``None`` (``zero_grad()``
with its default ``set_to_none=True``: the common, healthy case) nothing carried and the
hook does no device work at all. Otherwise it takes, on the device, the norms of ``p.grad``
(the carried gradient, zero after ``zero_grad(set_to_none=False)``) and of the incoming
one (two reductions); the end of the step sums their squares over those parameters. Later
calls in the same optimizer step are counted only (legitimate gradient accumulation:
several backward passes, then one ``optimizer.step()`` and one ``zero_grad()``).

"After an optimizer step" means after the collector's optimizer's ``step()`` for the
parameters it holds, and after ``Collector.step()`` for parameters it does not (another
optimizer's) or when there is no optimizer.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from runlens_collect import format as fmt
from runlens_collect.probes._base import ProbeBase, model_device, unwrap
from runlens_collect.step import StepFlags, StepParts

MAX_PARAMS = 8
"""Parameters hooked: one hook call per backward pass each, and two reductions (over that
tensor) per optimizer step when it still holds a gradient."""


class GradCarryProbe(ProbeBase):
    """Carried-over gradient at the first backward pass of each optimizer step."""

    name = "grad"

    def __init__(self, max_params: int = MAX_PARAMS) -> None:
        super().__init__()
        self.max_params = max_params
        self._names: list[str] = []
        self._params: list[nn.Parameter] = []
        self._by_optimizer: list[bool] = []
        self._first: list[bool] = []
        self._device = torch.device("cpu")
        # This step's first-pass measurements: 0-d device norms and the slots' bit values,
        # combined at the end of the step (two reductions per parameter in the hook).
        self._old_norms: list[torch.Tensor] = []
        self._new_norms: list[torch.Tensor] = []
        self._hit_bits: list[torch.Tensor] = []
        self._calls: list[int] = []
        self._bits: list[torch.Tensor] = []
        self._clean = 0  # first passes this step that found .grad None

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[Any]:
        inner = unwrap(model)
        self._device = model_device(inner)
        usable = [
            (n, p)
            for n, p in inner.named_parameters()
            # Not another device's, not a sharded DTensor (FSDP2).
            if p.requires_grad and p.device == self._device and not hasattr(p, "_local_tensor")
        ]
        # One parameter per module, modules spread over the model (first, last and
        # between): a wrong zero_grad misses a whole submodule (a GAN's generator, a second
        # optimizer's head). In each module the smallest tensor (a bias): the two norms a
        # hook takes read the whole tensor, and every tensor carries the same way.
        modules: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for n, p in usable:
            modules.setdefault(n.rpartition(".")[0], []).append((n, p))
        groups = list(modules.values())
        if not groups:
            return []
        k = min(self.max_params, len(groups))
        picks = sorted({round(i * (len(groups) - 1) / max(k - 1, 1)) for i in range(k)})
        held: set[int] = set()
        if optimizer is not None:
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        handles: list[Any] = []
        for i in picks:
            name, p = min(groups[i], key=lambda np_: np_[1].numel())
            slot = len(self._params)
            self._names.append(name)
            self._params.append(p)
            self._by_optimizer.append(id(p) in held)
            self._first.append(True)
            self._calls.append(0)
            self._bits.append(torch.tensor(float(2**slot), device=self._device))
            handles.append(p.register_hook(functools.partial(self._on_grad, slot)))
        if optimizer is not None and any(self._by_optimizer):
            handles.append(optimizer.register_step_post_hook(self._on_optimizer_step))
        return handles

    # -- hooks (training thread, inside backward) -------------------------------------------

    def _on_grad(self, slot: int, grad: torch.Tensor) -> None:
        if self.off:
            return None
        try:
            self._calls[slot] += 1
            if not self._first[slot]:
                return None  # a later backward pass of the same optimizer step
            self._first[slot] = False
            # Before autograd adds ``grad`` into it, .grad is what the step starts from.
            old = self._params[slot].grad
            if old is None:
                self._clean += 1  # reset to None: nothing carried, nothing to measure
                return None
            t0 = self.clock()  # only the device work is timed: the rest is a few lookups
            self._old_norms.append(torch.linalg.vector_norm(old.detach(), dtype=torch.float32))
            self._new_norms.append(torch.linalg.vector_norm(grad.detach(), dtype=torch.float32))
            self._hit_bits.append(self._bits[slot])
            self._spent(t0)
        except Exception as exc:
            self._fail(exc)
        return None

    def _on_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        for i, by_opt in enumerate(self._by_optimizer):
            if by_opt:
                self._first[i] = True

    # -- end of step ----------------------------------------------------------------------

    def end_step(self, step: int, flags: StepFlags, parts: StepParts) -> None:
        self._raise_pending()
        if self._new_norms:
            # Old and new norms in one stack (and one square): few kernels for the three
            # scalars, on the steps that measured any.
            both = torch.stack(self._old_norms + self._new_norms)
            n = len(self._old_norms)
            sq = both.square()
            parts.own_scalar(step, fmt.GRAD_CARRY_SQ, sq[:n].sum())
            parts.own_scalar(step, fmt.GRAD_NEW_SQ, sq[n:].sum())
            mask = ((both[:n] > 0) * torch.stack(self._hit_bits)).sum()
            parts.own_scalar(step, fmt.GRAD_CARRY_MASK, mask)
            self._old_norms, self._new_norms, self._hit_bits = [], [], []
        elif self._clean:
            # Every probed first pass found .grad None: nothing carried, known on the host.
            parts.host_scalar(step, fmt.GRAD_CARRY_SQ, 0.0)
            parts.host_scalar(step, fmt.GRAD_CARRY_MASK, 0.0)
        self._clean = 0
        passes = max(self._calls, default=0)
        if passes:
            parts.host_scalar(step, fmt.GRAD_PASSES, passes)
        for i, by_opt in enumerate(self._by_optimizer):
            self._calls[i] = 0
            if not by_opt:
                self._first[i] = True

    def run_json(self) -> dict[str, Any]:
        reset = "optimizer" if all(self._by_optimizer) else "step"
        return {"params": list(self._names), "reset": reset if self._names else None}
