"""What a comparison is made of: its options and its result values (runlens.compare)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from runlens.engine import AnalyzeOptions
from runlens.errors import OptionError
from runlens.findings import Report, Severity, _jsonable

Mode = Literal["min", "max"]
By = Literal["step", "time"]


@dataclass(frozen=True)
class CompareOptions:
    """How to compare. ``metric=None`` picks ``val/loss`` if every run has it, else
    ``train/loss``; ``mode=None`` infers the direction from the metric name."""

    metric: str | None = None
    mode: Mode | None = None
    by: By = "step"
    analyze: AnalyzeOptions = field(default_factory=AnalyzeOptions)
    separation_k: float = 3.0
    """Curves separate where |Δ smoothed| > k × √2 × min(σ_a, σ_b) (σ: robust step noise)."""
    separation_min_rel: float = 0.02
    """... and |Δ| > this fraction of the curves' level, so noiseless curves need a real gap."""
    separation_window: int = 5
    """... for this many consecutive compared points (fewer on very short overlaps)."""
    layer_ratio: float = 10.0
    """Per-layer medians differing by at least this factor are reported."""
    layer_tail: float = 0.25
    """Per-layer values are medians over this last fraction of the recorded steps."""
    workers: int | None = None
    input_format: str | None = None
    """Format of inputs that are not runlens runs (None: detect; see runlens.sources)."""
    mapping: tuple[tuple[str, str], ...] = ()
    """Source-name -> runlens-name overrides for imported logs (``--map``)."""

    def __post_init__(self) -> None:
        if self.by not in ("step", "time"):
            raise OptionError(f"--by must be 'step' or 'time', got {self.by!r}")
        if self.mode not in (None, "min", "max"):
            raise OptionError(f"metric mode must be 'min' or 'max', got {self.mode!r}")
        if self.separation_k <= 0 or self.separation_window < 1:
            raise OptionError("separation_k must be > 0 and separation_window >= 1")
        if self.layer_ratio <= 1:
            raise OptionError(f"layer_ratio must be > 1, got {self.layer_ratio}")
        if not 0 < self.layer_tail <= 1:
            raise OptionError(f"layer_tail must be in (0, 1], got {self.layer_tail}")


# -- result values ------------------------------------------------------------------------


@dataclass(frozen=True)
class ComparedRun:
    """One run of the comparison with its analysis and its value of the ranking metric."""

    label: str
    """Unique display name (the run name, with its path when two runs share a name)."""
    path: str
    rank: int | None
    """1 = best by the metric; None when the run has no finite final value of it."""
    metric_final: float | None
    """Final level of the metric (runlens.levels, as the report header); None if its
    last recorded point is not finite."""
    metric_best: float | None
    metric_best_step: int | None
    """Best level of the metric and its step (runlens.levels, as the report header)."""
    metric_nonfinite: bool
    """The metric's last recorded point is NaN/Inf (the run blew up)."""
    report: Report


@dataclass(frozen=True)
class ConfigDiff:
    """A flattened ``run.json`` key whose value differs; ``values[i]`` is that of
    ``Comparison.runs[i]`` and ``present[i]`` says whether that run had the key at all."""

    key: str
    section: str
    """``config``, ``repro``, ``versions`` or ``run`` (host, device, world size)."""
    values: tuple[Any, ...]
    present: tuple[bool, ...]


@dataclass(frozen=True)
class FindingsRow:
    """One signature across runs: the worst severity it had in each run (None: absent)."""

    signature: str
    cells: tuple[Severity | None, ...]
    summaries: tuple[str | None, ...]


@dataclass(frozen=True)
class FindingGroup:
    signature: str
    severity: Severity
    runs: tuple[str, ...]


@dataclass(frozen=True)
class Separation:
    """Where ``run``'s curve leaves ``baseline``'s beyond their noise (``at`` None: never
    within the overlap). ``at`` is a step, or seconds since start with ``by='time'``."""

    curve: str
    baseline: str
    run: str
    at: float | None
    step: int | None
    """The run's step at the separation point (equals ``at`` when aligned by step)."""
    delta: float | None
    """run − baseline (smoothed) there; None when one side was non-finite."""
    threshold: float | None
    noise: float | None
    """Combined robust noise √2 × min(σ_a, σ_b) of the two raw curves there."""
    nonfinite: bool
    """Separated because exactly one of the two curves had gone NaN/Inf."""
    compared_points: int
    overlap: tuple[float, float] | None


@dataclass(frozen=True)
class LayerDiff:
    """A layer whose tail median of ``stat`` differs by ≥ ``layer_ratio`` from the baseline
    (or is non-finite in exactly one of them). ``ratio`` = value / baseline_value."""

    layer: str
    stat: str
    baseline: str
    run: str
    baseline_value: float | None
    value: float | None
    ratio: float | None


@dataclass(frozen=True)
class LayerSetDiff:
    """Layers recorded in only one of (baseline, run), e.g. a deeper model."""

    baseline: str
    run: str
    only_in_run: tuple[str, ...]
    only_in_baseline: tuple[str, ...]


@dataclass(frozen=True)
class CompareError:
    """An input that could not be compared (unreadable run, glob with no match)."""

    path: str
    message: str


@dataclass(frozen=True)
class Comparison:
    runs: tuple[ComparedRun, ...]
    baseline: str
    metric: str
    mode: Mode
    mode_reason: str
    by: By
    config_diff: tuple[ConfigDiff, ...]
    findings: tuple[FindingsRow, ...]
    groups: tuple[FindingGroup, ...]
    clean_runs: tuple[str, ...]
    separations: tuple[Separation, ...]
    layer_diffs: tuple[LayerDiff, ...]
    layer_sets: tuple[LayerSetDiff, ...]
    layer_ratio: float = 10.0
    errors: tuple[CompareError, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(r.label for r in self.runs)

    def run(self, label: str) -> ComparedRun:
        for r in self.runs:
            if r.label == label:
                return r
        raise KeyError(label)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; each run carries its summary and findings, not the whole report.
        Schema: docs/compare.md."""
        runs = []
        for r in self.runs:
            rep = r.report
            runs.append(
                {
                    "label": r.label,
                    "name": rep.run.name,
                    "path": r.path,
                    "status": rep.run.status,
                    "rank": r.rank,
                    "metric_final": r.metric_final,
                    "metric_best": r.metric_best,
                    "metric_best_step": r.metric_best_step,
                    "metric_nonfinite": r.metric_nonfinite,
                    "summary": dataclasses.asdict(rep.summary),
                    "findings": [
                        {
                            "signature": f.signature,
                            "severity": f.severity,
                            "confidence": f.confidence,
                            "summary": f.summary,
                            "steps": f.steps,
                            "layers": f.layers,
                        }
                        for f in rep.findings
                    ],
                    "warnings": rep.warnings,
                    "coverage": dataclasses.asdict(rep.coverage),
                    "skipped": [dataclasses.asdict(s) for s in rep.skipped],
                }
            )

        def rows(items: Sequence[Any]) -> list[Any]:
            return [dataclasses.asdict(x) for x in items]

        return _jsonable(
            {
                "metric": self.metric,
                "mode": self.mode,
                "mode_reason": self.mode_reason,
                "by": self.by,
                "baseline": self.baseline,
                "runs": runs,
                "config_diff": rows(self.config_diff),
                "findings": rows(self.findings),
                "groups": rows(self.groups),
                "clean_runs": self.clean_runs,
                "separations": rows(self.separations),
                "layer_diffs": rows(self.layer_diffs),
                "layer_ratio": self.layer_ratio,
                "layer_sets": rows(self.layer_sets),
                "errors": rows(self.errors),
                "warnings": self.warnings,
            }
        )
