"""The reproducibility record of run.json (``repro``): what a person needs to re-run a run
or to explain why two runs differ.

It extends :func:`runlens_collect.runinfo.repro_record` (command line, git commit and dirty
flag of the working directory, torch's initial seed, cuDNN/determinism flags) with the
random state of numpy and Python, more determinism settings, the device and the versions
of the libraries that change numerics.

What can and cannot be known about seeds:

* torch: ``torch.initial_seed()`` is exact — the seed given to ``torch.manual_seed`` (or the
  one torch drew itself at import when nobody seeded it).
* numpy's legacy global generator and Python's ``random`` do not remember their seed. We
  record a fingerprint of their current state (two runs with equal fingerprints started
  from the same state) and, when the state is the one that seeding with torch's initial
  seed produces (the common ``seed_everything(s)`` pattern, before 624 draws), that seed.
  Otherwise the seed field is null: unknown, not "unseeded".
* numpy ``Generator`` objects (``np.random.default_rng``) live in user code: not visible.
* CUDA's seed is read only when CUDA is already initialized (reading it would initialize it).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import random
from typing import Any

import numpy as np
import torch

from runlens_collect import runinfo

# Libraries whose versions change numerics or defaults; recorded when installed.
_PACKAGES = (
    "torch",
    "numpy",
    "torchvision",
    "torchaudio",
    "transformers",
    "accelerate",
    "lightning",
    "pytorch-lightning",
    "timm",
    "deepspeed",
    "triton",
)
_ENV_VARS = ("PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def repro_record(device: torch.device | str | None = None) -> dict[str, Any]:
    """The full ``repro`` dict for run.json. Never raises: a fact that cannot be read is
    null."""
    rec = runinfo.repro_record()
    seed = rec.get("torch_initial_seed")
    rec.update(_guard(_seeds, seed))
    rec.update(_guard(_flags))
    rec.update(_guard(_device, device))
    rec["env"] = {k: os.environ.get(k) for k in _ENV_VARS}
    rec["packages"] = _guard(_packages)
    return rec


def _guard(fn: Any, *args: Any) -> dict[str, Any]:
    try:
        return fn(*args)
    except Exception:  # a missing fact must never stop training
        return {}


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(repr(obj).encode()).hexdigest()[:16]


def _seeds(torch_seed: int | None) -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    np_seed = py_seed = None
    if isinstance(torch_seed, int) and 0 <= torch_seed < 2**32:
        # Same key as a generator freshly seeded with torch's seed: that seed (draws since
        # seeding move only the position until the key is regenerated after 624 words).
        if np.array_equal(np.random.RandomState(torch_seed).get_state()[1], np_state[1]):
            np_seed = torch_seed
        if random.Random(torch_seed).getstate()[1][:624] == py_state[1][:624]:
            py_seed = torch_seed
    cuda_seed = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_seed = int(torch.cuda.initial_seed())
    return {
        "numpy_seed": np_seed,
        "numpy_state": _fingerprint((np_state[1].tobytes(), np_state[2])),
        "python_random_seed": py_seed,
        "python_random_state": _fingerprint(py_state),
        "cuda_initial_seed": cuda_seed,
    }


def _flags() -> dict[str, Any]:
    return {
        "deterministic_warn_only": bool(torch.is_deterministic_algorithms_warn_only_enabled()),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "torch_num_threads": int(torch.get_num_threads()),
    }


def _device(device: torch.device | str | None) -> dict[str, Any]:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(dev)
        cap = ".".join(str(c) for c in torch.cuda.get_device_capability(dev))
    else:
        name, cap = platform.processor() or platform.machine(), None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "device": str(dev),
        "device_name": name,
        "cuda_capability": cap,
        "cuda_version": torch.version.cuda,
        "cudnn_version": cudnn,
        "platform": platform.platform(),
    }


def _packages() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out
