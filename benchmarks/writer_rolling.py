"""What the collector's rolling compaction costs the writer thread, on a real training run.

Trains ``mlp12`` (12 Linear(128, 128) + ReLU layers and a head, batch 256, the model of
benchmarks/collector_overhead.py) on CPU for STEPS steps with the real Collector,
flushing every FLUSH steps, alternately with rolling compaction on and off (ROUNDS
times each), and reports per configuration: the writer thread's CPU seconds (from
/proc, Linux; with the roller thread that merges), of which writing segments and
merging them (``Writer.roll_stats``), the
rows rewritten by merges per row written, the live segments per table just before
``close()``, and the training wall time per step.

    python benchmarks/writer_rolling.py                              # 2000 steps, flush 20
    python benchmarks/writer_rolling.py --steps 6000 --flush 20      # 300 flushes
    python benchmarks/writer_rolling.py --steps 2000 --flush 500     # the default flush
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from runlens_collect import Collector
from runlens_collect import format as fmt

sys.path.insert(0, str(Path(__file__).parent))
from collector_overhead import make


def _thread_cpu(native_id: int) -> float:
    """CPU seconds (user + system) of one thread of this process (Linux /proc)."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(run_dir: Path, steps: int, flush: int, rolling: bool) -> dict[str, float]:
    model, x, y, loss_fn = make("mlp12", None)  # collector_overhead's model and batch
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    shutil.rmtree(run_dir, ignore_errors=True)
    col = Collector(model, opt, run_dir=run_dir, flush_steps=flush, rolling=rolling)
    writer = col._writer
    assert writer is not None
    t = time.perf_counter()
    for _ in range(steps):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        col.step(loss=loss)
    wall = time.perf_counter() - t
    col.flush()
    while writer.done_step != col._step - 1 and writer.is_alive():
        time.sleep(0.01)
    # Before close(): its compaction is not the writer's. The merges run on the roller
    # thread (rolling.Roller): both threads' CPU, the collector's background cost.
    roller = writer._roller
    cpu = _thread_cpu(writer.native_id)
    if roller is not None and roller.native_id is not None:
        cpu += _thread_cpu(roller.native_id)
    segments = max(
        len(fmt.live_segments((run_dir / tb / "rank=0").glob("part-*.parquet")))
        for tb in (fmt.SCALARS_DIR, fmt.LAYERS_DIR)
    )
    s = writer.roll_stats
    col.close()
    rows = sum(pq.read_metadata(f).num_rows for f in run_dir.glob("*/rank=0/part-*.parquet"))
    return {
        "writer_cpu": cpu,
        "write_cpu": s.write_cpu,
        "roll_cpu": s.roll_cpu,
        "rewritten": s.rows_rewritten / max(1, rows),
        "segments": segments,
        "ms_per_step": 1e3 * wall / steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--flush", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}, torch {torch.__version__}; load {os.getloadavg()[0]:.1f}"
    )
    out: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for rolling in (True, False):
                out[rolling].append(one_run(Path(tmp) / "run", args.steps, args.flush, rolling))
    print(f"mlp12, {args.steps} steps, flush every {args.flush} "
          f"({args.steps // args.flush} flushes), medians of {args.rounds}; load "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| rolling | writer + roller CPU s | writing segments CPU s | merging CPU s "
          "| rows rewritten | live segments before close | ms / step |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for rolling in (True, False):
        med = {k: statistics.median(r[k] for r in out[rolling]) for k in out[rolling][0]}
        print(
            f"| {'on' if rolling else 'off'} | {med['writer_cpu']:.2f} | {med['write_cpu']:.2f} "
            f"| {med['roll_cpu']:.2f} | {med['rewritten']:.2f}x | {med['segments']:.0f} "
            f"| {med['ms_per_step']:.2f} |"
        )


if __name__ == "__main__":
    main()
