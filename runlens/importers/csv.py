"""CSV metrics files → scalars.

Accepted layouts, all "one row per logging call, one column per metric":

* Lightning ``CSVLogger`` ``metrics.csv``: columns ``epoch, step, <metrics>`` with blank
  cells (training rows and validation rows log different metrics);
* Keras ``CSVLogger``: an ``epoch`` column and ``loss, val_loss, accuracy, ...``;
* any CSV with a step column (``step``, ``global_step``, ``iteration``, ``iter``,
  ``trainer/global_step``, ``Step``) or an ``epoch`` column.

The x axis is the step column when there is one; otherwise the epoch column, with a run
warning (steps then count epochs). Blank cells are "not logged on this row"; ``nan`` and
``inf`` are real non-finite values. Columns with no numeric value are ignored (with a
warning). A directory holding ``metrics.csv`` (a Lightning version folder) is accepted.
A ``.tsv`` file is read tab-separated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from runlens.errors import RunLoadError
from runlens.importers import CSV, LIGHTNING_CSV, ImportedLog, ScalarSeries

STEP_COLUMNS = ("step", "global_step", "trainer/global_step", "iteration", "iter", "it", "_step")
EPOCH_COLUMNS = ("epoch", "epochs")
TIME_COLUMNS = ("wall_time", "_timestamp", "timestamp", "time")


def inputs(path: Path) -> list[Path]:
    if path.is_dir():
        f = path / LIGHTNING_CSV
        if not f.is_file():
            raise RunLoadError(f"no {LIGHTNING_CSV} in {path}")
        return [f]
    return [path]


def read(path: Path) -> ImportedLog:
    (f,) = inputs(path)
    try:
        df = pl.read_csv(
            f,
            infer_schema=False,  # all strings: we decide per cell what is numeric
            separator="\t" if f.suffix.lower() == ".tsv" else ",",
            truncate_ragged_lines=True,
        )
    except Exception as exc:
        msg = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise RunLoadError(f"{f}: not a readable CSV file ({msg})") from None
    if df.width < 2 or df.height == 0:
        raise RunLoadError(f"{f}: not a metrics CSV (needs a header, a step or epoch column "
                           "and at least one metric column and row)")  # fmt: skip
    lower = {c.lower().strip(): c for c in df.columns}
    step_col = next((lower[c] for c in STEP_COLUMNS if c in lower), None)
    epoch_col = next((lower[c] for c in EPOCH_COLUMNS if c in lower), None)
    warnings: list[str] = []
    x_col = step_col or epoch_col
    if x_col is None:
        cols = ", ".join(df.columns[:8]) + (", ..." if df.width > 8 else "")
        raise RunLoadError(f"{f}: not a metrics CSV: no step or epoch column (columns: {cols})")
    if step_col is None:
        warnings.append(f"{f.name} has no step column: epochs are used as steps (x axis = epoch)")
    time_col = next((lower[c] for c in TIME_COLUMNS if c in lower), None)

    num = df.select(pl.col(c).str.strip_chars().cast(pl.Float64, strict=False) for c in df.columns)
    x = num[x_col]
    if x.null_count() == len(x):
        raise RunLoadError(f"{f}: column {x_col!r} holds no numbers")
    if x.drop_nulls().is_nan().any() or (x.drop_nulls() != x.drop_nulls().round()).any():
        raise RunLoadError(f"{f}: column {x_col!r} holds non-integer values")
    wall = num[time_col] if time_col else pl.repeat(float("nan"), num.height, eager=True)

    series: list[ScalarSeries] = []
    skip = {x_col, time_col}
    dropped = []
    for c in df.columns:
        if c in skip:
            continue
        raw = df[c].str.strip_chars()
        vals = num[c]
        logged = raw.is_not_null() & (raw != "")
        ok = logged & vals.is_not_null() & x.is_not_null()
        if logged.any() and not ok.any():
            dropped.append(c)
            continue
        if not ok.any():
            continue
        steps = x.filter(ok).cast(pl.Int64).to_numpy()
        # Lightning repeats e.g. `epoch` on the train and val rows of one step: one value a
        # step (the last), so only genuinely conflicting logs trigger the loader's warning.
        keep = _last_per_step(steps)
        series.append(
            ScalarSeries(
                name=c.strip(),
                steps=steps[keep],
                values=vals.filter(ok).to_numpy().astype(np.float64)[keep],
                wall_time=wall.filter(ok)
                .fill_null(float("nan"))
                .to_numpy()
                .astype(np.float64)[keep],
            )
        )
    if dropped:
        warnings.append(f"{f.name}: non-numeric columns ignored: {', '.join(dropped[:8])}")
    if not series:
        raise RunLoadError(f"{f}: no numeric metric columns besides {x_col!r}")
    name = f.parent.name if f.name == LIGHTNING_CSV else f.stem
    return ImportedLog(CSV, name, series, warnings=warnings)


def _last_per_step(steps: np.ndarray) -> np.ndarray:
    """Indices keeping the last row of each step, in original order."""
    if steps.size == 0:
        return np.arange(0)
    _, first_in_reversed = np.unique(steps[::-1], return_index=True)
    return np.sort(steps.size - 1 - first_in_reversed)
