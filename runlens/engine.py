"""The analysis engine: run every applicable signature, link causes, summarize the run."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from runlens_collect import format as fmt

from runlens import sanity
from runlens import series as S
from runlens.context import Context
from runlens.errors import OptionError
from runlens.findings import (
    Coverage,
    CurvePreview,
    Finding,
    Report,
    RunInfo,
    RunSummary,
    Skipped,
    TaskSummary,
)
from runlens.health import layer_health
from runlens.layerscan import DEFAULT_MEMORY_MB
from runlens.links import link_findings, rank_findings
from runlens.metrics import is_schedule
from runlens.needs import REPORT_NEEDS, Need
from runlens.ranks import RANKS_FACT, ranks_text
from runlens.run import Run, load_run
from runlens.sampling import SAMPLING_FACT, sampling_text
from runlens.segments import LIST_RETRIES, SegmentsChanged
from runlens.signatures import REGISTRY
from runlens.signatures.base import NotChecked, Params, Signature
from runlens.sources import open_run
from runlens.task import TaskInfo, parse_task

DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
"""Signatures run in this many threads by default: numpy and scipy release the GIL."""

PREVIEW_CURVES = (fmt.TRAIN_LOSS, fmt.VAL_LOSS, "val/accuracy", "lr/0", fmt.GRAD_NORM)


@dataclass(frozen=True)
class AnalyzeOptions:
    """How to analyze. ``overrides`` maps signature name -> {param: value}."""

    overrides: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    smoothing: float = S.DEFAULT_SMOOTHING
    only: tuple[str, ...] | None = None
    """Run only these signatures (names); None runs all."""
    preview_points: int = 120
    task: str | None = None
    """The task of the run(s) analyzed, overriding what the run says: ``classification:10``,
    ``regression``, ``multilabel:5``, ``language-modeling``, ``unknown`` (see runlens.task)."""
    memory_mb: float = DEFAULT_MEMORY_MB
    """Bound on the memory of reading the layers table (runlens.layerscan): a run whose
    step × layer matrices would not fit is read as window levels, in chunks."""
    workers: int = DEFAULT_WORKERS
    """Threads running signatures (they share one read of the run; results and report
    are the same for any number, tests/test_concurrency.py)."""
    final: bool = True
    """The data is the whole run (post-hoc analysis). False while the run is still being
    written (``runlens watch``'s live passes): signatures that judge the end of the run
    then defer or ask for confirmation (``Context.final``, docs/signatures.md)."""

    def __post_init__(self) -> None:
        validate_overrides(self.overrides)
        if self.task is not None:
            parse_task(self.task)  # raises OptionError on a bad spec
        if self.only is not None:
            unknown = [n for n in self.only if n not in REGISTRY]
            if unknown:
                raise OptionError(f"unknown signature(s): {', '.join(unknown)}")
        if not 0.0 <= self.smoothing < 1.0:
            raise OptionError(f"smoothing must be in [0, 1), got {self.smoothing}")
        if not self.memory_mb >= 64:
            raise OptionError(f"memory must be at least 64 MB, got {self.memory_mb}")
        if self.workers < 1:
            raise OptionError(f"workers must be >= 1, got {self.workers}")


def validate_overrides(overrides: Mapping[str, Mapping[str, float]]) -> None:
    for sig, values in overrides.items():
        if sig not in REGISTRY:
            raise OptionError(f"unknown signature {sig!r} in override (see `runlens signatures`)")
        known = REGISTRY[sig].defaults()
        for k in values:
            if k not in known:
                names = ", ".join(sorted(known)) or "none"
                raise OptionError(f"signature {sig!r} has no parameter {k!r} (has: {names})")


def parse_set(items: Iterable[str]) -> dict[str, dict[str, float]]:
    """Parse ``NAME.PARAM=VALUE`` strings (the CLI's ``--set``) into overrides."""
    out: dict[str, dict[str, float]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        sig, dot, param = key.strip().rpartition(".")
        if not sep or not dot or not sig or not param:
            raise OptionError(f"--set expects NAME.PARAM=VALUE, got {item!r}")
        try:
            out.setdefault(sig, {})[param] = float(value)
        except ValueError:
            raise OptionError(f"--set {key}: {value!r} is not a number") from None
    validate_overrides(out)
    return out


def load_config(path: str | os.PathLike[str]) -> dict[str, dict[str, float]]:
    """Read overrides from a TOML file: one table per signature, e.g.
    ``[loss-spike]\\nthreshold = 8``."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise OptionError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise OptionError(f"config {path} is not valid TOML: {exc}") from None
    out: dict[str, dict[str, float]] = {}
    for sig, table in data.items():
        if not isinstance(table, dict):
            raise OptionError(f"config {path}: [{sig}] must be a table of parameters")
        for k, v in table.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise OptionError(f"config {path}: {sig}.{k} must be a number")
            out.setdefault(sig, {})[k] = float(v)
    validate_overrides(out)
    return out


def resolve_params(sig: type[Signature], overrides: Mapping[str, float]) -> Params:
    values = sig.defaults()
    values.update({k: float(v) for k, v in overrides.items()})
    return Params(values)


def make_context(
    run: Run | str | os.PathLike[str], options: AnalyzeOptions | None = None
) -> Context:
    """The :class:`Context` :func:`analyze` reads ``run`` through (a path is opened with
    :func:`runlens.sources.open_run`). Pass it to :func:`analyze` and then to the
    graphical reports (runlens.plotdata) so that the run is read once."""
    options = options or AnalyzeOptions()
    if not isinstance(run, Run):
        run = open_run(run)
    stated = parse_task(options.task) if options.task is not None else None
    return Context(
        run, options.smoothing, task=stated, memory_mb=options.memory_mb, final=options.final
    )


def plan(signatures: Iterable[type[Signature]]) -> tuple[Need, ...]:
    """What an analysis running ``signatures`` reads from the layers table: their declared
    ``needs`` and what the reports read (runlens.needs.REPORT_NEEDS)."""
    out: dict[Need, None] = dict.fromkeys(REPORT_NEEDS)
    for sig in signatures:
        out.update(dict.fromkeys(sig.needs))
    return tuple(out)


def analyze(
    run: Run | Context | str | os.PathLike[str], options: AnalyzeOptions | None = None
) -> Report:
    """Diagnose one run. ``run`` is a :class:`Run`, a path to a run directory or to a
    log :func:`runlens.sources.open_run` imports (TensorBoard, CSV, HF trainer state), or
    a :class:`Context` from :func:`make_context` with the same options.

    A live run's segments may be merged while they are read (the collector's rolling
    compaction): a path or a :class:`Run` is then loaded again and analyzed afresh; a
    :class:`Context` raises ``segments.SegmentsChanged`` for its owner to do the same."""
    for attempt in range(LIST_RETRIES):
        try:
            return _analyze(run, options)
        except SegmentsChanged:
            if isinstance(run, Context) or attempt == LIST_RETRIES - 1:
                raise
            if isinstance(run, Run):
                run = load_run(run.path, None if run.merged else run.rank)
    raise AssertionError("unreachable")


def _analyze(
    run: Run | Context | str | os.PathLike[str], options: AnalyzeOptions | None = None
) -> Report:
    options = options or AnalyzeOptions()
    ctx = run if isinstance(run, Context) else make_context(run, options)
    todo: list[tuple[str, type[Signature]]] = []
    skipped_early: dict[str, Skipped] = {}
    considered: list[str] = []
    for name, sig in REGISTRY.items():
        if options.only is not None and name not in options.only:
            continue
        considered.append(name)
        if not sanity.applies(name, sig.category, ctx.run.kind):
            skipped_early[name] = Skipped(
                name, f"does not apply to {ctx.run.kind} runs", "not-applicable"
            )
            continue
        todo.append((name, sig))
    # Everything the signatures declared is read in one pass before any of them runs.
    ctx.prepare(plan(sig for _, sig in todo))
    run = ctx.run
    jobs = [(name, sig, resolve_params(sig, options.overrides.get(name, {}))) for name, sig in todo]
    if options.workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=options.workers) as pool:
            results = list(pool.map(lambda j: _run_one(ctx, *j), jobs))
        outcomes = {j[0]: r for j, r in zip(jobs, results, strict=True)}
    else:
        outcomes = {j[0]: _run_one(ctx, *j) for j in jobs}

    findings: list[Finding] = []
    skipped: list[Skipped] = []
    partial: list[Skipped] = []
    warnings: list[str] = []
    no_layers = 0  # signatures skipped for want of layer statistics
    for name in considered:
        if name in skipped_early:
            skipped.append(skipped_early[name])
            continue
        out = outcomes[name]
        if out.missing:
            skipped.append(Skipped(name, _missing_reason(ctx, out.missing), "not-recorded"))
            no_layers += any("layers:" in m for m in out.missing)
        elif out.skipped is not None:
            skipped.append(out.skipped)
            if out.warning:
                warnings.append(out.warning)
        else:
            partial += out.parts
            findings.extend(_clip_steps(f, ctx) for f in out.findings)
    if no_layers and not ctx.has_layers:
        what = "log" if run.source_format != "runlens" else "run"
        warnings.append(
            f"layer statistics not available in this {what}: {no_layers} signatures skipped"
        )
    # Root causes first, each followed by the findings it explains (see links.py).
    findings = rank_findings(link_findings(findings))
    return Report(
        run=_run_info(run),
        summary=summarize(ctx, options),
        findings=tuple(findings),
        skipped=tuple(skipped),
        layers=tuple(layer_health(ctx, findings)),
        curves=tuple(_previews(ctx, options.preview_points)),
        # the run's warnings (loading, and segments the layers pass found unreadable) first
        warnings=tuple(dict.fromkeys([*run.warnings, *ctx.notes, *warnings])),
        coverage=coverage(ctx, considered, findings, skipped, partial),
    )


@dataclass(frozen=True)
class _Outcome:
    """What running one signature gave (exactly one of the three is set)."""

    missing: tuple[str, ...] = ()
    """Requirements the run does not have: not run."""
    skipped: Skipped | None = None
    """Not checked (NotChecked) or an internal error."""
    warning: str | None = None
    findings: tuple[Finding, ...] = ()
    parts: tuple[Skipped, ...] = ()


def _run_one(ctx: Context, name: str, sig: type[Signature], params: Params) -> _Outcome:
    """Run one signature on its own fork of the context (safe in a thread)."""
    own = ctx.fork(name)
    missing = own.missing(sig.requires)
    if missing:
        return _Outcome(missing=tuple(missing))
    try:
        found = sig().detect(own, params)
    except NotChecked as nc:  # could not look: not checked, and the report says why
        return _Outcome(skipped=Skipped(name, nc.reason, nc.kind))
    except SegmentsChanged:  # a live run's segment merged under it: analyze() retries
        raise
    except Exception as exc:  # one broken signature must not hide the others
        text = f"{type(exc).__name__}: {exc}"
        return _Outcome(
            skipped=Skipped(name, f"internal error: {text}", "internal-error"),
            warning=f"signature {name} failed: {text}",
        )
    return _Outcome(findings=tuple(found), parts=tuple(own.take_parts()))


# -- coverage -------------------------------------------------------------------------------

MAIN_CHECKS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        fmt.TRAIN_LOSS,
        (
            "nan-inf",
            "loss-divergence",
            "loss-flat",
            "loss-oscillation",
            "loss-spike",
            "noisy-loss",
            "underfitting",
        ),
    ),
    (f"{fmt.VAL_LOSS}|{fmt.VAL_ACCURACY}", ("overfitting",)),
    (f"{fmt.GRAD_NORM}|layers:{fmt.KIND_GRAD}", ("exploding-gradients",)),
    (f"layers:{fmt.KIND_GRAD}", ("vanishing-gradients",)),
)
"""(requirement, signatures): the checks a clean report must have run, for a run that has
the requirement. A report with no findings says "No problems found" only when every main
check of its run ran (a not-applicable one does not count against it)."""

SANITY_MAIN_CHECKS: dict[str, tuple[str, ...]] = {
    sanity.KIND_LR_RANGE_TEST: ("lr-range-test",),
    sanity.KIND_OVERFIT_ONE_BATCH: ("cannot-overfit-batch",),
    sanity.KIND_INIT_CHECK: ("bad-initialization",),
}


def main_checks(ctx: Context, considered: Iterable[str]) -> tuple[str, ...]:
    """The main checks of this run among the signatures ``considered`` (see MAIN_CHECKS)."""
    if ctx.run.kind in SANITY_MAIN_CHECKS:
        wanted = SANITY_MAIN_CHECKS[ctx.run.kind]
    else:
        wanted = tuple(n for req, names in MAIN_CHECKS if ctx.available(req) for n in names)
    chosen = set(considered)
    return tuple(n for n in REGISTRY if n in wanted and n in chosen)


def coverage(
    ctx: Context,
    considered: Sequence[str],
    findings: Sequence[Finding],
    skipped: Sequence[Skipped],
    partial: Sequence[Skipped],
) -> Coverage:
    """What ran, what found something, what could not check: see findings.Coverage."""
    not_run = {s.signature for s in skipped}
    wanted_not_run = {s.signature for s in skipped if s.kind != "not-applicable"}
    flagged = {f.signature for f in findings}
    ran = [n for n in considered if n not in not_run]
    main = main_checks(ctx, considered)
    main_not_run = tuple(n for n in main if n in wanted_not_run)
    return Coverage(
        found=tuple(n for n in ran if n in flagged),
        clean=tuple(n for n in ran if n not in flagged),
        main=main,
        main_not_run=main_not_run,
        complete=bool(main) and not main_not_run,
        partial=tuple(partial),
        task=_task_summary(ctx.task),
    )


def _task_summary(t: TaskInfo) -> TaskSummary:
    return TaskSummary(t.type, t.num_classes, t.source, t.ignored, t.chance_level)


def _missing_reason(ctx: Context, missing: Sequence[str]) -> str:
    """``needs layers:activation (...)`` with why it is missing, when that is known."""
    run = ctx.run
    why = ""
    kinds = [a.split(":", 1)[1] for m in missing for a in m.split("|") if a.startswith("layers:")]
    collector = run.meta.get("collector") or {}
    in_effect = collector.get("kinds_in_effect")
    if kinds and run.source_format != "runlens":
        why = f" (an imported {run.source_format} log has no layer statistics)"
    elif kinds and not ctx.has_layers:
        pass  # "layer statistics not available" says it all
    elif kinds and fmt.KIND_ACTIVATION in kinds and collector.get("compiled"):
        why = " (not recorded: the model was compiled, activation hooks are off)"
    elif kinds and isinstance(in_effect, list) and not set(kinds) & set(in_effect):
        why = f" (not recorded: the collector ran without {' or '.join(kinds)} statistics)"
    elif any(m.startswith(fmt.PROBE_PREFIX) for m in missing):
        why = (
            f" (an imported {run.source_format} log has no probe statistics)"
            if run.source_format != "runlens"
            else " (recorded without runlens_collect's probes: an older collector or probes=())"
        )
    return "needs " + ", ".join(missing) + why


def _clip_steps(f: Finding, ctx: Context) -> Finding:
    """Keep a finding's step range inside the run, whatever the signature computed. The
    run ends at its last logged step of any scalar: an evaluation logged after the last
    training-loss entry (the end-of-epoch eval of an HF log) is inside it."""
    if f.steps is None or ctx.steps is None:
        return f
    lo, hi = ctx.steps
    for name in f.series:
        c = ctx.curve(name)
        if c is not None and len(c):
            lo, hi = min(lo, int(c.steps[0])), max(hi, int(c.steps[-1]))
    a = min(max(f.steps[0], lo), hi)
    b = min(max(f.steps[1], lo), hi)
    if (a, b) == f.steps:
        return f
    from dataclasses import replace

    return replace(f, steps=(a, b))


def _run_info(run: Run) -> RunInfo:
    version = run.meta.get("schema_version")
    return RunInfo(
        name=run.name,
        # An imported log is named by where the user's log is, not by the cache entry.
        path=str(run.origin or (run.meta.get("imported") or {}).get("source") or run.path),
        run_id=run.meta.get("run_id"),
        kind=run.kind,
        status=_status(run),
        schema_version=version if isinstance(version, int) else None,
        source_format=run.source_format,
        config=dict(run.config),
        x_axis=run.x_axis,
    )


def summarize(ctx: Context, options: AnalyzeOptions | None = None) -> RunSummary:
    run = ctx.run
    tl, vl = ctx.train_loss, ctx.val_loss
    n_steps = len(tl) if tl is not None else 0
    first = last = None
    if ctx.steps is not None:
        first, last = ctx.steps
    duration = steps_per_s = None
    wall = _wall_times(ctx)
    if wall is not None and wall.size >= 2:
        duration = float(wall[-1] - wall[0])
        if duration > 0 and n_steps > 1:
            steps_per_s = (n_steps - 1) / duration

    # One definition of final/best/best step for every report (runlens.levels).
    tl_lv = ctx.levels(fmt.TRAIN_LOSS) if tl is not None else None
    vl_lv = ctx.levels(fmt.VAL_LOSS) if vl is not None else None
    task = ctx.task_metric
    task_lv = ctx.levels(task) if task is not None else None
    abnormal, reason = _end_state(run)
    plan = _planned(run)
    return RunSummary(
        steps=n_steps,
        first_step=first,
        last_step=last,
        duration_s=duration,
        steps_per_s=steps_per_s,
        final_train_loss=tl_lv.final if tl_lv else None,
        best_train_loss=tl_lv.best if tl_lv else None,
        best_train_step=tl_lv.best_step if tl_lv else None,
        final_val_loss=vl_lv.final if vl_lv else None,
        best_val_loss=vl_lv.best if vl_lv else None,
        best_val_step=vl_lv.best_step if vl_lv else None,
        ended_abnormally=abnormal,
        end_reason=reason,
        extras=_extras(run),
        task_metric=task if task_lv else None,
        task_metric_mode=task_lv.mode if task_lv else None,
        final_task_metric=task_lv.final if task_lv else None,
        best_task_metric=task_lv.best if task_lv else None,
        best_task_metric_step=task_lv.best_step if task_lv else None,
        planned_length=plan[0] if plan else None,
        planned_unit=plan[1] if plan else None,
        resumed_at=run.resumes,
        skipped_steps=int(run.skipped_steps.size),
        **_sanity_summary(ctx, options or AnalyzeOptions()),
    )


def _extras(run: Run) -> dict[str, Any]:
    """run.json's summary_extras, plus what the collector sampled (runlens.sampling)."""
    extras = dict(run.meta.get("summary_extras") or {})
    text = sampling_text(run.meta)
    if text is not None:
        extras.setdefault(SAMPLING_FACT, text)
    text = ranks_text(run)
    if text is not None:
        extras.setdefault(RANKS_FACT, text)
    return extras


def _sanity_summary(ctx: Context, options: AnalyzeOptions) -> dict[str, Any]:
    """suggested_lr / lr_method / overfit_check of sanity runs, with the thresholds of the
    signatures that report them (so ``--set`` moves both)."""
    kind = ctx.run.kind
    if kind == sanity.KIND_LR_RANGE_TEST:
        p = resolve_params(REGISTRY["lr-range-test"], options.overrides.get("lr-range-test", {}))
        s = sanity.lr_suggestion(ctx, p.diverge_factor, p.skip_start, int(p.skip_end))
        return {"suggested_lr": s.suggested_lr, "lr_method": s.method} if s else {}
    if kind == sanity.KIND_OVERFIT_ONE_BATCH:
        name = "cannot-overfit-batch"
        p = resolve_params(REGISTRY[name], options.overrides.get(name, {}))
        a = sanity.overfit_analysis(ctx, p.rel_target, p.abs_target, int(p.tail))
        return {"overfit_check": a.check} if a else {}
    return {}


def _wall_times(ctx: Context) -> np.ndarray | None:
    s = ctx.scalar(fmt.TRAIN_LOSS)
    if s is None or not np.isfinite(s.wall_time).any():
        return None
    w = s.wall_time[np.isfinite(s.wall_time)]
    return np.sort(w)


def _planned(run: Run) -> tuple[int, str, int | None, str] | None:
    """(planned length, its unit, how far the log got, where the plan was read) of an
    imported log: run.json ``imported.planned`` / ``imported.reached`` (the importer's)."""
    imported = run.meta.get("imported")
    planned = imported.get("planned") if isinstance(imported, dict) else None
    if not isinstance(planned, dict):
        return None
    total = planned.get("total")
    if not isinstance(total, int) or isinstance(total, bool) or total <= 0:
        return None
    reached = imported.get("reached")
    reached = reached if isinstance(reached, int) and not isinstance(reached, bool) else None
    unit = "epoch" if planned.get("unit") == "epoch" else "step"
    return total, unit, reached, str(planned.get("source") or "")


def _status(run: Run) -> str:
    """run.json's status, except that an imported log that ends before its planned length
    is ``stopped`` (not ``finished``): the log cannot say whether it crashed or was cut."""
    plan = _planned(run)
    if run.source_format != "runlens" and plan and plan[2] is not None and plan[2] < plan[0]:
        return "stopped"
    return run.status


def _end_state(run: Run) -> tuple[bool, str]:
    if run.source_format != "runlens":
        plan = _planned(run)
        if plan is not None and plan[2] is not None:
            total, unit, reached, source = plan
            where = f" ({source})" if source else ""
            if reached < total:
                at = "at" if unit == "step" else "after"  # reached = epochs completed
                return False, (
                    f"stopped {at} {unit} {reached:,} of {total:,} planned{where}; "
                    f"imported from {run.source_format}"
                )
            return False, (
                f"reached the {total:,} {unit}s planned{where}; imported from {run.source_format}"
            )
        return False, f"imported from {run.source_format}"
    status = run.status
    if status == fmt.STATUS_FINISHED and run.clean_close:
        return False, "finished cleanly"
    if status == fmt.STATUS_FINISHED:
        return False, "finished (no close event)"
    if status == "unknown" and run.clean_close:  # run.json lost, events say it closed
        return False, "finished cleanly (close event; run.json missing or unreadable)"
    if status == fmt.STATUS_CRASHED:
        return True, "training raised an exception (status crashed)"
    if status == fmt.STATUS_PREEMPTED:
        last = run.meta.get("last_step")
        where = f" after step {last}" if last is not None else ""
        return True, f"stopped by a signal (SIGTERM/SIGINT: preempted){where}; flushed and closed"
    last = run.meta.get("last_step")
    where = f" after step {last}" if last is not None else ""
    return True, f"ended abnormally{where}: status {status!r} and no clean close (killed?)"


def _previews(ctx: Context, points: int) -> list[CurvePreview]:
    out = []
    names = list(PREVIEW_CURVES)
    if ctx.task_metric is not None and ctx.task_metric not in names:
        names.insert(3, ctx.task_metric)
    for name in names:
        c = ctx.curve(name) if ctx.run.has_scalar(name) else None
        if c is None or len(c) == 0:
            continue
        idx = np.unique(np.linspace(0, len(c) - 1, min(points, len(c))).astype(np.int64))
        lv = ctx.levels(name)
        schedule = is_schedule(name, ctx.run.meta)
        out.append(
            CurvePreview(
                name=name,
                steps=tuple(int(s) for s in c.steps[idx]),
                values=tuple(float(v) for v in c.raw[idx]),
                smoothed=tuple(float(v) for v in c.smooth[idx]),
                schedule=schedule,
                first=lv.first if lv else None,
                final=lv.final if lv else None,
                best=lv.best if lv else None,
                best_step=lv.best_step if lv else None,
                mode=lv.mode if lv else None,
                level_window=lv.window if lv else 1,
            )
        )
    return out
