"""TensorBoard event files → scalars and (from histograms) layer statistics.

Reading uses TensorBoard's own maintained record reader
(``tensorboard.backend.event_processing.event_file_loader.RawEventFileLoader``) and
``Event`` protos; install it with ``pip install 'runlens[tensorboard]'``. We parse the
raw records ourselves instead of going through ``EventAccumulator`` because it keeps
every value as a Python object per point; the values are the same.

* Scalars: ``simple_value`` (PyTorch's ``SummaryWriter``, TF1) and scalar tensors
  (TF2 ``tf.summary.scalar``). Tags of event files in sub-directories are prefixed with
  the sub-directory (``add_scalars`` writes one per curve): ``<subdir>/<tag>``.
* Histograms (``add_histogram``; TF2 ``tf.summary.histogram``) become ``layers`` rows.
  From a PyTorch/TF1 ``HistogramProto`` (exact min, max, count, sum, sum of squares):
  ``numel``, ``mean``, ``std``, ``norm`` and ``absmax`` are exact; ``frac_zero`` is the
  share of values in buckets lying within ±1e-10 (0 when min > 0 or max < 0; null when
  the buckets are too coarse to tell). From a TF2 bucket tensor only bucket edges are
  known: ``mean``/``std``/``norm`` assume values spread uniformly within a bucket and
  ``absmax`` is the outer edge of the outermost non-empty bucket. Everything else
  (``frac_nonfinite``, ``update_ratio``, the fixed-bin ``hist``...) is null.
* Histogram tag → (layer, kind), see :func:`layer_and_kind`.
* When every scalar tag is ``epoch_*`` (Keras' callback: ``train/epoch_loss`` at step =
  epoch), the run's x axis is ``epoch``.

A truncated last record (a run killed while writing) is dropped with a warning, as
TensorBoard itself does; a file with no readable record at all is an error.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from runlens_collect import format as fmt

from runlens.errors import RunLoadError
from runlens.importers import TENSORBOARD, ImportedLog, ScalarSeries, layers_table

_RECORD_OVERHEAD = 16  # TFRecord framing: u64 length, u32 crc, payload, u32 crc
_ZERO_EPS = 1e-10

_GRAD_PREFIX = re.compile(r"^(?:grad|grads|gradient|gradients)[/.](.+)$", re.IGNORECASE)
_GRAD_SUFFIX = re.compile(r"^(.+?)[/._](?:grad|grads|gradient|gradients)$", re.IGNORECASE)
_WEIGHT_PREFIX = re.compile(r"^(?:weight|weights|param|params|parameters)[/.](.+)$", re.I)
_ACT_PREFIX = re.compile(r"^(?:activation|activations|act|acts)[/.](.+)$", re.IGNORECASE)
_ACT_SUFFIX = re.compile(r"^(.+?)[/._](?:activation|activations|act|acts)$", re.IGNORECASE)
_UPDATE_PREFIX = re.compile(r"^(?:update|updates)[/.](.+)$", re.IGNORECASE)


def layer_and_kind(tag: str) -> tuple[str, str]:
    """Map a histogram tag to (layer, kind).

    ``grad(s)/X``, ``gradient(s)/X``, ``X/grad``, ``X.grad``, ``X_grad`` → (X, grad);
    ``activation(s)/X``, ``X/activation(s)`` → activation; ``update(s)/X`` → update;
    ``weight(s)/X``, ``param(s)/X``, ``parameters/X`` and anything else → weight. Slashes
    in the layer become dots, so ``fc1/weight`` is the parameter ``fc1.weight``.
    """
    rules = (
        (_GRAD_PREFIX, fmt.KIND_GRAD),
        (_GRAD_SUFFIX, fmt.KIND_GRAD),
        (_ACT_PREFIX, fmt.KIND_ACTIVATION),
        (_ACT_SUFFIX, fmt.KIND_ACTIVATION),
        (_UPDATE_PREFIX, fmt.KIND_UPDATE),
        (_WEIGHT_PREFIX, fmt.KIND_WEIGHT),
    )
    for rx, kind in rules:
        m = rx.match(tag)
        if m:
            return m.group(1).replace("/", "."), kind
    return tag.replace("/", "."), fmt.KIND_WEIGHT


def _tb() -> tuple[Any, Any, Any]:
    try:
        from tensorboard.backend.event_processing import event_file_loader
        from tensorboard.compat.proto import event_pb2
        from tensorboard.util import tensor_util
    except ImportError:
        raise RunLoadError(
            "reading TensorBoard logs needs the tensorboard package: "
            "pip install 'runlens[tensorboard]'"
        ) from None
    return event_file_loader, event_pb2, tensor_util


def inputs(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(f for f in path.rglob("*tfevents*") if f.is_file())
    if not files:
        raise RunLoadError(f"no TensorBoard event files (*tfevents*) under {path}")
    return files


def read(path: Path) -> ImportedLog:
    loader_mod, event_pb2, tensor_util = _tb()
    root = path if path.is_dir() else path.parent
    # Scalars as parallel flat lists (tag id, step, value, wall), grouped by tag at the end:
    # cheaper per point than one list object per tag.
    tag_ids: dict[str, int] = {}
    ids: list[int] = []
    steps: list[int] = []
    values: list[float] = []
    walls: list[float] = []
    hist_rows: dict[str, list[Any]] = {k: [] for k in _HIST_COLUMNS}
    warnings: list[str] = []
    plugin_of: dict[str, str] = {}  # tag -> plugin name (metadata comes with the first value)
    good_files = 0
    for f in inputs(path):
        prefix = f.parent.relative_to(root).as_posix() if f.parent != root else ""
        consumed = records = 0
        try:
            for rec in loader_mod.RawEventFileLoader(str(f)).Load():
                consumed += len(rec) + _RECORD_OVERHEAD
                records += 1
                try:
                    event = event_pb2.Event.FromString(rec)
                except Exception:  # a record with a valid CRC but not an Event
                    raise RunLoadError(f"{f}: not a TensorBoard event file") from None
                if not event.HasField("summary"):
                    continue
                step, wall = int(event.step), float(event.wall_time)
                for v in event.summary.value:
                    tag = f"{prefix}/{v.tag}" if prefix else v.tag
                    if v.metadata.plugin_data.plugin_name:
                        plugin_of[tag] = v.metadata.plugin_data.plugin_name
                    kind = v.WhichOneof("value")
                    if kind == "simple_value":
                        ids.append(tag_ids.setdefault(tag, len(tag_ids)))
                        steps.append(step)
                        values.append(v.simple_value)
                        walls.append(wall)
                    elif kind == "histo":
                        _hist_proto_row(hist_rows, tag, step, v.histo)
                    elif kind == "tensor":
                        plugin = plugin_of.get(tag, "")
                        if plugin == "scalars" or (not plugin and _is_scalar_tensor(v.tensor)):
                            arr = np.asarray(tensor_util.make_ndarray(v.tensor))
                            ids.append(tag_ids.setdefault(tag, len(tag_ids)))
                            steps.append(step)
                            values.append(float(arr.reshape(-1)[0]))
                            walls.append(wall)
                        elif plugin == "histograms":
                            arr = np.asarray(tensor_util.make_ndarray(v.tensor), np.float64)
                            _hist_tensor_row(hist_rows, tag, step, arr)
        except RunLoadError:
            raise
        except Exception as exc:  # the reader's own errors: unreadable file
            raise RunLoadError(f"{f}: unreadable TensorBoard event file ({exc})") from None
        size = f.stat().st_size
        if records == 0 and size > 0:
            raise RunLoadError(f"{f}: not a TensorBoard event file or truncated (no record)")
        if consumed < size:
            warnings.append(
                f"{f.name}: truncated or corrupt after {records} records; "
                f"{size - consumed} trailing bytes ignored"
            )
        good_files += records > 0
    if not good_files:
        raise RunLoadError(f"{path}: the TensorBoard event files are empty")
    series = _group(tag_ids, ids, steps, values, walls)
    n = len(hist_rows["step"])
    layers = layers_table(hist_rows, n) if n else None
    if not series and layers is None:
        raise RunLoadError(f"{path}: no scalars or histograms in these TensorBoard files")
    name = (path if path.is_dir() else path.parent).name
    # Keras' TensorBoard callback logs epoch_loss, epoch_accuracy... at step = epoch.
    epochs = bool(series) and all(s.name.rsplit("/", 1)[-1].startswith("epoch_") for s in series)
    return ImportedLog(
        TENSORBOARD,
        name,
        series,
        layers=layers,
        warnings=warnings,
        x_axis="epoch" if epochs else "step",
    )


def _group(
    tag_ids: dict[str, int],
    ids: list[int],
    steps: list[int],
    values: list[float],
    walls: list[float],
) -> list[ScalarSeries]:
    """Split the flat point lists into one series per tag, each in file order."""
    id_arr = np.asarray(ids, np.int64)
    order = np.argsort(id_arr, kind="stable")
    bounds = np.searchsorted(id_arr[order], np.arange(len(tag_ids) + 1))
    st, va, wa = (np.asarray(a)[order] for a in (steps, values, walls))
    return [
        ScalarSeries(
            tag,
            st[bounds[i] : bounds[i + 1]].astype(np.int64),
            va[bounds[i] : bounds[i + 1]].astype(np.float64),
            wa[bounds[i] : bounds[i + 1]].astype(np.float64),
        )
        for tag, i in tag_ids.items()
    ]


def _is_scalar_tensor(t: Any) -> bool:
    # Without plugin metadata (it is only on a tag's first value), a 0-d float is a scalar.
    return len(t.tensor_shape.dim) == 0 and t.dtype in (1, 2, 19)  # float, double, half


_HIST_COLUMNS = ("step", "layer", "kind", "numel", "missing", "mean", "std", "norm", "absmax",
                 "frac_zero")  # fmt: skip


def _add_row(rows: dict[str, list[Any]], tag: str, step: int, **stats: Any) -> None:
    layer, kind = layer_and_kind(tag)
    rows["step"].append(step)
    rows["layer"].append(layer)
    rows["kind"].append(kind)
    rows["missing"].append(False)
    for k in ("numel", "mean", "std", "norm", "absmax", "frac_zero"):
        rows[k].append(stats[k])


def _hist_proto_row(rows: dict[str, list[Any]], tag: str, step: int, h: Any) -> None:
    num = float(h.num)
    if num <= 0:
        _add_row(rows, tag, step, numel=0, mean=None, std=None, norm=None, absmax=None,
                 frac_zero=None)  # fmt: skip
        return
    mean = h.sum / num
    var = max(h.sum_squares / num - mean * mean, 0.0)
    _add_row(
        rows,
        tag,
        step,
        numel=round(num),
        mean=mean,
        std=math.sqrt(var),
        norm=math.sqrt(max(h.sum_squares, 0.0)),
        absmax=max(abs(h.min), abs(h.max)),
        frac_zero=_frac_zero(h, num),
    )


def _frac_zero(h: Any, num: float) -> float | None:
    if h.min > 0 or h.max < 0:
        return 0.0
    if h.min == 0 and h.max == 0:
        return 1.0
    limits = np.asarray(h.bucket_limit, np.float64)
    counts = np.asarray(h.bucket, np.float64)
    if limits.size == 0 or limits.size != counts.size:
        return None
    left = np.concatenate([[h.min], limits[:-1]])
    tight = (np.abs(left) <= _ZERO_EPS) & (np.abs(limits) <= _ZERO_EPS)
    if not tight.any():
        return None
    return float(counts[tight].sum() / num)


def _hist_tensor_row(rows: dict[str, list[Any]], tag: str, step: int, arr: np.ndarray) -> None:
    if arr.ndim != 2 or arr.shape[1] != 3:
        return
    left, right, counts = arr[:, 0], arr[:, 1], arr[:, 2]
    num = float(counts.sum())
    if num <= 0:
        _add_row(rows, tag, step, numel=0, mean=None, std=None, norm=None, absmax=None,
                 frac_zero=None)  # fmt: skip
        return
    # Uniform within each bucket: E[x] = (l+r)/2, E[x²] = (l² + lr + r²)/3.
    ex = float((counts * (left + right) / 2).sum() / num)
    ex2 = float((counts * (left * left + left * right + right * right) / 3).sum() / num)
    nz = counts > 0
    tight = (np.abs(left) <= _ZERO_EPS) & (np.abs(right) <= _ZERO_EPS)
    _add_row(
        rows,
        tag,
        step,
        numel=round(num),
        mean=ex,
        std=math.sqrt(max(ex2 - ex * ex, 0.0)),
        norm=math.sqrt(max(ex2 * num, 0.0)),
        absmax=float(np.maximum(np.abs(left[nz]), np.abs(right[nz])).max()),
        frac_zero=float(counts[tight].sum() / num) if tight.any() else None,
    )
