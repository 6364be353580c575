"""What a scalar name says about the series: its direction, whether it is a schedule,
and which validation metric is the run's task metric.

One place for these rules, so the header, the curve table, the findings, ``compare`` and
the HTML report read a name the same way (docs/report-schema.md, docs/compare.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

from runlens_collect import format as fmt

Mode = Literal["min", "max"]

# Metric direction (docs/compare.md): the last path segment of the name is split into
# words; a "higher is better" word wins, else a "lower is better" word, else unknown.
HIGHER_IS_BETTER: Final = frozenset(
    {
        "acc", "accuracy", "top1", "top5", "f1", "auc", "auroc", "roc", "precision",
        "recall", "iou", "miou", "map", "bleu", "rouge", "rouge1", "rouge2", "rougel",
        "rougelsum", "r2", "dice", "score", "reward", "return", "correct", "throughput",
        "exact", "em", "matthews", "mcc", "pearson", "spearmanr", "sacrebleu", "chrf",
    }
)  # fmt: skip
LOWER_IS_BETTER: Final = frozenset(
    {"loss", "error", "err", "nll", "mse", "mae", "rmse", "perplexity", "ppl", "cer", "wer"}
)

# Words that name how a series was produced, not what the model scores: never a task metric.
_NOT_TASK: Final = frozenset(
    {"runtime", "samples", "steps", "second", "per", "epoch", "flos", "time", "jit",
     "compilation", "throughput", "mem", "memory", "count", "num", "batch"}
)  # fmt: skip

# Preferred task metrics, best first (the metric people pick checkpoints by).
_TASK_PRIORITY: Final = (
    "wer", "cer", "f1", "accuracy", "acc", "exact", "em", "bleu", "sacrebleu", "rouge",
    "rougel", "rouge1", "rouge2", "rougelsum", "chrf", "matthews", "mcc", "auc", "auroc",
    "roc", "map", "miou", "iou", "dice", "top1", "top5", "precision", "recall", "pearson",
    "spearmanr", "r2", "score", "mae", "rmse", "mse", "perplexity", "ppl", "error", "err",
)  # fmt: skip

_SCHEDULE_NAMES: Final = frozenset(
    {"lr", "learning_rate", "epoch", "momentum", "weight_decay", "wd", "beta1", "beta2"}
)
_SCHEDULE_PREFIXES: Final = (fmt.LR_PREFIX, "lr-", "momentum/", "schedule/", "wd/")


def _words(name: str) -> list[str]:
    last = name.rsplit("/", 1)[-1].lower()
    return [w for w in re.split(r"[^a-z0-9]+", last) if w]


def direction(name: str) -> Mode | None:
    """``min`` / ``max`` when the name says which way is better, else None."""
    words = _words(name)
    if any(w in HIGHER_IS_BETTER for w in words):
        return "max"
    if any(w in LOWER_IS_BETTER for w in words):
        return "min"
    return None


def metric_mode(name: str) -> tuple[Mode, str]:
    """(direction, why) for a metric name; lower is better when the name does not say."""
    for w in _words(name):
        if w in HIGHER_IS_BETTER:
            return "max", f"higher is better ('{w}' in the name)"
    for w in _words(name):
        if w in LOWER_IS_BETTER:
            return "min", f"lower is better ('{w}' in the name)"
    return "min", "lower is better (default: no known word in the name)"


def is_schedule(name: str, meta: Mapping[str, Any] | None = None) -> bool:
    """True for a series the training loop sets rather than measures (learning rate,
    momentum, the epoch counter...), or one the run lists as a schedule
    (``run.json`` ``imported.schedules``). Schedules are shown raw, never smoothed."""
    low = name.lower()
    if low in _SCHEDULE_NAMES or low.startswith(_SCHEDULE_PREFIXES):
        return True
    listed = ((meta or {}).get("imported") or {}).get("schedules") if meta else None
    return isinstance(listed, list) and name in listed


def task_metric(names: Iterable[str]) -> str | None:
    """The validation metric a checkpoint is usually chosen by (``val/wer``,
    ``val/accuracy``, ``val/f1``...), or None when the run logs none besides the loss.

    Candidates are ``val/*`` series other than losses and timing counters whose name has
    a known direction word; the word earliest in the priority list wins (WER before
    accuracy, accuracy before precision...), then the name."""
    best: tuple[int, int, str] | None = None
    for name in names:
        if not name.startswith("val/") or name.count("/") != 1:
            continue
        words = _words(name)
        if not words or "loss" in words or any(w in _NOT_TASK for w in words):
            continue
        ranks = [_TASK_PRIORITY.index(w) for w in words if w in _TASK_PRIORITY]
        if not ranks:
            continue
        key = (min(ranks), len(words), name)  # val/accuracy before val/test_accuracy
        if best is None or key < best:
            best = key
    return best[2] if best else None
