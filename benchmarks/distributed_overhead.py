"""Per-rank wall-time overhead of the collector under DDP (torchrun, gloo, CPU).

    torchrun --standalone --nproc_per_node=2 benchmarks/distributed_overhead.py \\
        --model mlp12 --steps 60 --repeats 3 [--json out.json]

Every rank trains two identical DDP models (the same process group) with their steps
interleaved one by one (bare, runlens, runlens, bare, ...) as in collector_overhead.py, so
load bursts on a shared machine hit both alike; one of them has a ``Collector`` (default
settings: the 3% ``overhead`` budget, probes on) writing its own rank partition of one run
directory. Reported per rank: the median bare step, the median of the paired step ratios
(runlens / bare) and the whole-run ratio (every step, the collector's flush and close
included), and what the collector measured itself (run.json ``collector.sampling``
``measured_overhead``, rank 0; the other ranks' from their own collectors). The step of a
DDP model includes its all-reduce, so a rank's overhead also shows the other rank's: the
job runs at the pace of the slower rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from runlens_collect import Collector, observe
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from collector_overhead import make


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mlp12")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for rep in range(args.repeats):
        model_a, x, y, loss_fn = make(args.model, args.batch)
        model_b, _, _, _ = make(args.model, args.batch)
        bare = nn.parallel.DistributedDataParallel(model_a)
        seen = nn.parallel.DistributedDataParallel(model_b)
        opt_a = torch.optim.AdamW(bare.parameters(), lr=1e-3)
        opt_b = torch.optim.AdamW(seen.parameters(), lr=1e-3)
        tmp = tempfile.mkdtemp(prefix="runlens-dist-bench-") if rank == 0 else None
        holder = [tmp]
        dist.broadcast_object_list(holder, src=0)  # one run directory for every rank
        run_dir = Path(holder[0]) / "run"
        col = Collector(seen, opt_b, run_dir=run_dir)

        def step(model, opt, col, x=x, y=y, loss_fn=loss_fn):
            t0 = time.perf_counter()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if col is not None:
                col.step(loss=loss)
            return time.perf_counter() - t0

        times_a, times_b = [], []
        whole_a = whole_b = 0.0
        for i in range(args.warmup + args.steps):
            order = (False, True) if i % 2 == 0 else (True, False)
            for with_col in order:
                if with_col:
                    t = step(seen, opt_b, col)
                else:
                    with observe.quiet():  # the bare model's losses are no collector's
                        t = step(bare, opt_a, None)
                if i >= args.warmup:
                    (times_b if with_col else times_a).append(t)
                    if with_col:
                        whole_b += t
                    else:
                        whole_a += t
        t0 = time.perf_counter()
        col.close()
        whole_b += time.perf_counter() - t0
        ratios = [b / a for a, b in zip(times_a, times_b, strict=True)]
        measured = None
        if rank == 0:
            meta = json.loads((run_dir / "run.json").read_text())
            measured = meta["collector"]["sampling"].get("measured_overhead")
        rows.append(
            {
                "rank": rank,
                "repeat": rep,
                "bare_ms": 1e3 * statistics.median(times_a),
                "runlens_ms": 1e3 * statistics.median(times_b),
                "paired_ratio": statistics.median(ratios),
                "whole_run_ratio": whole_b / whole_a,
                "measured_overhead_rank0": measured,
            }
        )
        dist.barrier()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        flat = [r for part in gathered for r in part]
        print(f"model {args.model}, {world} ranks (gloo, CPU, 1 thread each), "
              f"{args.steps} steps x {args.repeats} repeats")  # fmt: skip
        print("rank  bare ms  runlens ms  paired ratio  whole-run ratio")
        for r in range(world):
            mine = [row for row in flat if row["rank"] == r]
            keys = ("bare_ms", "runlens_ms", "paired_ratio", "whole_run_ratio")
            med = {k: statistics.median(row[k] for row in mine) for k in keys}
            print(f"{r:>4}  {med['bare_ms']:7.2f}  {med['runlens_ms']:10.2f}  "
                  f"{med['paired_ratio']:12.3f}  {med['whole_run_ratio']:15.3f}")  # fmt: skip
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": flat}, indent=1))
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
