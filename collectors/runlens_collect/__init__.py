"""runlens_collect: the training-side collector of runlens.

Usage::

    from runlens_collect import Collector

    with Collector(model, optimizer, run_dir="runs/exp1", config={"lr": 1e-3}) as col:
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            col.step(loss=loss)

``runlens_collect.format`` (the run-format contract) must stay importable without torch,
because the analyzer imports it. So the torch-dependent exports (``Collector``,
``CollectorConfig``, the sanity runs ``lr_range_test``, ``overfit_one_batch``,
``init_check``) are loaded lazily on first attribute access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runlens_collect._active import log

__version__ = "0.1.0"

if TYPE_CHECKING:
    from runlens_collect.collector import Collector
    from runlens_collect.config import CollectorConfig
    from runlens_collect.sanity import init_check, lr_range_test, overfit_one_batch

__all__ = [
    "Collector",
    "CollectorConfig",
    "__version__",
    "init_check",
    "log",
    "lr_range_test",
    "overfit_one_batch",
]

_LAZY = {
    "Collector": "runlens_collect.collector",
    "CollectorConfig": "runlens_collect.config",
    # The debugging playbook's sanity runs (docs/playbook.md).
    "lr_range_test": "runlens_collect.sanity",
    "overfit_one_batch": "runlens_collect.sanity",
    "init_check": "runlens_collect.sanity",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `import runlens_collect.format` (analyzer side) never imports torch.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'runlens_collect' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
