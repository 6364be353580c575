"""Losses logged only as their components: the total the model minimises.

Ultralytics YOLO (``results.csv`` and its TensorBoard tags) logs ``train/box_loss``,
``train/cls_loss``, ``train/dfl_loss`` (YOLOv5: ``box``, ``obj``, ``cls``; segmentation and
pose add ``seg``, ``pose``, ``kobj``) and the same under ``val/``, but never their total.
The loss it backpropagates is that sum (each component already carries its gain; the sum
is multiplied by the batch size), so the importer adds ``train/loss`` and ``val/loss`` as
the sum of the components at the steps where all of them are logged, and says so in a
run warning. A log that has its own overall loss is left alone.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from runlens.importers import ALIASES, ImportedLog, ScalarSeries

YOLO_COMPONENTS: Final = ("box", "seg", "obj", "cls", "dfl", "pose", "kobj")
"""Ultralytics loss components, in the order its logs write them."""

YOLO_REQUIRED: Final = ("box", "cls")
"""Components every ultralytics detection-family log has."""


def add_totals(log: ImportedLog) -> None:
    """Append ``train/loss`` / ``val/loss`` totals to ``log`` where only components are
    logged (see the module docstring)."""
    by_name = {s.name.strip().lower(): s for s in log.scalars}
    for split, target in (("train", "train/loss"), ("val", "val/loss")):
        if any(alias in by_name for alias in ALIASES[target]):
            continue
        parts = [by_name.get(f"{split}/{c}_loss") for c in YOLO_COMPONENTS]
        present = [p for p in parts if p is not None]
        names = {p.name.strip().lower() for p in present}
        if not all(f"{split}/{c}_loss" in names for c in YOLO_REQUIRED):
            continue
        total = _sum(present, target)
        if total is None:
            continue
        log.scalars.append(total)
        log.warnings.append(
            f"{target} is the sum of {', '.join(p.name.strip() for p in present)}: "
            "ultralytics logs only the components of the loss it minimises"
        )


def _sum(parts: list[ScalarSeries], name: str) -> ScalarSeries | None:
    """The components added at the steps where every one of them has a value (the last
    value of a step logged twice)."""
    common = None
    for p in parts:
        s = np.unique(p.steps)
        common = s if common is None else np.intersect1d(common, s)
    if common is None or common.size == 0:
        return None
    total = np.zeros(common.size)
    wall = np.full(common.size, np.nan)
    for p in parts:
        last = {int(st): i for i, st in enumerate(p.steps)}  # later rows win
        idx = np.array([last[int(st)] for st in common])
        total += np.asarray(p.values, dtype=np.float64)[idx]
        w = np.asarray(p.wall_time, dtype=np.float64)[idx]
        wall = np.where(np.isfinite(wall), wall, w)
    return ScalarSeries(name, common.astype(np.int64), total, wall)
