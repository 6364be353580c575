"""What every probe shares: failure handling inside hooks and the run.json entry."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class ProbeBase:
    """Hooks cannot raise into the training loop and cannot reach the collector's guard:
    a hook that fails switches its probe off (``off``) and keeps the exception, which
    ``end_step`` raises under the collector's guard (one warning, the probe disabled).

    ``changed`` is set when the probe's ``run_json()`` has something new; the collector
    copies it into run.json at the end of that step.
    """

    name = "probe"

    def __init__(self) -> None:
        self.off = False
        self.changed = True
        self._error: BaseException | None = None
        self.clock: Callable[[], float] = time.perf_counter
        self._charge: Callable[[str, float], None] | None = None

    def timed(self, clock: Callable[[], float], charge: Callable[[str, float], None]) -> None:
        """Time the hooks with ``clock`` and report their seconds to ``charge`` (the
        collector's overhead budget, category ``base``: probes record every step)."""
        self.clock = clock
        self._charge = charge

    def _spent(self, t0: float) -> None:
        """Charge the time since ``t0`` (a ``clock()`` reading at the hook's start)."""
        if self._charge is not None:
            self._charge("base", self.clock() - t0)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self.off = True

    def _raise_pending(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise exc

    def run_json(self) -> dict[str, Any]:
        """This probe's entry of run.json ``probes`` (format.PROBE_JSON_KEYS)."""
        return {}


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose parameter names the collector records (torch.compile wraps it)."""
    return getattr(model, "_orig_mod", model)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
