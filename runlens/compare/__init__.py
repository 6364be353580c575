"""Runs side by side: ranking, config differences, findings matrix, where curves separate.

``compare(runs) -> Comparison`` loads and analyzes every run (in a thread pool: polars and
numpy release the GIL), then compares them. It never prints; a caller that wants a
progress bar passes ``on_progress`` (the CLI uses :func:`progress_bar`). A run that cannot
be read becomes an entry in ``Comparison.errors`` instead of failing the comparison; only
when no run at all can be read does it raise :class:`~runlens.errors.RunlensError`.

Every per-run tuple in a :class:`Comparison` (config values, matrix cells) is in the
order of ``Comparison.runs``, which is the ranking. The baseline for pairwise results
(separation, layer differences) is the first run *given*, whatever its rank.
See docs/compare.md.

The package follows the jobs: :mod:`~runlens.compare.loading` (inputs, per-run analysis,
progress), :mod:`~runlens.compare.ranking` (ranking, config differences, findings
matrix), :mod:`~runlens.compare.separation` (where curves separate),
:mod:`~runlens.compare.layers` (per-layer differences); :mod:`~runlens.compare.model`
holds the options and result values. Everything public is importable from here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from runlens_collect import format as fmt

from runlens import metrics as M
from runlens.compare.layers import layer_differences
from runlens.compare.loading import (
    GRAD_NORM_STAT,
    PROGRESS_MIN_RUNS,
    UPDATE_RATIO_STAT,
    Loaded,
    ProgressFn,
    dedupe,
    expand_inputs,
    load_one,
    nothing_message,
    progress_bar,
    source_path,
)
from runlens.compare.model import (
    By,
    ComparedRun,
    CompareError,
    CompareOptions,
    Comparison,
    ConfigDiff,
    FindingGroup,
    FindingsRow,
    LayerDiff,
    LayerSetDiff,
    Mode,
    Separation,
)
from runlens.compare.ranking import (
    config_diff,
    entry,
    findings_matrix,
    flatten,
    labels_of,
    metric_mode,
    rank_key,
)
from runlens.compare.separation import MIN_NOISE_POINTS, separation
from runlens.discover import FoundRun
from runlens.errors import OptionError, RunlensError
from runlens.run import Run

# Metric direction (docs/compare.md): see runlens.metrics (re-exported here).
HIGHER_IS_BETTER = M.HIGHER_IS_BETTER
LOWER_IS_BETTER = M.LOWER_IS_BETTER

__all__ = [
    "GRAD_NORM_STAT",
    "HIGHER_IS_BETTER",
    "LOWER_IS_BETTER",
    "MIN_NOISE_POINTS",
    "PROGRESS_MIN_RUNS",
    "UPDATE_RATIO_STAT",
    "By",
    "CompareError",
    "CompareOptions",
    "ComparedRun",
    "Comparison",
    "ConfigDiff",
    "FindingGroup",
    "FindingsRow",
    "LayerDiff",
    "LayerSetDiff",
    "Mode",
    "ProgressFn",
    "Separation",
    "compare",
    "expand_inputs",
    "flatten",
    "metric_mode",
    "progress_bar",
]


def compare(
    runs: Sequence[Run | str | os.PathLike[str]],
    options: CompareOptions | None = None,
    on_progress: ProgressFn | None = None,
) -> Comparison:
    """Compare runs (Run objects, run directories, folders of runs or glob patterns).

    The first run given is the baseline of the pairwise results. Raises
    :class:`RunlensError` when nothing was given or no run could be read.
    """
    opts = options or CompareOptions()
    if not runs:
        raise OptionError("compare needs at least one run")
    sources: list[Run | FoundRun] = []
    errors: list[CompareError] = []
    input_format = None if opts.input_format in (None, "auto") else opts.input_format
    for r in runs:  # expand one at a time so the user's order (and baseline) is kept
        if isinstance(r, Run):
            sources.append(r)
        else:
            found, errs = expand_inputs([r], input_format)
            sources += found
            errors += errs
    sources, dup_warnings = dedupe(sources)
    if not sources:
        raise RunlensError(nothing_message(errors))

    curve_names = None if opts.metric is None else [opts.metric]
    loaded: list[Loaded | None] = [None] * len(sources)
    workers = opts.workers or min(8, len(sources), 2 * (os.cpu_count() or 2))
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(load_one, s, curve_names, opts) for s in sources]
        for i, fut in enumerate(futures):
            try:
                loaded[i] = fut.result()
            except RunlensError as exc:
                errors.append(CompareError(source_path(sources[i]), str(exc)))
            except Exception as exc:  # one corrupt run must not sink a 50-run sweep
                errors.append(CompareError(source_path(sources[i]), f"{type(exc).__name__}: {exc}"))
            done += 1
            if on_progress is not None:
                on_progress(done, len(sources))
    good = [x for x in loaded if x is not None]
    if not good:
        raise RunlensError(nothing_message(errors))
    return _build(good, opts, errors, dup_warnings)


def _build(
    loaded: list[Loaded], opts: CompareOptions, errors: list[CompareError], warnings: list[str]
) -> Comparison:
    warnings = list(warnings)
    labels = labels_of(loaded)
    metric = opts.metric
    if metric is None:
        has_val = all(fmt.VAL_LOSS in x.curves for x in loaded)
        metric = fmt.VAL_LOSS if has_val else fmt.TRAIN_LOSS
    if not any(metric in x.scalar_names for x in loaded):
        avail = sorted({n for x in loaded for n in x.scalar_names})
        raise OptionError(
            f"no run has the metric {metric!r} (available: {', '.join(avail[:12]) or 'none'})"
        )
    if opts.mode is not None:
        mode: Mode = opts.mode
        mode_reason = f"{'lower' if mode == 'min' else 'higher'} is better (given)"
    else:
        mode, mode_reason = metric_mode(metric)
    missing = [lab for lab, x in zip(labels, loaded, strict=True) if metric not in x.curves]
    if missing:
        warnings.append(f"{len(missing)} run(s) have no {metric}: {', '.join(missing[:5])}")

    entries = [entry(lab, x, metric, mode) for lab, x in zip(labels, loaded, strict=True)]
    order = sorted(range(len(entries)), key=lambda i: rank_key(entries[i], mode, i))
    ranked: list[ComparedRun] = []
    rank = 0
    for i in order:
        e = entries[i]
        if e.metric_final is not None:
            rank += 1
            e = dataclasses.replace(e, rank=rank)
        ranked.append(e)
    by_label = {lab: x for lab, x in zip(labels, loaded, strict=True)}
    ranked_loaded = [by_label[e.label] for e in ranked]
    baseline = labels[0]
    base = loaded[0]

    curves = [fmt.TRAIN_LOSS] + ([metric] if metric != fmt.TRAIN_LOSS else [])
    separations = [
        separation(name, baseline, base, lab, x, opts)
        for lab, x in zip(labels[1:], loaded[1:], strict=True)
        for name in curves
        if name in base.curves and name in x.curves
    ]
    layer_diffs, layer_sets = layer_differences(baseline, base, labels[1:], loaded[1:], opts)
    findings, groups, clean = findings_matrix(ranked)
    return Comparison(
        runs=tuple(ranked),
        baseline=baseline,
        metric=metric,
        mode=mode,
        mode_reason=mode_reason,
        by=opts.by,
        config_diff=tuple(config_diff(ranked_loaded)),
        findings=findings,
        groups=groups,
        clean_runs=clean,
        separations=tuple(separations),
        layer_diffs=tuple(layer_diffs),
        layer_sets=tuple(layer_sets),
        layer_ratio=opts.layer_ratio,
        errors=tuple(errors),
        warnings=tuple(warnings),
    )
