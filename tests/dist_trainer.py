"""A tiny data-parallel training job for the distributed tests (run under torchrun, gloo).

    torchrun --nproc_per_node=2 tests/dist_trainer.py --out RUN --mode MODE [--zero-code]

Modes (every one trains the same small regression MLP with SGD for ``--steps`` steps):

* ``healthy``: DDP, each rank its own slice of the data (what DistributedSampler does);
* ``nosync``: DDP with ``0.bias`` excluded from gradient sync (DDP's
  ``_set_params_and_buffers_to_ignore_for_model``): the replicas' ``0.bias`` drift apart;
* ``slow``: DDP, rank 1 waits ``--delay`` seconds for each batch (a slow input pipeline);
* ``samedata``: DDP, every rank reads rank 0's slice (the sampler was forgotten);
* ``nan``: DDP, rank 1's batch of step 10 holds a NaN (the all-reduce then spreads NaN
  gradients to every rank);
* ``zero1`` / ``zero2``: DeepSpeed ZeRO stage 1 / 2 (CPU accelerator, gloo), the
  collector on the engine and the client optimizer (runs only where deepspeed imports);
* ``fsdp2``: ``fully_shard`` on each Linear and the root (uneven shards: 15 rows over 2 ranks, and
  the output layer's single row on rank 0 only).

Each rank writes ``RUN.truth/rank<R>.json``: the losses it computed, the collectives
called during its optimizer steps and ``Collector.step()`` calls (0: the collector
never communicates) and, under FSDP2,
rank 0 the statistics of the *unsharded* weights and gradients at each step (from
``full_tensor()``, outside the collector), the ground truth the tests compare with.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor.debug import CommDebugMode


def stats(t: torch.Tensor) -> dict[str, float]:
    t = t.detach().double().reshape(-1)
    return {
        "numel": t.numel(),
        "norm": float(t.norm()),
        "mean": float(t.mean()),
        "std": float(t.std()) if t.numel() > 1 else math.nan,
        "absmax": float(t.abs().max()),
        "frac_zero": float((t == 0).double().mean()),
    }


def _fsdp1_full(model: nn.Module, grads: bool) -> dict[str, dict[str, float]]:
    """Statistics of FSDP1's unsharded parameters (or gradients): each rank's 1-D parts
    all-gathered and concatenated in rank order (the flat shards are contiguous)."""
    out = {}
    world = dist.get_world_size()
    for name, p in model.named_parameters():
        t = (p.grad if grads else p).detach().reshape(-1).double()
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([t.numel()]))
        parts = [torch.zeros(int(s), dtype=torch.double) for s in sizes]
        dist.all_gather(parts, t.contiguous())
        out[name] = stats(torch.cat(parts))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", default="healthy")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--delay", type=float, default=0.03)
    ap.add_argument("--zero-code", action="store_true")
    ap.add_argument("--flush-steps", type=int, default=None, help="the collector's flush_steps")
    args = ap.parse_args()

    if args.mode.startswith("zero"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model: nn.Module = nn.Sequential(nn.Linear(6, 15), nn.Tanh(), nn.Linear(15, 1))
    g = torch.Generator().manual_seed(1)
    batch = 16
    x_all = torch.randn(args.steps * world * batch, 6, generator=g)
    w_true = 0.3 * torch.randn(6, 1, generator=g)
    y_all = x_all @ w_true + 0.1 * torch.randn(len(x_all), 1, generator=g)

    if args.mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        fully_shard(model)
    elif args.mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(model, use_orig_params=True)
    elif args.mode.startswith("zero"):
        pass  # wrapped by deepspeed.initialize below
    else:
        if args.mode == "nosync":
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, ["0.bias"]
            )
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = None
    if args.mode.startswith("zero"):
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": batch,
            "zero_optimization": {"stage": int(args.mode[-1])},
            "zero_allow_untested_optimizer": True,
        }
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        model = engine

    col = None
    if not args.zero_code:
        from runlens_collect import Collector

        knobs = {} if args.flush_steps is None else {"flush_steps": args.flush_steps}
        col = Collector(model, opt, run_dir=args.out, overhead=None, activation_every=4, **knobs)
    losses, truth_w, truth_g = [], [], []
    collectives = training_collectives = 0
    for step in range(args.steps):
        if args.mode == "slow" and rank == 1:
            time.sleep(args.delay)  # the input pipeline of rank 1 is slow
        shard = 0 if args.mode == "samedata" else rank
        lo = (step * world + shard) * batch
        x, y = x_all[lo : lo + batch], y_all[lo : lo + batch]
        if args.mode == "nan" and rank == 1 and step == 10:
            x = x.clone()
            x[0, 0] = float("nan")  # one corrupt example on one rank
        if engine is None:
            # the positive control of the count below: forward + backward (DDP's gradient
            # all-reduce, FSDP2's all-gathers and reduce-scatters)
            with CommDebugMode() as comm_fb:
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
            training_collectives += comm_fb.get_total_counts()
        else:
            loss = nn.functional.mse_loss(model(x), y)
        if engine is not None:
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
            if col is not None:
                col.step(loss=loss)
            continue
        if args.mode == "fsdp2":
            # Ground truth outside the collector: the unsharded tensors (all-gathered).
            full_w = {n: p.full_tensor() for n, p in model.named_parameters()}
            full_g = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
            truth_w.append({n: stats(t) for n, t in full_w.items()})
            truth_g.append({n: stats(t) for n, t in full_g.items()})
        elif args.mode == "fsdp1":
            truth_w.append(_fsdp1_full(model, grads=False))
            truth_g.append(_fsdp1_full(model, grads=True))
        # The collector's work (the optimizer hooks' reads, step()) must call no collective:
        # counted over the optimizer step and col.step() (CommDebugMode sees c10d and
        # functional collectives, DTensor's included).
        with CommDebugMode() as comm:
            opt.step()
            if col is not None:
                col.step(loss=loss)
        collectives += comm.get_total_counts()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    rolled: dict[str, object] = {}
    if col is not None and args.flush_steps is not None and col._writer is not None:
        # What the writer's rolling compaction left before close() compacts: its segments.
        for _ in range(1000):
            if col._writer.done_step == col._step - 1:
                break
            col.flush()
            time.sleep(0.01)
        from runlens_collect import format as fmt

        rolled["merges"] = col._writer.roll_stats.merges
        for table in (fmt.SCALARS_DIR, fmt.LAYERS_DIR):
            folder = Path(args.out) / table / f"rank={rank}"
            rolled[table] = len(fmt.live_segments(folder.glob("part-*.parquet")))
    if col is not None:
        col.close()
    out = Path(args.out + ".truth")
    out.mkdir(parents=True, exist_ok=True)
    rec = {
        "rolled": rolled,
        "losses": losses,
        "weights": truth_w,
        "grads": truth_g,
        "collectives": collectives,
        "training_collectives": training_collectives,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(rec))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
