"""Framework callbacks that record a runlens run (optional dependencies, imported lazily).

* ``runlens_collect.integrations.lightning.RunlensCallback`` for PyTorch Lightning;
* ``runlens_collect.integrations.hf.RunlensTrainerCallback`` for ``transformers.Trainer``.

Importing this package imports neither framework; each module imports its own and raises
a one-line ImportError naming the package to install when it is missing.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, package: str) -> ModuleType:
    """Import ``module`` or fail with a clear message naming the pip package."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"this runlens_collect integration needs {package}: pip install {package} "
            f"(or pip install 'runlens[integrations]'); import failed: {exc}"
        ) from None


# Metric names of the frameworks -> runlens names (format.VAL_LOSS etc.); others keep
# a prefix: val_* / eval_* -> val/*, anything else -> train/*.
VAL_NAMES = {
    "val_loss": "val/loss",
    "valid_loss": "val/loss",
    "validation_loss": "val/loss",
    "eval_loss": "val/loss",
    "val_acc": "val/accuracy",
    "val_accuracy": "val/accuracy",
    "eval_accuracy": "val/accuracy",
}


def runlens_name(name: str) -> str:
    """The runlens scalar name for a framework metric name."""
    if name in VAL_NAMES:
        return VAL_NAMES[name]
    if "/" in name:
        head, rest = name.split("/", 1)
        if head in ("val", "valid", "validation", "eval"):
            return VAL_NAMES.get(f"val_{rest}", f"val/{rest}")
        return name
    for prefix in ("val_", "valid_", "validation_", "eval_"):
        if name.startswith(prefix):
            return f"val/{name[len(prefix) :]}"
    return f"train/{name}"
