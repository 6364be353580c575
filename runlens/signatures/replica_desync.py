"""Data-parallel replicas whose weights (or gradients) differ across ranks."""

from __future__ import annotations

import numpy as np
import polars as pl
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.signatures._ranks import rank_layers, require_ranks
from runlens.signatures.base import NotChecked, Param, Params, Signature

_STATS = ("norm", "mean", "std")


class ReplicaDesync(Signature):
    """Data-parallel replicas that stopped being copies of each other.

    What it detects:
        Parameters every rank holds whole (replicas: not listed as shards in the run's
        layout) whose weight — or gradient, read right before the optimizer step, after
        DDP's all-reduce — differs between ranks at the same step: the relative difference
        of its norm, or of its mean or std measured in units of the lowest rank's norm per
        element, exceeds ``rel_tol`` on at least ``min_steps`` recorded steps. A parameter
        whose weights already differ at its first recorded step is not a replica (a
        tensor-parallel shard kept as a plain tensor) and is not judged. Reports the first
        step and the layers.

    Why it matters:
        Data parallelism is only correct while every replica applies the same update.
        Once they differ, each rank trains its own model, the gradients averaged no longer
        belong to one set of weights, and the checkpoint (usually rank 0's) is not the
        model the loss curve describes. Nothing crashes: TrainCheck found a BLOOM-176B
        bf16 clipping desync that went unnoticed for 10 days.

    Evidence:
        The first step of desync, the layers, the largest relative difference and the
        rank that differs most from the lowest rank.

    How to fix:
        Make every trainable parameter go through the gradient sync: no parameter outside
        the DDP-wrapped module or in ``_ddp_params_and_buffers_to_ignore``; no stepping
        the bare model some steps and the wrapped one others; ``no_sync()`` only on
        accumulation micro-steps, never on the step that calls ``optimizer.step()``; the
        same clipping threshold, learning rate and random state on every rank (clip on the
        synced gradients); broadcast weights after loading a checkpoint on one rank.

    References:
        Megatron-LM, ``--check-weight-hash-across-dp-replicas-interval`` (weight hashes
        compared across data-parallel replicas); Jiang et al., "TrainCheck: Training with
        Confidence" (OSDI 2025), cross-rank consistency invariants (BLOOM-176B clipping
        desync); PyTorch docs, ``DistributedDataParallel`` (parameters broadcast at
        construction, gradients all-reduced in backward, ``no_sync``).
    """

    name = "replica-desync"
    summary = "data-parallel replicas whose weights differ across ranks"
    category = "bug"
    severity = "error"
    requires = ("layers:weight",)
    params = (
        Param(
            "rel_tol",
            1e-5,
            "relative difference across ranks (norm; mean and std in units of the norm per "
            "element) above which replicas differ",
            "float32 epsilon is 1.2e-7: replicas fed the same all-reduced gradient are "
            "bitwise equal (Megatron compares hashes); 1e-5 leaves ~100 ulps for "
            "reduction-order noise",
        ),
        Param(
            "min_steps",
            2.0,
            "recorded steps with a difference needed (a weight desync persists)",
            "runlens default: one step could be a stale read; a real desync never heals",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        ranks = require_ranks(ctx)
        layout = ctx.run.layout
        sharded = set(layout.shards) if layout is not None else set()
        names = [n for n in ctx.run.layer_names if n not in sharded]
        if not names:
            raise NotChecked("every parameter is sharded: no replicas to compare", "not-applicable")
        hits: dict[str, tuple[int, float, int, str]] = {}  # layer -> (step, diff, rank, kind)
        judged = 0
        not_replicas: set[str] = set()
        for kind in (fmt.KIND_WEIGHT, fmt.KIND_GRAD):
            wanted = [n for n in names if n not in not_replicas]
            df = rank_layers(ctx.run, kind, ("numel", *_STATS), wanted)
            if df.height == 0:
                continue
            if kind == fmt.KIND_WEIGHT:
                judged = df["layer"].n_unique()
            found, others = _desync(df, ranks, p, kind == fmt.KIND_WEIGHT)
            not_replicas |= others
            for layer, first, diff, rank, n in found:
                if n < p.min_steps:
                    continue
                if layer not in hits or first < hits[layer][0]:
                    hits[layer] = (first, diff, rank, kind)
        if not judged:
            raise NotChecked("no parameter recorded on two ranks at a common step", "not-recorded")
        if not hits:
            return []
        order = {n: i for i, n in enumerate(names)}
        layers = sorted(hits, key=lambda n: (hits[n][0], order.get(n, 0)))
        first = min(h[0] for h in hits.values())
        worst = max(hits.values(), key=lambda h: h[1])
        shown = ", ".join(f"`{n}`" for n in layers[:5]) + (" ..." if len(layers) > 5 else "")
        return [
            Finding(
                signature=self.name,
                severity="error",
                confidence=1.0 if worst[1] > 100 * p.rel_tol else 0.8,
                summary=(
                    f"the data-parallel replicas differ from step {first}: {len(layers)} "
                    f"parameter(s) ({shown}) are not the same on every rank (largest "
                    f"relative difference {fmt_num(worst[1])} in the {worst[3]}, rank "
                    f"{worst[2]} vs rank {ranks[0]}; tolerance {fmt_num(p.rel_tol)})"
                ),
                fix="Put every trainable parameter under the DDP wrapper's gradient sync (no "
                "ignored or outside parameters, no steps of the bare model, no_sync only on "
                "accumulation micro-steps); clip and schedule identically on every rank.",
                steps=(first, ctx.steps[1] if ctx.steps else first),
                layers=tuple(layers),
                evidence=(
                    Evidence("first step of desync", float(first)),
                    Evidence("parameters that differ", float(len(layers))),
                    Evidence("largest relative difference", worst[1], p.rel_tol, ">"),
                    Evidence("rank that differs most", float(worst[2])),
                ),
                causes=(
                    "a parameter excluded from DDP's all-reduce (ignored, or outside the "
                    "wrapped module)",
                    "the bare model stepped on some steps, the wrapped one on others",
                    "no_sync() on the step that updates",
                    "clipping or learning rate computed per rank",
                ),
            )
        ]


def _desync(
    df: pl.DataFrame, ranks: tuple[int, ...], p: Params, weights: bool
) -> tuple[list[tuple[str, int, float, int, int]], set[str]]:
    """(layer, first step, largest difference, its rank, steps that differ) of each layer
    whose ranks differ, and the layers that are not replicas: weights that differ at their
    first common step (their gradients are not judged either)."""
    base = ranks[0]
    ref = df.filter(pl.col("rank") == base).drop("rank")
    other = df.filter(pl.col("rank") != base)
    j = other.join(ref, on=["step", "layer"], suffix="_0").sort("step")
    out: list[tuple[str, int, float, int, int]] = []
    not_replicas: set[str] = set()
    if j.height == 0:
        return out, not_replicas
    norm0 = j["norm_0"].to_numpy().astype(np.float64)
    # mean and std compare in units of the per-element RMS (norm / sqrt(numel))
    rms = np.abs(norm0) / np.sqrt(np.maximum(j["numel_0"].to_numpy().astype(np.float64), 1.0))
    diffs = []
    for s in _STATS:
        a, b = j[s].to_numpy().astype(np.float64), j[f"{s}_0"].to_numpy().astype(np.float64)
        scale = np.abs(b) if s == "norm" else rms
        with np.errstate(invalid="ignore", divide="ignore"):
            diffs.append(np.abs(a - b) / np.maximum(scale, 1e-30))
    d = np.fmax.reduce(np.vstack(diffs), axis=0)  # NaN only where every stat is NaN
    d = np.where(np.isfinite(d), d, 0.0)
    j = j.with_columns(pl.Series("_d", d))
    for (layer,), g in j.group_by(["layer"], maintain_order=True):
        steps, dd, rk = g["step"].to_numpy(), g["_d"].to_numpy(), g["rank"].to_numpy()
        bad = dd > p.rel_tol
        if not bad.any():
            continue
        if weights and bad[steps == steps.min()].any():
            not_replicas.add(str(layer))  # never equal: a tensor-parallel shard, a per-rank head
            continue
        k = int(np.argmax(dd))
        out.append((str(layer), int(steps[bad].min()), float(dd[k]), int(rk[k]), int(bad.sum())))
    return out, not_replicas
