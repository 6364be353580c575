"""The facts of one optimizer step beyond the statistics (the step contract's inputs).

``Collector._end_step`` closes a step with what this object gathered since the last one:

* the training loss: the ``loss`` given to ``step()``, else the micro-batch losses
  backwarded since the last step (``observe`` reports each ``backward``), each *unscaled*
  (``scaler.scale(loss)`` is mapped back to ``loss``) and reduced: their mean, with a
  division by a constant undone when the step backwarded several (``loss / accum`` is the
  usual gradient-accumulation idiom), or their sum (the Hugging Face Trainer's own
  definition of a step's loss);
* the AMP ``GradScaler`` in use and the loss scale of the step's backward;
* whether the gradients are still multiplied by the loss scale where they are read
  (a fused optimizer unscales inside its step; Lightning reads them before ``unscale_``);
* the skip flag only the device knows (a fused optimizer's ``found_inf``);
* the gradient norm before clipping (``clip_grad_norm_``'s return value) and whether the
  gradients were clipped after the collector last read them (then they are read again).

Everything stays on the device: nothing here reads a tensor's value.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch

MEAN = "mean"
SUM = "sum"
_DIV = ("DivBackward0", "DivBackward1")
_MAX_SCALED = 8  # scaler outputs remembered until backwarded (a step scales one loss)


def _constant_divisor(t: torch.Tensor) -> torch.Tensor | float | None:
    """``c`` when ``t`` was computed as ``x / c`` with a constant scalar ``c``, else None
    (read from the autograd node; the constant is a CPU scalar: no device read)."""
    fn = t.grad_fn
    if fn is None or type(fn).__name__ not in _DIV:
        return None
    other = getattr(fn, "_saved_other", None)
    if isinstance(other, torch.Tensor):
        if other.numel() == 1 and not other.requires_grad:
            return other
        return None
    return float(other) if isinstance(other, int | float) else None


class StepContract:
    """What the current step showed of its loss, scaler and clipping (training thread)."""

    def __init__(self, reduction: str = MEAN) -> None:
        if reduction not in (MEAN, SUM):
            raise ValueError(f"loss reduction must be {MEAN!r} or {SUM!r}")
        self.reduction = reduction
        self._scaler: weakref.ref[Any] | None = None
        self.reset()

    def reset(self) -> None:
        """A new step begins."""
        self.micro: list[tuple[torch.Tensor, torch.Tensor | float | None]] = []
        self.scaled: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.scale: torch.Tensor | None = None
        self.preclip: torch.Tensor | None = None
        self.clip_max: float | None = None  # max_norm of a 2-norm clip of every gradient
        self.device_skip: torch.Tensor | None = None
        self.grads_read = False  # the collector read gradients this step
        self.reread = False  # ... and they were clipped after that read

    # -- the scaler -------------------------------------------------------------------------

    @property
    def scaler(self) -> Any:
        """The GradScaler seen last (None when none is in use)."""
        return self._scaler() if self._scaler is not None else None

    def on_scale(self, scaler: Any, loss: torch.Tensor, scaled: torch.Tensor) -> None:
        if scaled is loss or not getattr(scaler, "is_enabled", lambda: True)():
            return
        if self.scaler is not scaler:
            self._scaler = weakref.ref(scaler)
        if self.scale is None and isinstance(getattr(scaler, "_scale", None), torch.Tensor):
            # Cloned: update() rewrites the scale in place before the step ends.
            self.scale = scaler._scale.detach().reshape(()).clone()
        if len(self.scaled) >= _MAX_SCALED:
            del self.scaled[0]
        self.scaled.append((scaled, loss))

    def unscaled(self, t: torch.Tensor) -> torch.Tensor:
        """The loss ``t`` was scaled from, when ``t`` is a GradScaler output; else ``t``."""
        for i, (scaled, loss) in enumerate(self.scaled):
            if scaled is t:
                del self.scaled[i]
                return loss
        return t

    def grad_scale(self, optimizer: Any) -> torch.Tensor | None:
        """The factor the gradients are multiplied by right now (None: unscaled).

        A fused optimizer under a GradScaler gets ``optimizer.grad_scale`` (set by
        ``scaler.step`` for the duration of ``optimizer.step``, None once ``unscale_``
        ran); otherwise gradients are scaled between ``scaler.scale(loss).backward()``
        and ``scaler.unscale_(optimizer)``, which the scaler's per-optimizer stage says.
        """
        if optimizer is None:
            return None
        gs = getattr(optimizer, "grad_scale", None)
        if isinstance(gs, torch.Tensor):
            return gs
        scaler = self.scaler
        if scaler is None or self.scale is None:
            return None
        states = getattr(scaler, "_per_optimizer_states", None)
        state = states.get(id(optimizer)) if isinstance(states, dict) else None
        stage = getattr(state.get("stage") if isinstance(state, dict) else None, "name", "READY")
        return self.scale if stage == "READY" else None

    # -- losses -----------------------------------------------------------------------------

    def on_backward(self, t: torch.Tensor) -> None:
        loss = self.unscaled(t)
        divisor = _constant_divisor(loss) if self.reduction == MEAN else None
        self.micro.append((loss.detach().reshape(()), divisor))

    def loss(self) -> torch.Tensor | None:
        """The step's loss from its micro-batches (a device tensor), or None."""
        micro = self.micro
        if not micro:
            return None
        if self.reduction == SUM:
            vals = [t for t, _ in micro]
            return vals[0] if len(vals) == 1 else torch.stack(vals).sum()
        if len(micro) > 1 and all(d is not None for _, d in micro):
            vals = [t * d for t, d in micro]  # accumulation: each was divided by its count
        else:
            vals = [t for t, _ in micro]
        return vals[0] if len(vals) == 1 else torch.stack(vals).mean()

    # -- clipping ---------------------------------------------------------------------------

    def on_clip(self, norm: Any, max_norm: Any = None, norm_type: Any = 2.0) -> None:
        """``clip_grad_norm_`` returned ``norm``; ``max_norm`` when it clipped every
        gradient the collector reads (None otherwise)."""
        self.clip_max = None
        if isinstance(norm, torch.Tensor) and norm.numel() == 1:
            self.preclip = norm.detach().reshape(())
            if (
                isinstance(max_norm, int | float)
                and not isinstance(max_norm, bool)
                and math.isfinite(max_norm)
                and max_norm > 0
                and norm_type in (2, 2.0)
            ):
                self.clip_max = float(max_norm)
        if self.grads_read:
            self.reread = True

    def clipped_norm(self) -> torch.Tensor | None:
        """The 2-norm of every gradient after this step's clip, from the norm the clip
        returned and no read of the gradients: ``clip_grad_norm_`` multiplies them all by
        min(1, max_norm / (norm + 1e-6)) (torch.nn.utils.clip_grad), so their norm is
        the returned one times that factor (to float rounding). None without such a clip."""
        pre = self.preclip
        if pre is None or self.clip_max is None:
            return None
        pre = pre.float()
        return pre * torch.clamp(self.clip_max / (pre + 1e-6), max=1.0)
