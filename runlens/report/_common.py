"""What every text reporter shows, computed once: header facts, sparklines, row order.

Values here are plain strings straight from the run; each reporter escapes them for its
own output format (rich markup, Markdown) at the last moment.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runlens.findings import CurvePreview, Finding, LayerHealth, Report, Skipped, fmt_num

SPARK_CHARS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 24
MAX_LAYER_ROWS = 40
"""The health table shows at most this many rows (flagged ones first), then "… N more"."""

NO_PROBLEMS = "No problems found"
LAYERS_MISSING = "layer statistics not available"


def sparkline(values: Sequence[float], width: int = SPARK_WIDTH) -> str:
    """Unicode sparkline of ``values`` resampled to ``width`` points; ``×`` marks NaN/Inf."""
    n = len(values)
    if n == 0:
        return ""
    if n > width:
        # Take the value at evenly spaced indices: keeps spikes visible better than means.
        picks = [values[round(i * (n - 1) / (width - 1))] for i in range(width)]
    else:
        picks = list(values)
    finite = [v for v in picks if math.isfinite(v)]
    if not finite:
        return "×" * len(picks)
    lo, hi = min(finite), max(finite)
    span = hi - lo
    out = []
    for v in picks:
        if not math.isfinite(v):
            out.append("×")
        elif span <= 0:
            out.append(SPARK_CHARS[len(SPARK_CHARS) // 2])
        else:
            out.append(SPARK_CHARS[min(len(SPARK_CHARS) - 1, int((v - lo) / span * 8))])
    return "".join(out)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def fmt_steps(steps: tuple[int, int] | None) -> str:
    if steps is None:
        return "-"
    a, b = steps
    return str(a) if a == b else f"{a}–{b}"


def fmt_where(steps: tuple[int, int] | None, unit: str = "step") -> str:
    """A finding's range with its unit: ``step 40``, ``steps 40–59``, ``epochs 3–9``."""
    if steps is None:
        return f"{unit}s -"
    a, b = steps
    return f"{unit} {a}" if a == b else f"{unit}s {a}–{b}"


def fmt_frac(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def fmt_opt(x: float | None) -> str:
    return "-" if x is None else fmt_num(x)


def loss_fact(
    final: float | None, best: float | None, best_step: int | None, unit: str = "step"
) -> str | None:
    if final is None and best is None:
        return None
    text = f"final {fmt_num(final)}"
    if best is not None:
        text += f" · best {fmt_num(best)}"
        if best_step is not None:
            text += f" @ {unit} {best_step}"
    return text


def header_facts(report: Report) -> list[tuple[str, str]]:
    """(label, value) pairs describing the run, in display order."""
    s = report.summary
    facts = [("run", report.run.name), ("path", report.run.path)]
    if report.run.kind != "train":
        facts.append(("kind", report.run.kind))
    facts.append(("status", f"{report.run.status} ({s.end_reason})"))
    unit = report.run.x_axis
    if s.first_step is not None and s.last_step is not None:
        facts.append((f"{unit}s", f"{s.steps} recorded, {unit}s {s.first_step}–{s.last_step}"))
    else:
        facts.append((f"{unit}s", str(s.steps)))
    facts.append(("duration", fmt_duration(s.duration_s)))
    if s.steps_per_s is not None:
        facts.append(("throughput", f"{fmt_num(s.steps_per_s)} {unit}s/s"))
    train = loss_fact(s.final_train_loss, s.best_train_loss, s.best_train_step, unit)
    if train:
        facts.append(("train loss", train))
    val = loss_fact(s.final_val_loss, s.best_val_loss, s.best_val_step, unit)
    if val:
        facts.append(("val loss", val))
    if s.task_metric is not None:
        task = loss_fact(s.final_task_metric, s.best_task_metric, s.best_task_metric_step, unit)
        if task:
            facts.append((s.task_metric, task))
    if report.run.config:
        facts.append(("config", config_line(report.run.config)))
    for key, value in sorted(s.extras.items()):
        facts.append((str(key), fmt_num(value) if isinstance(value, float) else str(value)))
    facts += sanity_facts(report)
    return facts


def sanity_facts(report: Report) -> list[tuple[str, str]]:
    """The verdict line of a sanity run (docs/playbook.md), when there is one."""
    s = report.summary
    facts = []
    if s.suggested_lr is not None:
        facts.append(("suggested lr", f"{fmt_num(s.suggested_lr)} ({s.lr_method or 'n/a'})"))
    oc = s.overfit_check
    if oc is not None:
        verdict = "PASSED" if oc.passed else "FAILED"
        text = f"{verdict}: loss {fmt_num(oc.initial_loss)} → {fmt_num(oc.final_loss)}"
        text += f" in {oc.steps} steps (target {fmt_num(oc.target_loss)})"
        if oc.layers_without_grad:
            text += f"; no gradient: {', '.join(oc.layers_without_grad)}"
        facts.append(("overfit one batch", text))
    return facts


MAX_CONFIG_ITEMS = 12
MAX_CONFIG_VALUE = 40


def config_line(config: Mapping[str, Any]) -> str:
    """``key=value, ...`` of the flattened config (nested keys joined with dots), capped."""
    items = list(_flatten(config))
    parts = []
    for key, value in items[:MAX_CONFIG_ITEMS]:
        text = fmt_num(value) if isinstance(value, float) else str(value)
        if len(text) > MAX_CONFIG_VALUE:
            text = text[: MAX_CONFIG_VALUE - 1] + "…"
        parts.append(f"{key}={text}")
    if len(items) > MAX_CONFIG_ITEMS:
        parts.append(f"… ({len(items) - MAX_CONFIG_ITEMS} more)")
    return ", ".join(parts)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def verdict(report: Report) -> str:
    """One line: the clean-run message, or the count of findings by severity."""
    if not report.findings:
        return NO_PROBLEMS
    counts: dict[str, int] = {}
    for f in report.findings:
        counts[f.severity] = counts.get(f.severity, 0) + 1
    parts = [f"{n} {sev}{'s' if n > 1 else ''}" for sev, n in counts.items()]
    return f"{len(report.findings)} finding{'s' if len(report.findings) > 1 else ''}: " + ", ".join(
        parts
    )


def link_note(f: Finding) -> str | None:
    if f.explained_by:
        return f"probably a consequence of {f.explained_by}"
    if f.explains:
        return f"root cause of: {', '.join(f.explains)}"
    return None


def curves_note(curves: Sequence[CurvePreview]) -> str:
    """What the curve table's numbers are, per curve (the same as the header's)."""
    groups: dict[str, list[str]] = {}
    for c in curves:
        key = "raw values" if c.level_window <= 1 else f"median of {c.level_window} points"
        groups.setdefault(key, []).append(c.name)
    parts = [f"{k} ({', '.join(v)})" for k, v in groups.items()]
    return (
        "first/final/best: levels as in the header, " + "; ".join(parts) + ". "
        "Trend: smoothed, schedules raw."
    )


@dataclass(frozen=True)
class CurveRow:
    name: str
    spark: str
    first: str
    final: str
    best: str
    """``0.41 @ step 800`` (or ``-`` when the curve has no better direction)."""


def curve_rows(curves: Sequence[CurvePreview], unit: str = "step") -> list[CurveRow]:
    """One row per previewed curve: its levels (runlens.levels, as in the header) and a
    sparkline of the smoothed curve (the raw one for a schedule)."""
    rows = []
    for c in curves:
        best = "-"
        if c.best is not None:
            best = f"{fmt_num(c.best)} @ {unit} {c.best_step}"
        rows.append(
            CurveRow(
                name=c.name,
                spark=sparkline(c.values if c.schedule else c.smoothed),
                first=fmt_opt(c.first),
                final=fmt_opt(c.final),
                best=best,
            )
        )
    return rows


def layer_rows(
    layers: Sequence[LayerHealth], cap: int = MAX_LAYER_ROWS
) -> tuple[list[LayerHealth], int]:
    """Rows to show (flagged first, then model order) and how many were left out."""
    flagged = [r for r in layers if r.flagged_by]
    rest = [r for r in layers if not r.flagged_by]
    ordered = flagged + rest
    return ordered[:cap], max(0, len(ordered) - cap)


def skipped_groups(skipped: Sequence[Skipped]) -> list[tuple[str, list[str]]]:
    """Group skipped signatures by a readable reason, keeping first-seen order."""
    groups: dict[str, list[str]] = {}
    for s in skipped:
        groups.setdefault(_reason_text(s.reason), []).append(s.signature)
    return list(groups.items())


def _reason_text(reason: str) -> str:
    if reason.startswith("needs "):
        needs = [r.strip() for r in reason[len("needs ") :].split(",")]
        # "grad_norm|layers:grad" counts too: the layer alternative is what is missing.
        if needs and all("layers:" in n for n in needs):
            return LAYERS_MISSING
    return reason


def shown_warnings(report: Report) -> list[str]:
    """Warnings to list; the engine's "layer statistics not available" note is left out
    when the skipped-signatures line already says it (with the names)."""
    if any(r == LAYERS_MISSING for r, _ in skipped_groups(report.skipped)):
        return [w for w in report.warnings if not w.startswith(LAYERS_MISSING)]
    return list(report.warnings)


def skipped_line(reason: str, names: Sequence[str]) -> str:
    n = len(names)
    return f"{reason}: {n} signature{'s' if n > 1 else ''} skipped ({', '.join(names)})"
