"""Wall-time overhead of the collector vs bare training vs TensorBoard histograms.

One process, CPU. Each configuration is paired with bare training: both train their own
identical model and their steps are interleaved one by one (bare, runlens, runlens, bare,
...), so load bursts on a shared machine hit both alike. Reports, over several repeats,
the median step time and the median of the paired ratios to bare training, the whole-run
ratio (every step after the first, activation and histogram steps included, plus the
final flush; ``STEPS`` timed steps per model unless ``--steps``), the same ratio in the
training thread's CPU time (steadier on a shared machine: other processes' load does
not count; the writer thread's own CPU does not either), and what the collector
recorded per step (its adapted cadence, from run.json).

    python benchmarks/collector_overhead.py --model issue17 --threads 1   # issue 17's table
    python benchmarks/collector_overhead.py --model transformer --repeats 7 --steps 30
    python benchmarks/collector_overhead.py --model mlp --configs "runlens;runlens:every=10"
    python benchmarks/collector_overhead.py --configs "runlens:probes=0;runlens"  # probes' cost

Models: ``mlp`` (4 layers, width 512), ``mlp12`` (12 layers, width 128), ``tf2`` (2-layer
transformer, d_model 64), ``transformer`` (8 layers, d_model 128); ``issue17`` runs
mlp12, tf2 and transformer.

"runlens" is ``Collector(model, opt, run_dir)`` at its defaults: an ``overhead`` budget of
3% of the step time, within which it records weight/grad/update statistics (every step
when they fit), activations (every 10 steps when they fit), histograms (every 50); loss,
learning rate, grad_norm and timings every step; and the silent-bug probes
(``runlens:probes=0`` leaves them out). "runlens:overhead=none" is the fixed
cadence of the knobs. "tensorboard" is ``SummaryWriter.add_histogram`` for every
parameter and gradient each step (what ``wandb.watch``-style logging does), plus the loss.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from runlens_collect import Collector, observe
from torch import nn


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 128, layers: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)))


def make(model_name: str, batch: int | None):
    torch.manual_seed(0)
    if model_name == "mlp12":
        b = batch or 256
        layers: list[nn.Module] = []
        for _ in range(12):
            layers += [nn.Linear(128, 128), nn.ReLU()]
        model = nn.Sequential(*layers, nn.Linear(128, 10))
        x, y = torch.randn(b, 128), torch.randint(0, 10, (b,))
        return model, x, y, nn.functional.cross_entropy
    if model_name == "tf2":
        b = batch or 32
        model = TinyTransformer(d=64, layers=2)
        x, y = torch.randint(0, 1000, (b, 64)), torch.randint(0, 1000, (b, 64))

        def tf_loss(out, y):
            return nn.functional.cross_entropy(out.flatten(0, 1), y.flatten())

        return model, x, y, tf_loss
    if model_name == "mlp":
        b = batch or 256
        model = nn.Sequential(
            nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
            nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10),
        )  # fmt: skip
        x, y = torch.randn(b, 256), torch.randint(0, 10, (b,))
        loss_fn = nn.functional.cross_entropy
    else:
        b = batch or 32
        model = TinyTransformer()
        x, y = torch.randint(0, 1000, (b, 64)), torch.randint(0, 1000, (b, 64))

        def loss_fn(out, y):
            return nn.functional.cross_entropy(out.flatten(0, 1), y.flatten())

    return model, x, y, loss_fn


STEPS = {"mlp12": 500, "tf2": 300, "mlp": 300, "transformer": 60}
"""Timed steps per model by default: a whole run, short enough to repeat; the one-off
close (final flush, compaction) spread over them. Real runs are far longer, which only
spreads it thinner."""


class OwnClock:
    """``perf_counter`` minus the time spent in the other configurations' steps.

    With steps interleaved, the time between two ``Collector.step()`` calls holds the
    bare model's step as well: on the plain clock the overhead controller would see twice
    the real step time and allow twice the budget (and record ``time/step`` twice too long).
    """

    def __init__(self) -> None:
        self.excluded = 0.0

    def __call__(self) -> float:
        return time.perf_counter() - self.excluded


class Trainer:
    """One configuration's model, optimizer and per-step hook."""

    def __init__(self, config: str, model_name: str, batch: int | None, tmp: str) -> None:
        self.model, self.x, self.y, self.loss_fn = make(model_name, batch)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.times: list[float] = []
        self.cpu: list[float] = []  # the training thread's CPU seconds per step
        self.clock = OwnClock()
        self.col = None
        self.tb = None
        if config.startswith("runlens"):
            # "runlens" = defaults; "runlens:every=10" etc. override knobs
            knobs = dict(kv.split("=") for kv in config.partition(":")[2].split(",") if kv)
            # probes=0: without the silent-bug probes (runlens_collect.probes); default on.
            probes = () if knobs.pop("probes", "1") == "0" else None
            self.col = Collector(
                self.model,
                self.opt,
                run_dir=tmp,
                clock=self.clock,
                probes=probes,
                **{k: _knob(v) for k, v in knobs.items()},
            )
        elif config == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(tmp)
            self.named = list(self.model.named_parameters())

    def step(self, i: int, timed: bool) -> float:
        """One training step; its wall time in seconds.

        The collector observes loss functions and ``backward`` process-wide
        (``runlens_collect.observe``): bare steps run ``observe.quiet()``, so they pay no
        collector work and the collector never sees their losses. (Each configuration is
        paired with bare training alone: one collector per process at a time.)"""
        if self.col is not None:
            return self._step(i, timed)
        with observe.quiet():
            return self._step(i, timed)

    def _step(self, i: int, timed: bool) -> float:
        c0 = time.thread_time()
        t0 = time.perf_counter()
        loss = self.loss_fn(self.model(self.x), self.y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        if self.col is not None:
            self.col.step(loss=loss)
        elif self.tb is not None:
            self.tb.add_scalar("train/loss", loss, i)
            for n, p in self.named:
                self.tb.add_histogram(n, p, i)
                if p.grad is not None:
                    self.tb.add_histogram(n + "/grad", p.grad, i)
        dt = time.perf_counter() - t0
        if timed:
            self.times.append(dt)
            self.cpu.append(time.thread_time() - c0)
        return dt

    def close(self) -> tuple[float, float]:
        """Seconds of wall time and of this thread's CPU time the close took."""
        c0, t0 = time.thread_time(), time.perf_counter()
        if self.col is not None:
            self.col.close()
        if self.tb is not None:
            self.tb.close()
        return time.perf_counter() - t0, time.thread_time() - c0


def _knob(v: str) -> int | float | None:
    if v.lower() == "none":
        return None
    return float(v) if "." in v else int(v)


def recorded(run_dir: str, steps: int) -> dict:
    """What the collector recorded: its final cadence and the share of steps with each
    kind of layer rows (from run.json and the layers table)."""
    import pyarrow.parquet as pq
    from runlens_collect import format as fmt

    meta = json.loads((Path(run_dir) / fmt.RUN_JSON).read_text())
    kinds: dict[str, set[int]] = {}
    hist_steps: set[int] = set()
    for f in sorted((Path(run_dir) / fmt.LAYERS_DIR).glob(fmt.SEGMENT_GLOB)):
        t = pq.read_table(f, columns=["step", "kind", "hist"]).to_pydict()
        for s, k, h in zip(t["step"], t["kind"], t["hist"], strict=True):
            kinds.setdefault(str(k), set()).add(int(s))
            if h is not None:
                hist_steps.add(int(s))
    total = steps + 1  # steps 0..warmup+steps-1 all recorded; rate over the timed ones
    return {
        "sampling": meta["collector"].get("sampling"),
        "memory": meta["collector"].get("memory"),
        "steps_with": {k: len(v) for k, v in sorted(kinds.items())},
        "hist_steps": len(hist_steps),
        "steps_total": total,
    }


def run(configs: list[str], model_name: str, steps: int, warmup: int, batch: int | None):
    """Seconds per step of each configuration, their steps interleaved one by one.

    Every configuration trains its own identical model; step i of each runs back to back,
    so bursts of load on a shared machine hit all configurations alike. Returns the median
    step time plus the one-off close (final flush) spread over the timed steps.
    """
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {c: Trainer(c, model_name, batch, f"{tmp}/{c}") for c in configs}
        for i in range(warmup + steps):
            order = configs if i % 2 == 0 else configs[::-1]
            for c in order:
                dt = trainers[c].step(i, timed=i >= warmup)
                for other, t in trainers.items():
                    if other != c:
                        t.clock.excluded += dt  # not part of the other models' steps
        out = {}
        for c, t in trainers.items():
            close, close_cpu = t.close()
            # median: the typical step; mean: all of them, incl. activation/histogram
            # steps and the final flush (what a whole training run pays); cpu: the mean
            # in the training thread's CPU time (the close's wait for the writer thread
            # excluded), which other processes' load on a shared machine barely moves
            rec = recorded(f"{tmp}/{c}", warmup + steps) if t.col is not None else None
            out[c] = (
                statistics.median(t.times) + close / steps,
                (sum(t.times) + close) / steps,
                rec,
                (sum(t.cpu) + close_cpu) / steps,
            )
        return out


def _describe(recs: list) -> str:
    """Per repeat: steps with weight/grad/update rows, activation rows, histograms, and the
    final cadence."""
    out = []
    for r in recs:
        if not r:
            continue
        w = r["steps_with"]
        s = r["sampling"] or {}
        last = s.get("last", {})
        m = r["memory"] or {}
        out.append(
            f"{w.get('grad', 0)}/{w.get('activation', 0)}/{r['hist_steps']} of "
            f"{r['steps_total']} steps (grad/act/hist), final every={last.get('every')} "
            f"act={last.get('activation_every')} hist={last.get('hist_every')}, "
            f"K={m.get('update_subsets')}, own {_pct(s.get('measured_overhead'))}"
        )
    return "; ".join(out) if out else "-"


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{x:.1%}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model",
        choices=["mlp", "mlp12", "tf2", "transformer", "both", "issue17"],
        default="both",
    )
    ap.add_argument(
        "--configs",
        default="runlens;tensorboard",
        help="';'-separated: runlens, runlens:every=10,hist_every=100, tensorboard",
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--steps", type=int, default=None, help="timed steps (default: per model, STEPS)"
    )
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = ["bare", *[c for c in args.configs.split(";") if c != "bare"]]
    models = {"both": ["mlp", "transformer"], "issue17": ["mlp12", "tf2", "transformer"]}.get(
        args.model, [args.model]
    )
    results = {}
    for m in models:
        steps = args.steps or STEPS[m]
        samples: dict[str, list[float]] = {c: [] for c in configs}
        means: dict[str, list[float]] = {c: [] for c in configs}
        ratios: dict[str, list[float]] = {c: [] for c in configs}
        mean_ratios: dict[str, list[float]] = {c: [] for c in configs}
        cpu_ratios: dict[str, list[float]] = {c: [] for c in configs}
        records: dict[str, list] = {c: [] for c in configs}
        for _ in range(args.repeats):
            # Each configuration is interleaved with bare training only: two background
            # writers (runlens's, TensorBoard's) in one loop would slow each other's steps.
            for c in configs:
                if c == "bare":
                    continue
                got = run(["bare", c], m, steps, args.warmup, args.batch)
                for name in ("bare", c):
                    samples[name].append(got[name][0])
                    means[name].append(got[name][1])
                ratios[c].append(got[c][0] / got["bare"][0])
                mean_ratios[c].append(got[c][1] / got["bare"][1])
                cpu_ratios[c].append(got[c][3] / got["bare"][3])
                records[c].append(got[c][2])
        med = {c: statistics.median(v) for c, v in samples.items() if v}
        avg = {c: statistics.median(v) for c, v in means.items() if v}
        results[m] = {
            "median_s_per_step": med,
            "mean_s_per_step": avg,
            "samples": samples,
            "means": means,
            "ratios": ratios,
            "mean_ratios": mean_ratios,
            "cpu_ratios": cpu_ratios,
            "steps": steps,
            "recorded": records,
        }
        print(f"\n{m}: {steps} steps, {args.repeats} interleaved repeats (median over repeats)")
        print(
            "| config | median ms/step | ratio | mean ms/step (all steps + close) | ratio "
            "(median, min-max) | CPU ratio (training thread) | recorded |"
        )
        print("|---|---|---|---|---|---|---|")
        for c in configs:
            r = statistics.median(ratios[c]) if ratios[c] else 1.0
            rm = statistics.median(mean_ratios[c]) if mean_ratios[c] else 1.0
            spread = (
                f" ({min(mean_ratios[c]):.3f}-{max(mean_ratios[c]):.3f})" if mean_ratios[c] else ""
            )
            rc = statistics.median(cpu_ratios[c]) if cpu_ratios[c] else 1.0
            print(
                f"| {c} | {med[c] * 1e3:.1f} | {r:.3f} | {avg[c] * 1e3:.1f} | {rm:.3f}{spread} "
                f"| {rc:.3f} | {_describe(records[c])} |"
            )
    info = {
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "args": vars(args),
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"info": info, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
