"""The currently active collector, for the module-level ``runlens_collect.log``.

Kept free of torch so that ``import runlens_collect`` stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class _Logger(Protocol):
    def log(self, values: Mapping[str, Any]) -> None: ...


_active: _Logger | None = None


def set_active(collector: _Logger | None) -> None:
    global _active
    _active = collector


def get_active() -> _Logger | None:
    return _active


def log(values: Mapping[str, Any]) -> None:
    """Record scalars on the active Collector at its current step; a no-op when none is.

    ``values`` maps names (e.g. ``"val/loss"``) to floats or scalar tensors. Tensors are
    never synchronised on the calling thread.
    """
    collector = _active
    if collector is not None:
        collector.log(values)
