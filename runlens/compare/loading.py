"""Loading the runs of a comparison: inputs expanded, each run opened, analyzed and
reduced to what the comparison keeps (in a thread pool: polars and numpy release the
GIL), with a progress bar for long loads."""

from __future__ import annotations

import contextlib
import glob
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from runlens_collect import format as fmt

from runlens.compare.model import CompareError, CompareOptions
from runlens.context import Context
from runlens.discover import FoundRun, discover
from runlens.engine import analyze, make_context
from runlens.errors import RunlensError
from runlens.findings import Report
from runlens.levels import tail_levels
from runlens.run import Run
from runlens.sources import open_found
from runlens.storage import is_url

ProgressFn = Callable[[int, int], None]
"""Called as ``on_progress(done, total)`` after each run is loaded and analyzed."""

GRAD_NORM_STAT = "grad_norm"
UPDATE_RATIO_STAT = "update_ratio"
LAYER_STATS = {
    GRAD_NORM_STAT: (fmt.KIND_GRAD, "norm"),
    UPDATE_RATIO_STAT: (fmt.KIND_UPDATE, "update_ratio"),
}
"""Per-layer statistics compared between runs (their tail levels)."""
_GLOB_CHARS = re.compile(r"[*?\[]")
PROGRESS_MIN_RUNS = 10


# -- inputs ---------------------------------------------------------------------------------


def expand_inputs(
    items: Sequence[str | os.PathLike[str]], input_format: str | None = None
) -> tuple[list[FoundRun], list[CompareError]]:
    """The runs to compare: globs expanded (sorted), each path's runs found by
    :func:`runlens.discover.discover` (a folder of runs gives all of them, a CSV with
    runs appended each of them). A path that holds no run becomes an error entry."""
    found: list[FoundRun] = []
    errors: list[CompareError] = []
    for item in items:
        text = os.fspath(item)
        paths = [text]
        if _GLOB_CHARS.search(text) and not os.path.exists(text) and not is_url(text):
            paths = sorted(glob.glob(os.path.expanduser(text)))
            if not paths:
                errors.append(CompareError(text, f"no run matches {text!r}"))
        for p in paths:
            try:
                found += discover(p if is_url(p) else Path(p).expanduser(), input_format).runs
            except RunlensError as exc:
                errors.append(CompareError(p, str(exc)))
    return found, errors


# -- per-run work (in the pool) -------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    """What the comparison keeps of one run once its frames are no longer needed."""

    run_meta: dict[str, Any]
    path: str
    report: Report
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    """name -> (x, raw, smooth) on the chosen axis (steps or seconds since start)."""
    curve_steps: dict[str, np.ndarray]
    layer_tails: dict[str, dict[str, float]]
    scalar_names: tuple[str, ...]


def load_one(
    source: Run | FoundRun, curve_names: Sequence[str] | None, opts: CompareOptions
) -> Loaded:
    """Open and analyze one run; keep its report, curves and layer tail levels (read
    through the analysis' own Context: the run is read once)."""
    run = source if isinstance(source, Run) else open_found(source, dict(opts.mapping) or None)
    ctx = make_context(run, opts.analyze)
    report = analyze(ctx, opts.analyze)
    # The default metric (val/loss or train/loss) is chosen once all runs are loaded.
    wanted = {*(curve_names or ()), fmt.TRAIN_LOSS, fmt.VAL_LOSS}
    t0 = _start_time(ctx)
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    curve_steps: dict[str, np.ndarray] = {}
    for name in sorted(wanted):
        c = ctx.curve(name) if ctx.run.has_scalar(name) else None
        if c is None or len(c) == 0:
            continue
        x = c.steps.astype(np.float64)
        if opts.by == "time":
            s = ctx.scalar(name)
            assert s is not None
            # Clock steps backwards (NTP) must not unsort the axis.
            x = np.fmax.accumulate(s.wall_time) - t0
        curves[name] = (x, c.raw, c.smooth)
        curve_steps[name] = c.steps
    tails = {
        stat: tail_levels(ctx.layer(kind, st), opts.layer_tail)
        for stat, (kind, st) in LAYER_STATS.items()
    }
    return Loaded(
        run_meta=ctx.run.meta,
        path=report.run.path,  # for an imported log: the user's log, not the cache entry
        report=report,
        curves=curves,
        curve_steps=curve_steps,
        layer_tails=tails,
        scalar_names=ctx.run.scalar_names,
    )


def _start_time(ctx: Context) -> float:
    t = ctx.run.meta.get("start_time")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t):
        return float(t)
    s = ctx.scalar(fmt.TRAIN_LOSS)
    if s is not None and np.isfinite(s.wall_time).any():
        return float(np.nanmin(s.wall_time))
    return 0.0


def dedupe(sources: list[Run | FoundRun]) -> tuple[list[Run | FoundRun], list[str]]:
    seen: set[tuple[str, int | None]] = set()
    out, warnings = [], []
    for s in sources:
        part = s.part if isinstance(s, FoundRun) else None
        key = (os.path.realpath(source_path(s)), part)
        if key in seen:
            warnings.append(f"{source_path(s)} given twice; compared once")
            continue
        seen.add(key)
        out.append(s)
    return out, warnings


def source_path(s: Run | FoundRun) -> str:
    path = s.origin if isinstance(s, FoundRun) and s.origin else str(s.path)
    if isinstance(s, FoundRun) and s.part is not None:
        return f"{path}#{s.part + 1}"
    return path


def nothing_message(errors: list[CompareError]) -> str:
    if not errors:
        return "no run to compare"
    first = errors[0].message
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"no run could be read: {first}{more}"


# -- progress -------------------------------------------------------------------------------


@contextlib.contextmanager
def progress_bar(enabled: bool | None = None) -> Iterator[ProgressFn]:
    """A rich progress bar on stderr for long loads, as an ``on_progress`` callback.

    ``enabled=None`` shows it only when stderr is a terminal or there are more than
    ``PROGRESS_MIN_RUNS`` runs (the total is known at the first callback)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = Console(stderr=True)
    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "show" not in state:
            auto = console.is_terminal or total > PROGRESS_MIN_RUNS
            state["show"] = auto if enabled is None else enabled
            if state["show"]:
                prog = Progress(
                    TextColumn("loading runs"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    console=console,
                    transient=console.is_terminal,
                )
                prog.start()
                state["prog"], state["task"] = prog, prog.add_task("runs", total=total)
        if state["show"]:
            state["prog"].update(state["task"], completed=done)

    try:
        yield update
    finally:
        if state.get("show"):
            state["prog"].stop()
