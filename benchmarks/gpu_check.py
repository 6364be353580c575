"""The collector on one GPU, in one command (< 5 minutes): is the CUDA path what it claims?

    python benchmarks/gpu_check.py              # everything
    python benchmarks/gpu_check.py --skip-tests # only the GPT-2-small timing and memory

1. **Tests on CUDA**: ``pytest tests/test_collector_devices.py`` — with a GPU its tests run
   on ``cuda`` too, the training step under ``torch.cuda.set_sync_debug_mode("error")``
   (any host sync in the collector's step path fails; the bare step is checked first),
   the recorded statistics against torch's on the device, and the collector's extra
   ``torch.cuda.max_memory_allocated`` against its memory budget.
2. **GPT-2-small-sized model** (12 layers, d_model 768, 12 heads, 50,257-token vocabulary,
   tied head, sequence 1024, batch 8, AdamW, bfloat16 autocast: 124 M parameters): bare
   and collector steps interleaved (bare, collector, collector, bare, ...), each timed
   with ``torch.cuda.synchronize()`` around it (the benchmark's sync, not the
   collector's); median and whole-run ratios; the collector at its defaults (overhead
   budget 3%) and at a fixed every-step cadence (``overhead=None``).
3. **Peak memory**: ``torch.cuda.max_memory_allocated`` over steps of the bare model and
   of the collector's model (both models resident throughout), and the difference.

Without CUDA it says so and exits 0 (nothing to check here; the same code path runs on
CPU in the test suite).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


class GPT2Small(nn.Module):
    """A GPT-2-small-sized decoder from torch alone (pre-norm blocks, causal attention,
    learned positions, tied head)."""

    def __init__(
        self, vocab: int = 50257, d: int = 768, layers: int = 12, heads: int = 12, ctx: int = 1024
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        block = nn.TransformerEncoderLayer(
            d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
        h = self.blocks(self.tok(idx) + self.pos(pos), mask=mask, is_causal=True)
        return self.head(self.norm(h))


class Trainer:
    def __init__(self, device: torch.device, batch: int, seq: int, knobs: dict | None, tmp: str):
        from runlens_collect import Collector

        torch.manual_seed(0)
        self.model = GPT2Small().to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        g = torch.Generator(device=device).manual_seed(1)
        self.x = torch.randint(0, 50257, (batch, seq), device=device, generator=g)
        self.y = torch.randint(0, 50257, (batch, seq), device=device, generator=g)
        self.col = (
            Collector(self.model, self.opt, run_dir=tmp, **knobs) if knobs is not None else None
        )
        self.times: list[float] = []

    def step(self, timed: bool) -> float:
        """One training step, synchronized before and after; its wall time in seconds."""
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = self.model(self.x)
            loss = nn.functional.cross_entropy(out.flatten(0, 1).float(), self.y.flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.col is not None:
            self.col.step(loss=loss)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if timed:
            self.times.append(dt)
        return dt


def overhead(device: torch.device, steps: int, warmup: int, batch: int, seq: int) -> list[dict]:
    from runlens_collect import observe

    rows = []
    for label, knobs in (
        ("defaults (overhead 3%)", {}),
        ("every step (overhead=None)", {"overhead": None}),
    ):
        # The collector's clock leaves out the bare model's steps: between two of its
        # step() calls the plain clock would see both models' steps (twice the step time,
        # so twice the overhead budget).
        bare_s = [0.0]

        def own_clock(bare_s: list[float] = bare_s) -> float:
            return time.perf_counter() - bare_s[0]

        with tempfile.TemporaryDirectory() as tmp:
            bare = Trainer(device, batch, seq, None, tmp)
            col = Trainer(device, batch, seq, {**knobs, "clock": own_clock}, tmp + "/run")
            for i in range(warmup + steps):
                for t in (bare, col) if i % 2 == 0 else (col, bare):
                    with observe.quiet() if t is bare else contextlib.nullcontext():
                        dt = t.step(timed=i >= warmup)  # bare losses are no collector's
                    if t is bare:
                        bare_s[0] += dt
            t0 = time.perf_counter()
            assert col.col is not None
            col.col.close()
            close = time.perf_counter() - t0
            sampling = col.col.meta["collector"]["sampling"]
            memory = col.col.meta["collector"]["memory"]
            rows.append(
                {
                    "config": label,
                    "bare_ms": statistics.median(bare.times) * 1e3,
                    "col_ms": statistics.median(col.times) * 1e3,
                    "median_ratio": statistics.median(col.times) / statistics.median(bare.times),
                    "whole_run_ratio": (sum(col.times) + close) / sum(bare.times),
                    "last": sampling["last"],
                    "measured_overhead": sampling["measured_overhead"],
                    "update_subsets": memory["update_subsets"],
                    "budget_mib": memory["budget_bytes"] / 2**20,
                    "warnings": col.col.warnings,
                }
            )
            del bare, col
            torch.cuda.empty_cache()
    return rows


def peak_memory(device: torch.device, steps: int, batch: int, seq: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        bare = Trainer(device, batch, seq, None, tmp)
        col = Trainer(
            device,
            batch,
            seq,
            {"overhead": None, "hist_every": 1, "activation_every": 1},
            tmp + "/run",
        )
        for t in (bare, col):
            t.step(timed=False)  # optimizer state, allocator warm
        peaks = {}
        for name, t in (("bare", bare), ("collector", col)):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(steps):
                t.step(timed=False)
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated()
        assert col.col is not None
        budget = col.col.meta["collector"]["memory"]["budget_bytes"]
        col.col.close()
    return {**peaks, "extra": peaks["collector"] - peaks["bare"], "budget": budget}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here; nothing checked (the same code path runs on CPU "
            "in the test suite: tests/test_collector_devices.py, tests/test_collector_budget.py)"
        )
        return 0
    device = torch.device("cuda")
    t_start = time.perf_counter()
    print(f"gpu_check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    failed = False
    if not args.skip_tests:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               str(ROOT / "tests" / "test_collector_devices.py")]  # fmt: skip
        print("$ " + " ".join(cmd), flush=True)
        failed = subprocess.run(cmd, cwd=ROOT).returncode != 0
    rows = overhead(device, args.steps, args.warmup, args.batch, args.seq)
    mem = peak_memory(device, 5, args.batch, args.seq)
    print(
        "\nGPT-2-small-sized model (124M parameters), batch "
        f"{args.batch} x {args.seq} tokens, bf16 autocast, AdamW; {args.steps} timed steps "
        "interleaved with bare training"
    )
    print(
        "| collector | bare ms/step | with ms/step | ratio (median) | whole run | "
        "final cadence (every/act/hist) | own time | K |"
    )
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        last = r["last"]
        own = r["measured_overhead"]
        print(
            f"| {r['config']} | {r['bare_ms']:.1f} | {r['col_ms']:.1f} | {r['median_ratio']:.3f} | "
            f"{r['whole_run_ratio']:.3f} | {last['every']}/{last['activation_every']}/"
            f"{last['hist_every']} | {'?' if own is None else f'{own:.1%}'} | "
            f"{r['update_subsets']} |"
        )
        if r["warnings"]:
            print(f"  warnings: {r['warnings']}")
            failed = True
    gib = 2**30
    print("\nPeak torch.cuda.max_memory_allocated (5 steps each, every statistic every step):")
    print(
        f"bare {mem['bare'] / gib:.2f} GiB, with the collector {mem['collector'] / gib:.2f} GiB: "
        f"+{mem['extra'] / 2**20:.1f} MiB (budget {mem['budget'] / 2**20:.0f} MiB)"
    )
    if mem["extra"] > mem["budget"]:
        print("FAIL: the collector's extra peak memory exceeds its budget")
        failed = True
    print(
        f"\ngpu_check {'FAILED' if failed else 'passed'} in "
        f"{math.ceil(time.perf_counter() - t_start)} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
