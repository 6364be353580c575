"""Resident memory of a long run with many parameter tensors, at the collector's defaults.

    STEPS=3000 python benchmarks/collector_rss.py

1,000 parameter tensors (16..512 elements), SGD; gradients are set with one foreach op
(autograd over 1,000 leaves would dominate). Prints RSS every 250 steps and the number of
steps the writer dropped (``skipped`` events). Linux only (reads /proc/self/statm).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import torch
from runlens_collect import Collector
from torch import nn


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = nn.ParameterList([nn.Parameter(torch.randn(16 + (i * 37) % 497)) for i in range(1000)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    params = list(model.parameters())
    steps = int(os.environ.get("STEPS", 3000))
    samples = []
    with tempfile.TemporaryDirectory() as tmp:
        col = Collector(model, opt, run_dir=tmp)
        t0 = time.time()
        for i in range(steps):
            for p, g in zip(params, torch._foreach_mul(params, 1e-3), strict=True):
                p.grad = g
            opt.step()
            col.step(loss=torch.tensor(1.0))
            if i % 250 == 0 or i == steps - 1:
                samples.append((i, round(rss_mb(), 1)))
                print(f"step {i:6d}  rss {samples[-1][1]:7.1f} MB  {time.time() - t0:6.1f} s")
        col.close()
        with open(os.path.join(tmp, "events.jsonl")) as fh:
            skipped = sum(1 for line in fh if '"skipped"' in line)
    print(json.dumps({"rss_mb_by_step": samples, "skipped_events": skipped}))


if __name__ == "__main__":
    main()
