"""The runlens run format, version 1: the contract between collector and analyzer.

A run is a directory::

    RUN_DIR/
      run.json                         metadata (see RUN_JSON_KEYS), rewritten atomically
      events.jsonl                     one JSON object per line (see EVENT_KINDS)
      scalars/rank=0/part-000000.parquet   long table, SCALARS_SCHEMA
      layers/rank=0/part-000000.parquet    one row per (step, tensor, kind), LAYERS_SCHEMA

Segments are complete Parquet files written under a hidden temporary name and renamed
into place (``write_segment``), so a reader never sees a half-written file and a killed
writer loses at most the rows it had not yet flushed. The ``rank=N`` folders are Hive
partitions: polars, DuckDB and Spark read the tables directly.

This module is imported by both halves, so it depends only on the standard library,
numpy and pyarrow. It must never import torch (the analyzer does not have it).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION: Final = 1
"""Bumped on any incompatible change. Readers refuse versions newer than they know."""

RUN_JSON: Final = "run.json"
EVENTS_JSONL: Final = "events.jsonl"
SCALARS_DIR: Final = "scalars"
LAYERS_DIR: Final = "layers"
SEGMENT_GLOB: Final = "rank=*/part-*.parquet"

# -- run.json ---------------------------------------------------------------------------

STATUS_RUNNING: Final = "running"
STATUS_FINISHED: Final = "finished"
STATUS_CRASHED: Final = "crashed"
STATUSES: Final = (STATUS_RUNNING, STATUS_FINISHED, STATUS_CRASHED)

RUN_JSON_KEYS: Final = {
    "schema_version": "int, SCHEMA_VERSION of the writer",
    "run_id": "str, unique id (hex)",
    "name": "str, human name (defaults to the directory name)",
    "kind": "str, 'train' for ordinary runs; sanity runs use e.g. 'lr_range_test'",
    "start_time": "float, UNIX seconds",
    "end_time": "float | null, UNIX seconds when closed",
    "status": "'running' | 'finished' | 'crashed'",
    "last_step": "int | null, last step flushed to disk",
    "host": "str, hostname",
    "world_size": "int, torch.distributed world size (1 when not distributed)",
    "versions": "dict, python / torch / numpy / pyarrow / runlens_collect versions",
    "device": "str, device of the model's first parameter, e.g. 'cpu', 'cuda:0'",
    "config": "dict, the user's config, as given (JSON-able values only)",
    "collector": "dict, the collector settings in effect; its `memory` and `sampling` "
    "entries: see COLLECTOR_MEMORY_KEYS, COLLECTOR_SAMPLING_KEYS",
    "model": "dict, see MODEL_SUMMARY_KEYS",
    "repro": "dict, reproducibility record (command line, seeds, git, flags)",
    "source_format": "str, 'runlens' when the collector wrote the run; for a log converted "
    "by `runlens import`: 'tensorboard' | 'csv' | 'hf-trainer'",
    "imported": "dict | null, for converted logs: {source (absolute path of the log), "
    "importer_version, imported_at (UNIX s), names (source name -> runlens name, null = "
    "dropped), warnings (list of str, shown as run warnings), x_axis ('step' | 'epoch': "
    "what steps count), planned ({total, unit, source}: the length the log was planned "
    "for, when it says) and reached (how far it got, in that unit), schedules (optional "
    "list of names shown raw, never smoothed)}",
    "summary_extras": "dict, extra facts for the report's run summary (JSON scalars), e.g. "
    "an imported Hugging Face run's train_runtime",
    "task": "dict | null, what the model was trained to do, as the writer saw it (see "
    "TASK_KEYS); null when not known. Runs written before this key existed lack it: read "
    "as null",
}

MODEL_SUMMARY_KEYS: Final = {
    "class": "str, class name of the root module",
    "num_params": "int, total number of parameter elements",
    "modules": "list of {path, type, params: [{name, shape, numel, requires_grad}]}",
    "output_shape": "list[int] | null, shape of the root module's output, once seen",
}

# -- run.json "collector": what the budgets left out (issue 17) -------------------------
# Parameter rows are *sampled*: frozen parameters (requires_grad=False) only on full steps,
# updates of a rotating subset per stat step when the snapshot of all trainable parameters
# does not fit the memory budget, and all cadences thinned to the overhead budget. A row
# a step did not sample is absent (not a row with missing=true): readers treat the gap as
# "not sampled" (the analyzer's layer matrices hold the last sampled value).

COLLECTOR_MEMORY_KEYS: Final = {
    "budget_bytes": "int, the memory_budget in effect (bytes of device memory the collector "
    "may hold: its buffers and temporaries)",
    "held_bytes": "int, bytes of buffers held after setup",
    "trainable_bytes": "int, bytes of the parameters with requires_grad",
    "frozen_bytes": "int, bytes of the parameters without (recorded on full steps only)",
    "update_subsets": "int, K: the trainable parameters the optimizer holds are cut into K "
    "subsets whose snapshots fit half the budget, one per stat step in turn, so each has "
    "an update row at least every K stat steps (1: all every stat step; 0: no updates)",
    "update_cut_tensors": "list of str, tensors larger than the snapshot share: each stat "
    "step that covers one records the update of a run of its rows (row `numel` says how "
    "many elements; update_ratio over the same rows)",
}

COLLECTOR_SAMPLING_KEYS: Final = {
    "overhead_target": "float | null, the overhead knob: share of the step time the collector "
    "may spend on the training thread (null: fixed cadences)",
    "adaptive": "bool, whether the cadences adapted to it",
    "changes": "int, cadence changes (each a `cadence` event)",
    "every": "[min, max] steps between weight/grad/update rows over the run",
    "activation_every": "[min, max] steps between activation and output rows",
    "hist_every": "[min, max] steps between histograms",
    "frozen_every": "[min, max] steps between full steps (frozen parameters' rows)",
    "last": "{step, every, activation_every, hist_every, frozen_every}: the cadence in effect "
    "from that step to the end",
    "measured_overhead": "float | null, the collector's time on the training thread over the "
    "step time without it, whole run (written at close)",
}

# -- run.json "task" --------------------------------------------------------------------
# Written by whoever saw the loss function or the model class (the collector from a
# cross_entropy call and the logits' class dim, an integration from the Hugging Face model
# class). The analyzer's chance level ln(C) comes from here or from the user's config,
# never from the output's shape: a segmentation map's last dim is its width, not C.

TASK_CLASSIFICATION: Final = "classification"
TASK_MULTILABEL: Final = "multilabel"
TASK_REGRESSION: Final = "regression"
TASK_LANGUAGE_MODELING: Final = "language-modeling"
TASK_UNKNOWN: Final = "unknown"
TASK_TYPES: Final = (
    TASK_CLASSIFICATION,
    TASK_MULTILABEL,
    TASK_REGRESSION,
    TASK_LANGUAGE_MODELING,
    TASK_UNKNOWN,
)

TASK_KEYS: Final = {
    "type": "'classification' (one label of C per example or per position: cross_entropy, "
    "nll_loss) | 'multilabel' (independent binary labels: binary_cross_entropy[_with_logits]) "
    "| 'regression' (mse, l1, huber, ...) | 'language-modeling' (next/masked-token "
    "prediction over a vocabulary) | 'unknown'",
    "num_classes": "int | null, classes C of a classification (the logits' class dim), "
    "labels of a multilabel task, vocabulary size of a language model; null when not seen",
    "source": "str, how it was found, e.g. 'loss:cross_entropy', 'loss:mse', "
    "'model:GPT2LMHeadModel', 'labels', 'config'",
}


def task_record(task_type: str, num_classes: int | None = None, source: str = "") -> dict[str, Any]:
    """The run.json ``task`` value; raises ValueError on a type not in TASK_TYPES."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"task type must be one of {TASK_TYPES}, got {task_type!r}")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    return {"type": task_type, "num_classes": num_classes, "source": str(source)}


def read_task(meta: dict[str, Any]) -> dict[str, Any] | None:
    """run.json's ``task`` as written by :func:`task_record`, or None when it is absent
    (older runs), null or malformed (a reader never fails on it)."""
    task = meta.get("task")
    if not isinstance(task, dict) or task.get("type") not in TASK_TYPES:
        return None
    n = task.get("num_classes")
    ok = isinstance(n, int) and not isinstance(n, bool) and n >= 1
    return {
        "type": task["type"],
        "num_classes": n if ok else None,
        "source": str(task.get("source") or ""),
    }


# -- scalars ----------------------------------------------------------------------------

SCALARS_SCHEMA: Final = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("wall_time", pa.float64(), nullable=False),
        pa.field("name", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        pa.field("value", pa.float64()),
    ]
)

# Canonical scalar names. User metrics keep the names they were logged with.
TRAIN_LOSS: Final = "train/loss"
VAL_LOSS: Final = "val/loss"
VAL_ACCURACY: Final = "val/accuracy"
LR_PREFIX: Final = "lr/"  # one per optimizer param group: lr/0, lr/1, ...
GRAD_NORM: Final = "grad_norm"
"""Total L2 norm of all gradients as the optimizer receives them: after accumulation,
after AMP unscaling and after any clipping the user applied before ``optimizer.step()``."""
TIME_STEP: Final = "time/step"
"""Seconds between the ends of two consecutive steps (host wall clock)."""
TIME_DATA: Final = "time/data"
"""Seconds from the end of one step to the start of the next forward: waiting for data."""
TIME_COMPUTE: Final = "time/compute"
"""time/step - time/data: forward, backward, optimizer step."""


def lr_name(group: int) -> str:
    return f"{LR_PREFIX}{group}"


# -- layers -----------------------------------------------------------------------------

KIND_WEIGHT: Final = "weight"
KIND_GRAD: Final = "grad"
KIND_UPDATE: Final = "update"
KIND_ACTIVATION: Final = "activation"
KIND_OUTPUT: Final = "output"
KINDS: Final = (KIND_WEIGHT, KIND_GRAD, KIND_UPDATE, KIND_ACTIVATION, KIND_OUTPUT)
OUTPUT_LAYER: Final = "<output>"
"""Layer name of the rows describing the root module's output (kind 'output')."""

# Statistics present on every layers row (float32; NaN when the tensor is missing).
BASE_STATS: Final = ("mean", "std", "norm", "absmax", "frac_zero", "frac_nonfinite")

# -- fixed histogram bins ---------------------------------------------------------------
# Signed log2-magnitude bins, the same for every tensor and every step, so a histogram is
# a device-side count with no min/max reduction and no host sync.
HIST_LOG2_MIN: Final = -24  # magnitudes below 2**-24 count as zero
HIST_LOG2_MAX: Final = 8  # magnitudes at or above 2**8 go to the overflow bins
HIST_MAG_BINS: Final = HIST_LOG2_MAX - HIST_LOG2_MIN  # one bin per octave
HIST_NUM_BINS: Final = 2 * HIST_MAG_BINS + 3
"""Layout: [neg overflow] [neg octaves, large to small] [zero] [pos octaves, small to
large] [pos overflow]. Non-finite values are not counted (see frac_nonfinite)."""
HIST_ZERO_BIN: Final = HIST_MAG_BINS + 1


def hist_bin_edges() -> np.ndarray:
    """Left edges of the HIST_NUM_BINS bins, plus the final right edge (len = bins + 1).

    Edges are signed values: -inf, -2**8, ..., -2**-24, +2**-24, ..., 2**8, +inf. Bins are
    by magnitude: a positive bin holds 2**k <= x < 2**(k+1), a negative one
    -2**(k+1) < x <= -2**k, and the zero bin |x| < 2**-24.
    """
    pos = 2.0 ** np.arange(HIST_LOG2_MIN, HIST_LOG2_MAX + 1, dtype=np.float64)
    return np.concatenate([[-np.inf], -pos[::-1], pos, [np.inf]])


def hist_bin_index(values: np.ndarray) -> np.ndarray:
    """Reference (numpy) binning of finite values; the collector does the same on device."""
    v = np.asarray(values, dtype=np.float64)
    mag = np.abs(v)
    with np.errstate(divide="ignore"):
        octave = np.floor(np.log2(mag))
    octave = np.clip(octave, HIST_LOG2_MIN - 1, HIST_LOG2_MAX)
    # 0..HIST_MAG_BINS-1 for in-range octaves, HIST_MAG_BINS for overflow
    k = (octave - HIST_LOG2_MIN).astype(np.int64)
    pos = HIST_ZERO_BIN + 1 + k
    neg = HIST_ZERO_BIN - 1 - k
    idx = np.where(v >= 0, pos, neg)
    return np.where(mag < 2.0**HIST_LOG2_MIN, HIST_ZERO_BIN, idx)


LAYERS_SCHEMA: Final = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("layer", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        pa.field("kind", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        pa.field("numel", pa.int64(), nullable=False),
        pa.field("missing", pa.bool_(), nullable=False),
        *[pa.field(s, pa.float32()) for s in BASE_STATS],
        # kind == 'update': ||w_after - w_before|| / ||w_before||
        pa.field("update_ratio", pa.float32()),
        # kind == 'activation': units zero for every example of the batch
        pa.field("frac_dead_units", pa.float32()),
        # kind == 'activation' of bounded activations (tanh, sigmoid, ...): within 1% of a bound
        pa.field("frac_saturated", pa.float32()),
        # kind == 'output' only
        pa.field("min", pa.float32()),
        pa.field("max", pa.float32()),
        pa.field("row_sum_mean", pa.float32()),
        # fixed-bin counts (HIST_NUM_BINS), on histogram steps only
        pa.field("hist", pa.list_(pa.int64())),
    ]
)
LAYERS_COLUMNS: Final = tuple(LAYERS_SCHEMA.names)

# -- events.jsonl -----------------------------------------------------------------------

EVENT_KINDS: Final = {
    "start": "collector started: {run_id, world_size}",
    "nonfinite": "first non-finite value: {step, where: 'scalar'|'layer', name, layer_kind?}",
    "warning": "a collector failure that was swallowed: {message, site, step}",
    "skipped": "statistics dropped because the writer fell behind: {steps, total}",
    "cadence": "the overhead budget changed the cadences from `step` on: {step, every, "
    "activation_every, hist_every, frozen_every}",
    "close": "clean close: {last_step, status}",
}
"""Every event line is a JSON object with ``kind`` (a key of EVENT_KINDS), ``time`` (UNIX
seconds) and ``rank``, plus the fields listed. The layer kind of a ``nonfinite`` event is
``layer_kind`` because ``kind`` names the event."""

# -- writing helpers (used by the collector and by importers) ---------------------------


class SchemaVersionError(ValueError):
    """A run written by a newer runlens than this one."""


def segment_path(run_dir: str | os.PathLike[str], table: str, rank: int, seq: int) -> Path:
    return Path(run_dir) / table / f"rank={rank}" / f"part-{seq:06d}.parquet"


def write_segment(table: pa.Table, path: str | os.PathLike[str]) -> None:
    """Write one complete Parquet segment atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".parquet", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def write_json_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(sanitize_json(obj), fh, indent=2, default=_json_default, allow_nan=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def append_event(run_dir: str | os.PathLike[str], event: dict[str, Any]) -> None:
    line = json.dumps(sanitize_json(event), default=_json_default, allow_nan=False)
    with open(Path(run_dir) / EVENTS_JSONL, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def new_run_json(run_id: str, name: str, start_time: float) -> dict[str, Any]:
    """A run.json with every key of RUN_JSON_KEYS set to its initial value."""
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "name": name,
        "kind": "train",
        "start_time": start_time,
        "end_time": None,
        "status": STATUS_RUNNING,
        "last_step": None,
        "host": socket.gethostname(),
        "world_size": 1,
        "versions": {},
        "device": None,
        "config": {},
        "collector": {},
        "model": {},
        "repro": {},
        "source_format": "runlens",
        "imported": None,
        "summary_extras": {},
        "task": None,
    }


def check_schema_version(meta: dict[str, Any]) -> int:
    """Return the run's schema version, raising SchemaVersionError if we cannot read it."""
    version = meta.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SchemaVersionError(f"run.json has no valid schema_version (got {version!r})")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"run was written with schema version {version}; this runlens reads up to "
            f"{SCHEMA_VERSION}: upgrade runlens"
        )
    if version < 1:
        raise SchemaVersionError(f"unknown schema version {version}")
    return version


def empty_table(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def sanitize_json(obj: Any) -> Any:
    """Make ``obj`` strict-JSON: non-finite floats become null, keys become strings."""
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if np.isfinite(f) else None
    if isinstance(obj, dict):
        return {str(k): sanitize_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [sanitize_json(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return repr(obj)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
