"""Immutable analysis state: signatures run in parallel threads, without locks, and give
exactly what they give one after another; an analysis never changes the Run it reads.

On the recorded sample runs: the whole report with 8 worker threads is byte-identical to
the serial one, and the full registry run by 6 threads at once on one prepared Context
(every thread every signature, started together, plus undeclared reads of statistics
nobody planned) gives each signature's serial findings in every thread.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from runlens_collect import format as fmt

import runlens
from runlens.context import Context
from runlens.engine import AnalyzeOptions, _run_one, make_context, plan, resolve_params
from runlens.report import json_report
from runlens.run import load_run
from runlens.signatures import REGISTRY

SAMPLES = Path(__file__).resolve().parent.parent / "sample_runs"
RUNS = sorted(p.name for p in SAMPLES.iterdir() if (p / "run.json").is_file())


@pytest.mark.parametrize("name", RUNS)
def test_report_with_worker_threads_is_the_serial_report(name: str) -> None:
    serial = json_report.render(runlens.analyze(SAMPLES / name))
    threaded = json_report.render(runlens.analyze(SAMPLES / name, AnalyzeOptions(workers=8)))
    assert threaded == serial


def _outcomes(ctx: Context) -> dict[str, object]:
    out = {}
    for name, sig in REGISTRY.items():
        o = _run_one(ctx, name, sig, resolve_params(sig, {}))
        out[name] = (o.missing, o.skipped, o.warning, o.findings, o.parts)
    return out


@pytest.mark.parametrize(
    "name", ["exploding-gradients", "frozen-layer", "healthy-transformer", "nan-inf"]
)
def test_registry_run_concurrently_on_one_context(name: str) -> None:
    run = load_run(SAMPLES / name)
    serial = _outcomes(make_context(run))

    ctx = make_context(run)
    ctx.prepare(plan(REGISTRY.values()))
    threads = 6
    start = threading.Barrier(threads)

    def everything(i: int) -> dict[str, object]:
        start.wait()
        # Reads nobody declared, in the middle of the others: computed once, shared.
        ctx.layer(fmt.KIND_GRAD, "absmax")
        ctx.layer(fmt.KIND_WEIGHT, "mean", "max")
        names = list(REGISTRY)
        order = names[i:] + names[:i]  # each thread in its own order
        return {n: _outcomes_one(ctx, n) for n in order}

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(everything, range(threads)))
    for got in results:
        assert got == serial
    a = ctx.layer(fmt.KIND_GRAD, "absmax")
    assert a is not None and a is ctx.layer(fmt.KIND_GRAD, "absmax")


def _outcomes_one(ctx: Context, name: str) -> object:
    sig = REGISTRY[name]
    o = _run_one(ctx, name, sig, resolve_params(sig, {}))
    return (o.missing, o.skipped, o.warning, o.findings, o.parts)


def test_analysis_leaves_the_run_unchanged() -> None:
    run = load_run(SAMPLES / "exploding-gradients")
    before = {
        "warnings": list(run.warnings),
        "files": {k: list(v) for k, v in run._files.items()},
        "layers": run.layers,
        "scalars": run.scalars,
        "facts": run.facts,
        "dict": set(vars(run)),
    }
    runlens.analyze(run)
    runlens.analyze(run, AnalyzeOptions(workers=4))
    assert run.warnings == before["warnings"]
    assert {k: list(v) for k, v in run._files.items()} == before["files"]
    assert run.layers is before["layers"] and run.scalars is before["scalars"]
    assert run.facts == before["facts"]
    assert set(vars(run)) == before["dict"]  # nothing cached on it
