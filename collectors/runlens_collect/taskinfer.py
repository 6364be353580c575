"""What the model is trained to do, from what the training code shows: the loss functions
it calls and the model's class. Never from the output's shape (a segmentation map's last
dimension is its width; a multi-output regression has one column per target).

* ``from_model``: Hugging Face classes say it by name: ``...ForCausalLM``,
  ``...LMHeadModel``, ``...ForMaskedLM``, ``...ForConditionalGeneration`` are language
  models (vocabulary from ``config.vocab_size``); ``...ForSequenceClassification`` (and
  token/image/audio classification) classify into ``config.num_labels`` classes, or
  regress (``num_labels == 1`` / ``problem_type='regression'``), or are multilabel.
* ``from_loss``: one training loss call: ``cross_entropy``/``nll_loss`` -> classification
  with C from the logits' class dimension (dim 1, or dim 0 unbatched); the binary cross
  entropies -> multilabel with the labels' count; ``mse``/``l1``/``huber``... ->
  regression; any other loss -> unknown.
* ``TaskTracker`` combines them: a language-model class is final; otherwise the losses of
  the training steps decide, and several different ones (a detector's cross entropy plus
  its box regression) make the task unknown: the loss is then a sum, with no chance level.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from runlens_collect import format as fmt

_LM_SUFFIXES = (
    "ForCausalLM",
    "LMHeadModel",
    "ForMaskedLM",
    "ForConditionalGeneration",
    "ForSeq2SeqLM",
    "WithLMHead",
    "ForPreTraining",
)
_CLASSIFIER_SUFFIXES = (
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForImageClassification",
    "ForAudioClassification",
    "ForAudioFrameClassification",
    "ForVideoClassification",
)
_REGRESSION_LOSSES = frozenset(
    {"mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "poisson_nll_loss", "gaussian_nll_loss"}
)
_CLASSIFICATION_LOSSES = frozenset({"cross_entropy", "nll_loss"})
_MULTILABEL_LOSSES = frozenset(
    {"binary_cross_entropy", "binary_cross_entropy_with_logits", "multilabel_soft_margin_loss"}
)

Task = tuple[str, "int | None", str]
"""(type, num_classes, source) as in format.task_record."""


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else None


def from_model(model: nn.Module) -> tuple[Task | None, bool]:
    """(task, final) from a Hugging Face model class name; (None, False) for others."""
    cls = type(model).__name__
    config = getattr(model, "config", None)
    source = f"model:{cls}"
    if cls.endswith(_LM_SUFFIXES):
        return (fmt.TASK_LANGUAGE_MODELING, _int(getattr(config, "vocab_size", None)), source), True
    if cls.endswith(_CLASSIFIER_SUFFIXES):
        n = _int(getattr(config, "num_labels", None))
        problem = getattr(config, "problem_type", None)
        if problem == "regression" or n == 1:
            return (fmt.TASK_REGRESSION, None, source), False
        if problem == "multi_label_classification":
            return (fmt.TASK_MULTILABEL, n, source), False
        return (fmt.TASK_CLASSIFICATION, n, source), False
    return None, False


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str) -> Any:
    return args[i] if len(args) > i else kwargs.get(name)


def from_loss(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Task:
    """The task a loss function call says (unknown for losses that do not say one)."""
    source = f"loss:{name}"
    x = _arg(args, kwargs, 0, "input")
    if name in _REGRESSION_LOSSES:
        return fmt.TASK_REGRESSION, None, source
    if not isinstance(x, torch.Tensor):
        return fmt.TASK_UNKNOWN, None, source
    if name in _CLASSIFICATION_LOSSES:
        # (N, C), (N, C, d1, ...) or unbatched (C,): the class dim is 1, or 0 unbatched.
        c = x.shape[1] if x.dim() >= 2 else (x.shape[0] if x.dim() == 1 else None)
        return fmt.TASK_CLASSIFICATION, _int(int(c)) if c is not None else None, source
    if name in _MULTILABEL_LOSSES:
        n = x.shape[-1] if x.dim() >= 2 else 1
        return fmt.TASK_MULTILABEL, _int(int(n)), source
    return fmt.TASK_UNKNOWN, None, source


class TaskTracker:
    """The run's task as the training steps show it; ``record()`` is run.json's value."""

    def __init__(self, model: nn.Module) -> None:
        self._model_task, self.final = from_model(model)
        self._seen: dict[Task, None] = {}  # distinct training-loss tasks, in order
        self.changed = self._model_task is not None

    def loss(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """A loss function call; only training losses (grad enabled, output requires
        grad) count: an evaluation or metric loss says nothing about training."""
        if self.final or not (isinstance(out, torch.Tensor) and out.requires_grad):
            return
        task = from_loss(name, args, kwargs)
        if task not in self._seen:
            self._seen[task] = None
            self.changed = True

    def record(self) -> dict[str, Any] | None:
        """run.json ``task`` (format.task_record), or None when nothing was seen."""
        if self.final or not self._seen:
            t = self._model_task
            return fmt.task_record(*t) if t is not None else None
        tasks = list(self._seen)
        if len(tasks) == 1:
            kind, n, source = tasks[0]
            if kind == fmt.TASK_UNKNOWN and self._model_task is not None:
                return fmt.task_record(*self._model_task)
            return fmt.task_record(kind, n, source)
        names = "+".join(dict.fromkeys(s.split(":", 1)[1] for _, _, s in tasks))
        # Several losses summed (or several heads): no single chance level applies.
        return fmt.task_record(fmt.TASK_UNKNOWN, None, f"losses:{names}")
