"""Triage throughput: runs analyzed per minute, in-process, with a process pool and on Ray.

Builds the test suite's tree of 200 runs (tests/fleet_tree.py: copies of the 28 sample
runs with varied dates, imported TensorBoard / CSV / HF logs, broken runs), then times
``runlens.fleet.triage.triage`` end to end (discovery, analysis, reports, table, summary)
with ``--force`` into a fresh folder each time:

    python benchmarks/triage.py [--repeats 3] [--copies 6] [--no-ray]

Prints one line per configuration (median of the repeats) and, last, the time of a
re-triage of the unchanged tree (every run reused). Ray's start-up (a local instance) is
timed separately and included in its total, as a user would see it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fleet_tree import build_tree

from runlens.fleet.triage import TriageOptions, triage


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--copies", type=int, default=6)
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="runlens-triage-bench-"))
    os.environ["RUNLENS_CACHE_DIR"] = str(work / "cache")
    try:
        root = work / "tree"
        n = len(build_tree(root, copies=args.copies))
        print(f"tree: {n} runs; cpu count {os.cpu_count()}; load {os.getloadavg()[0]:.1f}")
        triage(root, work / "warm")  # fills the import cache, as a second triage would find it
        configs = [
            ("in-process (--workers 1)", TriageOptions(workers=1, force=True)),
            ("process pool (--workers 2)", TriageOptions(workers=2, force=True)),
        ]
        if not args.no_ray:
            configs.append(
                ("Ray local (--ray --workers 2)", TriageOptions(workers=2, ray="local", force=True))
            )
        for label, opts in configs:
            times = []
            for r in range(args.repeats):
                out = work / f"out-{len(times)}-{r}"
                t0 = time.perf_counter()
                res = triage(root, out, opts)
                times.append(time.perf_counter() - t0)
                assert res.analyzed == n
                shutil.rmtree(out)
            med = statistics.median(times)
            print(
                f"{label:32s} {med:6.1f} s  {60 * n / med:7.0f} runs/min  "
                f"(runs: {', '.join(f'{t:.1f}' for t in times)} s)"
            )
        t0 = time.perf_counter()
        res = triage(root, work / "warm")
        dt = time.perf_counter() - t0
        print(
            f"{'re-triage, nothing changed':32s} {dt:6.1f} s  (analyzed {res.analyzed}, "
            f"reused {res.reused})"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
