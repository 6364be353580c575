"""Wall-time overhead of the collector vs bare training vs TensorBoard histograms.

One process, CPU, configurations interleaved (bare, runlens, tensorboard, bare, ...) for
several repeats; reports the median time per step and the ratio to bare training.

    python benchmarks/collector_overhead.py                 # both models, defaults
    python benchmarks/collector_overhead.py --model transformer --repeats 7 --steps 30

"runlens" is ``Collector(model, opt, run_dir)`` at its defaults: weight/grad/update
statistics of every parameter every step, activations every 10 steps, histograms every 50.
"tensorboard" is ``SummaryWriter.add_histogram`` for every parameter and gradient each step
(what ``wandb.watch``-style logging does), plus the loss as a scalar.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from runlens_collect import Collector
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


def run(config: str, model_name: str, steps: int, warmup: int, batch: int | None) -> float:
    """Seconds per step (median over the timed steps) for one configuration."""
    model, x, y, loss_fn = make(model_name, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with tempfile.TemporaryDirectory() as tmp:
        after: Callable[[int, torch.Tensor], None]
        finish: Callable[[], None]
        if config == "runlens":
            col = Collector(model, opt, run_dir=tmp)

            def after(i, loss):
                col.step(loss=loss)

            finish = col.close
        elif config == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(tmp)
            named = list(model.named_parameters())

            def after(i, loss):
                tb.add_scalar("train/loss", loss, i)
                for n, p in named:
                    tb.add_histogram(n, p, i)
                    if p.grad is not None:
                        tb.add_histogram(n + "/grad", p.grad, i)

            finish = tb.close
        else:

            def after(i, loss):
                pass

            def finish():
                pass

        times = []
        t_prev = time.perf_counter()
        for i in range(warmup + steps):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            after(i, loss)
            t = time.perf_counter()
            if i >= warmup:
                times.append(t - t_prev)
            t_prev = t
        t0 = time.perf_counter()
        finish()
        close_s = time.perf_counter() - t0
    # Spread the one-off close (final flush) over the timed steps: honest wall time.
    return statistics.median(times) + close_s / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["mlp", "transformer", "both"], default="both")
    ap.add_argument("--configs", default="bare,runlens,tensorboard")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = args.configs.split(",")
    models = ["mlp", "transformer"] if args.model == "both" else [args.model]
    results = {}
    for m in models:
        samples: dict[str, list[float]] = {c: [] for c in configs}
        for _ in range(args.repeats):
            for c in configs:  # interleaved, so drifts in machine load hit all alike
                samples[c].append(run(c, m, args.steps, args.warmup, args.batch))
        med = {c: statistics.median(v) for c, v in samples.items()}
        results[m] = {"median_s_per_step": med, "samples": samples}
        print(f"\n{m}: median seconds/step over {args.repeats} interleaved repeats")
        print("| config | ms/step | ratio to bare |")
        print("|---|---|---|")
        for c in configs:
            ratio = med[c] / med["bare"] if "bare" in med else float("nan")
            print(f"| {c} | {med[c] * 1e3:.1f} | {ratio:.3f} |")
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
