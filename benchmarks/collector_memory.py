"""Memory of the collector: extra peak memory by model size, and host memory under stress.

``--models`` (issue 17): the peak memory a training process needs with the collector at
its defaults minus the same process without it, for a LoRA-like model (a frozen
100M-parameter base with rank-8 adapters trainable), a fully trainable 25M-parameter MLP
and a fully trainable 350M-parameter MLP. Each (model, with/without) pair runs in fresh
processes, interleaved, ``--repeats`` times; on CPU the device memory is the resident set,
so the figure is peak RSS (``ru_maxrss``) with minus without: device buffers, host ring,
writer, everything.

    python benchmarks/collector_memory.py --models                   # all three, 3 repeats
    python benchmarks/collector_memory.py --models lora mlp25m --repeats 5
    python benchmarks/collector_memory.py --models --probes both   # + without the probes

``--probes off`` runs the collector without the silent-bug probes (``probes=()``);
``--probes both`` adds that process to each interleaved group, so the probes' own share
is the difference of two columns measured side by side.

The rest of this docstring is the stress mode (the default):

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


# -- extra peak memory by model size (issue 17) ---------------------------------------------


class LoRA(nn.Module):
    """``layers`` frozen d x d linears (the base), each with trainable rank-``r`` adapters."""

    def __init__(self, d: int = 2048, layers: int = 24, r: int = 8) -> None:
        super().__init__()
        self.base = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(layers))
        self.a = nn.ModuleList(nn.Linear(d, r, bias=False) for _ in range(layers))
        self.b = nn.ModuleList(nn.Linear(r, d, bias=False) for _ in range(layers))
        for lin in self.b:
            nn.init.zeros_(lin.weight)
        self.base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for base, a, b in zip(self.base, self.a, self.b, strict=True):
            x = torch.tanh(base(x) + b(a(x))) * 0.5
        return x


def _mlp(d: int, layers: int) -> nn.Module:
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(d, d), nn.ReLU()]
    return nn.Sequential(*mods[:-1])


SCALE_MODELS = {
    # name: (builder, batch, optimizer)
    "lora": (lambda: LoRA(2048, 24, 8), 8, "adamw"),
    "mlp25m": (lambda: _mlp(2048, 6), 64, "adamw"),
    "mlp350m": (lambda: _mlp(4096, 21), 4, "sgd"),
}


# --one's collector argument: 0 bare, 1 collector at its defaults, 2 without the probes
_VARIANTS = {"on": 1, "off": 2}


def _one(model_name: str, variant: int, steps: int, out: Path) -> None:
    """One process: build, train ``steps`` steps, write peak RSS and facts to ``out``."""
    with_collector = variant > 0
    torch.set_num_threads(1)
    torch.manual_seed(0)
    build, batch, optim = SCALE_MODELS[model_name]
    model = build()
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    if optim == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(trainable, lr=1e-4)
    else:
        opt = torch.optim.AdamW(trainable, lr=1e-4)
    d = params[0].shape[1]
    x = torch.randn(batch, d)
    rss_model = rss_mb()
    col = None
    with tempfile.TemporaryDirectory() as tmp:
        if with_collector:
            probes = () if variant == 2 else None
            col = Collector(model, opt, run_dir=Path(tmp) / "run", probes=probes)
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if col is not None:
                col.step(loss=loss)
        if col is not None:
            col.close()
        train_s = time.perf_counter() - t0
        info = {
            "model": model_name,
            "collector": with_collector,
            "probes": variant == 1,
            "params": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in trainable),
            "param_mb": round(sum(p.numel() * p.element_size() for p in params) / 2**20, 1),
            "rss_after_model_mb": round(rss_model, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "train_s": round(train_s, 1),
        }
        if col is not None:
            info["memory"] = col.meta["collector"]["memory"]
            info["workspace_peak_mb"] = round(col._workspace.peak_bytes / 2**20, 2)
            info["warnings"] = col.warnings
    out.write_text(json.dumps(info))


def scale_table(models: list[str], repeats: int, steps: int, probes: str = "on") -> dict:
    """Extra peak RSS of the collector per model: fresh processes, interleaved.

    ``probes``: "on" (defaults), "off" (``probes=()``) or "both" (each as its own process
    in the same interleaved group)."""
    import statistics
    import subprocess
    import sys

    variants = [0] + ([1, 2] if probes == "both" else [_VARIANTS[probes]])
    runs: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for m in models:
                for use in variants if r % 2 == 0 else variants[::-1]:
                    out = Path(tmp) / f"{m}-{use}-{r}.json"
                    cmd = [
                        sys.executable,
                        __file__,
                        "--one",
                        m,
                        str(int(use)),
                        str(steps),
                        str(out),
                    ]
                    subprocess.run(cmd, check=True)
                    runs.setdefault((m, use), []).append(json.loads(out.read_text()))
    rows: dict = {}
    print(
        "| model | probes | parameters (trainable) | parameter MB | peak RSS without | with | "
        "collector adds (median, min-max) | budget | update subsets K | device buffers MB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in models:
        bare = runs[(m, 0)]
        for use in variants[1:]:
            col = runs[(m, use)]
            extra = [c["peak_rss_mb"] - b["peak_rss_mb"] for b, c in zip(bare, col, strict=True)]
            mem = col[0]["memory"]
            key = m if probes != "both" else f"{m}:probes={'on' if use == 1 else 'off'}"
            rows[key] = {"bare": bare, "collector": col, "extra_mb": extra}
            print(
                f"| {m} | {'on' if use == 1 else 'off'} | "
                f"{col[0]['params'] / 1e6:.1f}M ({col[0]['trainable'] / 1e6:.2f}M) | "
                f"{col[0]['param_mb']} | "
                f"{statistics.median(b['peak_rss_mb'] for b in bare):.0f} | "
                f"{statistics.median(c['peak_rss_mb'] for c in col):.0f} | "
                f"**{statistics.median(extra):+.0f} MB** ({min(extra):+.0f} to "
                f"{max(extra):+.0f}) | {mem['budget_bytes'] / 2**20:.0f} MiB | "
                f"{mem['update_subsets']} | "
                f"{max(c['workspace_peak_mb'] for c in col):.1f} |"
            )
    return rows


def main() -> None:
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        _one(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--models":
        ap = argparse.ArgumentParser(description="extra peak memory by model size")
        ap.add_argument("--models", nargs="*", default=list(SCALE_MODELS))
        ap.add_argument("--repeats", type=int, default=3)
        ap.add_argument("--steps", type=int, default=4)
        ap.add_argument("--json", type=Path, default=None)
        ap.add_argument(
            "--probes",
            choices=["on", "off", "both"],
            default="on",
            help="the collector with the silent-bug probes (default), without, or both",
        )
        args = ap.parse_args()
        rows = scale_table(args.models or list(SCALE_MODELS), args.repeats, args.steps, args.probes)
        machine = f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}"
        if args.json:
            args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
        return
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
