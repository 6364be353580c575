"""Re-record the sample runs: ``python sample_runs/make_samples.py [--only NAME ...] [--out DIR]``.

Each selected scenario's run directory is deleted and recorded again by training its tiny
model on CPU (seeded, so the curves are reproducible), then analyzed; one line per run says
how long it took, its size, and whether the diagnosis matches the scenario's expectation.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from sample_runs.scenarios import SCENARIOS, Scenario  # noqa: E402 (needs ROOT on sys.path)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _verdict(s: Scenario, run_dir: Path) -> str:
    import runlens

    report = runlens.analyze(run_dir)
    serious = {f.signature for f in report.findings if f.severity in ("error", "warning")}
    missing = [e for e in s.expect if e not in serious]
    if not s.expect:
        return "ok (healthy)" if not serious else f"FAIL: healthy run reports {sorted(serious)}"
    extra = sorted(serious - set(s.expect))
    if missing:
        return f"FAIL: missing {missing}"
    return "ok" + (f" (also: {', '.join(extra)})" if extra else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="scenarios to re-record")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="folder of the run directories (default: sample_runs/)",
    )
    args = ap.parse_args(argv)
    known = {s.name: s for s in SCENARIOS}
    names = args.only or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; known: {', '.join(known)}")
    failed = 0
    for name in names:
        s = known[name]
        run_dir = args.out / name
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        s.record(run_dir)
        dt = time.perf_counter() - t0
        verdict = _verdict(s, run_dir)
        failed += verdict.startswith("FAIL")
        print(f"{name:28s} {dt:6.1f}s {_size(run_dir) / 1e3:7.0f} kB  {verdict}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
