"""What every text reporter shows, computed once: header facts, sparklines, row order.

Values here are plain strings straight from the run; each reporter escapes them for its
own output format (rich markup, Markdown) at the last moment.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runlens.findings import (
    SKIP_KINDS,
    CurvePreview,
    Finding,
    LayerHealth,
    Report,
    Skipped,
    fmt_num,
)
from runlens.task import HOW_TO_STATE

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
    if s.resumed_at:
        at = ", ".join(f"{unit} {r}" for r in s.resumed_at)
        facts.append(("resumed", f"at {at} (one run: the continuation replaces later {unit}s)"))
    if s.skipped_steps:
        facts.append(
            (
                "skipped steps",
                f"{s.skipped_steps} optimizer {unit}s not applied (AMP loss-scale overflow): "
                "their gradients are not judged",
            )
        )
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
    """One line: the count of findings by severity, or the clean-run message. "No problems
    found" only when every main check of the run ran (see findings.Coverage); otherwise
    the line says how many checks ran and which main ones could not."""
    cov = report.coverage
    n_ran, n_not = len(cov.ran), len(report.not_checked)
    not_run = f"{n_not} could not run (see Coverage)"
    if report.findings:
        counts: dict[str, int] = {}
        for f in report.findings:
            counts[f.severity] = counts.get(f.severity, 0) + 1
        parts = [f"{n} {sev}{'s' if n > 1 else ''}" for sev, n in counts.items()]
        n = len(report.findings)
        text = f"{n} finding{'s' if n > 1 else ''}: " + ", ".join(parts)
        return text + (f"; {n_not} check{'s' if n_not > 1 else ''} could not run" if n_not else "")
    if cov.complete:
        checks = f"{n_ran} check{'s' if n_ran != 1 else ''} ran"
        if n_not:
            checks += f"; {n_not} could not run, see Coverage"
        return f"{NO_PROBLEMS} ({checks})"
    text = f"Nothing found by the {n_ran} check{'s' if n_ran != 1 else ''} that ran"
    if cov.main_not_run:
        names = ", ".join(cov.main_not_run)
        return f"{text}, but {n_not} could not run, among them main checks {names} (see Coverage)"
    if not cov.main:
        return f"{text}; none of the main checks applies to this run (see Coverage)"
    return f"{text}; {not_run}"


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
        why = _why(reason)
        needs = [r.strip() for r in reason[len("needs ") : len(reason) - len(why)].split(",")]
        # "grad_norm|layers:grad" counts too: the layer alternative is what is missing.
        if needs and all("layers:" in n for n in needs):
            return LAYERS_MISSING + why
    return reason


def _why(reason: str) -> str:
    """The ``(...)`` explanation the engine appends to a ``needs ...`` reason, if any."""
    i = reason.find(" (")
    return reason[i:] if i >= 0 and reason.endswith(")") else ""


def shown_warnings(report: Report) -> list[str]:
    """Warnings to list; the engine's "layer statistics not available" note is left out
    when the coverage already says it (with the names)."""
    if any(r.startswith(LAYERS_MISSING) for r, _ in skipped_groups(report.skipped)):
        return [w for w in report.warnings if not w.startswith(LAYERS_MISSING)]
    return list(report.warnings)


def skipped_line(reason: str, names: Sequence[str]) -> str:
    n = len(names)
    return f"{reason}: {n} signature{'s' if n > 1 else ''} skipped ({', '.join(names)})"


# -- coverage -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoverageLine:
    """One line of the coverage section: a heading (``too few points``) and its text."""

    heading: str
    text: str
    wanted: bool
    """False for not-applicable lines and the list of clean checks (shown dimmed)."""


def coverage_summary(report: Report) -> str:
    """``21 checks ran (1 found something), 3 could not run, 2 not applicable``."""
    cov = report.coverage
    n_na = len(report.skipped) - len(report.not_checked)
    text = f"{len(cov.ran)} check{'s' if len(cov.ran) != 1 else ''} ran"
    if cov.found:
        text += f" ({len(cov.found)} found something)"
    text += f", {len(report.not_checked)} could not run"
    if cov.partial:
        n = len({p.signature for p in cov.partial})
        text += f", {n} ran in part"
    if n_na:
        text += f", {n_na} not applicable"
    return text


def coverage_lines(report: Report) -> list[CoverageLine]:
    """The coverage section: task, what could not run grouped by kind and reason, what ran
    in part, what found nothing, what does not apply."""
    cov = report.coverage
    out = [CoverageLine("task", task_text(report), cov.task.type == "unknown")]
    for kind, heading in SKIP_KINDS.items():
        if kind == "not-applicable":
            continue
        for reason, names in skipped_groups([s for s in report.skipped if s.kind == kind]):
            text = _group_text(heading, reason, names)
            if kind == "task-unknown":  # the task line above says why and what to do
                text = f"{', '.join(names)}: need the number of classes C (see task)"
            out.append(CoverageLine(heading, text, True))
    for kind, heading in SKIP_KINDS.items():
        for p in (p for p in cov.partial if p.kind == kind):
            why = "see task" if kind == "task-unknown" else _strip(heading, p.reason)
            text = f"{p.signature} ran without its {p.part}: {why}"
            out.append(CoverageLine(f"in part, {heading}", text, kind != "not-applicable"))
    if cov.found:
        out.append(CoverageLine("found something", ", ".join(cov.found), False))
    if cov.clean:
        out.append(CoverageLine("found nothing", ", ".join(cov.clean), False))
    na = [s for s in report.skipped if s.kind == "not-applicable"]
    for reason, names in skipped_groups(na):
        out.append(
            CoverageLine(SKIP_KINDS["not-applicable"], f"{', '.join(names)}: {reason}", False)
        )
    return out


def task_text(report: Report) -> str:
    t = report.coverage.task
    if t.type == "unknown":
        seen = f" ({'; '.join(t.ignored)})" if t.ignored else ""
        return f"unknown{seen}: chance-level checks off; {HOW_TO_STATE}"
    text = t.type
    if t.num_classes is not None:
        text += f", {t.num_classes} {'classes' if t.type == 'classification' else 'labels'}"
    if t.chance_level is not None:
        text += f", chance level ln(C) = {fmt_num(t.chance_level)}"
    text += f" (from {t.source})" if t.source else ""
    if t.ignored:
        text += f"; ignored: {'; '.join(t.ignored)}"
    if t.type == "classification" and t.chance_level is None and t.num_classes is None:
        text += f": number of classes unknown, chance-level checks off; {HOW_TO_STATE}"
    return text


def _group_text(heading: str, reason: str, names: Sequence[str]) -> str:
    return f"{', '.join(names)}: {_strip(heading, reason)}"


def _strip(heading: str, reason: str) -> str:
    """A reason without the heading it repeats (``task unknown; state it ...``)."""
    if reason.lower().startswith(heading):
        rest = reason[len(heading) :].lstrip(" :;,")
        return rest or reason
    return reason
