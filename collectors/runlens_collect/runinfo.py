"""Static facts about a run for run.json: model summary, versions, reproducibility record."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn


def model_summary(model: nn.Module) -> dict[str, Any]:
    """Every module with its type and direct parameters (format.MODEL_SUMMARY_KEYS)."""
    modules = []
    for path, mod in model.named_modules():
        params = [
            {
                "name": f"{path}.{name}" if path else name,
                "shape": list(p.shape),
                "numel": int(p.numel()),
                "requires_grad": bool(p.requires_grad),
                "dtype": str(p.dtype).removeprefix("torch."),
            }
            for name, p in mod.named_parameters(recurse=False)
        ]
        modules.append({"path": path, "type": type(mod).__name__, "params": params})
    # named_parameters() de-duplicates tied parameters, so shared weights count once.
    num_params = sum(int(p.numel()) for p in model.parameters())
    return {
        "class": type(model).__name__,
        "num_params": num_params,
        "modules": modules,
        "output_shape": None,
    }


def versions() -> dict[str, str]:
    from runlens_collect import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
        "runlens_collect": __version__,
    }


def _git(args: list[str], cwd: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=2.0,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def repro_record() -> dict[str, Any]:
    """Command line, git state of the cwd, seeds and determinism flags (failures -> null)."""
    cwd = os.getcwd()
    commit = _git(["rev-parse", "HEAD"], cwd)
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd) if commit else None
    try:
        seed: int | None = int(torch.initial_seed())
    except Exception:
        seed = None
    return {
        "argv": list(sys.argv),
        "executable": sys.executable,
        "cwd": cwd,
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "torch_initial_seed": seed,
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
        "pythonhashseed": os.environ.get("PYTHONHASHSEED"),
    }
