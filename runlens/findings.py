"""Typed values the analyzer returns: findings, the run summary, the report.

Everything here is a frozen dataclass. Signatures build :class:`Finding` values and never
print; reporters turn a :class:`Report` into text; only the CLI writes files.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["error", "warning", "info"]
SEVERITY_ORDER: dict[str, int] = {"error": 0, "warning": 1, "info": 2}


@dataclass(frozen=True)
class Evidence:
    """One named number behind a finding, with the threshold it was compared to.

    ``op`` reads as "value op threshold" held, e.g. ``value=0.93 op='>' threshold=0.5``.
    """

    name: str
    value: float
    threshold: float | None = None
    op: str | None = None
    unit: str | None = None

    def __str__(self) -> str:
        text = f"{self.name} = {fmt_num(self.value)}{' ' + self.unit if self.unit else ''}"
        if self.threshold is not None:
            text += f" ({self.op or 'vs'} {fmt_num(self.threshold)})"
        return text


@dataclass(frozen=True)
class Finding:
    """One diagnosis: what is wrong, where, the numbers, the likely causes, the fix."""

    signature: str
    severity: Severity
    confidence: float
    summary: str
    fix: str
    steps: tuple[int, int] | None = None
    layers: tuple[str, ...] = ()
    evidence: tuple[Evidence, ...] = ()
    causes: tuple[str, ...] = ()
    # Filled by the engine's linking pass: findings explained by this one (root cause) or
    # the finding that explains this one.
    explains: tuple[str, ...] = ()
    explained_by: str | None = None
    series: tuple[str, ...] = ()
    """The curves that show the problem, main one first (``("val/loss",)``); empty when
    the finding is not about particular scalar curves (layer statistics)."""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITY_ORDER:
            raise ValueError(f"bad severity {self.severity!r}")
        object.__setattr__(self, "confidence", float(min(1.0, max(0.0, self.confidence))))
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "series", tuple(self.series))
        object.__setattr__(self, "evidence", tuple(self.evidence))
        object.__setattr__(self, "causes", tuple(self.causes))
        if self.steps is not None:
            a, b = (int(s) for s in self.steps)
            object.__setattr__(self, "steps", (min(a, b), max(a, b)))


SkipKind = Literal[
    "not-applicable", "not-recorded", "too-few-points", "task-unknown", "internal-error"
]
SKIP_KINDS: dict[str, str] = {
    "not-applicable": "not applicable",
    "not-recorded": "statistic not recorded",
    "too-few-points": "too few points",
    "task-unknown": "task unknown",
    "internal-error": "internal error",
}
"""Why a signature (or part of one) could not check, with the heading reports group by,
in report order. ``not-applicable``: nothing to check here (a sanity run's kind, a model
without ReLU layers, a regression's chance level); the others mean the check was wanted
and could not be done."""


@dataclass(frozen=True)
class Skipped:
    """A signature that could not check this run (or part of it could not), and why."""

    signature: str
    reason: str
    """Specific and readable, e.g. ``only 7 train/loss points after the warm-up, needs 20``."""
    kind: SkipKind = "not-recorded"
    part: str | None = None
    """None when the whole signature did not run; else the part of it that did not (the
    rest ran), e.g. ``comparison with the chance level``."""

    def __post_init__(self) -> None:
        if self.kind not in SKIP_KINDS:
            raise ValueError(f"bad skip kind {self.kind!r}")


@dataclass(frozen=True)
class TaskSummary:
    """The task the analysis assumed (see :mod:`runlens.task`)."""

    type: str
    """classification, multilabel, regression, language-modeling or unknown."""
    num_classes: int | None = None
    source: str | None = None
    ignored: tuple[str, ...] = ()
    chance_level: float | None = None


@dataclass(frozen=True)
class Coverage:
    """What the analysis could and could not check (docs/report-schema.md#coverage).

    Every signature considered is in exactly one of ``found``, ``clean`` and the report's
    ``skipped``; ``partial`` lists parts of signatures that ran but could not do all of
    their job (e.g. the chance-level comparison of a run whose task is unknown).
    """

    found: tuple[str, ...] = ()
    """Signatures that ran and reported something."""
    clean: tuple[str, ...] = ()
    """Signatures that ran and found nothing."""
    main: tuple[str, ...] = ()
    """The main checks for this run: the loss-curve signatures when there is a training
    loss, overfitting with validation, the gradient ones with gradient statistics, the
    sanity signature of a sanity run (see runlens.engine.main_checks)."""
    main_not_run: tuple[str, ...] = ()
    """Main checks that could not check (skipped for a reason other than not applicable)."""
    complete: bool = False
    """All main checks ran (and there was at least one): only then does a report with no
    findings say "No problems found"."""
    partial: tuple[Skipped, ...] = ()
    task: TaskSummary = field(default_factory=lambda: TaskSummary("unknown"))

    @property
    def ran(self) -> tuple[str, ...]:
        return self.found + self.clean


@dataclass(frozen=True)
class RunInfo:
    name: str
    path: str
    run_id: str | None
    kind: str
    status: str
    schema_version: int | None
    source_format: str = "runlens"
    config: dict[str, Any] = field(default_factory=dict)
    x_axis: str = "step"
    """What steps count: ``step``, or ``epoch`` for a log indexed by epochs."""


@dataclass(frozen=True)
class OverfitCheck:
    """Verdict of a one-batch overfit run (``runlens_collect.overfit_one_batch``)."""

    passed: bool
    final_loss: float | None
    steps: int
    initial_loss: float | None = None
    target_loss: float | None = None
    """The loss the run had to reach (see the ``cannot-overfit-batch`` signature)."""
    layers_without_grad: tuple[str, ...] = ()
    """Parameters held by the optimizer that never received a non-zero gradient."""


@dataclass(frozen=True)
class RunSummary:
    steps: int
    first_step: int | None
    last_step: int | None
    duration_s: float | None
    steps_per_s: float | None
    final_train_loss: float | None
    best_train_loss: float | None
    best_train_step: int | None
    final_val_loss: float | None
    best_val_loss: float | None
    best_val_step: int | None
    ended_abnormally: bool
    end_reason: str
    # Extra facts for the summary (e.g. an imported run's runtime).
    extras: dict[str, Any] = field(default_factory=dict)
    # Results of sanity runs (docs/playbook.md): an LR range test's suggestion and the
    # method that chose it; a one-batch overfit run's verdict.
    suggested_lr: float | None = None
    lr_method: str | None = None
    overfit_check: OverfitCheck | None = None
    # The validation metric checkpoints are chosen by (val/wer, val/accuracy...), when the
    # run logs one, with its levels (runlens.levels, like the losses above).
    task_metric: str | None = None
    task_metric_mode: str | None = None
    final_task_metric: float | None = None
    best_task_metric: float | None = None
    best_task_metric_step: int | None = None
    planned_length: int | None = None
    """Length the run was set up for (an imported log's max_steps / max_epochs), if known."""
    planned_unit: str | None = None
    """``step`` or ``epoch``: what ``planned_length`` counts."""
    resumed_at: tuple[int, ...] = ()
    """Steps at which training continued into this run (resumed from a checkpoint)."""
    skipped_steps: int = 0
    """Optimizer steps that did not update the parameters (AMP GradScaler overflow)."""


@dataclass(frozen=True)
class LayerHealth:
    """One row of the per-layer health table (last recorded values, smoothed)."""

    layer: str
    grad_norm: float | None
    update_ratio: float | None
    dead_fraction: float | None
    saturated_fraction: float | None
    flagged_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class CurvePreview:
    """A curve downsampled for display (sparklines, tables, plots)."""

    name: str
    steps: tuple[int, ...]
    values: tuple[float, ...]
    smoothed: tuple[float, ...]
    """The debiased EMA; equal to ``values`` for a schedule (never smoothed)."""
    schedule: bool = False
    first: float | None = None
    final: float | None = None
    best: float | None = None
    best_step: int | None = None
    """``first``/``final``/``best``/``best_step``: runlens.levels over the whole curve (not
    just the kept points); ``best`` is None when the name has no better direction."""
    mode: str | None = None
    level_window: int = 1


@dataclass(frozen=True)
class Report:
    run: RunInfo
    summary: RunSummary
    findings: tuple[Finding, ...]
    skipped: tuple[Skipped, ...] = ()
    layers: tuple[LayerHealth, ...] = ()
    curves: tuple[CurvePreview, ...] = ()
    warnings: tuple[str, ...] = ()
    coverage: Coverage = field(default_factory=Coverage)

    @property
    def not_checked(self) -> tuple[Skipped, ...]:
        """Skipped signatures whose check was wanted (every kind but not-applicable)."""
        return tuple(s for s in self.skipped if s.kind != "not-applicable")

    @property
    def worst_severity(self) -> Severity | None:
        if not self.findings:
            return None
        return min((f.severity for f in self.findings), key=SEVERITY_ORDER.__getitem__)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (non-finite floats become None). Schema: docs/report-schema.md."""
        return _jsonable(dataclasses.asdict(self))


def fmt_num(x: float | None) -> str:
    """Compact human number: 3 significant digits, scientific when tiny or huge."""
    if x is None:
        return "n/a"
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    ax = abs(x)
    if ax >= 1e5 or ax < 1e-3:
        return f"{x:.2e}"
    return f"{x:.4g}"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _jsonable(obj.item())
    return obj
