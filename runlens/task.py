"""What a run's model was trained to do, from what was stated, never from shapes.

The chance level ln(C) of a classifier is the loss of a uniform guess; several signatures
compare the loss with it. C comes, in order, from

1. the task stated for this analysis (``runlens analyze --task classification:10``,
   :attr:`runlens.engine.AnalyzeOptions.task`);
2. the user's config in run.json: ``task`` (``"classification"``, ``"regression"``, ...,
   or ``"classification:10"``) and ``num_classes`` / ``n_classes`` / ``classes`` /
   ``num_labels`` / ``n_labels``;
3. run.json's ``task`` key, written by the collector from the loss function it saw or by
   an integration from the model class (see ``runlens_collect.format.TASK_KEYS``);
4. nothing: the task is unknown and the chance-level checks do not run.

The model output's last dimension is not used: a segmentation map's last dimension is its
width and a multi-output regression has one column per target. Hugging Face's
``num_labels`` is on every ``PretrainedConfig`` (default 2), so it counts only when the
model class is a classifier (``...ForSequenceClassification``) or the config is not a
Hugging Face one (no ``model_type``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runlens_collect import format as fmt

from runlens.errors import OptionError

TASK_TYPES = fmt.TASK_TYPES
CLASSIFICATION = fmt.TASK_CLASSIFICATION

_ALIASES = {
    "classification": fmt.TASK_CLASSIFICATION,
    "classifier": fmt.TASK_CLASSIFICATION,
    "cls": fmt.TASK_CLASSIFICATION,
    "multiclass": fmt.TASK_CLASSIFICATION,
    "multi-class": fmt.TASK_CLASSIFICATION,
    "segmentation": fmt.TASK_CLASSIFICATION,  # per-pixel classification
    "multilabel": fmt.TASK_MULTILABEL,
    "multi-label": fmt.TASK_MULTILABEL,
    "regression": fmt.TASK_REGRESSION,
    "language-modeling": fmt.TASK_LANGUAGE_MODELING,
    "language_modeling": fmt.TASK_LANGUAGE_MODELING,
    "language-model": fmt.TASK_LANGUAGE_MODELING,
    "lm": fmt.TASK_LANGUAGE_MODELING,
    "causal-lm": fmt.TASK_LANGUAGE_MODELING,
    "causal_lm": fmt.TASK_LANGUAGE_MODELING,
    "masked-lm": fmt.TASK_LANGUAGE_MODELING,
    "unknown": fmt.TASK_UNKNOWN,
}

# User config keys holding a class count; the HF ones are trusted only as said above.
_CLASS_KEYS = ("num_classes", "n_classes", "classes")
_HF_CLASS_KEYS = ("num_labels", "n_labels")

HOW_TO_STATE = (
    "state it with `runlens analyze RUN --task classification:C` (or regression, "
    "multilabel:C, language-modeling), or record `num_classes` in the run's config"
)


@dataclass(frozen=True)
class TaskInfo:
    """The task the analysis assumes, and where that came from."""

    type: str
    """One of ``runlens_collect.format.TASK_TYPES``."""
    num_classes: int | None = None
    source: str | None = None
    """Where type and count came from, e.g. ``config num_classes``, ``--task``,
    ``run.json task (loss:cross_entropy)``; None when the task is unknown."""
    ignored: tuple[str, ...] = ()
    """Hints that were seen and not trusted, each with the reason."""

    @property
    def chance_level(self) -> float | None:
        """ln(C) of a single-label classification with C > 1 classes, else None."""
        if self.type == CLASSIFICATION and self.num_classes is not None and self.num_classes > 1:
            return math.log(self.num_classes)
        return None

    def why_no_chance(self) -> tuple[str, str]:
        """(kind, reason) why :attr:`chance_level` is None, for the report's coverage.
        ``kind`` is ``task-unknown`` or ``not-applicable`` (see findings.SKIP_KINDS)."""
        if self.type == CLASSIFICATION and self.num_classes == 1:
            return "not-applicable", "a classification with 1 class has no chance level"
        if self.type == CLASSIFICATION:
            return (
                "task-unknown",
                f"classification with an unknown number of classes ({self.source}); "
                + HOW_TO_STATE,
            )
        if self.type == fmt.TASK_UNKNOWN:
            seen = f" ({'; '.join(self.ignored)})" if self.ignored else ""
            return "task-unknown", f"task unknown{seen}; {HOW_TO_STATE}"
        return (
            "not-applicable",
            f"the task is {self.type} ({self.source}); the chance level ln(C) is defined "
            "for single-label classification",
        )

    def describe(self) -> str:
        """One line for reports: ``classification, 10 classes (config num_classes)``."""
        if self.type == fmt.TASK_UNKNOWN:
            return "unknown"
        text = self.type
        if self.num_classes is not None:
            unit = {fmt.TASK_LANGUAGE_MODELING: "tokens in the vocabulary"}.get(
                self.type, "classes" if self.type == CLASSIFICATION else "labels"
            )
            text += f", {self.num_classes} {unit}"
        return f"{text} ({self.source})" if self.source else text


UNKNOWN = TaskInfo(fmt.TASK_UNKNOWN)


def parse_task(text: str, source: str = "--task") -> TaskInfo:
    """``classification:10``, ``regression``, ``multilabel:5``, ``language-modeling``,
    ``unknown`` -> TaskInfo. Raises OptionError on anything else."""
    got = _parse(text)
    if got is None:
        names = ", ".join(t for t in TASK_TYPES)
        raise OptionError(
            f"{source} {text!r}: expected TYPE or TYPE:CLASSES with TYPE one of {names} "
            "(e.g. classification:10)"
        )
    kind, n = got
    return TaskInfo(kind, n, source if kind != fmt.TASK_UNKNOWN else None)


def _parse(text: object) -> tuple[str, int | None] | None:
    if not isinstance(text, str):
        return None
    name, sep, count = text.strip().lower().partition(":")
    kind = _ALIASES.get(name.strip())
    if kind is None:
        return None
    if not sep:
        return kind, None
    try:
        n = int(count.strip())
    except ValueError:
        return None
    if n < 1 or kind in (fmt.TASK_REGRESSION, fmt.TASK_UNKNOWN):
        return None
    return kind, n


def resolve_task(
    meta: Mapping[str, Any], config: Mapping[str, Any], stated: TaskInfo | None = None
) -> TaskInfo:
    """The task of a run (see the module docstring for the order). ``meta`` is run.json,
    ``config`` its user config, ``stated`` what the user said for this analysis."""
    if stated is not None and stated.type == fmt.TASK_UNKNOWN:
        return TaskInfo(fmt.TASK_UNKNOWN, None, None, ("--task unknown",))
    ignored: list[str] = []
    candidates: list[tuple[str | None, int | None, str]] = []
    if stated is not None:
        candidates.append((stated.type, stated.num_classes, stated.source or "--task"))
    candidates += _from_config(meta, config, ignored)
    written = fmt.read_task(dict(meta))
    if written is not None and written["type"] == fmt.TASK_UNKNOWN and written["source"]:
        ignored.append(f"the collector saw {written['source']}: no single task")
    if written is not None:
        where = f"run.json task ({written['source']})" if written["source"] else "run.json task"
        candidates.append((written["type"], written["num_classes"], where))

    kind, kind_from = next(
        ((k, w) for k, _, w in candidates if k is not None and k != fmt.TASK_UNKNOWN),
        (None, None),
    )
    # A count counts only from a source that agrees on the type (or states none).
    count, count_from = next(
        ((n, w) for k, n, w in candidates if n is not None and k in (None, kind)), (None, None)
    )
    if kind is None and count is not None:
        kind, kind_from = CLASSIFICATION, count_from  # a class count alone: a classifier
    if kind is None:
        return TaskInfo(fmt.TASK_UNKNOWN, None, None, tuple(ignored))
    if kind == fmt.TASK_REGRESSION:
        count = count_from = None
    source = kind_from if count_from in (None, kind_from) else f"{kind_from}; {count_from}"
    return TaskInfo(kind, count, source, tuple(ignored))


def _from_config(
    meta: Mapping[str, Any], config: Mapping[str, Any], ignored: list[str]
) -> list[tuple[str | None, int | None, str]]:
    out: list[tuple[str | None, int | None, str]] = []
    t = config.get("task")
    # A class count in the config says classification, unless its task says otherwise.
    count_type: str = CLASSIFICATION
    if t is not None:
        got = _parse(t) if isinstance(t, str) else _parse_dict(t)
        if got is None:
            ignored.append(f"config task={t!r} is not a known task type")
        else:
            out.append((got[0], got[1], "config task"))
            count_type = got[0]
    for key in _CLASS_KEYS:
        n = _count(config.get(key))
        if n is not None:
            out.append((count_type, n, f"config {key}"))
            break
    for key in _HF_CLASS_KEYS:
        n = _count(config.get(key))
        if n is None:
            continue
        why = _distrust_num_labels(meta, config)
        if why is None:
            out.append((count_type, n, f"config {key}"))
        else:
            ignored.append(f"config {key}={n} ignored: {why}")
        break
    return out


def _parse_dict(t: object) -> tuple[str, int | None] | None:
    if not isinstance(t, Mapping):
        return None
    got = _parse(t.get("type"))
    if got is None:
        return None
    n = _count(t.get("num_classes"))
    return got[0], n if n is not None else got[1]


def _count(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else None


def _distrust_num_labels(meta: Mapping[str, Any], config: Mapping[str, Any]) -> str | None:
    """Why ``num_labels`` does not say the class count here (None: it does)."""
    cls = str((meta.get("model") or {}).get("class") or "")
    if "Classification" in cls:
        return None
    if cls and any(s in cls for s in ("LMHead", "ForCausalLM", "ForMaskedLM", "Seq2Seq")):
        return f"the model {cls} is a language model"
    if "model_type" in config:
        what = f"the model class {cls} is not" if cls else "no model class says it is"
        return (
            "every Hugging Face config has it (default 2) and "
            f"{what} a ...ForSequenceClassification classifier"
        )
    return None
