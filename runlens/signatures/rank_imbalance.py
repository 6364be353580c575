"""Ranks that do not see their share of the data: the same batches, or other data."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.signatures._ranks import RankTable, rank_scalars, require_ranks
from runlens.signatures.base import NotChecked, Param, Params, Signature

_FINGERPRINT = (fmt.INPUT_SUM, fmt.INPUT_SUMSQ, fmt.INPUT_PROJ)


class RankImbalance(Signature):
    """Data-parallel ranks that do not split the data between them.

    What it detects:
        Two sharding bugs, from the per-rank records:

        * **the same data on every rank**: the input fingerprints of the collector's
          input probe (``probe/input/sum``, ``sumsq`` and ``proj``: the batch's sum, sum of
          squares and a fixed projection, blind to the order of the examples) are equal
          across ranks, to ``fingerprint_tol``, on at least ``same_fraction`` of the steps
          (and at least ``min_steps``): each rank trains on the batch of the others,
          although the job believes it shards the data (a DataLoader without a
          DistributedSampler, a sampler whose rank was not set);
        * **a rank on different data**: a rank's loss differs from the mean over the
          ranks at the same steps systematically: the paired differences' mean is at
          least ``t_min`` standard errors from zero and at least ``min_gap`` of the
          median loss, over at least ``min_steps`` steps (a rank reading another split,
          a shard of one class, a different preprocessing).

        Not applied to runs with several mesh dimensions or tensor parallelism (DTensor
        parameters without FSDP2), where ranks of one model-parallel group legitimately
        see the same batch.

    Why it matters:
        Identical batches on N ranks make the effective batch N times smaller than
        configured and the run N times more expensive than it needs to be, with the
        learning rate tuned for the wrong batch. A rank on other data pulls the average
        gradient towards a distribution the job did not mean to train on.

    Evidence:
        For identical data: the fraction of steps whose fingerprints match on every
        rank, and the steps compared. For a loss offset: the rank, its mean difference,
        the t statistic and the steps compared.

    How to fix:
        Use ``DistributedSampler(dataset, num_replicas=world_size, rank=rank)`` (and
        ``sampler.set_epoch(epoch)`` every epoch), or shard an iterable dataset by rank
        (``split_dataset_by_node``); check each rank reads its own files and that
        preprocessing is the same everywhere.

    References:
        PyTorch docs, ``torch.utils.data.distributed.DistributedSampler`` (each rank a
        disjoint subset; ``set_epoch``); Goyal et al., "Accurate, Large Minibatch SGD"
        (2017): the effective batch is the sum of the ranks' batches and the learning
        rate scales with it.
    """

    name = "rank-imbalance"
    summary = "ranks fed the same batches, or one rank on different data"
    category = "bug"
    severity = "warning"
    requires = (fmt.TRAIN_LOSS,)
    params = (
        Param(
            "fingerprint_tol",
            1e-6,
            "relative difference of the input fingerprints below which two ranks' batches "
            "are the same",
            "float32 sums of the same elements in another order differ by ~1e-7 relative",
        ),
        Param(
            "same_fraction",
            0.9,
            "share of the compared steps whose batches match on every rank",
            "runlens default: sharded data never matches; a few matching steps (padding "
            "batches at an epoch's end) are not the bug",
        ),
        Param(
            "min_steps",
            10.0,
            "steps compared at least",
            "runlens default",
        ),
        Param(
            "t_min",
            6.0,
            "paired-difference t statistic of a rank's loss against the ranks' mean",
            "runlens default: a one-sided 1e-9 tail, so that several ranks and runs "
            "checked never fire by chance",
        ),
        Param(
            "min_gap",
            0.1,
            "that mean difference as a share of the median loss",
            "runlens default: smaller offsets do not change what the job learns",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        ranks = require_ranks(ctx)
        layout = ctx.run.layout
        if layout is not None and _model_parallel(layout):
            raise NotChecked(
                "model-parallel ranks (several mesh dimensions or tensor parallelism) "
                "legitimately share batches",
                "not-applicable",
            )
        tables = rank_scalars(ctx.run, (fmt.TRAIN_LOSS, *_FINGERPRINT))
        out = []
        same = _same_data(tables, p)
        if same is not None:
            out.append(self._same(ctx, ranks, *same, p))
        elif fmt.TRAIN_LOSS in tables:
            off = _offset(tables[fmt.TRAIN_LOSS], ctx.transient_end, p)
            if off is not None:
                out.append(self._offset(*off, p))
        if not out and fmt.TRAIN_LOSS not in tables:
            raise NotChecked(f"no per-rank {fmt.TRAIN_LOSS}", "not-recorded")
        return out

    def _same(
        self,
        ctx: Context,
        ranks: tuple[int, ...],
        frac: float,
        n: int,
        steps: np.ndarray,
        p: Params,
    ) -> Finding:
        return Finding(
            signature=self.name,
            severity="warning",
            confidence=float(min(1.0, frac)),
            summary=(
                f"every rank trains on the same batches: the input fingerprints "
                f"(probe/input sum, sum of squares, projection) match on all {len(ranks)} "
                f"ranks at {frac:.0%} of {n} steps; the data is not sharded, so the "
                f"effective batch is {len(ranks)}× smaller than configured"
            ),
            fix="Shard the data by rank: DistributedSampler(dataset, num_replicas=world_size, "
            "rank=rank) with set_epoch(epoch), or split an iterable dataset by node.",
            steps=(int(steps[0]), int(steps[-1])),
            series=(fmt.INPUT_SUM,),
            evidence=(
                Evidence("steps whose batches match on every rank", frac, p.same_fraction, ">="),
                Evidence("steps compared", float(n), p.min_steps, ">="),
                Evidence("ranks", float(len(ranks))),
            ),
            causes=(
                "a DataLoader without DistributedSampler",
                "a sampler or dataset shard created without the rank",
                "the same seed for a random per-rank data order",
            ),
        )

    def _offset(
        self, rank: int, gap: float, t: float, rel: float, n: int, steps: np.ndarray, p: Params
    ) -> Finding:
        return Finding(
            signature=self.name,
            severity="warning",
            confidence=float(min(1.0, 0.5 + (abs(t) - p.t_min) / (2 * p.t_min))),
            summary=(
                f"rank {rank}'s loss differs systematically from the other ranks': "
                f"{'+' if gap > 0 else ''}{fmt_num(gap)} on average ({rel:.0%} of the median "
                f"loss, t = {fmt_num(t)} over {n} steps): it does not see the same "
                "distribution of data"
            ),
            fix="Check what rank reads: its shard of files, its sampler, its preprocessing.",
            steps=(int(steps[0]), int(steps[-1])),
            series=(fmt.TRAIN_LOSS,),
            evidence=(
                Evidence("rank", float(rank)),
                Evidence("mean loss difference vs the ranks' mean", gap),
                Evidence("as a share of the median loss", abs(rel), p.min_gap, ">="),
                Evidence("paired t statistic", abs(t), p.t_min, ">="),
                Evidence("steps compared", float(n), p.min_steps, ">="),
            ),
            causes=(
                "a rank reading another split or a biased shard",
                "different preprocessing on one node",
            ),
        )


def _model_parallel(layout: object) -> bool:
    wrapper = getattr(layout, "wrapper", None)
    per_rank = getattr(layout, "per_rank", {}) or {}
    meshes = {m for lay in per_rank.values() for m in (lay.get("meshes") or [])}
    return wrapper == "DTensor" or any(_mesh_dims(m) > 1 for m in meshes)


def _mesh_dims(mesh: str) -> int:
    """Dimensions of a mesh written as '(names):[d0, d1]'."""
    shape = mesh.rsplit(":", 1)[-1].strip("[] ")
    return len([s for s in shape.split(",") if s.strip()])


def _same_data(tables: dict[str, RankTable], p: Params) -> tuple[float, int, np.ndarray] | None:
    """(fraction of matching steps, steps compared, those steps) when the batches match."""
    if any(n not in tables for n in _FINGERPRINT):
        return None
    match: np.ndarray | None = None
    steps = tables[_FINGERPRINT[0]].steps
    valid = np.ones(steps.size, bool)
    for name in _FINGERPRINT:
        t = tables[name]
        if len(t.ranks) < 2 or not np.array_equal(t.steps, steps):
            return None
        v = t.values
        ok = np.isfinite(v).all(axis=1)
        ref = v[:, :1]
        scale = np.maximum(np.abs(ref), 1e-12)
        with np.errstate(invalid="ignore"):
            eq = (np.abs(v - ref) <= p.fingerprint_tol * scale).all(axis=1) & ok
        match = eq if match is None else (match & eq)
        valid &= ok
    assert match is not None
    n = int(valid.sum())
    if n < p.min_steps:
        return None
    frac = float(match[valid].mean())
    if frac < p.same_fraction:
        return None
    return frac, n, steps[valid]


def _offset(
    t: RankTable, transient_end: int, p: Params
) -> tuple[int, float, float, float, int, np.ndarray] | None:
    """(rank, mean gap, t, gap / median loss, steps, steps) of the most offset rank."""
    if len(t.ranks) < 2:
        return None
    keep = (t.steps > transient_end) & np.isfinite(t.values).all(axis=1)
    if keep.sum() < p.min_steps:
        return None
    v = t.values[keep]
    mean = v.mean(axis=1, keepdims=True)
    d = v - mean
    med = float(np.median(np.abs(mean)))
    best = None
    for k, rank in enumerate(t.ranks):
        sd = float(d[:, k].std(ddof=1))
        gap = float(d[:, k].mean())
        if sd <= 0:
            continue
        tstat = gap / (sd / np.sqrt(d.shape[0]))
        rel = gap / med if med > 0 else np.inf
        big = abs(tstat) >= p.t_min and abs(rel) >= p.min_gap
        if big and (best is None or abs(tstat) > abs(best[2])):
            best = (int(rank), gap, float(tstat), float(rel), int(d.shape[0]), t.steps[keep])
    return best
