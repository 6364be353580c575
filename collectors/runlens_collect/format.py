"""The runlens run format, version 1: the contract between collector and analyzer.

A run is a directory::

    RUN_DIR/
      run.json                         metadata (see RUN_JSON_KEYS), rewritten atomically
      events.jsonl                     one JSON object per line (see EVENT_KINDS), rank 0
      events-rank1.jsonl ...           the events of the other ranks (events_path)
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
from collections.abc import Iterable
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
STATUS_PREEMPTED: Final = "preempted"
"""Ended by SIGTERM or SIGINT (a scheduler's preemption, Ctrl-C): flushed and closed, but
not finished."""
STATUSES: Final = (STATUS_RUNNING, STATUS_FINISHED, STATUS_CRASHED, STATUS_PREEMPTED)

RUN_JSON_KEYS: Final = {
    "schema_version": "int, SCHEMA_VERSION of the writer",
    "run_id": "str, unique id (hex)",
    "name": "str, human name (defaults to the directory name)",
    "kind": "str, 'train' for ordinary runs; sanity runs use e.g. 'lr_range_test'",
    "start_time": "float, UNIX seconds",
    "end_time": "float | null, UNIX seconds when closed",
    "status": "'running' | 'finished' | 'crashed' | 'preempted' (SIGTERM/SIGINT: flushed and "
    "closed, not finished)",
    "last_step": "int | null, last step flushed to disk",
    "host": "str, hostname",
    "world_size": "int, torch.distributed world size (1 when not distributed)",
    "versions": "dict, python / torch / numpy / pyarrow / runlens_collect versions",
    "device": "str, device of the model's first parameter, e.g. 'cpu', 'cuda:0'",
    "config": "dict, the user's config, as given (JSON-able values only)",
    "collector": "dict, the collector settings in effect, and: kinds_in_effect, rank, "
    "compiled (bool: activation hooks off), devices (device -> parameters recorded there), "
    "data_time (how time/data was measured: 'host' | 'device-events' | 'unreliable', see "
    "DATA_TIME_*), wire_dtype ('float64', or 'float32' on devices without float64), "
    "memory and sampling (see COLLECTOR_MEMORY_KEYS, COLLECTOR_SAMPLING_KEYS)",
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
    "resumed": "list of {step, time, previous_last_step, previous_status, run_id, segments} "
    "(as the `resume` event): each time training "
    "continued into this run directory (a resume from a checkpoint); `step` is the first "
    "step recorded by the continuation. Steps from `step` on recorded earlier are replaced "
    "(the last write wins). Absent or empty: never resumed",
    "probes": "dict, probe name -> what that probe saw at setup and over the run (see "
    "PROBE_JSON_KEYS); absent or {} when no probe ran (older runs, ``probes=()``)",
    "distributed": "dict | null, rank 0's layout under torch.distributed or with sharded "
    "(DTensor) parameters (see DISTRIBUTED_KEYS); every rank's own is in its `start` event "
    "(`layout`). null in single-process runs; absent in runs written before it existed",
}

# -- run.json "distributed" and the `start` event's `layout` (issue 18) ----------------------
# Each rank records what it holds; no collective is ever called. A parameter listed in
# `shards` is a shard: its rows (layer = the global name, numel = the shard's elements)
# describe this rank's part only, and readers combine the shards of a name across ranks
# (norm from sums of squares, mean from sums, counts, extremes, histogram bins; replicas:
# the same offset on several ranks, counted once). Parameters not listed are whole on
# every rank: replicas under data parallelism, compared across ranks by replica-desync.

DISTRIBUTED_KEYS: Final = {
    "rank": "int, this rank",
    "world_size": "int, torch.distributed world size",
    "local_rank": "int | null, LOCAL_RANK set by the launcher (torchrun, deepspeed)",
    "local_world_size": "int | null, LOCAL_WORLD_SIZE set by the launcher",
    "backend": "str | null, the default process group's backend ('gloo', 'nccl', ...)",
    "wrapper": "'DDP' | 'FSDP1' | 'FSDP2' | 'DeepSpeed' | 'DTensor' (DTensor parameters "
    "without FSDP2: tensor parallel) | null: what wraps the model",
    "meshes": "list of str, the device meshes of DTensor parameters: '(dim names):[shape]'",
    "n_params": "int, parameters recorded",
    "n_sharded": "int, of those, shards (DTensor parameters with a Shard placement)",
    "n_replicated": "int, parameters every rank holds whole",
    "shards": "dict, parameter name -> {offset: this shard's offset in each dimension of "
    "the global tensor, shape: the shard's shape, global_shape, placements (str)}",
}

MODEL_SUMMARY_KEYS: Final = {
    "class": "str, class name of the root module",
    "num_params": "int, total number of parameter elements",
    "modules": "list of {path, type, params: [{name, shape, numel, requires_grad, dtype}]}; "
    "dtype is the parameter's storage type at setup (float32, bfloat16, ...), absent in runs "
    "written before it was recorded",
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
after AMP unscaling and after any clipping the user applied before ``optimizer.step()``.
Absent on a step where no parameter had a gradient (runs written before this rule have a
NaN there)."""
GRAD_NORM_PRECLIP: Final = "grad_norm_preclip"
"""Total gradient norm before clipping: what ``torch.nn.utils.clip_grad_norm_`` returned
(the last call of the step)."""
LOSS_SCALE: Final = "amp/loss_scale"
"""The AMP ``GradScaler`` loss scale the step's backward used."""
STEP_SKIPPED: Final = "optim/skipped"
"""1 when the step did not update the parameters (the GradScaler found inf/NaN gradients,
or ``optimizer.step()`` was not called), else 0."""
TIME_STEP: Final = "time/step"
"""Seconds between the ends of two consecutive steps (host wall clock)."""
TIME_DATA: Final = "time/data"
"""Seconds from the end of one step to the start of the next forward: waiting for data."""
TIME_COMPUTE: Final = "time/compute"
"""time/step - time/data: forward, backward, optimizer step."""
SKIP_SENSITIVE: Final = (GRAD_NORM, GRAD_NORM_PRECLIP)
"""Scalars that describe gradients applied by the step: a skipped step's values (inf under
a GradScaler overflow) were never applied, and readers ignore them."""

SCALAR_NAMES: Final = {
    TRAIN_LOSS: "every step: the training loss of the optimizer step, *unscaled* (never "
    "multiplied by an AMP loss scale) and averaged over its micro-batches: the `loss` given "
    "to `step()`, else the mean of the scalars backwarded since the last step (each one's "
    "division by a constant undone when a step backwards several: gradient accumulation); "
    "the Hugging Face integration records the Trainer's own definition (the sum of what "
    "`training_step` backwarded)",
    "train/<name>": "every step: extra keyword arguments of `step()`",
    "lr/0, lr/1, ...": "every step: `lr` of each optimizer param group",
    GRAD_NORM: "every step that applied gradients: total L2 norm of all gradients **as the "
    "optimizer receives them**: after accumulation, unscaled (AMP), **after clipping**. "
    "Absent (not NaN) on a step where no parameter had a gradient",
    GRAD_NORM_PRECLIP: "steps that clipped: total L2 norm **before** clipping (what "
    "`torch.nn.utils.clip_grad_norm_` returned, also through accelerate / Lightning)",
    LOSS_SCALE: "every step under an AMP GradScaler: the loss scale of the step's backward",
    STEP_SKIPPED: "1 on a step whose optimizer update did not happen (GradScaler overflow; "
    "`optimizer.step()` not called), 0 on other steps once a GradScaler is in use. A skipped "
    "step has no grad/update rows and no grad_norm unless the skip was only known on the "
    "device (fused optimizers): readers ignore those (SKIP_SENSITIVE, grad and update rows)",
    "probe/...": "see *probe scalars* below: the silent-bug probes' statistics",
    TIME_STEP: "from the second step: seconds between the ends of two consecutive steps",
    TIME_DATA: "from the second step: seconds the device waited for the next batch; see "
    "run.json `collector.data_time` for how it was measured",
    TIME_COMPUTE: "from the second step: `time/step - time/data`",
    "anything": "when logged: `Collector.log({...})` / `runlens_collect.log({...})` values "
    "under their own names, at the last completed step",
}
"""The scalar names the collector writes, with when and what (docs/run-format.md)."""

DATA_TIME_HOST: Final = "host"
"""run.json ``collector.data_time``: time/data measured on the host clock, exact where the
device runs synchronously with the host (CPU)."""
DATA_TIME_DEVICE_EVENTS: Final = "device-events"
"""... measured on the device's timeline (CUDA events at the end of a step and at the next
forward's start): how long the device idled for the next batch."""
DATA_TIME_UNRELIABLE: Final = "unreliable"
"""... host time on an asynchronous device without timing events: not a data wait."""


def lr_name(group: int) -> str:
    return f"{LR_PREFIX}{group}"


# -- probe scalars (runlens_collect.probes) -----------------------------------------------
# Extra per-step statistics of the collector's probes, the evidence of the silent-bug
# checks (docs/silent-bugs.md). All live under PROBE_PREFIX; a run recorded without a
# probe has none of its names. Counts are host values; the rest are device reductions
# shipped in the step's buffer (no host sync).

PROBE_PREFIX: Final = "probe/"
INPUT_SUM: Final = "probe/input/sum"
INPUT_SUMSQ: Final = "probe/input/sumsq"
INPUT_PROJ: Final = "probe/input/proj"
INPUT_EXAMPLES: Final = "probe/input/examples"
INPUT_NUMEL: Final = "probe/input/numel"
INPUT_FORWARDS: Final = "probe/input/forwards"
INPUT_EVAL_BATCH: Final = "probe/input/eval_batch"
MODE_TRAIN_GRAD: Final = "probe/mode/train_grad"
MODE_TRAIN_NOGRAD: Final = "probe/mode/train_nograd"
MODE_EVAL_GRAD: Final = "probe/mode/eval_grad"
MODE_EVAL_NOGRAD: Final = "probe/mode/eval_nograd"
MODE_DISAGREE_TRAIN: Final = "probe/mode/disagree_train"
MODE_DISAGREE_EVAL: Final = "probe/mode/disagree_eval"
MODE_EVALS_BEFORE_TRAIN: Final = "probe/mode/evals_before_train"
GRAD_CARRY_SQ: Final = "probe/grad/carry_sq"
GRAD_NEW_SQ: Final = "probe/grad/new_sq"
GRAD_CARRY_MASK: Final = "probe/grad/carry_mask"
GRAD_PASSES: Final = "probe/grad/passes"

PROBE_SCALARS: Final = {
    INPUT_SUM: "sum of the elements of the model's first input tensor (the first tensor "
    "argument of the root module's forward, else of its keyword arguments), summed over "
    "the step's training forwards (grad enabled; train-mode ones, or eval-mode ones when "
    "the step had no train-mode forward); device, float32",
    INPUT_SUMSQ: "sum of the squared elements of that input, over the same forwards; device",
    INPUT_PROJ: "Σ_j v_j Σ_i x_ij: the input viewed as (batch, rest), summed over the batch "
    "and projected on fixed weights v_j = cos(1.61803·j + 0.5): with sum and sumsq a "
    "fingerprint of the batch's examples that no reordering changes; device",
    INPUT_EXAMPLES: "examples of the step: the input's first dimension summed over the "
    "step's training forwards (host)",
    INPUT_NUMEL: "elements per example of the input (its numel / first dimension) at the "
    "step's last training forward (host)",
    INPUT_FORWARDS: "training forwards of the step (several with gradient accumulation)",
    INPUT_EVAL_BATCH: "largest first dimension of the inputs of no-grad forwards since the "
    "previous step (evaluation batches); absent when there was none",
    MODE_TRAIN_GRAD: "root-module forwards this step with grad enabled and model.training "
    "True (ordinary training forwards)",
    MODE_TRAIN_NOGRAD: "forwards with grad disabled in training mode (evaluation without "
    "model.eval(), or no-grad forwards inside training)",
    MODE_EVAL_GRAD: "forwards with grad enabled in eval mode (training without "
    "model.train(), or evaluation without torch.no_grad())",
    MODE_EVAL_NOGRAD: "forwards with grad disabled in eval mode (ordinary evaluation)",
    MODE_DISAGREE_TRAIN: "at the step's first train-mode forward: mode-dependent modules "
    "(dropout with p > 0, BatchNorm/InstanceNorm with running statistics, spectral norm) "
    "whose own training flag is False",
    MODE_DISAGREE_EVAL: "at the step's first eval-mode forward: mode-dependent modules "
    "whose own training flag is True",
    MODE_EVALS_BEFORE_TRAIN: "recorded once, at step 0: forwards in eval mode before the "
    "first train-mode forward of the run",
    GRAD_CARRY_SQ: "Σ over the probed parameters of ‖p.grad‖² as it was when the first "
    "gradient of an optimizer step arrived (a tensor hook, before accumulation): 0 when "
    "gradients were reset (zero_grad) since the previous optimizer step; device, or a "
    "host 0 when every probed p.grad was None (nothing to measure)",
    GRAD_NEW_SQ: "Σ over the probed parameters whose p.grad was not None at that first "
    "pass of ‖incoming gradient‖²; device; absent when every probed p.grad was None "
    "(then carry_sq is 0)",
    GRAD_CARRY_MASK: "bit i set when probed parameter i (run.json probes.grad.params) "
    "carried a non-zero gradient into this step; device (a host 0 with carry_sq's)",
    GRAD_PASSES: "backward passes that reached the probed parameters during this step (> 1 "
    "with gradient accumulation)",
}

PROBE_JSON_KEYS: Final = {
    "inputs": "{} (the input probe keeps no setup facts)",
    "modes": "{sensitive: mode-dependent modules by class (Dropout, BatchNorm2d, ...), "
    "spectral_norm: paths of modules with torch.nn.utils.spectral_norm (power iteration "
    "only in training mode), disagree_train / disagree_eval: paths (at most 20) of modules "
    "seen with a training flag different from the root's}",
    "grad": "{params: names of the probed parameters, in bit order of "
    "probe/grad/carry_mask; reset: 'optimizer' (after optimizer.step()) or 'step'}",
    "optimizer": "{present: bool, tensors: parameter tensors the optimizer holds, "
    "foreign: of those, tensors that are not parameters of the model, foreign_numel, "
    "frozen_held: model parameters the optimizer holds with requires_grad False (names, at "
    "most 20), n_frozen_held, trainable_outside: model parameters with requires_grad True "
    "in no param group (names, at most 20), n_trainable_outside, checked_at: steps of the "
    "checks (setup is -1)}",
}


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
    "start": "collector started: {run_id, world_size, layout?}; `layout` (see "
    "DISTRIBUTED_KEYS) when distributed or sharded",
    "nonfinite": "first non-finite value: {step, where: 'scalar'|'layer', name, layer_kind?}",
    "warning": "a collector failure that was swallowed: {message, site, step}",
    "skipped": "statistics dropped because the writer fell behind: {steps, total}",
    "cadence": "the overhead budget changed the cadences from `step` on: {step, every, "
    "activation_every, hist_every, frozen_every}",
    "close": "clean close: {last_step, status}",
    "resume": "training continued into this run directory: {step, previous_last_step, "
    "previous_status, run_id, segments: {scalars, layers}}; `segments` are the first segment "
    "numbers this rank's continuation writes: rows of earlier segments at `step` or later "
    "are superseded",
    "signal": "SIGTERM/SIGINT received: the run is flushed and closed as preempted: {signal}",
}
"""Every event line is a JSON object with ``kind`` (a key of EVENT_KINDS), ``time`` (UNIX
seconds) and ``rank``, plus the fields listed. The layer kind of a ``nonfinite`` event is
``layer_kind`` because ``kind`` names the event."""

# -- writing helpers (used by the collector and by importers) ---------------------------


class SchemaVersionError(ValueError):
    """A run written by a newer runlens than this one."""


def segment_path(run_dir: str | os.PathLike[str], table: str, rank: int, seq: int) -> Path:
    return Path(run_dir) / table / f"rank={rank}" / f"part-{seq:06d}.parquet"


EVENTS_RANK_GLOB: Final = "events-rank*.jsonl"


def events_path(run_dir: str | os.PathLike[str], rank: int = 0) -> Path:
    """Where ``rank`` appends its events: ``events.jsonl`` for rank 0, else
    ``events-rank<N>.jsonl`` (one file per process: concurrent appends to one file are
    not atomic on network file systems). Readers read them all."""
    name = EVENTS_JSONL if rank == 0 else f"events-rank{rank}.jsonl"
    return Path(run_dir) / name


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename in directory ``path`` durable (best effort: not every OS or file
    system can open a directory)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- compaction: segment names and which segments a reader reads -------------------------
# A long run leaves many small segments (one per flush). Compaction (runlens_collect.compact)
# merges the segments numbered A..B of one rank into ``part-A-B.parquet`` (written under a
# hidden temporary name, then renamed into place) and only then deletes them. A reader
# therefore reads the *live* segments: a compacted segment replaces every segment whose
# numbers it covers, so whatever moment a reader lists the folder (before the rename, in
# between, after the deletions) it sees each row exactly once.


COMPACT_ROW_GROUP_ROWS: Final = 1 << 16
"""Rows per row group of a compacted segment. Readers decode row groups in parallel:
measured with polars on 1.2M layers rows, 2^15-2^16 rows per group scanned fastest (2-3x
faster than 2^20), and their statistics let a step filter skip most of a file."""
COMPACT_SMALL_ROWS: Final = 1 << 18
"""Segments with fewer rows are merged; larger ones already scan well and stay."""
COMPACT_MAX_FILE_ROWS: Final = 1 << 24
"""Rows per compacted segment at most (a damaged file loses no more than this)."""

ROLL_FANOUT: Final = 8
"""Rolling compaction (the collector's writer, while the run records) merges this many
consecutive segments of one tier into one of the tier above: n flushes leave at most
7 x log8(n) segments (17 at most for 300 flushes) and rewrite each row ~log8(n) times
(1.8 for 300; fanout 4: 12 segments, 3.7 times, twice the writer's merging time)."""

COMPACTION_STEPS: Final = (
    "Per table and rank, the live segments in order are grouped: consecutive readable "
    f"segments with one schema, each of fewer than {COMPACT_SMALL_ROWS:,} rows, up to "
    f"{COMPACT_MAX_FILE_ROWS:,} rows per group (runlens_collect.compact). Larger or "
    "unreadable segments stay as they are.",
    "A group of two or more segments is streamed, one segment at a time, into a hidden "
    "temporary file (`.tmp-compact-*.parquet`, not a segment name) in the rank folder, in "
    f"row groups of {COMPACT_ROW_GROUP_ROWS:,} rows with column statistics (min/max of "
    "`step` lets readers skip row groups), and flushed to disk (fsync).",
    "The file is renamed to `part-A-B.parquet`, A and B the first and last segment numbers "
    "of the group, and the folder fsynced. From then on readers read it and ignore every "
    "segment whose numbers it covers.",
    "The covered segments are deleted (a later compaction deletes any left by a crash, and "
    "any orphan temporary file). A lock left by a process that died is taken over at once "
    "when its holder (process id and host name in the file) was on this host, otherwise "
    "after ten minutes.",
)
"""The compaction protocol, step by step (docs/run-format.md is generated from this)."""

ROLLING_POLICY: Final = (
    "Rolling compaction (the collector's roller thread, after each flush, while the run "
    "records; `Collector(rolling=False)` or `compact=False` turns it off): among the live "
    "segments this writer wrote (numbered from its first segment on: never an earlier "
    "collector's, so never across a resume, and never another rank's), a segment's tier "
    f"is floor(log{ROLL_FANOUT} of the segment numbers it covers). Whenever {ROLL_FANOUT} "
    "consecutive segments of one tier, each of fewer than "
    f"{COMPACT_SMALL_ROWS:,} rows, are there, they are merged into one of the tier above "
    "by steps 2-4, under the same lock file (`.compact.lock` in the rank folder) as "
    "`runlens compact`. So n flushes leave at most "
    f"{ROLL_FANOUT - 1} x log{ROLL_FANOUT}(n) small segments per table and rank, and each "
    f"row is rewritten about log{ROLL_FANOUT}(n) times. A merge reads its segments in "
    f"batches of {COMPACT_ROW_GROUP_ROWS:,} rows (its memory is bounded, whatever their "
    "size). A merged segment holds the rows of the segments it covers in their order."
)
"""When the collector merges segments while the run records (runlens_collect.rolling.roll)."""

READER_RULE: Final = (
    "Readers read the *live* segments of a rank folder (`format.live_segments`): the files "
    "named `part-N.parquet` or `part-A-B.parquet`, in order of their first number, leaving "
    "out any segment whose numbers a `part-A-B.parquet` covers. Writers continue after the "
    "highest number present, covered ones included (`format.next_segment_number`)."
)


def compacted_segment_path(
    run_dir: str | os.PathLike[str], table: str, rank: int, first: int, last: int
) -> Path:
    """Where the segments ``first..last`` of ``rank`` go once merged."""
    return Path(run_dir) / table / f"rank={rank}" / f"part-{first:06d}-{last:06d}.parquet"


def segment_range(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """Segment numbers a file covers: ``part-000007.parquet`` -> (7, 7),
    ``part-000000-000299.parquet`` -> (0, 299); None for any other name."""
    name = os.path.basename(os.fspath(path))
    if not name.startswith("part-") or not name.endswith(".parquet"):
        return None
    parts = name[5:-8].split("-")
    if len(parts) > 2 or not all(p.isdigit() for p in parts):
        return None
    first, last = int(parts[0]), int(parts[-1])
    return (first, last) if first <= last else None


def live_segments(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The segments a reader reads, in row order: by first segment number, each one
    dropped when another (compacted) segment covers its numbers. Files whose names are
    not segment names are ignored."""
    ranged = []
    for p in paths:
        r = segment_range(p)
        if r is not None:
            ranged.append((r[0], -r[1], Path(p)))
    ranged.sort(key=lambda x: (x[0], x[1], x[2].name))
    out: list[Path] = []
    reach = -1
    for _first, neg_last, p in ranged:
        if -neg_last <= reach:  # inside a wider segment already taken
            continue
        out.append(p)
        reach = max(reach, -neg_last)
    return out


def next_segment_number(paths: Iterable[str | os.PathLike[str]]) -> int:
    """One past the highest segment number among ``paths`` (0 if none): where a writer
    continues so that it never reuses a number a compacted segment covers."""
    ranges = [r for r in (segment_range(p) for p in paths) if r is not None]
    return max(r[1] for r in ranges) + 1 if ranges else 0


def segment_steps(path: str | os.PathLike[str]) -> tuple[int, int, int, bool] | None:
    """(first step, last step, rows, complete) of a segment from its Parquet footer's
    ``step`` statistics, without reading data: over the row groups that have them,
    ``complete`` when all do; None when none does. Raises when the footer is unreadable."""
    md = pq.read_metadata(path)
    i = md.schema.to_arrow_schema().get_field_index("step")
    if i < 0:
        return None
    lo: list[int] = []
    hi: list[int] = []
    for g in range(md.num_row_groups):
        st = md.row_group(g).column(i).statistics
        if st is not None and st.has_min_max:
            lo.append(int(st.min))
            hi.append(int(st.max))
    if not lo:
        return None
    return min(lo), max(hi), md.num_rows, len(lo) == md.num_row_groups


def write_segment(table: pa.Table, path: str | os.PathLike[str]) -> None:
    """Write one complete Parquet segment atomically and durably: temp file, fsync,
    rename, fsync of the directory (a node crash can otherwise leave an empty file under
    the final name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".parquet", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def write_json_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """Rewrite a JSON file atomically and durably (temp file, fsync, rename, fsync dir)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(sanitize_json(obj), fh, indent=2, default=_json_default, allow_nan=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def append_event(run_dir: str | os.PathLike[str], event: dict[str, Any], rank: int = 0) -> None:
    append_events(run_dir, [event], rank)


def append_events(
    run_dir: str | os.PathLike[str], events: list[dict[str, Any]], rank: int = 0
) -> None:
    """Append events to ``rank``'s events file and fsync it."""
    if not events:
        return
    text = "".join(
        json.dumps(sanitize_json(e), default=_json_default, allow_nan=False) + "\n" for e in events
    )
    with open(events_path(run_dir, rank), "a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def read_resumed(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """run.json's ``resumed`` entries that have an int ``step`` (a reader never fails)."""
    out = []
    for r in meta.get("resumed") or []:
        if (
            isinstance(r, dict)
            and isinstance(r.get("step"), int)
            and not isinstance(r.get("step"), bool)
        ):
            out.append(r)
    return out


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
        "resumed": [],
        "probes": {},
        "distributed": None,
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
