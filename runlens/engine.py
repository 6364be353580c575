"""The analysis engine: run every applicable signature, link causes, summarize the run."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
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
    CurvePreview,
    Finding,
    Report,
    RunInfo,
    RunSummary,
    Skipped,
)
from runlens.health import layer_health
from runlens.links import link_findings, rank_findings
from runlens.run import Run
from runlens.signatures import REGISTRY
from runlens.signatures.base import Params, Signature
from runlens.sources import open_run

PREVIEW_CURVES = (fmt.TRAIN_LOSS, fmt.VAL_LOSS, "val/accuracy", "lr/0", fmt.GRAD_NORM)


@dataclass(frozen=True)
class AnalyzeOptions:
    """How to analyze. ``overrides`` maps signature name -> {param: value}."""

    overrides: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    smoothing: float = S.DEFAULT_SMOOTHING
    only: tuple[str, ...] | None = None
    """Run only these signatures (names); None runs all."""
    preview_points: int = 120

    def __post_init__(self) -> None:
        validate_overrides(self.overrides)
        if self.only is not None:
            unknown = [n for n in self.only if n not in REGISTRY]
            if unknown:
                raise OptionError(f"unknown signature(s): {', '.join(unknown)}")
        if not 0.0 <= self.smoothing < 1.0:
            raise OptionError(f"smoothing must be in [0, 1), got {self.smoothing}")


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


def analyze(run: Run | str | os.PathLike[str], options: AnalyzeOptions | None = None) -> Report:
    """Diagnose one run. ``run`` is a :class:`Run` or a path to a run directory or to a
    log :func:`runlens.sources.open_run` imports (TensorBoard, CSV, HF trainer state)."""
    options = options or AnalyzeOptions()
    if not isinstance(run, Run):
        run = open_run(run)
    ctx = Context(run, options.smoothing)
    findings: list[Finding] = []
    skipped: list[Skipped] = []
    warnings: list[str] = []
    no_layers = 0  # signatures skipped for want of layer statistics
    for name, sig in REGISTRY.items():
        if options.only is not None and name not in options.only:
            continue
        if not sanity.applies(name, sig.category, run.kind):
            skipped.append(Skipped(name, f"not applicable to {run.kind} runs"))
            continue
        missing = ctx.missing(sig.requires)
        if missing:
            skipped.append(Skipped(name, "needs " + ", ".join(missing)))
            no_layers += any("layers:" in m for m in missing)
            continue
        params = resolve_params(sig, options.overrides.get(name, {}))
        try:
            found = sig().detect(ctx, params)
        except Exception as exc:  # one broken signature must not hide the others
            skipped.append(Skipped(name, f"internal error: {type(exc).__name__}: {exc}"))
            warnings.append(f"signature {name} failed: {type(exc).__name__}: {exc}")
            continue
        findings.extend(_clip_steps(f, ctx) for f in found)
    if no_layers and not run.has_layers():
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
        # run.warnings last: loading is lazy, a segment can turn out unreadable mid-analysis
        warnings=tuple(dict.fromkeys([*run.warnings, *warnings])),
    )


def _clip_steps(f: Finding, ctx: Context) -> Finding:
    """Keep a finding's step range inside the run, whatever the signature computed."""
    if f.steps is None or ctx.steps is None:
        return f
    lo, hi = ctx.steps
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
        status=run.status,
        schema_version=version if isinstance(version, int) else None,
        source_format=run.source_format,
        config=dict(run.config),
    )


def summarize(ctx: Context, options: AnalyzeOptions | None = None) -> RunSummary:
    run = ctx.run
    tl, vl = ctx.train_loss, ctx.val_loss
    n_steps = len(tl) if tl is not None else 0
    first = last = None
    if ctx.steps is not None:
        first, last = ctx.steps
    duration = steps_per_s = None
    wall = _wall_times(run)
    if wall is not None and wall.size >= 2:
        duration = float(wall[-1] - wall[0])
        if duration > 0 and n_steps > 1:
            steps_per_s = (n_steps - 1) / duration

    ema_window = round(1 / (1 - ctx.smoothing)) if ctx.smoothing < 1 else 1

    def level(c: Any) -> tuple[float | None, tuple[int, float] | None]:
        # The EMA's window, at most a tenth of the points (sparse validation curves), at
        # least 3: see Curve.level.
        if c is None:
            return None, None
        window = max(3, min(ema_window, int(c.finite.sum()) // 10))
        return c.level(window) or (None, None)

    train_final, tb = level(tl)
    val_final, vb = level(vl)
    abnormal, reason = _end_state(run)
    return RunSummary(
        steps=n_steps,
        first_step=first,
        last_step=last,
        duration_s=duration,
        steps_per_s=steps_per_s,
        final_train_loss=train_final,
        best_train_loss=tb[1] if tb else None,
        best_train_step=tb[0] if tb else None,
        final_val_loss=val_final,
        best_val_loss=vb[1] if vb else None,
        best_val_step=vb[0] if vb else None,
        ended_abnormally=abnormal,
        end_reason=reason,
        extras=dict(run.meta.get("summary_extras") or {}),
        **_sanity_summary(ctx, options or AnalyzeOptions()),
    )


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


def _wall_times(run: Run) -> np.ndarray | None:
    s = run.scalar(fmt.TRAIN_LOSS)
    if s is None or not np.isfinite(s.wall_time).any():
        return None
    w = s.wall_time[np.isfinite(s.wall_time)]
    return np.sort(w)


def _end_state(run: Run) -> tuple[bool, str]:
    if run.source_format != "runlens":
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
    last = run.meta.get("last_step")
    where = f" after step {last}" if last is not None else ""
    return True, f"ended abnormally{where}: status {status!r} and no clean close (killed?)"


def _previews(ctx: Context, points: int) -> list[CurvePreview]:
    out = []
    for name in PREVIEW_CURVES:
        c = ctx.curve(name) if ctx.run.has_scalar(name) else None
        if c is None or len(c) == 0:
            continue
        idx = np.unique(np.linspace(0, len(c) - 1, min(points, len(c))).astype(np.int64))
        out.append(
            CurvePreview(
                name=name,
                steps=tuple(int(s) for s in c.steps[idx]),
                values=tuple(float(v) for v in c.raw[idx]),
                smoothed=tuple(float(v) for v in c.smooth[idx]),
            )
        )
    return out
