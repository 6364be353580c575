"""End-to-end speed and memory of ``runlens analyze`` on large synthetic runs.

Builds a run in the runlens format (pyarrow, row groups of 2^16 rows, one segment per
1000 steps like the collector's flush) of STEPS steps × TENSORS tensors × 4 kinds
(weight/grad/update/activation) of healthy-looking statistics with noise, histograms every
50 steps, plus the scalars train/loss (every step), val/loss (every 500 steps), lr/0,
grad_norm and time/*. Then:

* **ratio** (one process, imports done, page cache warm): the bare polars scan of the
  columns the analysis reads (the layers columns of ``engine.plan`` over every signature,
  and the scalars table), and ``runlens.analyze(path)``, interleaved REPEAT times;
  the scan both collected into memory (``collect``, runs up to ``--collect-max`` rows)
  and reduced by the streaming engine (one aggregate per column: reads and decodes every
  value, holds none); the median of each and their ratio;
* **memory** (each in a fresh process, peak RSS from ``getrusage(RUSAGE_CHILDREN)``):
  ``runlens.analyze(path)`` and ``runlens analyze PATH --format json -o /dev/null``.

    python benchmarks/analyze_scale.py                         # 10M rows, 3 repeats
    python benchmarks/analyze_scale.py --steps 500000 --repeat 1            # 100M rows
    python benchmarks/analyze_scale.py --steps 500000 --tensors 500 --repeat 1   # 1B
    python benchmarks/analyze_scale.py --segments 6000 300     # 300 segments, rolled, compacted
    python benchmarks/analyze_scale.py --profile               # cProfile of analyze

Runs are cached under --dir (default: $TMPDIR/runlens-bench) and rebuilt only when the
generator's parameters change.
"""

from __future__ import annotations

import argparse
import itertools
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
KINDS = (fmt.KIND_WEIGHT, fmt.KIND_GRAD, fmt.KIND_UPDATE, fmt.KIND_ACTIVATION)
SEGMENT_STEPS = 1000
HIST_EVERY = 50
VAL_EVERY = 500
TEMPLATE_ROWS = 20_000_000
GENERATOR_VERSION = 2  # bump when the synthetic data changes, to invalidate caches
ROW_GROUP_ROWS = fmt.COMPACT_ROW_GROUP_ROWS
"""Row groups as runlens writes them (collector segments hold at most 100,000 layer rows,
compacted ones 2^16-row groups): polars decodes a whole row group at a time, so files
with 1M-row groups would measure the reader's buffers, not the analysis."""


def param_names(tensors: int = TENSORS) -> list[str]:
    return [f"blocks.{i}.fc.{p}" for i in range(tensors // 2) for p in ("weight", "bias")]


def module_names(tensors: int = TENSORS) -> list[str]:
    return [f"blocks.{i}.{m}" for i in range(tensors // 2) for m in ("fc", "act")]


def model_summary(tensors: int = TENSORS) -> dict:
    blocks = tensors // 2
    modules: list[dict] = [{"path": "", "type": "Net", "params": []}]
    for i in range(blocks):
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
        "num_params": blocks * (65536 + 256),
        "modules": modules,
        "output_shape": [128, 256],
    }


def _layer_segment(rng: np.random.Generator, steps: np.ndarray, tensors: int = TENSORS) -> pa.Table:
    """Rows of ``steps`` in collector order: step, then kind, then tensor."""
    TENSORS = tensors
    n_steps = len(steps)
    per_step = len(KINDS) * TENSORS
    n = n_steps * per_step
    params, modules = param_names(tensors), module_names(tensors)
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


def build_run(path: Path, steps: int, seed: int = 0, tensors: int = TENSORS) -> Path:
    """Write the synthetic run (reused when ``path`` already holds the same one).

    Runs of more than ``TEMPLATE_ROWS`` layer rows repeat one generated segment with its
    steps moved (the noise repeats every segment; each segment is still encoded and
    compressed on its own), so a billion rows take minutes, not hours, to write."""
    stamp = {"steps": steps, "seed": seed, "tensors": tensors, "version": GENERATOR_VERSION}
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
        model=model_summary(tensors),
    )
    fmt.write_json_atomic(meta, path / fmt.RUN_JSON)
    template = None
    if steps * tensors * len(KINDS) > TEMPLATE_ROWS:
        template = _layer_segment(rng, np.arange(SEGMENT_STEPS, dtype=np.int64), tensors)
        per_step = tensors * len(KINDS)
    for seq, start in enumerate(range(0, steps, SEGMENT_STEPS)):
        st = np.arange(start, min(start + SEGMENT_STEPS, steps), dtype=np.int64)
        if template is None:
            layers = _layer_segment(rng, st, tensors)
        else:
            layers = template.slice(0, len(st) * per_step)
            i = layers.schema.get_field_index("step")
            layers = layers.set_column(i, "step", pa.array(np.repeat(st, per_step)))
        _write(layers, fmt.segment_path(path, fmt.LAYERS_DIR, 0, seq))
        _write(_scalar_segment(rng, st, steps), fmt.segment_path(path, fmt.SCALARS_DIR, 0, seq))
    fmt.append_event(path, {"kind": "start", "time": 1.7e9, "rank": 0, "run_id": meta["run_id"]})
    fmt.append_event(
        path,
        {"kind": "close", "time": 1.7e9, "rank": 0, "last_step": steps - 1, "status": "finished"},
    )
    marker.write_text(json.dumps(stamp))
    return path


def _write(table: pa.Table, path: Path) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd", row_group_size=ROW_GROUP_ROWS)


def split_segments(src: Path, dest: Path, parts: int, rolled: dict | None = None) -> Path:
    """A copy of run ``src`` with each table cut into ``parts`` segments by step (the
    same rows, as a collector flushing more often would have written them). With
    ``rolled`` (a dict, filled with the seconds spent writing and merging), each segment
    written is followed by the collector writer's rolling compaction (compact.roll), as
    a run still recording (or crashed) with rolling on leaves it."""
    import pyarrow.parquet as pq
    from runlens_collect import rolling

    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in (fmt.RUN_JSON, fmt.EVENTS_JSONL):
        shutil.copy(src / name, dest / name)
    for table in (fmt.SCALARS_DIR, fmt.LAYERS_DIR):
        files = sorted((src / table).glob(fmt.SEGMENT_GLOB))
        t = pa.concat_tables(pq.read_table(f) for f in files)
        steps = t.column("step").to_numpy()
        cuts = np.linspace(steps.min(), steps.max() + 1, parts + 1).astype(np.int64)
        for seq, (lo, hi) in enumerate(itertools.pairwise(cuts)):
            part = t.filter(pa.array((steps >= lo) & (steps < hi)))
            t0, c0 = time.perf_counter(), time.thread_time()
            fmt.write_segment(part, fmt.segment_path(dest, table, 0, seq))
            if rolled is None:
                continue
            t1, c1 = time.perf_counter(), time.thread_time()
            merged = rolling.roll(dest, table, 0, 0, rows_cache=rolled.setdefault("cache", {}))
            t2, c2 = time.perf_counter(), time.thread_time()
            for key, v in (("write_s", t1 - t0), ("roll_s", t2 - t1), ("write_cpu", c1 - c0),
                           ("roll_cpu", c2 - c1)):  # fmt: skip
                rolled[key] = rolled.get(key, 0.0) + v
            rolled["rows"] = rolled.get("rows", 0) + part.num_rows
            rolled["rewritten"] = rolled.get("rewritten", 0) + sum(m.rows for m in merged)
            live = len(fmt.live_segments((dest / table / "rank=0").glob("part-*.parquet")))
            rolled["most"] = max(rolled.get("most", 0), live)
    return dest


# -- measuring --------------------------------------------------------------------------------

_RATIO = r"""
import json, statistics, sys, time
import polars as pl
import runlens
from pathlib import Path

path, repeat, collect_max = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cols = sys.argv[4].split(",")
lay = pl.scan_parquet(sorted(str(f) for f in path.glob("layers/rank=*/part-*.parquet")))
sca = pl.scan_parquet(sorted(str(f) for f in path.glob("scalars/rank=*/part-*.parquet")))
rows = lay.select(pl.len()).collect().item()

def agg(c, dtype):
    e = pl.col(c)
    if dtype == pl.Categorical:
        return e.to_physical().max()
    if dtype == pl.Boolean:
        return e.sum()
    return e.max()

schema = lay.collect_schema()
def bare_collect():
    return lay.select(cols).collect().height + sca.collect().height
def bare_stream():
    a = lay.select([agg(c, schema[c]) for c in cols]).collect(engine="streaming")
    b = sca.select(pl.col("value").max(), pl.col("step").max(), pl.col("wall_time").max(),
                   pl.col("name").to_physical().max()).collect(engine="streaming")
    return a.width + b.width

def timed(fn):
    t = time.perf_counter(); fn(); return time.perf_counter() - t

out = {"rows": rows, "cols": cols, "collect": [], "stream": [], "analyze": []}
if rows <= 200_000_000:  # larger than the page cache: every pass reads the disk alike
    runlens.analyze(path)  # warm: imports, page cache
for _ in range(repeat):  # interleaved: a burst of load hits each alike
    if rows <= collect_max:
        out["collect"].append(timed(bare_collect))
    out["stream"].append(timed(bare_stream))
    out["analyze"].append(timed(lambda: runlens.analyze(path)))
print(json.dumps(out))
"""

_LIBRARY = """
import sys, time, runlens
t = time.perf_counter(); report = runlens.analyze(sys.argv[1]); dt = time.perf_counter() - t
print(dt, len(report.findings))
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


def planned_columns() -> list[str]:
    """The layers columns an analysis reads: those of ``engine.plan`` over every
    signature (what ``runlens.analyze`` reads in its one pass)."""
    from runlens import engine
    from runlens.needs import LayerStat, NonFiniteRows
    from runlens.signatures import REGISTRY

    needs = engine.plan(REGISTRY.values())
    cols = ["step", "layer", "kind"]
    cols += dict.fromkeys(n.stat for n in needs if isinstance(n, LayerStat))
    if any(isinstance(n, NonFiniteRows) for n in needs):
        cols += [c for c in ("missing", "frac_nonfinite", "norm") if c not in cols]
    return list(dict.fromkeys(cols))


def ratio(path: Path, repeat: int, collect_max: int, code: Path | None = None) -> dict:
    """The interleaved same-process measurement; ``code``: a checkout whose runlens is
    timed instead of this one (the scan reads the same columns either way)."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), str(code / "collectors")])
    cols = ",".join(planned_columns())
    out = subprocess.run(
        [sys.executable, "-c", _RATIO, str(path), str(repeat), str(collect_max), cols],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=code,
    )
    return json.loads(out.stdout)


def memory(path: Path, repeat: int, cli: bool = True) -> dict[str, list[tuple[float, float]]]:
    runlens_cli = shutil.which("runlens") or "runlens"
    cases = {"runlens.analyze (library call)": ([sys.executable, "-c", _LIBRARY, str(path)], True)}
    if cli:
        cases["runlens analyze --format json (CLI process)"] = (
            [runlens_cli, "analyze", str(path), "--format", "json", "-o", os.devnull],
            False,
        )
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    for _ in range(repeat):
        for name, (argv, inside) in cases.items():
            results[name].append(_measure(argv, inside))
    return results


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(
    path: Path, steps: int, tensors: int, repeat: int, collect_max: int, code: Path | None
) -> None:
    load = os.getloadavg()
    size = sum(f.stat().st_size for f in path.rglob("*.parquet")) / 2**20
    r = ratio(path, repeat, collect_max, code)
    if code is not None:
        print(f"\nanalysis timed with the runlens of {code}")
    mem = memory(path, repeat, cli=r["rows"] <= 200_000_000) if code is None else {}
    print(
        f"\n{r['rows']:,} layer rows ({steps:,} steps × {tensors} tensors × 4 kinds), "
        f"{size:,.0f} MiB of Parquet, load average {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f}, median of {repeat}"
    )
    print(f"columns: {', '.join(r['cols'])}")
    print("| what (one process, interleaved) | seconds (median) | min–max |\n|---|---:|---:|")
    rows = [("runlens.analyze(path)", r["analyze"]),
            ("bare scan, streaming aggregate of the columns", r["stream"]),
            ("bare scan, collect of the columns", r["collect"])]  # fmt: skip
    for name, xs in rows:
        if xs:
            print(f"| {name} | {_med(xs):.2f} | {min(xs):.2f}–{max(xs):.2f} |")
    a = _med(r["analyze"])
    line = f"analyze / streaming scan = {a / _med(r['stream']):.2f}×"
    if r["collect"]:
        line += f", analyze / collect scan = {a / _med(r['collect']):.2f}×"
    print(line)
    if mem:
        print("| fresh process | seconds (median) | peak RSS MiB (max) |\n|---|---:|---:|")
    for name, samples in mem.items():
        t = statistics.median(x for x, _ in samples)
        print(f"| {name} | {t:.2f} | {max(m for _, m in samples):.0f} |")


def segments(path: Path, parts: int, repeat: int, workdir: Path) -> None:
    """The same run as ``parts`` segments, as the collector's rolling compaction leaves
    it while recording, and compacted: analyze time of each, interleaved in one
    process; and what the rolling compaction cost the writer."""
    from runlens_collect.compact import compact_run

    many = split_segments(path, workdir / f"{path.name}-{parts}-segments", parts)
    cost: dict = {}
    rolled = split_segments(path, workdir / f"{path.name}-{parts}-rolled", parts, cost)
    one = split_segments(path, workdir / f"{path.name}-compacted", parts)
    done = compact_run(one)
    code = r"""
import json, sys, time, runlens
paths, repeat = sys.argv[1:-1], int(sys.argv[-1])
for p in paths:
    runlens.analyze(p)
wall, cpu = [[] for _ in paths], [[] for _ in paths]
for _ in range(repeat):
    for i, p in enumerate(paths):
        # CPU seconds of the process (all threads) too: less moved by other jobs than wall
        t, c = time.perf_counter(), time.process_time(); runlens.analyze(p)
        wall[i].append(time.perf_counter() - t); cpu[i].append(time.process_time() - c)
print(json.dumps([wall, cpu]))
"""
    runs = [many, rolled, one]
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, runs), str(repeat)],
        check=True,
        capture_output=True,
        text=True,
    )
    wall, cpu = json.loads(out.stdout)
    load = os.getloadavg()
    n = len(list((many / fmt.LAYERS_DIR).glob(fmt.SEGMENT_GLOB)))
    r = len(list((rolled / fmt.LAYERS_DIR).glob(fmt.SEGMENT_GLOB)))
    print(f"\nsegments: {n} per table, rolled {r}, compacted ({done.describe()}); "
          f"load {load[0]:.1f}")  # fmt: skip
    print(
        f"rolling (writer side, both tables): writing {cost['write_s']:.2f} s wall "
        f"({cost['write_cpu']:.2f} s CPU), merging {cost['roll_s']:.2f} s wall "
        f"({cost['roll_cpu']:.2f} s CPU, {cost['roll_cpu'] / cost['write_cpu']:.2f}x the "
        f"writing's); rows rewritten {cost['rewritten'] / cost['rows']:.2f}x; at most "
        f"{cost['most']} live segments per table"
    )
    print("| run | wall s (median) | min–max | CPU s (median) | min–max | wall / compacted |")
    print("|---|---:|---:|---:|---:|---:|")
    names = (f"{n} segments", f"rolled ({r} segments)", "compacted")
    for name, w, c in zip(names, wall, cpu, strict=True):
        ratio = _med(w) / _med(wall[2])
        print(f"| {name} | {_med(w):.3f} | {min(w):.3f}–{max(w):.3f} "
              f"| {_med(c):.3f} | {min(c):.3f}–{max(c):.3f} | {ratio:.3f} |")  # fmt: skip
    for name, i in ((f"{n} segments", 0), ("rolled", 1)):
        print(
            f"{name} / compacted: wall {_med(wall[i]) / _med(wall[2]):.3f} (medians), "
            f"{min(wall[i]) / min(wall[2]):.3f} (minima); CPU "
            f"{_med(cpu[i]) / _med(cpu[2]):.3f} (medians)"
        )


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
    ap.add_argument("--steps", type=int, nargs="+", default=[50000])
    ap.add_argument("--tensors", type=int, default=TENSORS, help="tensors per kind")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--collect-max", type=int, default=20_000_000,
                    help="largest run whose columns are also collected into memory")  # fmt: skip
    ap.add_argument("--segments", type=int, nargs=2, metavar=("STEPS", "PARTS"), default=None,
                    help="a run of STEPS steps in PARTS segments against it compacted")  # fmt: skip
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "runlens-bench")
    ap.add_argument("--profile", action="store_true", help="cProfile analyze on the largest")
    ap.add_argument("--code", type=Path, default=None,
                    help="time the runlens of this checkout (a `git archive` of main)")  # fmt: skip
    args = ap.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}, {platform.platform()}"
    )
    if args.segments:
        steps, parts = args.segments
        path = build_run(args.dir / f"steps-{steps}", steps)
        segments(path, parts, args.repeat, args.dir)
        return
    runs = {}
    for steps in args.steps:
        t = time.perf_counter()
        name = f"steps-{steps}" + ("" if args.tensors == TENSORS else f"-t{args.tensors}")
        runs[steps] = build_run(args.dir / name, steps, tensors=args.tensors)
        print(f"run of {steps} steps ready in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    if args.profile:
        profile(runs[max(runs)])
        return
    for steps, path in runs.items():
        report(path, steps, args.tensors, args.repeat, args.collect_max, args.code)


if __name__ == "__main__":
    main()
