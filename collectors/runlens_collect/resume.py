"""Continuing a run: what a run directory already holds, and the resume record.

Training resumed from a checkpoint continues the step axis: into the same run directory
(``Collector(..., resume=True)``, or by default when the directory already holds a run),
or from the framework's global step (``start_step=N``: Hugging Face ``state.global_step``,
Lightning ``trainer.global_step``). The continuation keeps the run's id and start time,
appends to run.json ``resumed`` and writes a ``resume`` event (each rank to its own
events file) with the step it starts at and the first segment number of each table it
writes: rows of earlier segments at that step or later belong to the attempt the
checkpoint superseded, and the analyzer drops them (the run reads as one).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runlens_collect import format as fmt


@dataclass
class Previous:
    """A run already in the directory."""

    meta: dict[str, Any] | None
    last_step: int | None
    """The last step on disk (run.json ``last_step`` or the segments, whichever is later)."""


def _max_step(files: list[Path]) -> int | None:
    best: int | None = None
    for f in files:
        try:
            steps = fmt.segment_steps(f)
        except Exception:
            continue  # a segment being written or damaged: run.json still says
        if steps is not None:
            best = steps[1] if best is None else max(best, steps[1])
    return best


def find_previous(run_dir: Path, rank: int = 0) -> Previous | None:
    """The run ``run_dir`` holds for ``rank`` (its segments; rank 0 also run.json, which
    only rank 0 writes), or None when it holds none: the ranks of a distributed run start
    at slightly different times, and another rank's first segment is no run to resume."""
    meta = None
    if rank == 0:
        try:
            loaded = json.loads((run_dir / fmt.RUN_JSON).read_text(encoding="utf-8"))
            meta = loaded if isinstance(loaded, dict) else None
        except (OSError, ValueError):
            meta = None
    files = [
        f for t in (fmt.SCALARS_DIR, fmt.LAYERS_DIR) for f in run_dir.glob(f"{t}/rank={rank}/*")
    ]
    files = [f for f in files if f.name.startswith("part-") and f.suffix == ".parquet"]
    if meta is None and not files:
        return None
    last = meta.get("last_step") if meta is not None else None
    last = last if isinstance(last, int) and not isinstance(last, bool) else None
    seg = _max_step(files)
    if seg is not None:
        last = seg if last is None else max(last, seg)
    return Previous(meta, last)


def resume_record(
    step: int, prev: Previous | None, now: float, segments: dict[str, int], run_id: str
) -> dict[str, Any]:
    """One run.json ``resumed`` entry / ``resume`` event body."""
    return {
        "step": int(step),
        "time": now,
        "previous_last_step": prev.last_step if prev is not None else None,
        "previous_status": (prev.meta or {}).get("status") if prev is not None else None,
        "segments": dict(segments),
        "run_id": run_id,
    }


def resume_point(
    run_dir: Path, rank: int, prev: Previous | None, start_step: int | None, resume: bool | None
) -> tuple[int | None, bool]:
    """(the first step, or None to keep the one given; whether this run continues the one
    the directory holds). Warns when a directory's run is continued by default, or when
    ``resume=False`` records beside one."""
    if start_step is not None:
        return None, prev is not None or start_step > 0
    if prev is None or prev.last_step is None:
        if resume is False and any(run_dir.glob(f"*/rank={rank}/part-*")):
            warnings.warn(
                f"runlens_collect: {run_dir} already holds a run; resume=False: this run is "
                "recorded from step 0 beside it (the analyzer will see both)",
                RuntimeWarning,
                stacklevel=4,
            )
        return None, False
    first = prev.last_step + 1
    if resume is None:
        warnings.warn(
            f"runlens_collect: {run_dir} already holds a run (last step {prev.last_step}); "
            f"continuing it at step {first} (a resume). Pass start_step=N to continue from "
            "a checkpoint's step, or record into a new directory",
            RuntimeWarning,
            stacklevel=4,
        )
    return first, True
