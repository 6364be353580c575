"""Input fingerprints and batch sizes, from the root module's forward pre-hook.

Per training forward the probe reduces the model's first input tensor on its device to
three numbers — the sum, the sum of squares and an order-free projection (the input as
(batch, rest), summed over the batch, dotted with fixed weights) — kept in device
accumulators (added to on later forwards of the step). Nothing is copied to the host and
nothing waits for the device: the accumulators are shipped with the step's other device
scalars. The batch size is the input's first dimension, known on the host from the shape.

What it costs per training forward: three kernels — a column sum, a dot product of the
input with itself (both passes over the input) and two small dot products of the column
sums with ``[ones; projection weights]``. Inputs that are not float32 (token ids,
masks, uint8 images, 16-bit inputs) are first converted to float32, a copy the size of the
input; under autocast the product and the dot are done as a multiply and sums, which
autocast leaves in float32. Per step three device
scalars and four host scalars. The projection weights are cached per width (at most
``MAX_WIDTHS``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from runlens_collect import format as fmt
from runlens_collect.probes._base import ProbeBase, model_device, unwrap
from runlens_collect.step import StepFlags, StepParts

_SUM_PROJ = (fmt.INPUT_SUM, fmt.INPUT_PROJ)
MAX_WIDTHS = 16
"""Projection weight vectors kept (one per distinct example width): variable-length
inputs must not grow memory without bound."""


def first_input(args: Sequence[Any], kwargs: dict[str, Any] | None) -> torch.Tensor | None:
    """The first tensor argument of a forward, else the first tensor keyword argument."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    for v in (kwargs or {}).values():
        if isinstance(v, torch.Tensor):
            return v
    return None


class InputProbe(ProbeBase):
    """Fingerprints of the training batches and the batch sizes of training and evaluation."""

    name = "inputs"

    def __init__(self) -> None:
        super().__init__()
        self._device = torch.device("cpu")
        self._weights: dict[int, torch.Tensor] = {}
        # Per mode (train/eval): [sum, projection] and the sum of squares, on the device.
        self._acc: dict[bool, tuple[torch.Tensor, torch.Tensor] | None] = {True: None, False: None}
        self._examples = {True: 0, False: 0}
        self._forwards = {True: 0, False: 0}
        self._numel = {True: 0, False: 0}
        self._eval_batch = 0

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[Any]:
        self._device = model_device(unwrap(model))
        return [model.register_forward_pre_hook(self._on_forward_pre, with_kwargs=True)]

    # -- hook (training thread) -----------------------------------------------------------

    def _on_forward_pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self.off:
            return None
        t0 = self.clock()
        try:
            x = first_input(args, kwargs)
            if x is None or x.is_complex() or x.is_sparse:
                return None
            batch = int(x.shape[0]) if x.dim() else 1
            if not torch.is_grad_enabled():
                self._eval_batch = max(self._eval_batch, batch)
                return None
            # Grad-enabled forwards are training forwards; eval-mode ones are kept apart
            # and used only when the step had no train-mode forward (model.eval() left on).
            mode = bool(module.training)
            self._forwards[mode] += 1
            self._examples[mode] += batch
            self._numel[mode] = x.numel() // max(batch, 1)
            if x.device == self._device and x.numel():
                fp = self._fingerprint(x.detach(), batch)
                acc = self._acc[mode]
                if acc is None:
                    self._acc[mode] = fp
                else:
                    acc[0].add_(fp[0])
                    acc[1].add_(fp[1])
        except Exception as exc:
            self._fail(exc)
        self._spent(t0)
        return None

    def _fingerprint(self, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([sum, projection], sum of squares) of one input, in three kernels (this runs on
        every training forward)."""
        x2 = x.reshape(max(batch, 1), -1)
        if x2.dtype != torch.float32:
            x2 = x2.float()  # token ids, masks, uint8 images: one copy the size of the input
        cols = x2.sum(0)
        w = self._projection(cols.numel())
        if torch.is_autocast_enabled(x2.device.type):
            # Autocast may run these products in 16 bits; a multiply and sums stay float32.
            return (cols * w).sum(1), x2.square().sum()
        flat = x2.reshape(-1)
        # vecdot, not mv: a BLAS call per step costs ~2x more on CPU (measured in-loop).
        return torch.linalg.vecdot(w, cols), torch.linalg.vecdot(flat, flat)

    def _projection(self, width: int) -> torch.Tensor:
        w = self._weights.get(width)
        if w is None:
            if len(self._weights) >= MAX_WIDTHS:
                self._weights.clear()
            j = torch.arange(width, device=self._device, dtype=torch.float32)
            w = torch.stack([torch.ones_like(j), torch.cos(1.61803 * j + 0.5)])
            self._weights[width] = w
        return w

    # -- end of step --------------------------------------------------------------------

    def end_step(self, step: int, flags: StepFlags, parts: StepParts) -> None:
        self._raise_pending()
        mode = bool(self._forwards[True])  # eval-mode ones only without train-mode ones
        if self._forwards[mode]:
            acc = self._acc[mode]
            if acc is not None:
                sum_proj, sumsq = acc
                parts.own_scalars(step, _SUM_PROJ, sum_proj)
                parts.own_scalar(step, fmt.INPUT_SUMSQ, sumsq)
            parts.host_scalar(step, fmt.INPUT_EXAMPLES, self._examples[mode])
            parts.host_scalar(step, fmt.INPUT_NUMEL, self._numel[mode])
            parts.host_scalar(step, fmt.INPUT_FORWARDS, self._forwards[mode])
        if self._eval_batch:
            parts.host_scalar(step, fmt.INPUT_EVAL_BATCH, self._eval_batch)
        self._acc = {True: None, False: None}
        self._examples = {True: 0, False: 0}
        self._forwards = {True: 0, False: 0}
        self._eval_batch = 0
