"""Importers: convert logs written by other tools into runlens run directories.

Each source has one module (``tensorboard``, ``csv``, ``hf_trainer``) with two functions:

* ``inputs(path) -> list[Path]`` — the files the import reads (their sizes and mtimes key
  the import cache, see :mod:`runlens.sources`);
* ``read(path) -> ImportedLog`` — the log's series with their *source* names.

This module detects the format of a path, maps source metric names to runlens names
(:func:`resolve_names`, documented in ``docs/importing.md``) and writes the result as an
ordinary run directory (:func:`convert`) with ``format.write_segment`` /
``format.write_json_atomic``, so the whole analyzer works on imported logs unchanged.
Importers never write next to the user's logs; only the destination directory.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa
from runlens_collect import format as fmt

from runlens.errors import OptionError, RunLoadError

IMPORTER_VERSION: Final = 3
"""Bumped when an importer's output changes, so cached imports are rebuilt."""

RUNLENS: Final = "runlens"
TENSORBOARD: Final = "tensorboard"
CSV: Final = "csv"
HF_TRAINER: Final = "hf-trainer"
FORMATS: Final = (RUNLENS, TENSORBOARD, CSV, HF_TRAINER)
"""Values of ``--input-format`` besides ``auto``."""

HF_STATE_FILE: Final = "trainer_state.json"
LIGHTNING_CSV: Final = "metrics.csv"


@dataclass
class ScalarSeries:
    """One series as the source named it; arrays of equal length, in file order."""

    name: str
    steps: np.ndarray
    values: np.ndarray
    wall_time: np.ndarray


@dataclass
class ImportedLog:
    """What an importer read: series under their source names, plus facts for run.json."""

    source_format: str
    name: str
    scalars: list[ScalarSeries]
    layers: pa.Table | None = None
    """Rows in ``format.LAYERS_SCHEMA`` (TensorBoard histograms), or None."""
    config: dict[str, Any] = field(default_factory=dict)
    summary_extras: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    x_axis: str = "step"
    """What the steps count: ``step``, or ``epoch`` for logs indexed by epochs."""
    hints: dict[str, str] = field(default_factory=dict)
    """Runlens names the importer knows from the log's layout (fastai's ``accuracy`` is a
    validation metric): they beat the default mapping, ``--map`` beats them."""
    planned: dict[str, Any] | None = None
    """``{"total", "unit", "reached", "source"}``: the length the run was set up for and
    how far the log got, when the log says (HF max_steps, Lightning max_epochs)."""


# -- format detection -------------------------------------------------------------------


def is_runlens_dir(path: Path) -> bool:
    return path.is_dir() and (
        (path / fmt.RUN_JSON).is_file()
        or (path / fmt.SCALARS_DIR).is_dir()
        or (path / fmt.LAYERS_DIR).is_dir()
    )


def is_event_file(path: Path) -> bool:
    return "tfevents" in path.name


KERAS_LOG: Final = "training.log"
CSV_SUFFIXES: Final = (".csv", ".tsv")
SNIFFED_SUFFIXES: Final = (".log", ".txt", "")
"""Files whose name does not say CSV but whose first line may (Keras' ``training.log``)."""


def file_format(p: Path) -> str | None:
    """The format of a log file, or None when it is none runlens reads."""
    if is_event_file(p):
        return TENSORBOARD
    if p.suffix.lower() in CSV_SUFFIXES:
        return CSV
    if p.name == HF_STATE_FILE:
        return HF_TRAINER
    if p.name == KERAS_LOG:
        return CSV
    if p.suffix.lower() in SNIFFED_SUFFIXES:
        from runlens.importers.csv import looks_like_csv

        return CSV if looks_like_csv(p) else None
    return None


def dir_format(p: Path) -> str | None:
    """The format of a directory that is one run (a runlens run, a Trainer output or
    checkpoint folder, a Lightning version folder, a TensorBoard log directory), or None
    when it is not one run (a folder of runs, or nothing readable)."""
    if is_runlens_dir(p):
        return RUNLENS
    if (p / HF_STATE_FILE).is_file() or any(p.glob(f"checkpoint-*/{HF_STATE_FILE}")):
        return HF_TRAINER
    if (p / LIGHTNING_CSV).is_file():
        return CSV
    if is_tensorboard_run(p):
        return TENSORBOARD
    return None


SPLIT_DIRS: Final = frozenset(
    {"train", "training", "validation", "valid", "val", "eval", "evaluation", "test"}
)
"""Sub-directory names Keras' TensorBoard callback (``logs/train``, ``logs/validation``)
and similar loggers use for the splits of ONE run."""


def is_tensorboard_run(p: Path) -> bool:
    """One TensorBoard run: event files directly in ``p`` (sub-directories with event
    files are its ``add_scalars`` curves), or only split-named sub-directories
    (``train/``, ``validation/``) holding them."""
    try:
        entries = list(p.iterdir())
    except OSError:
        return False
    if any(e.is_file() and is_event_file(e) for e in entries):
        return True
    with_events = [e for e in entries if e.is_dir() and any(is_event_file(f) for f in _files_in(e))]
    return bool(with_events) and all(e.name.lower() in SPLIT_DIRS for e in with_events)


def _files_in(d: Path) -> list[Path]:
    try:
        return [f for f in d.iterdir() if f.is_file()]
    except OSError:
        return []


def detect_format(path: str | os.PathLike[str]) -> str:
    """The source format of ``path`` (one of FORMATS), or a one-line RunLoadError. A
    folder of several runs is no format: see :mod:`runlens.discover`."""
    p = Path(path)
    if not p.exists():
        raise RunLoadError(f"no such file or directory: {p}")
    if p.is_file():
        found = file_format(p)
        if found is None and p.suffix.lower() == ".json":
            return HF_TRAINER  # any JSON: the importer says whether it is a Trainer state
        if found is None:
            raise RunLoadError(
                f"cannot tell the format of {p}: expected a TensorBoard event file "
                "(*tfevents*), a CSV metrics file (.csv, .tsv, Keras' training.log) or a "
                "trainer_state.json (use --input-format)"
            )
        return found
    found = dir_format(p)
    if found is None and any(is_event_file(f) for f in p.rglob("*tfevents*")):
        return TENSORBOARD
    if found is None:
        raise RunLoadError(
            f"{p} is not a runlens run and holds no TensorBoard event files, metrics.csv or "
            "trainer_state.json (use --input-format to force one)"
        )
    return found


def check_format(name: str | None) -> str | None:
    """Validate an ``--input-format`` value; ``auto``/None mean detect."""
    if name is None or name == "auto":
        return None
    if name not in FORMATS:
        raise OptionError(f"unknown input format {name!r} (choose auto, {', '.join(FORMATS)})")
    return name


def _module(source_format: str) -> Any:
    if source_format == TENSORBOARD:
        from runlens.importers import tensorboard as mod
    elif source_format == CSV:
        from runlens.importers import csv as mod
    elif source_format == HF_TRAINER:
        from runlens.importers import hf_trainer as mod
    else:
        raise OptionError(f"no importer for format {source_format!r}")
    return mod


def is_csv_format(source_format: str) -> bool:
    return source_format == CSV


def inputs(path: str | os.PathLike[str], source_format: str) -> list[Path]:
    """The files an import of ``path`` reads, sorted (they key the import cache). ``path``
    may also be a :class:`runlens.listing.ListedPath` (a run on object storage, before
    anything is downloaded): the same files are named from the listing."""
    p = path if hasattr(path, "iterdir") else Path(path)
    return list(_module(source_format).inputs(p))


# -- metric-name mapping ----------------------------------------------------------------

# Source names (compared case-insensitively) for each runlens name, in priority order:
# when two source names of one log map to the same runlens name, the earlier one wins and
# the other keeps its own name (with a warning).
ALIASES: Final[dict[str, tuple[str, ...]]] = {
    fmt.TRAIN_LOSS: (
        "train/loss",
        "train_loss_step",
        "train/loss_step",
        "train_loss",
        "loss/train",
        "training_loss",
        "training/loss",
        "trn_loss",
        "loss",
        "total_loss",
        "train/epoch_loss",
        "train_loss_epoch",
    ),
    fmt.VAL_LOSS: (
        "val/loss",
        "val_loss",
        "validation/loss",
        "validation_loss",
        "valid/loss",
        "valid_loss",
        "eval/loss",
        "eval_loss",
        "loss/val",
        "loss/validation",
        "loss/valid",
        "val_loss_epoch",
        "val/loss_epoch",
    ),
    fmt.VAL_ACCURACY: (
        "val/accuracy",
        "val_accuracy",
        "val/acc",
        "val_acc",
        "validation/accuracy",
        "validation_accuracy",
        "valid/accuracy",
        "valid_acc",
        "eval/accuracy",
        "eval_accuracy",
        "eval_acc",
        "accuracy/val",
        "accuracy/validation",
        "val_acc_epoch",
    ),
    "train/accuracy": (
        "train/accuracy",
        "train_accuracy",
        "train/acc",
        "train_acc",
        "train_acc_step",
        "accuracy/train",
        "accuracy",
        "acc",
    ),
    fmt.lr_name(0): (
        "lr/0",
        "lr",
        "learning_rate",
        "train/learning_rate",
        "train/lr",
        "learning-rate",
    ),
    fmt.GRAD_NORM: (
        "grad_norm",
        "train/grad_norm",
        "gradient_norm",
        "grad_norm/total",
        "grad_2.0_norm_total",
    ),
}
_ALIAS_INDEX: Final = {
    alias: (target, rank) for target, names in ALIASES.items() for rank, alias in enumerate(names)
}

# Pattern rules, tried after the aliases (rank 100): Lightning's LearningRateMonitor
# ("lr-Adam", "lr-Adam/pg2") and prefixed validation/training metrics.
_LR_MONITOR = re.compile(r"^lr-[A-Za-z0-9_.]+(?:/pg(\d+))?$")
_ULTRALYTICS_LR = re.compile(r"^(?:lr/pg|x/lr)(\d+)$", re.IGNORECASE)
"""Ultralytics' per-group learning rates, 0-based: ``lr/pg0`` (YOLOv8), ``x/lr0`` (v5)."""
_VAL_PREFIX = re.compile(r"^(?:val|valid|validation|eval)[_/](.+)$", re.IGNORECASE)
_TRAIN_PREFIX = re.compile(r"^(?:train|training)[_/](.+)$", re.IGNORECASE)
_PATTERN_RANK: Final = 100
_KEEP_RANK: Final = 1000


_EPOCH_TAG = re.compile(r"^(?P<split>[^/]+)/epoch_(?P<rest>.+)$", re.IGNORECASE)
"""Keras' TensorBoard callback: ``train/epoch_loss``, ``validation/epoch_accuracy``."""


def canonical_name(raw: str) -> tuple[str, float]:
    """The default runlens name of a source metric name and its priority (lower wins)."""
    hit = _ALIAS_INDEX.get(raw.lower())
    if hit is not None:
        return hit
    m = _EPOCH_TAG.match(raw)
    if m:
        split = m.group("split").lower()
        split = "val" if split in ("validation", "valid", "eval", "evaluation") else split
        target, rank = canonical_name(f"{split}/{m.group('rest')}")
        return target, rank + 0.5
    m = _ULTRALYTICS_LR.match(raw)
    if m:
        return fmt.lr_name(int(m.group(1))), _PATTERN_RANK
    m = _LR_MONITOR.match(raw)
    if m:
        group = int(m.group(1)) - 1 if m.group(1) else 0
        return fmt.lr_name(max(group, 0)), _PATTERN_RANK
    for prefix, rx in (("val/", _VAL_PREFIX), ("train/", _TRAIN_PREFIX)):
        m = rx.match(raw)
        if m:
            rest = m.group(1)
            rest = "accuracy" if rest.lower() == "acc" else rest
            return prefix + rest, _PATTERN_RANK
    return raw, _KEEP_RANK


def parse_map(items: Iterable[str]) -> dict[str, str]:
    """Parse ``--map SRC=DST`` items. An empty DST drops the series."""
    out: dict[str, str] = {}
    for item in items:
        src, sep, dst = item.partition("=")
        if not sep or not src.strip():
            raise OptionError(f"--map expects SOURCE_NAME=RUNLENS_NAME, got {item!r}")
        out[src.strip()] = dst.strip()
    return out


_VAL_PREFIXES: Final = ("val_", "val/", "valid_", "valid/", "validation_", "validation/",
                        "eval_", "eval/")  # fmt: skip
_EVAL_SET_LOSS = re.compile(r"^(?:eval|val)[_/](?P<set>.+?)[_/]loss$", re.IGNORECASE)
PRIMARY_EVAL_SETS: Final = ("validation", "valid", "val", "dev", "eval", "evaluation")
"""When a log has several evaluation sets and no plain ``eval_loss``, the first set with
one of these names (else the first set logged) is the primary one: its loss is val/loss."""


def default_names(raw_names: Iterable[str]) -> dict[str, tuple[str, float]]:
    """The default (runlens name, priority) of every source name of one log: the alias
    table and patterns of :func:`canonical_name`, plus rules that look at the other
    names of the log:

    * Lightning ``X_step`` / ``X_epoch`` (``self.log(..., on_step=True, on_epoch=True)``):
      ``X_step`` takes X's runlens name, ``X_epoch`` that name + ``_epoch``;
    * Keras ``X`` next to ``val_X``: ``train/X``;
    * several evaluation sets (``eval_<set>_loss``, HF Trainer with a dict of eval
      datasets) and no plain ``eval_loss``: the primary set's loss is ``val/loss`` and its
      metrics ``val/<metric>``; the other sets keep ``val/<set>_<metric>``.
    """
    names = list(dict.fromkeys(raw_names))
    lower = {n.lower() for n in names}
    out = {raw: canonical_name(raw) for raw in names}
    for raw in names:
        low = raw.lower()
        for suffix in ("_step", "_epoch"):
            if not low.endswith(suffix) or raw.lower() in _ALIAS_INDEX:
                continue
            base = raw[: -len(suffix)]
            target, rank = canonical_name(base)
            if rank >= _KEEP_RANK:
                continue
            if suffix == "_epoch" and f"{base.lower()}_step" in lower:
                out[raw] = (f"{target}_epoch", _PATTERN_RANK)
            else:
                out[raw] = (target, rank + (0.25 if suffix == "_step" else 0.5))
        if low.endswith("_epoch") and f"{low[:-6]}_step" in lower and raw.lower() in _ALIAS_INDEX:
            target, _ = out[raw]
            out[raw] = (f"{target}_epoch", _PATTERN_RANK)
        if out[raw][1] >= _KEEP_RANK and any(p + low in lower for p in _VAL_PREFIXES):
            out[raw] = (f"train/{raw}", _PATTERN_RANK)
    _eval_sets(names, out)
    return out


def _eval_sets(names: list[str], out: dict[str, tuple[str, float]]) -> None:
    if any(target == fmt.VAL_LOSS and rank < _PATTERN_RANK for target, rank in out.values()):
        return  # a plain eval_loss/val_loss: that is the validation loss
    sets = []
    lower = {n.lower() for n in names}
    for raw in names:
        m = _EVAL_SET_LOSS.match(raw)
        if m and m.group("set").lower() not in ("", "train"):
            part = m.group("set").lower()
            if any(f"train{sep}{part}_loss" in lower for sep in ("/", "_")):
                continue  # val/box_loss beside train/box_loss: a loss component, not a set
            sets.append((raw[: m.start("set")], m.group("set")))
    if not sets:
        return
    by_name = {s.lower(): (prefix, s) for prefix, s in sets}
    primary = next((by_name[n] for n in PRIMARY_EVAL_SETS if n in by_name), sets[0])
    prefix, name = primary
    head = f"{prefix}{name}"
    for raw in names:
        if raw.lower().startswith(head.lower()) and raw[len(head) : len(head) + 1] in ("_", "/"):
            metric = raw[len(head) + 1 :]
            target, rank = canonical_name(f"val_{metric}")
            out[raw] = (target, min(rank, _PATTERN_RANK) - 0.5)


def resolve_names(
    raw_names: Iterable[str],
    overrides: Mapping[str, str] | None = None,
    hints: Mapping[str, str] | None = None,
) -> tuple[dict[str, str | None], list[str]]:
    """Map source names to runlens names: ``--map`` overrides first, then the importer's
    ``hints`` (what the log's layout says), then the defaults (:func:`default_names`).

    Returns ``{source name: runlens name or None (dropped)}`` and warnings about
    collisions (two source names mapping to one runlens name).
    """
    overrides = overrides or {}
    hints = hints or {}
    raw_names = list(raw_names)
    defaults = default_names(raw_names)
    wanted: dict[str, tuple[str, float]] = {}
    out: dict[str, str | None] = {}
    for raw in raw_names:
        if raw in overrides:
            dst = overrides[raw]
            if not dst:
                out[raw] = None
                continue
            wanted[raw] = (dst, -2)  # explicit mapping beats every default
        elif raw in hints:
            wanted[raw] = (canonical_name(hints[raw])[0] if hints[raw] else raw, -1)
        else:
            wanted[raw] = defaults[raw]
    by_target: dict[str, list[str]] = {}
    for raw, (target, _) in wanted.items():
        by_target.setdefault(target, []).append(raw)
    warnings: list[str] = []
    for target, raws in by_target.items():
        ranked = sorted(raws, key=lambda r: wanted[r][1])  # stable: first seen wins ties
        out[ranked[0]] = target
        for loser in ranked[1:]:
            out[loser] = loser if loser != target else f"source/{loser}"
            warnings.append(
                f"{ranked[0]!r} and {loser!r} both map to {target!r}; "
                f"using {ranked[0]!r} (the other keeps the name {out[loser]!r}; see --map)"
            )
    return out, warnings


# -- writing a run directory ------------------------------------------------------------


def read(path: str | os.PathLike[str], source_format: str, part: int | None = None) -> ImportedLog:
    """Read a log with the importer of ``source_format`` (source names, nothing mapped).
    ``part``: which of the runs appended in one CSV file (see ``csv.parts``)."""
    if part is not None:
        if source_format != CSV:
            raise OptionError(f"only CSV logs hold appended runs, not {source_format}")
        return _module(source_format).read(Path(path), part)
    return _module(source_format).read(Path(path))


def convert(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    source_format: str | None = None,
    mapping: Mapping[str, str] | None = None,
) -> Path:
    """Import the log at ``path`` into the run directory ``out_dir``; return ``out_dir``.

    ``source_format`` None detects it. ``mapping`` maps source names to runlens names
    (see :func:`resolve_names`). ``out_dir`` must not already hold a run.
    """
    from runlens.discover import single

    found = single(path, source_format)
    src, fmt_name = found.path, found.format
    if fmt_name == RUNLENS:
        raise RunLoadError(f"{src} is already a runlens run: nothing to import")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise RunLoadError(f"output directory {out} exists and is not empty")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise RunLoadError(f"output directory {out} is inside the log {src}: choose another")
    log = read(src, fmt_name, found.part)
    write_run(log, src, out, mapping)
    return out


def write_run(
    log: ImportedLog,
    source: Path,
    out_dir: Path,
    mapping: Mapping[str, str] | None = None,
) -> None:
    """Write ``log`` as a runlens run directory (scalars, layers, run.json)."""
    from runlens.importers.components import add_totals

    add_totals(log)
    names, name_warnings = resolve_names([s.name for s in log.scalars], mapping, log.hints)
    warnings = [*log.warnings, *name_warnings]
    if mapping:
        unused = sorted(set(mapping) - set(names))
        if unused:
            warnings.append(f"--map names not in this log: {', '.join(unused)}")

    kept = [(names[s.name], s) for s in log.scalars if names.get(s.name)]
    if not kept and log.layers is None:
        raise RunLoadError(f"{source}: no metrics found in this {log.source_format} log")
    out_dir.mkdir(parents=True, exist_ok=True)
    if kept:
        fmt.write_segment(_scalars_table(kept), fmt.segment_path(out_dir, fmt.SCALARS_DIR, 0, 0))
    if log.layers is not None and log.layers.num_rows:
        fmt.write_segment(log.layers, fmt.segment_path(out_dir, fmt.LAYERS_DIR, 0, 0))

    steps = [s.steps for _, s in kept if len(s.steps)]
    walls = np.concatenate([s.wall_time for _, s in kept]) if kept else np.array([])
    walls = walls[np.isfinite(walls)]
    mtime = max((f.stat().st_mtime for f in _safe_inputs(source, log.source_format)), default=0)
    meta = fmt.new_run_json(
        run_id=_run_id(source),
        name=log.name,
        start_time=float(walls.min()) if walls.size else float(mtime),
    )
    meta.update(
        kind="train",
        status=fmt.STATUS_FINISHED,
        end_time=float(walls.max()) if walls.size else float(mtime),
        last_step=int(max(int(s.max()) for s in steps)) if steps else None,
        config=log.config,
        source_format=log.source_format,
        imported={
            "source": str(source.resolve()),
            "importer_version": IMPORTER_VERSION,
            "imported_at": time.time(),
            "names": {raw: dst for raw, dst in names.items()},
            "warnings": warnings,
            "x_axis": log.x_axis,
            **_plan(log),
        },
    )
    if log.summary_extras:
        meta["summary_extras"] = log.summary_extras
    fmt.write_json_atomic(meta, out_dir / fmt.RUN_JSON)


def _plan(log: ImportedLog) -> dict[str, Any]:
    """run.json ``imported.planned`` / ``imported.reached`` in the units of the plan."""
    p = log.planned
    if not p or not isinstance(p.get("total"), int) or not isinstance(p.get("reached"), int):
        return {}
    return {
        "planned": {"total": p["total"], "unit": p.get("unit", "step"),
                    "source": p.get("source", "")},
        "reached": p["reached"],
    }  # fmt: skip


def _scalars_table(kept: list[tuple[str | None, ScalarSeries]]) -> pa.Table:
    names = [n for n, _ in kept]
    counts = np.array([len(s.steps) for _, s in kept], dtype=np.int64)
    codes = np.repeat(np.arange(len(kept), dtype=np.int32), counts)
    return pa.table(
        {
            "step": pa.array(np.concatenate([s.steps for _, s in kept]).astype(np.int64)),
            "wall_time": pa.array(
                np.concatenate([s.wall_time for _, s in kept]).astype(np.float64)
            ),
            "name": pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(names, pa.string())),
            "value": pa.array(np.concatenate([s.values for _, s in kept]).astype(np.float64)),
        },
        schema=fmt.SCALARS_SCHEMA,
    )


def _safe_inputs(source: Path, source_format: str) -> list[Path]:
    try:
        return inputs(source, source_format)
    except (OSError, RunLoadError):
        return []


def _run_id(source: Path) -> str:
    return hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:32]


def layers_table(columns: dict[str, Any], n: int) -> pa.Table:
    """A LAYERS_SCHEMA table of ``n`` rows from the given columns; the rest null."""
    arrays = []
    for f in fmt.LAYERS_SCHEMA:
        if f.name in columns:
            col = columns[f.name]
            if pa.types.is_dictionary(f.type):
                arrays.append(pa.array(col, pa.string()).dictionary_encode())
            else:
                arrays.append(pa.array(col, f.type))
        else:
            arrays.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(arrays, schema=fmt.LAYERS_SCHEMA)
