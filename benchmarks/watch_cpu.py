"""What `runlens watch` costs: CPU on an idle and on a busy run, and the cost of one poll
as a run grows (what is incremental and what is not).

    python benchmarks/watch_cpu.py [--seconds 60] [--interval 5] [--steps 20000]

1. idle: ``runlens watch`` on a run that is ``running`` but writes nothing, for
   ``--seconds``; CPU seconds of the watch process (utime + stime from /proc) over wall
   seconds, after its start-up (imports, first read) is subtracted.
2. busy: the same on a real trainer (tests/live_trainer.py, an MLP on CPU with the
   collector, flushing every 100 steps, as fast as it goes).
3. growth: a synthetic run of ``--steps`` steps (20 layers x weight/grad/update every step,
   a flush every 500 steps) fed to a Watcher one segment at a time; the time to read the
   new segment and the time of the analysis pass are printed every 10 segments, next to a
   full ``runlens analyze`` of the run so far. Reading is proportional to the new segment;
   the curve pass re-runs the curve signatures over the whole series (numpy, O(steps));
   the layer pass works on at most head + window layer steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from runlens_collect import format as fmt

ROOT = Path(__file__).resolve().parent.parent
RUNLENS = [sys.executable, "-c", "from runlens.cli import main; main()"]
TICK = os.sysconf("SC_CLK_TCK")
KINDS = ["weight", "grad", "update"]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def measure_watch(run_dir: Path, seconds: float, interval: float) -> tuple[float, float]:
    """(CPU % of one core over the steady state, CPU s of start-up) of `runlens watch`."""
    proc = subprocess.Popen(
        [*RUNLENS, "watch", str(run_dir), "--interval", str(interval), "--format", "jsonl"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # the first event: imports done, the run read once
    # Keep reading its output, so a full pipe never blocks (or idles) the watch.
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    t0, c0 = time.monotonic(), cpu_seconds(proc.pid)
    time.sleep(seconds)
    t1, c1 = time.monotonic(), cpu_seconds(proc.pid)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    return 100 * (c1 - c0) / (t1 - t0), c0


def idle_run(dest: Path) -> Path:
    shutil.copytree(ROOT / "sample_runs" / "healthy-transformer", dest)
    meta = json.loads((dest / fmt.RUN_JSON).read_text())
    meta["status"] = fmt.STATUS_RUNNING
    fmt.write_json_atomic(meta, dest / fmt.RUN_JSON)
    return dest


def busy(work: Path, seconds: float, interval: float) -> tuple[float, int]:
    run = work / "busy"
    trainer = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "live_trainer.py"),
            str(run),
            "--steps",
            "10000000",
            "--flush-steps",
            "100",
            "--step-sleep",
            "0",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        while not (run / fmt.RUN_JSON).exists():
            time.sleep(0.1)
        pct, _ = measure_watch(run, seconds, interval)
        meta = json.loads((run / fmt.RUN_JSON).read_text())
    finally:
        trainer.kill()
        trainer.wait()
    return pct, int(meta.get("last_step") or 0)


def synthetic_segments(steps: int, layers: int = 20, flush: int = 500):
    rng = np.random.default_rng(0)
    loss = 2.5 * np.exp(-np.arange(steps) / (steps / 3)) + 0.3 + 0.05 * rng.standard_normal(steps)
    names = [f"block{i}.weight" for i in range(layers)]
    for lo in range(0, steps, flush):
        s = np.arange(lo, min(lo + flush, steps))
        sc_names = ["train/loss", "lr/0", "grad_norm", "time/step"]
        sc = pa.table(
            {
                "step": np.repeat(s, len(sc_names)),
                "wall_time": np.repeat(1.7e9 + 0.1 * s, len(sc_names)).astype(np.float64),
                "name": pa.array(sc_names * len(s)).dictionary_encode(),
                "value": np.column_stack(
                    [
                        loss[s],
                        np.full(len(s), 1e-3),
                        1 + 0.1 * rng.random(len(s)),
                        np.full(len(s), 0.1),
                    ]
                ).ravel(),
            }
        )
        n = len(s) * layers * 3
        cols = {
            "step": np.repeat(s, layers * 3),
            "layer": pa.array(np.tile(np.repeat(names, 3), len(s))).dictionary_encode(),
            "kind": pa.array(np.tile(KINDS, len(s) * layers)).dictionary_encode(),
            "numel": np.full(n, 4096, np.int64),
            "missing": np.zeros(n, bool),
        }
        for stat in fmt.BASE_STATS:
            cols[stat] = rng.random(n).astype(np.float32)
        cols["update_ratio"] = np.full(n, 1e-3, np.float32)
        lt = pa.table(cols)
        yield sc.cast(fmt.SCALARS_SCHEMA), lt


def growth(work: Path, steps: int) -> None:
    from runlens.engine import analyze
    from runlens.live import Watcher, WatchOptions

    run = work / "growth"
    run.mkdir()
    meta = fmt.new_run_json("bench", "growth", 1.7e9)
    fmt.write_json_atomic(meta, run / fmt.RUN_JSON)
    w = Watcher(run, WatchOptions(interval=1, confirm=1))
    print(
        f"{'steps':>7} {'rows':>9} {'read s':>7} {'curve pass s':>12} {'full pass s':>11} "
        f"{'analyze s':>9}"
    )
    last = {"curve": 0.0, "full": 0.0}
    for seq, (sc, lt) in enumerate(synthetic_segments(steps)):
        fmt.write_segment(sc, fmt.segment_path(run, fmt.SCALARS_DIR, 0, seq))
        fmt.write_segment(lt, fmt.segment_path(run, fmt.LAYERS_DIR, 0, seq))
        r0, a0, f0 = w.stats.read_seconds, w.stats.analyze_seconds, w.stats.full_passes
        w.poll()
        last["full" if w.stats.full_passes > f0 else "curve"] = w.stats.analyze_seconds - a0
        if seq % 10 == 9:
            t0 = time.perf_counter()
            analyze(run)
            full = time.perf_counter() - t0
            print(
                f"{int(sc['step'][-1].as_py()) + 1:>7} {w.stats.rows_read:>9} "
                f"{w.stats.read_seconds - r0:>7.3f} {last['curve']:>12.3f} "
                f"{last['full']:>11.3f} {full:>9.3f}"
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--interval", type=float, default=5)
    ap.add_argument("--steps", type=int, default=20000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="runlens-watch-bench-"))
    os.environ["RUNLENS_CACHE_DIR"] = str(work / "cache")
    print(f"cpu count {os.cpu_count()}; load {os.getloadavg()[0]:.1f}")
    try:
        pct, start = measure_watch(idle_run(work / "idle"), args.seconds, args.interval)
        print(
            f"idle run, interval {args.interval:g} s: {pct:.2f}% of one core "
            f"(start-up {start:.1f} CPU s)"
        )
        pct, last = busy(work, args.seconds, args.interval)
        print(
            f"busy run (trainer reached step {last}), interval {args.interval:g} s: "
            f"{pct:.2f}% of one core"
        )
        growth(work, args.steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
