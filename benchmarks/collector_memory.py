"""Host memory of the collector under stress: many tensors, every statistic every step.

A model with ``--params`` parameter tensors (default 1,000, sizes 16..512 elements) trains
for ``--steps`` steps (default 10,000) with the Collector at its smallest cadence
(``every=1, activation_every=1, hist_every=1``). Every ``--sample-every`` steps the
process's resident set size (RSS, from /proc/self/statm) and the writer's queue length
are sampled. When the writer cannot keep up, the documented policy is to drop that step's
statistics (counted in events.jsonl as ``skipped``) rather than block training or buffer
without limit; the summary says how many steps were dropped.

    python benchmarks/collector_memory.py                       # 1000 tensors, 10k steps
    python benchmarks/collector_memory.py --steps 2000 --json out.json
    python benchmarks/collector_memory.py --defaults --steps 3000 --sample-every 250

Linux only (reads /proc). Prints one line per sample and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
from runlens_collect import Collector
from runlens_collect import format as fmt
from torch import nn

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE / 2**20


class ManyTensors(nn.Module):
    """``n`` small parameter tensors plus a linear head.

    The loss is the head's MSE plus an L2 penalty ``decay/2 * sum ||p||²`` on the many
    tensors, whose gradient ``decay * p`` is set with one foreach op (:meth:`add_penalty_grads`):
    autograd over 1,000 leaves would cost more than the collector being measured.
    """

    def __init__(self, n: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        sizes = [16 * (1 + (i * 7) % 8) for i in range(n)]  # 16 .. 128 elements
        self.ps = nn.ParameterList([nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in sizes])
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x).squeeze(-1)

    @torch.no_grad()
    def add_penalty_grads(self, decay: float = 1e-2) -> None:
        ps = list(self.ps)
        for p, g in zip(ps, torch._foreach_mul(ps, decay), strict=True):
            p.grad = g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--sample-every", type=int, default=1000)
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument(
        "--defaults",
        action="store_true",
        help="the Collector's default cadence and max_queue instead of the stress cadence",
    )
    ap.add_argument(
        "--no-probes", action="store_true", help="without the silent-bug probes (probes=())"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = ManyTensors(args.params)
    n_tensors = len(list(model.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 16), torch.randn(32)
    samples = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        rss0 = rss_mb()
        t0 = time.perf_counter()
        knobs = (
            {}
            if args.defaults
            else {"every": 1, "activation_every": 1, "hist_every": 1, "max_queue": args.max_queue}
        )
        probes = () if args.no_probes else None
        with Collector(model, opt, run_dir=run_dir, probes=probes, **knobs) as col:
            s = col.settings
            cadence = f"every={s.every} activation_every={s.activation_every} "
            cadence += f"hist_every={s.hist_every} max_queue={s.max_queue}"
            writer = col._writer  # for the queue length only
            for step in range(1, args.steps + 1):
                loss = nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                model.add_penalty_grads()
                opt.step()
                col.step(loss=loss)
                if step % args.sample_every == 0:
                    s = {
                        "step": step,
                        "rss_mb": round(rss_mb(), 1),
                        "queue": writer.queue.qsize() if writer else None,
                        "queue_max": writer.queue.maxsize if writer else None,
                        "skipped_so_far": writer.skipped_total if writer else None,
                        "elapsed_s": round(time.perf_counter() - t0, 1),
                    }
                    samples.append(s)
                    print(json.dumps(s), flush=True)
        train_s = time.perf_counter() - t0
        events = [
            json.loads(line)
            for line in (run_dir / fmt.EVENTS_JSONL).read_text().splitlines()
            if line.strip()
        ]
        skipped = max((e.get("total", 0) for e in events if e["kind"] == "skipped"), default=0)
        disk_mb = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file()) / 2**20
    rss = [s["rss_mb"] for s in samples]
    half = len(rss) // 2
    summary = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "param_tensors": n_tensors,
        "steps": args.steps,
        "cadence": cadence,
        "probes": [type(p).__name__ for p in col.probes],
        "rss_before_mb": round(rss0, 1),
        "rss_first_sample_mb": rss[0] if rss else None,
        "rss_last_sample_mb": rss[-1] if rss else None,
        "rss_max_sample_mb": max(rss) if rss else None,
        # growth over the second half of the run: ~0 when memory is bounded
        "rss_growth_second_half_mb": round(rss[-1] - rss[half], 1) if len(rss) > 1 else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "queue_max_seen": max((s["queue"] or 0) for s in samples) if samples else None,
        "skipped_steps": skipped,
        "train_s": round(train_s, 1),
        "steps_per_s": round(args.steps / train_s, 1),
        "run_dir_mb": round(disk_mb, 1),
        "warnings": col.warnings,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "samples": samples}, indent=2))


if __name__ == "__main__":
    main()
