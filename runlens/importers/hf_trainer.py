"""Hugging Face ``Trainer`` state (``trainer_state.json``) → scalars.

Reads ``log_history``: training entries (``loss``, ``learning_rate``, ``grad_norm``,
``epoch``, ``step``) and evaluation entries (``eval_loss``, ``eval_<metric>``,
``eval_runtime``...), each at its ``step`` (the global step). The last entry the Trainer
writes at the end of ``train()`` (``train_runtime``, the run-average ``train_loss``...)
is a summary, not a point of a curve: it goes to the run summary's extras. The other
top-level fields (``train_batch_size``, ``num_train_epochs``, ``max_steps``,
``logging_steps``...) become the run's config.

``path`` may be the JSON file, a checkpoint directory holding it, or an output directory
of ``checkpoint-N`` folders (the one with the highest N is read: its history is the
longest).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from runlens.errors import RunLoadError
from runlens.importers import HF_STATE_FILE, HF_TRAINER, ImportedLog, ScalarSeries

_SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
_NOT_SERIES = ("step", "total_flos")


def inputs(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if (path / HF_STATE_FILE).is_file():
        return [path / HF_STATE_FILE]
    checkpoints = [
        (int(m.group(1)), p)
        for p in path.glob(f"checkpoint-*/{HF_STATE_FILE}")
        if (m := re.fullmatch(r"checkpoint-(\d+)", p.parent.name))
    ]
    if not checkpoints:
        raise RunLoadError(f"no {HF_STATE_FILE} in {path} or its checkpoint-* folders")
    return [max(checkpoints)[1]]


def read(path: Path) -> ImportedLog:
    (f,) = inputs(path)
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RunLoadError(f"{f}: not a text JSON file") from None
    except json.JSONDecodeError as exc:
        raise RunLoadError(f"{f}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise RunLoadError(f"{f}: not a Hugging Face trainer_state.json (no log_history list)")

    points: dict[str, tuple[list[int], list[float]]] = {}
    extras: dict[str, Any] = {}
    no_step = 0
    use_epoch = all("step" not in e for e in state["log_history"] if isinstance(e, dict))
    for entry in state["log_history"]:
        if not isinstance(entry, dict):
            continue
        if any(k in entry for k in _SUMMARY_KEYS):
            extras.update({k: v for k, v in entry.items() if _number(v) is not None})
            continue
        x = _number(entry.get("epoch" if use_epoch else "step"))
        if x is None or not math.isfinite(x):
            no_step += 1
            continue
        for k, v in entry.items():
            val = _number(v)
            if k in _NOT_SERIES or val is None or (use_epoch and k == "epoch"):
                continue
            steps, values = points.setdefault(k, ([], []))
            steps.append(round(x))
            values.append(val)
    warnings = []
    if use_epoch and points:
        warnings.append(f"{f.name}: log_history has no step: epochs are used as steps")
    if no_step:
        warnings.append(f"{f.name}: {no_step} log_history entries without a step ignored")
    if not points:
        raise RunLoadError(f"{f}: log_history holds no metrics")
    series = [_dedupe(k, s, v) for k, (s, v) in points.items()]
    config = {
        k: v
        for k, v in state.items()
        if k != "log_history" and (v is None or isinstance(v, (int, float, str, bool)))
    }
    # Name the run after the training output folder, not "checkpoint-500".
    in_checkpoint = f.parent.name.startswith("checkpoint-")
    folder = f.parent.parent if in_checkpoint else f.parent
    return ImportedLog(
        HF_TRAINER,
        folder.name or f.stem,
        series,
        config=config,
        summary_extras=extras,
        warnings=warnings,
        x_axis="epoch" if use_epoch else "step",
        planned=_plan(state, use_epoch, f.parent.name if in_checkpoint else None),
    )


def _dedupe(name: str, steps: list[int], values: list[float]) -> ScalarSeries:
    """One series; a point repeated with the same value at one step (``epoch`` is in both
    the training and the evaluation entry of a step) is kept once, so only conflicting
    values at one step reach the loader's duplicate-step warning."""
    s, v = np.asarray(steps, np.int64), np.asarray(values, np.float64)
    if s.size > 1:
        same = (s[1:] == s[:-1]) & ((v[1:] == v[:-1]) | (np.isnan(v[1:]) & np.isnan(v[:-1])))
        keep = np.concatenate([[True], ~same])
        s, v = s[keep], v[keep]
    return ScalarSeries(name, s, v, np.full(s.size, np.nan))  # the Trainer logs no times


def _plan(state: dict[str, Any], use_epoch: bool, checkpoint: str | None) -> dict[str, Any] | None:
    """The planned length (``max_steps``; ``num_train_epochs`` for a log without steps)
    and how far the state got (``global_step`` / ``epoch``)."""
    where = f"{checkpoint}/{HF_STATE_FILE}" if checkpoint else HF_STATE_FILE
    if not use_epoch:
        total, reached = _int(state.get("max_steps")), _int(state.get("global_step"))
        if total and total > 0 and reached is not None:
            return {"total": total, "unit": "step", "reached": reached,
                    "source": f"max_steps in {where}"}  # fmt: skip
        return None
    total = _int(state.get("num_train_epochs"))
    epoch = _number(state.get("epoch"))
    if total and total > 0 and epoch is not None and math.isfinite(epoch):
        return {"total": total, "unit": "epoch", "reached": math.floor(epoch + 1e-6),
                "source": f"num_train_epochs in {where}"}  # fmt: skip
    return None


def _int(v: Any) -> int | None:
    x = _number(v)
    return int(x) if x is not None and math.isfinite(x) and x == int(x) else None


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)
