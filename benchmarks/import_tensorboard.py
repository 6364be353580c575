"""Import + analyze a TensorBoard log of N scalars vs reading it with TensorBoard's loader.

    python benchmarks/import_tensorboard.py               # 500k scalars
    python benchmarks/import_tensorboard.py --scalars 100000 --repeat 3

Writes the log with TensorBoard's own ``EventFileWriter``, one event per simple_value
scalar (the layout of PyTorch's ``SummaryWriter.add_scalar``): 10 tags (train loss, lr,
grad norm, 6 other per-step metrics, a val loss every 10 steps; the loss turns NaN in the
last 10%). The OS file cache is warmed by one read first. Then it times:

* ``EventAccumulator``: ``EventAccumulator(dir, size_guidance={"scalars": 0}).Reload()``
  plus ``Scalars(tag)`` for every tag (what TensorBoard does, keep-everything mode);
* ``import``: ``runlens.sources.open_run`` with an empty cache (read + convert + write);
* ``import + analyze``: the same followed by ``runlens.analyze``;
* ``cached analyze``: ``open_run`` + ``analyze`` again: the import cache is reused.

Prints a Markdown table (median of ``--repeat`` runs).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def write_log(logdir: Path, n_scalars: int) -> int:
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    per_step = 9.1  # 9 per-step tags + val/loss every 10 steps
    steps = int(n_scalars / per_step)
    w = EventFileWriter(str(logdir), max_queue_size=1000, flush_secs=120)
    t0 = time.time()
    written = 0
    others = [f"metrics/m{i}" for i in range(6)]
    for s in range(steps):
        loss = 2.0 * math.exp(-s / (steps / 4)) + 0.05 * math.sin(s)
        if s > 0.9 * steps:
            loss = float("nan")  # the run diverges near the end
        vals = [("train/loss", loss), ("lr", 1e-3), ("grad_norm", 1.0 + 0.1 * math.cos(s))]
        vals += [(t, math.sin(s * 0.001 + i)) for i, t in enumerate(others)]
        if s % 10 == 0:
            vals.append(("val/loss", loss + 0.1))
        for t, v in vals:  # one event per value, as SummaryWriter.add_scalar writes them
            summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=t, simple_value=v)])
            w.add_event(event_pb2.Event(wall_time=t0 + s * 0.01, step=s, summary=summary))
        written += len(vals)
    w.close()
    return written


def time_it(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scalars", type=int, default=500_000)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import runlens
    from runlens.sources import open_run

    work = Path(tempfile.mkdtemp(prefix="runlens-bench-"))
    logdir, cache = work / "tb", work / "cache"
    os.environ["RUNLENS_CACHE_DIR"] = str(cache)
    try:
        t = time.perf_counter()
        n = write_log(logdir, args.scalars)
        size = sum(f.stat().st_size for f in logdir.iterdir())
        print(f"wrote {n} scalars ({size / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s",
              file=sys.stderr)  # fmt: skip
        for f in logdir.iterdir():
            f.read_bytes()  # warm the OS cache for every contender alike

        def accumulator() -> None:
            ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
            ea.Reload()
            got = sum(len(ea.Scalars(tag)) for tag in ea.Tags()["scalars"])
            assert got == n, (got, n)

        def cold_import() -> None:
            shutil.rmtree(cache, ignore_errors=True)
            run = open_run(logdir)
            assert run.source_format == "tensorboard"

        def cold_import_analyze() -> None:
            shutil.rmtree(cache, ignore_errors=True)
            report = runlens.analyze(open_run(logdir))
            assert any(f.signature == "nan-inf" for f in report.findings)

        def cached_analyze() -> None:
            runlens.analyze(open_run(logdir))

        rows = [
            ("TensorBoard EventAccumulator (read all scalars)", time_it(accumulator, args.repeat)),
            ("runlens import (read + convert to Parquet)", time_it(cold_import, args.repeat)),
            ("runlens import + analyze", time_it(cold_import_analyze, args.repeat)),
            ("runlens analyze, import cached", time_it(cached_analyze, args.repeat)),
        ]
        print(f"| {n:,} scalars, {size / 1e6:.1f} MB event file | seconds |")
        print("|---|---:|")
        for name, secs in rows:
            print(f"| {name} | {secs:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
