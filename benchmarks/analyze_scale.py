"""End-to-end speed and memory of ``runlens analyze`` on a large synthetic run.

Builds a run in the runlens format (pyarrow + ``format.write_segment``, one segment per
1000 steps like the collector's flush) of STEPS steps × 50 tensors × 4 kinds
(weight/grad/update/activation) of healthy-looking statistics with noise, histograms every
50 steps, plus the scalars train/loss (every step), val/loss (every 500 steps), lr/0,
grad_norm and time/*. Then, each in a fresh subprocess, repeated and reported as the
median (peak RSS from ``getrusage(RUSAGE_CHILDREN)``):

* ``runlens.analyze(path)`` (the library call; imports not timed),
* ``runlens analyze PATH --format json -o /dev/null`` (the whole CLI process),
* a bare polars ``scan_parquet(...).collect()`` of the layer and scalar tables,
* a projection-only polars scan of the columns the analyzer reads.

    python benchmarks/analyze_scale.py                       # 1M and 10M rows, 3 repeats
    python benchmarks/analyze_scale.py --steps 5000 --repeat 5
    python benchmarks/analyze_scale.py --profile             # cProfile of analyze, top 30

Runs are cached under --dir (default: $TMPDIR/runlens-bench) and rebuilt only when the
generator's parameters change.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from runlens_collect import format as fmt

TENSORS = 50  # per kind: 25 Linear layers (weight + bias) / 25 Linear + 25 ReLU outputs
BLOCKS = TENSORS // 2
KINDS = (fmt.KIND_WEIGHT, fmt.KIND_GRAD, fmt.KIND_UPDATE, fmt.KIND_ACTIVATION)
SEGMENT_STEPS = 1000
HIST_EVERY = 50
VAL_EVERY = 500
GENERATOR_VERSION = 1  # bump when the synthetic data changes, to invalidate caches

# Columns the analyzer reads from the layers table (the projection-only baseline).
ANALYZER_COLUMNS = (
    "step",
    "layer",
    "kind",
    "numel",
    "missing",
    "std",
    "norm",
    "frac_nonfinite",
    "update_ratio",
    "frac_dead_units",
    "frac_saturated",
)


def param_names() -> list[str]:
    return [f"blocks.{i}.fc.{p}" for i in range(BLOCKS) for p in ("weight", "bias")]


def module_names() -> list[str]:
    return [f"blocks.{i}.{m}" for i in range(BLOCKS) for m in ("fc", "act")]


def model_summary() -> dict:
    modules: list[dict] = [{"path": "", "type": "Net", "params": []}]
    for i in range(BLOCKS):
        modules.append(
            {
                "path": f"blocks.{i}.fc",
                "type": "Linear",
                "params": [
                    {"name": "weight", "shape": [256, 256], "numel": 65536, "requires_grad": True},
                    {"name": "bias", "shape": [256], "numel": 256, "requires_grad": True},
                ],
            }
        )
        modules.append({"path": f"blocks.{i}.act", "type": "ReLU", "params": []})
    return {
        "class": "Net",
        "num_params": BLOCKS * (65536 + 256),
        "modules": modules,
        "output_shape": [128, 256],
    }


def _layer_segment(rng: np.random.Generator, steps: np.ndarray) -> pa.Table:
    """Rows of ``steps`` in collector order: step, then kind, then tensor."""
    n_steps = len(steps)
    per_step = len(KINDS) * TENSORS
    n = n_steps * per_step
    params, modules = param_names(), module_names()
    names = params + [m for m in modules if m not in params]
    layer_ids = np.empty(per_step, np.int32)
    kind_ids = np.repeat(np.arange(len(KINDS), dtype=np.int32), TENSORS)
    for k, kind in enumerate(KINDS):
        src = modules if kind == fmt.KIND_ACTIVATION else params
        layer_ids[k * TENSORS : (k + 1) * TENSORS] = [names.index(x) for x in src]
    is_bias = np.array([p.endswith("bias") for p in params] * 3 + [False] * TENSORS)
    is_relu = np.array([False] * (3 * TENSORS) + [m.endswith("act") for m in modules])
    kind_of = np.repeat(np.arange(len(KINDS)), TENSORS)
    numel = np.where(is_bias, 256, 65536).astype(np.int64)
    numel[kind_of == 3] = 128 * 256

    t = np.repeat(steps.astype(np.float64), per_step)
    kind_col = np.tile(kind_of, n_steps)
    noise = rng.lognormal(0.0, 0.1, n).astype(np.float32)
    # plausible scales per kind: weights O(1..10), grads O(0.1) decaying, updates 1e-3
    base = np.array([8.0, 0.3, 0.01, 20.0], np.float32)[kind_col]
    base = base * np.where(np.tile(is_bias, n_steps), 0.1, 1.0).astype(np.float32)
    decay = np.where(kind_col == 1, 1.0 / np.sqrt(1.0 + t / 5000.0), 1.0).astype(np.float32)
    norm = base * decay * noise
    std = norm / np.sqrt(np.tile(numel, n_steps)).astype(np.float32)
    mean = (rng.standard_normal(n).astype(np.float32) * 0.1) * std
    absmax = 4.0 * std * noise
    nan = np.full(n, np.nan, np.float32)
    update_ratio = np.where(kind_col == 2, 1e-3 * noise, np.nan).astype(np.float32)
    relu = np.tile(is_relu, n_steps)
    dead = np.where(relu, 0.05 + 0.02 * rng.random(n), np.nan).astype(np.float32)
    frac_zero = np.where(relu, 0.5, 0.0).astype(np.float32)
    sat = np.where(kind_col == 3, 0.0, np.nan).astype(np.float32)

    hist_rows = np.flatnonzero(np.repeat(steps % HIST_EVERY == 0, per_step))
    counts = rng.multinomial(
        1000, np.full(fmt.HIST_NUM_BINS, 1 / fmt.HIST_NUM_BINS), len(hist_rows)
    )
    offsets = np.zeros(n + 1, np.int32)
    lengths = np.zeros(n, np.int32)
    lengths[hist_rows] = fmt.HIST_NUM_BINS
    offsets[1:] = np.cumsum(lengths)
    valid = np.zeros(n, bool)
    valid[hist_rows] = True
    hist = pa.ListArray.from_arrays(
        pa.array(offsets),
        pa.array(counts.ravel().astype(np.int64)),
        mask=pa.array(~valid),
    )
    cols = {
        "step": pa.array(np.repeat(steps, per_step).astype(np.int64)),
        "layer": pa.DictionaryArray.from_arrays(
            pa.array(np.tile(layer_ids, n_steps)), pa.array(names)
        ),
        "kind": pa.DictionaryArray.from_arrays(
            pa.array(np.tile(kind_ids, n_steps)), pa.array(KINDS)
        ),
        "numel": pa.array(np.tile(numel, n_steps)),
        "missing": pa.array(np.zeros(n, bool)),
        "mean": pa.array(mean),
        "std": pa.array(std),
        "norm": pa.array(norm),
        "absmax": pa.array(absmax),
        "frac_zero": pa.array(frac_zero),
        "frac_nonfinite": pa.array(np.zeros(n, np.float32)),
        "update_ratio": pa.array(update_ratio),
        "frac_dead_units": pa.array(dead),
        "frac_saturated": pa.array(sat),
        "min": pa.array(nan),
        "max": pa.array(nan),
        "row_sum_mean": pa.array(nan),
        "hist": hist,
    }
    return pa.Table.from_pydict(cols, schema=fmt.LAYERS_SCHEMA)


def _scalar_segment(rng: np.random.Generator, steps: np.ndarray, total: int) -> pa.Table:
    t = steps.astype(np.float64)
    loss = 0.3 + 2.0 * np.exp(-t / (total / 5)) + 0.05 * rng.standard_normal(len(t))
    warm = max(1, total // 100)
    lr = 1e-3 * np.where(t < warm, (t + 1) / warm, 0.5 * (1 + np.cos(np.pi * t / total)))
    series = {
        fmt.TRAIN_LOSS: loss,
        fmt.lr_name(0): lr,
        fmt.GRAD_NORM: 1.0 + 0.1 * rng.standard_normal(len(t)),
        fmt.TIME_DATA: np.full(len(t), 0.002),
        fmt.TIME_COMPUTE: np.full(len(t), 0.048),
        fmt.TIME_STEP: np.full(len(t), 0.05),
    }
    names, st, vals = [], [], []
    for name, v in series.items():
        names += [name] * len(t)
        st.append(steps)
        vals.append(v)
    val = steps[steps % VAL_EVERY == 0]
    vt = val.astype(np.float64)
    names += [fmt.VAL_LOSS] * len(val)
    st.append(val)
    vals.append(0.35 + 2.0 * np.exp(-vt / (total / 5)) + 0.02 * rng.standard_normal(len(vt)))
    step = np.concatenate(st)
    return pa.Table.from_pydict(
        {
            "step": step.astype(np.int64),
            "wall_time": 1.7e9 + 0.05 * step,
            "name": pa.array(names).dictionary_encode(),
            "value": np.concatenate(vals),
        },
        schema=fmt.SCALARS_SCHEMA,
    )


def build_run(path: Path, steps: int, seed: int = 0) -> Path:
    """Write the synthetic run (reused when ``path`` already holds the same one)."""
    stamp = {"steps": steps, "seed": seed, "tensors": TENSORS, "version": GENERATOR_VERSION}
    marker = path / ".bench.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    meta = fmt.new_run_json("bench" + "0" * 27, path.name, 1.7e9)
    meta.update(
        status=fmt.STATUS_FINISHED,
        end_time=1.7e9 + 0.05 * steps,
        last_step=steps - 1,
        config={"lr": 1e-3, "num_classes": 256, "task": "classification"},
        model=model_summary(),
    )
    fmt.write_json_atomic(meta, path / fmt.RUN_JSON)
    for seq, start in enumerate(range(0, steps, SEGMENT_STEPS)):
        st = np.arange(start, min(start + SEGMENT_STEPS, steps), dtype=np.int64)
        fmt.write_segment(_layer_segment(rng, st), fmt.segment_path(path, fmt.LAYERS_DIR, 0, seq))
        fmt.write_segment(
            _scalar_segment(rng, st, steps), fmt.segment_path(path, fmt.SCALARS_DIR, 0, seq)
        )
    fmt.append_event(path, {"kind": "start", "time": 1.7e9, "rank": 0, "run_id": meta["run_id"]})
    fmt.append_event(
        path,
        {"kind": "close", "time": 1.7e9, "rank": 0, "last_step": steps - 1, "status": "finished"},
    )
    marker.write_text(json.dumps(stamp))
    return path


# -- measuring (each measurement in a fresh process) ------------------------------------

_LIBRARY = """
import sys, time, runlens
t = time.perf_counter(); report = runlens.analyze(sys.argv[1]); dt = time.perf_counter() - t
print(dt, len(report.findings))
"""

_SCAN = """
import sys, time, polars as pl
cols = sys.argv[2].split(",") if len(sys.argv) > 2 else None
t = time.perf_counter()
lay = pl.scan_parquet(sys.argv[1] + "/layers/rank=*/part-*.parquet", hive_partitioning=False)
sca = pl.scan_parquet(sys.argv[1] + "/scalars/rank=*/part-*.parquet", hive_partitioning=False)
n = (lay.select(cols) if cols else lay).collect().height + sca.collect().height
print(time.perf_counter() - t, n)
"""


def _measure(argv: list[str], timed_inside: bool) -> tuple[float, float]:
    # A wrapper process per measurement, so RUSAGE_CHILDREN's max covers only this child.
    wrapper = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter()\n"
        "out = subprocess.run(sys.argv[1:], check=True, capture_output=True, text=True)\n"
        "wall = time.perf_counter() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "print(json.dumps([wall, rss, out.stdout]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper, *argv], check=True, capture_output=True, text=True
    )
    wall, rss, stdout = json.loads(out.stdout)
    return (float(stdout.split()[0]) if timed_inside else wall), rss


def measure(path: Path, repeat: int) -> dict[str, list[tuple[float, float]]]:
    cli = shutil.which("runlens") or "runlens"
    cases = {
        "runlens.analyze (library call)": ([sys.executable, "-c", _LIBRARY, str(path)], True),
        "runlens analyze --format json (CLI process)": (
            [cli, "analyze", str(path), "--format", "json", "-o", os.devnull],
            False,
        ),
        "polars scan_parquet().collect(), all columns": (
            [sys.executable, "-c", _SCAN, str(path)],
            True,
        ),
        "polars scan, analyzer's columns only": (
            [sys.executable, "-c", _SCAN, str(path), ",".join(ANALYZER_COLUMNS)],
            True,
        ),
    }
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    for _ in range(repeat):  # interleaved, so a burst of load hits every case alike
        for name, (argv, inside) in cases.items():
            results[name].append(_measure(argv, inside))
    return results


def _median(res: dict[str, list[tuple[float, float]]], name: str) -> float:
    return statistics.median(t for t, _ in res[name])


def _cell(samples: list[tuple[float, float]]) -> str:
    t = sorted(x for x, _ in samples)
    rss = statistics.median(r for _, r in samples)
    return f"{statistics.median(t):.2f} | {t[0]:.2f}–{t[-1]:.2f} | {rss:.0f}"


def profile(path: Path, top: int = 30) -> None:
    import cProfile
    import pstats

    import runlens

    runlens.analyze(path)  # warm the page cache and imports
    prof = cProfile.Profile()
    prof.enable()
    runlens.analyze(path)
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[5000, 50000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "runlens-bench")
    ap.add_argument("--profile", action="store_true", help="cProfile analyze on the largest")
    args = ap.parse_args()

    runs = {}
    for steps in args.steps:
        t = time.perf_counter()
        runs[steps] = build_run(args.dir / f"steps-{steps}", steps)
        print(f"run of {steps} steps ready in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    if args.profile:
        profile(runs[max(runs)])
        return
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}, {platform.platform()}"
    )
    for steps, path in runs.items():
        load = os.getloadavg()
        res = measure(path, args.repeat)
        rows = steps * TENSORS * len(KINDS)
        size = sum(f.stat().st_size for f in path.rglob("*.parquet")) / 2**20
        print(
            f"\n{rows:,} layer rows ({steps:,} steps), {size:.0f} MiB of Parquet, "
            f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}, "
            f"median of {args.repeat}"
        )
        print("| what | seconds (median) | min–max | peak RSS MiB |\n|---|---:|---:|---:|")
        for name, samples in res.items():
            print(f"| {name} | {_cell(samples)} |")

        lib = _median(res, "runlens.analyze (library call)")
        cli = _median(res, "runlens analyze --format json (CLI process)")
        bare = _median(res, "polars scan_parquet().collect(), all columns")
        proj = _median(res, "polars scan, analyzer's columns only")
        print(
            f"analyze / full scan = {lib / bare:.1f}×, / projected scan = {lib / proj:.1f}×; "
            f"CLI / full scan = {cli / bare:.1f}×"
        )


if __name__ == "__main__":
    main()
