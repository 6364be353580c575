"""A real training process for the watch tests: an MLP learning a 4-class problem with
the collector recording it. Run as a script (the tests start it in a subprocess):

    python tests/live_trainer.py RUN_DIR --steps 400 --diverge-at 200 --flush-steps 20

``--diverge-at S`` multiplies the learning rate by ``--lr-jump`` from step S on (the loss
climbs away and stays up); ``--hang-at S`` stops making steps at S without closing the
collector (a hung job; the tests kill it); ``--step-sleep`` paces the steps.
"""

from __future__ import annotations

import argparse
import time

import torch
from runlens_collect import Collector


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--diverge-at", type=int, default=None)
    ap.add_argument("--lr-jump", type=float, default=40.0)
    ap.add_argument("--hang-at", type=int, default=None)
    ap.add_argument("--flush-steps", type=int, default=20)
    ap.add_argument("--step-sleep", type=float, default=0.02)
    args = ap.parse_args()

    torch.set_num_threads(1)  # a tiny model: one thread, and the watch gets a core
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    col = Collector(
        model,
        opt,
        run_dir=args.run_dir,
        config={"lr": lr, "num_classes": 4, "task": "classification"},
        flush_steps=args.flush_steps,
        flush_seconds=600.0,  # flushes come every flush_steps steps: one flush interval
        activation_every=10,
        # The writer decodes min(64, max_queue) steps at a time: a queue of flush_steps
        # makes every flush land on its own, flush_steps steps apart.
        max_queue=max(2, min(64, args.flush_steps)),
    )
    with col:
        for step in range(args.steps):
            if step == args.hang_at:
                print(f"hanging at step {step}", flush=True)
                time.sleep(3600)
            if step == args.diverge_at:
                for group in opt.param_groups:
                    group["lr"] = lr * args.lr_jump
            idx = torch.randint(0, 512, (64,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
            time.sleep(args.step_sleep)
    print("done", flush=True)


if __name__ == "__main__":
    main()
