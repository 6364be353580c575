"""CSV metrics files → scalars.

Accepted layouts, all "one row per logging call, one column per metric":

* Lightning ``CSVLogger`` ``metrics.csv``: columns ``epoch, step, <metrics>`` with blank
  cells (training rows and validation rows log different metrics); the ``hparams.yaml``
  next to it gives the planned ``max_steps`` / ``max_epochs`` when it holds them;
* Keras ``CSVLogger`` (default file name in Keras' examples: ``training.log``): an
  ``epoch`` column and ``loss, val_loss, accuracy, ...``;
* a Keras ``History`` saved with pandas (``pd.DataFrame(history.history).to_csv(f)``):
  no epoch column, with or without pandas' unnamed index column; the row index is the
  epoch (with a run warning);
* fastai ``CSVLogger`` ``history.csv``: ``epoch, train_loss, valid_loss, <metrics>,
  time``; the metrics are computed on the validation set (``accuracy`` → ``val/accuracy``)
  and ``time`` (``mm:ss`` per epoch) gives wall times;
* any CSV with a step column (``step``, ``global_step``, ``iteration``, ``iter``,
  ``trainer/global_step``, ``Step``) or an ``epoch`` column.

The x axis is the step column when there is one; otherwise the epoch column (or the row
index), and the run's axis is ``epoch``. Blank cells are "not logged on this row"; ``nan``
and ``inf`` are real non-finite values. Columns with no numeric value are ignored (with a
warning). A directory holding ``metrics.csv`` (a Lightning version folder) is accepted. A
``.tsv`` file is read tab-separated.

Several runs appended to one file are split (:func:`parts`): a repeated header line starts
a new run, and so does the step (or epoch) column going back to where the current run
started or earlier. A step going back only part of the way is a run resumed from a
checkpoint: it stays one run (with a warning), later rows winning for repeated steps.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from runlens.errors import RunLoadError
from runlens.importers import CSV, LIGHTNING_CSV, ImportedLog, ScalarSeries

STEP_COLUMNS = ("step", "global_step", "trainer/global_step", "iteration", "iter", "it", "_step")
EPOCH_COLUMNS = ("epoch", "epochs")
TIME_COLUMNS = ("wall_time", "_timestamp", "timestamp", "time")
INDEX_COLUMNS = ("", "unnamed: 0", "index")
"""pandas' index column: an empty header cell (``to_csv``), or what pandas names it when
the file is read back and written again."""
KERAS_LOG = "training.log"
FASTAI_COLUMNS = frozenset({"epoch", "train_loss", "valid_loss"})
HPARAMS = "hparams.yaml"
_MMSS = re.compile(r"^(?:(\d+):)?(\d+):(\d{2})$")
# Names that say "this column is a metric": a header made only of such names is a metrics
# log even without a step or epoch column (a Keras History saved with pandas).
_METRIC_WORD = re.compile(r"(loss|acc|accuracy|error|mae|mse|auc|f1|lr|learning_rate)", re.I)


@dataclass(frozen=True)
class Part:
    """One run inside a CSV file: its data lines (1-based, inclusive) and why it starts."""

    index: int
    first_line: int
    last_line: int
    why: str
    """Empty for the first part; else e.g. ``header repeated at line 42``."""


@dataclass
class _Segment:
    """The file's text split at repeated headers: a header and its data lines."""

    header: str
    lines: list[str]
    line_numbers: list[int]


def inputs(path: Path) -> list[Path]:
    if path.is_dir():
        f = path / LIGHTNING_CSV
        if not f.is_file():
            raise RunLoadError(f"no {LIGHTNING_CSV} in {path}")
        return [f]
    return [path]


def looks_like_csv(path: Path) -> bool:
    """True when a file's first line reads as a metrics CSV header (for files whose name
    does not say, such as Keras' ``training.log``)."""
    try:
        with path.open("rb") as fh:  # a Path, or a ListedPath on object storage
            head = fh.read(4096)
    except OSError:
        return False
    try:
        first = head.decode("utf-8").splitlines()[0] if head.strip() else ""
    except (UnicodeDecodeError, IndexError):
        return False
    sep = "\t" if "\t" in first and "," not in first else ","
    cells = [c.strip().strip('"').lower() for c in first.split(sep)]
    if len(cells) < 2:
        return False
    keys = set(cells)
    return bool(keys & {*STEP_COLUMNS, *EPOCH_COLUMNS}) or any(
        _METRIC_WORD.search(c) for c in cells
    )


def parts(path: Path) -> list[Part]:
    """The runs in one CSV file (one part when nothing was appended)."""
    (f,) = inputs(path)
    return [p for p, _ in _split(f)]


def read(path: Path, part: int | None = None) -> ImportedLog:
    """Read the file (or one of its :func:`parts`: ``part`` is its index)."""
    (f,) = inputs(path)
    split = _split(f)
    warnings: list[str] = []
    if part is None and len(split) > 1:
        raise RunLoadError(
            f"{f}: {len(split)} runs appended in one file ({_describe(split)}); "
            "read them one at a time"
        )
    k = part or 0
    if not 0 <= k < len(split):
        raise RunLoadError(f"{f}: no run #{k + 1} in this file ({len(split)} found)")
    p, table = split[k]
    warnings += table.warnings
    log = _to_log(f, table, warnings)
    if len(split) > 1:
        log.name = f"{log.name} (run {k + 1} of {len(split)})"
        why = f" ({p.why})" if p.why else ""
        log.warnings.insert(
            0,
            f"{f.name} holds {len(split)} runs appended in one file: this is run {k + 1}, "
            f"lines {p.first_line}–{p.last_line}{why}",
        )
    return log


def describe_parts(found: list[Part]) -> str:
    """``lines 2–41, 43–82 (header repeated at line 42)``."""
    spans = ", ".join(f"{p.first_line}–{p.last_line}" for p in found)
    whys = [p.why for p in found if p.why]
    return f"lines {spans}" + (f" ({'; '.join(whys)})" if whys else "")


def _describe(split: list[tuple[Part, _Table]]) -> str:
    return describe_parts([p for p, _ in split])


# -- reading ------------------------------------------------------------------------------


@dataclass
class _Table:
    """One run's rows: the parsed frame (all strings), its x column, the file lines."""

    df: pl.DataFrame
    x_name: str | None
    """The x column's name; None when the row index is the x axis."""
    x: pl.Series
    axis: str
    line_numbers: list[int]
    warnings: list[str]


def _text(f: Path) -> str:
    try:
        data = f.read_bytes()
    except OSError as exc:
        raise RunLoadError(f"{f}: cannot read ({exc.strerror or exc})") from None
    if b"\x00" in data[:4096]:
        raise RunLoadError(f"{f}: not a readable CSV file (binary data)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise RunLoadError(f"{f}: not a readable CSV file (not UTF-8 text)") from None


def _segments(f: Path) -> list[_Segment]:
    """Split at repeated header lines (``cat a.csv b.csv``, loggers re-opened in append
    mode that write their header again)."""
    text = _text(f)
    rows = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    if not rows:
        raise RunLoadError(
            f"{f}: not a metrics CSV (empty file: needs a header and at least one row)"
        )
    header = rows[0][1]
    segs = [_Segment(header, [], [])]
    for n, ln in rows[1:]:
        if ln.strip() == header.strip():
            segs.append(_Segment(header, [], []))
            continue
        segs[-1].lines.append(ln)
        segs[-1].line_numbers.append(n)
    return [s for s in segs if s.lines] or [segs[0]]


def _split(f: Path) -> list[tuple[Part, _Table]]:
    out: list[tuple[Part, _Table]] = []
    segs = _segments(f)
    for si, seg in enumerate(segs):
        table = _parse(f, seg)
        for lo, hi, why in _resets(table):
            sub = _Table(
                df=table.df[lo:hi],
                x_name=table.x_name,
                x=table.x[lo:hi],
                axis=table.axis,
                line_numbers=table.line_numbers[lo:hi],
                warnings=list(table.warnings) if lo == 0 else [],
            )
            if lo == 0 and si > 0:
                why = f"header repeated at line {seg.line_numbers[0] - 1}"
            first = sub.line_numbers[0] if sub.line_numbers else 0
            last = sub.line_numbers[-1] if sub.line_numbers else 0
            out.append((Part(len(out), first, last, why), sub))
    return out


def _parse(f: Path, seg: _Segment) -> _Table:
    tabbed = "\t" in seg.header and "," not in seg.header
    sep = "\t" if f.suffix.lower() == ".tsv" or tabbed else ","
    body = "\n".join([seg.header, *seg.lines]) + "\n"
    try:
        df = pl.read_csv(
            io.StringIO(body),
            infer_schema=False,  # all strings: we decide per cell what is numeric
            separator=sep,
            truncate_ragged_lines=True,
        )
    except Exception as exc:
        msg = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise RunLoadError(f"{f}: not a readable CSV file ({msg})") from None
    if df.width < 2 or df.height == 0:
        raise RunLoadError(f"{f}: not a metrics CSV (needs a header, a step or epoch column "
                           "and at least one metric column and row)")  # fmt: skip
    # One row per data line, unless a quoted cell spans lines (then line numbers are off).
    lines = seg.line_numbers if len(seg.line_numbers) == df.height else list(range(df.height))
    lower = {c.lower().strip(): c for c in df.columns}
    step_col = next((lower[c] for c in STEP_COLUMNS if c in lower), None)
    epoch_col = next((lower[c] for c in EPOCH_COLUMNS if c in lower), None)
    warnings: list[str] = []
    x_name = step_col or epoch_col
    axis = "step" if step_col else "epoch"
    if x_name is None:
        index_col = next((lower[c] for c in INDEX_COLUMNS if c in lower), None)
        others = [c for c in df.columns if c != index_col]
        if not others or not any(_METRIC_WORD.search(c) for c in others):
            cols = ", ".join(df.columns[:8]) + (", ..." if df.width > 8 else "")
            raise RunLoadError(f"{f}: not a metrics CSV: no step or epoch column (columns: {cols})")
        if index_col is not None:
            df = df.drop(index_col)
        if df.width < 1:
            raise RunLoadError(f"{f}: no metric columns besides the index")
        x = pl.Series("row", np.arange(df.height, dtype=np.float64))
        warnings.append(
            f"{f.name} has no epoch or step column: the row index is used as the epoch "
            "(first row = epoch 0), as in a Keras History saved with pandas"
        )
        return _Table(df, None, x, "epoch", lines, warnings)
    x = df[x_name].str.strip_chars().cast(pl.Float64, strict=False)
    if x.null_count() == len(x):
        raise RunLoadError(f"{f}: column {x_name!r} holds no numbers")
    xs = x.drop_nulls()
    if xs.is_nan().any() or (xs != xs.round()).any():
        raise RunLoadError(f"{f}: column {x_name!r} holds non-integer values")
    if step_col is None:
        warnings.append(f"{f.name} has no step column: the x axis counts epochs")
    return _Table(df, x_name, x, axis, lines, warnings)


def _resets(t: _Table) -> list[tuple[int, int, str]]:
    """Row ranges [lo, hi) of the runs in one segment: a new run starts where x goes back
    to the current run's first x or below. A smaller step back is a resume (a warning)."""
    if t.x_name is None:
        return [(0, t.df.height, "")]
    x = t.x.to_numpy()
    out: list[tuple[int, int, str]] = []
    lo, why = 0, ""
    start = prev = math.nan
    for i, v in enumerate(x):
        if not np.isfinite(v):
            continue
        if np.isfinite(prev) and v < prev:
            if v <= start:
                out.append((lo, i, why))
                lo = i
                why = f"{t.x_name} went back from {int(prev)} to {int(v)} at line " + str(
                    t.line_numbers[i]
                )
                start = v
            else:
                t.warnings.append(
                    f"{t.x_name} goes back from {int(prev)} to {int(v)} at line "
                    f"{t.line_numbers[i]} (a run resumed from a checkpoint?): for repeated "
                    f"{t.axis}s the later rows are used"
                )
        if not np.isfinite(start):
            start = v
        prev = v
    out.append((lo, t.df.height, why))
    return out


def _to_log(f: Path, t: _Table, warnings: list[str]) -> ImportedLog:
    df, x = t.df, t.x
    lower = {c.lower().strip(): c for c in df.columns}
    fastai = set(lower) >= FASTAI_COLUMNS
    time_col = next((lower[c] for c in TIME_COLUMNS if c in lower), None)
    num = df.select(pl.col(c).str.strip_chars().cast(pl.Float64, strict=False) for c in df.columns)
    wall = _fastai_wall(f, df[time_col]) if fastai and time_col else None
    if wall is None:
        wall = num[time_col] if time_col else pl.repeat(float("nan"), num.height, eager=True)

    series: list[ScalarSeries] = []
    skip = {t.x_name, time_col}
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
        raise RunLoadError(f"{f}: no numeric metric columns besides {t.x_name or 'the index'!r}")
    name = f.parent.name if f.name == LIGHTNING_CSV else f.stem
    hints: dict[str, str] = {}
    if fastai:
        # fastai's Recorder computes every metric on the validation set.
        known = {"epoch", "train_loss", "valid_loss", "time"}
        hints = {c.strip(): f"val/{c.strip()}" for c in df.columns if c.lower() not in known}
    log = ImportedLog(CSV, name, series, warnings=warnings, x_axis=t.axis, hints=hints)
    _lightning_plan(f, log, t)
    return log


def _fastai_wall(f: Path, col: pl.Series) -> pl.Series | None:
    """fastai's ``time`` column (``mm:ss`` each epoch took) as wall times: the cumulative
    durations, ending at the file's modification time (written after the last epoch)."""
    secs = []
    for v in col.to_list():
        m = _MMSS.match((v or "").strip())
        if not m:
            return None
        h, mm, ss = (int(g) if g else 0 for g in m.groups())
        secs.append(3600 * h + 60 * mm + ss)
    end = np.cumsum(np.asarray(secs, np.float64))
    try:
        mtime = f.stat().st_mtime
    except OSError:
        return None
    return pl.Series("wall", mtime - end[-1] + end)


def _lightning_plan(f: Path, log: ImportedLog, t: _Table) -> None:
    """Planned length from Lightning's ``hparams.yaml`` (``max_steps`` / ``max_epochs``,
    when the user saved them there), and how far the log got."""
    hp = read_flat_yaml(f.parent / HPARAMS)
    if not hp:
        return
    log.config.update(hp)
    max_steps, max_epochs = hp.get("max_steps"), hp.get("max_epochs")
    steps = [s for s in log.scalars if len(s.steps)]
    if isinstance(max_steps, int) and max_steps > 0 and t.axis == "step" and steps:
        last = max(int(s.steps.max()) for s in steps)
        gaps = [np.median(np.diff(s.steps)) for s in steps if len(s.steps) > 1]
        every = int(min(gaps)) if gaps else 1
        # Lightning's step column is 0-based and logged every log_every_n_steps: within
        # one logging interval of the end counts as the end.
        reached = max_steps if last + 1 + every > max_steps else last + 1
        log.planned = {"total": max_steps, "unit": "step", "reached": reached,
                       "source": f"max_steps in {HPARAMS}"}  # fmt: skip
        return
    epoch = next((s for s in log.scalars if s.name.lower() == "epoch"), None)
    last_epoch = None
    if epoch is not None and np.isfinite(epoch.values).any():
        last_epoch = int(np.nanmax(epoch.values))
    elif t.axis == "epoch" and steps:
        last_epoch = max(int(s.steps.max()) for s in steps)
    if isinstance(max_epochs, int) and max_epochs > 0 and last_epoch is not None:
        log.planned = {"total": max_epochs, "unit": "epoch", "reached": last_epoch + 1,
                       "source": f"max_epochs in {HPARAMS}"}  # fmt: skip


def read_flat_yaml(path: Path) -> dict[str, Any]:
    """Top-level ``key: scalar`` lines of a small YAML file (Lightning's hparams.yaml);
    nested blocks and anything unusual are skipped. No YAML library needed."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    out: dict[str, Any] = {}
    for line in text.splitlines():
        if not line or line[0] in " \t#-" or ":" not in line:
            continue
        key, _, value = line.partition(":")
        value = value.split(" #", 1)[0].strip()
        if not key.strip() or not value or value.startswith(("!", "&", "*", "|", ">")):
            continue
        out[key.strip()] = _scalar(value)
    return out


def _scalar(v: str) -> Any:
    low = v.lower()
    if low in ("null", "~", "none"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v.strip("'\"")


def _last_per_step(steps: np.ndarray) -> np.ndarray:
    """Indices keeping the last row of each step, in original order."""
    if steps.size == 0:
        return np.arange(0)
    _, first_in_reversed = np.unique(steps[::-1], return_index=True)
    return np.sort(steps.size - 1 - first_in_reversed)
