"""The ranks of a distributed run, merged into one view (issue 18).

Every rank writes its own ``rank=R`` partition (runlens_collect, docs/distributed.md).
The analyzer's default view of a run with several ranks is *merged*:

* **scalars**: one value per (step, name), the mean over the ranks that wrote it (the
  loss of the job is the mean of the ranks' losses, as DDP averages their gradients);
  ``wall_time`` the latest. ``grad_norm`` of a sharded model (each rank's norm covers its
  own shards) is the root of the sum of the ranks' squares instead: the norm of the
  whole gradient.
* **layers**: parameters every rank holds whole (replicas under data parallelism) and
  activations/outputs come from the lowest rank (one replica; replica-desync compares
  them across ranks). Shards of a sharded parameter (run.json ``distributed.shards``, each
  rank's ``start`` event) are combined exactly into one row per (step, name, kind):
  count = Σ numel, sum = Σ mean·numel, sum of squares = Σ norm², so mean, std and norm of
  the whole tensor follow; ``absmax`` is the largest (NaN if any), ``frac_zero`` and
  ``frac_nonfinite`` are count-weighted, histogram bins add, ``update_ratio`` is
  ‖Δ‖ / ‖w‖ with each shard's ‖w‖ = its norm / its update_ratio. Shards with the same
  offset on several ranks (replicated mesh dimensions) count once. A step where the
  shards do not add up to the whole tensor (a rank's rows not written) has no merged row.

``--rank R`` (``load_run(path, rank=R)``) is the view of one rank instead. The per-rank
frames stay available to the rank signatures (``Run.rank_scalars``, ``Run.rank_layers``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import polars as pl
from runlens_collect import format as fmt

RANKS_FACT = "ranks"
"""The report header's line about the ranks (``ranks_text``)."""

SHARDABLE_KINDS = (fmt.KIND_WEIGHT, fmt.KIND_GRAD, fmt.KIND_UPDATE)

ROOT_SUM_SQUARES = (fmt.GRAD_NORM,)
"""Scalars each rank computes over the parameters it holds: under sharding, the norm of
the whole is the root of the sum of the ranks' squares."""


@dataclass(frozen=True)
class RankLayout:
    """What the ranks of a run hold, from run.json ``distributed`` and the ``start``
    events' ``layout`` (format.DISTRIBUTED_KEYS)."""

    ranks: tuple[int, ...]
    world_size: int
    wrapper: str | None = None
    shards: dict[str, dict[int, tuple[Any, ...]]] = field(default_factory=dict)
    """name -> rank -> the shard's offset (a tuple: equal offsets are replicas)."""
    global_numel: dict[str, int] = field(default_factory=dict)
    n_replicated: int = 0
    per_rank: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def sharded(self) -> bool:
        return bool(self.shards)

    @property
    def distributed(self) -> bool:
        return len(self.ranks) > 1 or self.world_size > 1


def read_layout(meta: dict[str, Any], events: list[dict[str, Any]], ranks: list[int]) -> RankLayout:
    """The layout the ranks recorded (the latest ``start`` of each rank wins)."""
    per_rank: dict[int, dict[str, Any]] = {}
    dist_meta = meta.get("distributed")
    if isinstance(dist_meta, dict):
        per_rank[int(dist_meta.get("rank") or 0)] = dist_meta
    for e in events:
        lay = e.get("layout") if e.get("kind") == "start" else None
        r = e.get("rank", 0)
        if isinstance(lay, dict) and isinstance(r, int):
            per_rank[r] = lay
    shards: dict[str, dict[int, tuple[Any, ...]]] = {}
    numel: dict[str, int] = {}
    for r, lay in per_rank.items():
        for name, info in (lay.get("shards") or {}).items():
            if not isinstance(info, dict):
                continue
            gshape = info.get("global_shape") or []
            try:
                numel[name] = int(math.prod(int(s) for s in gshape))
                shards.setdefault(name, {})[r] = tuple(int(o) for o in info.get("offset") or ())
            except (TypeError, ValueError):
                continue
    world = meta.get("world_size")
    sizes = [lay.get("world_size") for lay in per_rank.values()]
    world = max([w for w in [world, *sizes] if isinstance(w, int)] or [len(ranks) or 1])
    wrapper = next((lay.get("wrapper") for lay in per_rank.values() if lay.get("wrapper")), None)
    repl = [lay.get("n_replicated") for lay in per_rank.values()]
    return RankLayout(
        ranks=tuple(ranks),
        world_size=int(world),
        wrapper=str(wrapper) if wrapper else None,
        shards=shards,
        global_numel=numel,
        n_replicated=max([int(n) for n in repl if isinstance(n, int)] or [0]),
        per_rank=per_rank,
    )


def merge_scalars(lf: pl.LazyFrame, layout: RankLayout) -> pl.LazyFrame:
    """One row per (step, name): the ranks' mean (see the module docstring)."""
    lowest = min(layout.ranks) if layout.ranks else 0
    # Within one rank the last write of a step wins (as in the one-rank view).
    lf = (
        lf.with_row_index("_i")
        .with_columns(pl.col("name").cast(pl.String))
        .sort("_i")
        .unique(["rank", "name", "step"], keep="last", maintain_order=True)
    )
    value = pl.col("value").cast(pl.Float64)
    merged = value.mean()
    if layout.sharded:
        rss = (value**2).sum().sqrt()
        merged = pl.when(pl.col("name").first().is_in(ROOT_SUM_SQUARES)).then(rss).otherwise(merged)
    out = (
        lf.group_by("step", "name", maintain_order=True)
        .agg(
            pl.col("_i").min().alias("_i"),
            pl.col("wall_time").max().alias("wall_time"),
            merged.alias("value"),
        )
        .sort("_i")
        .select(
            "step",
            "wall_time",
            pl.col("name").cast(pl.Categorical),
            "value",
            pl.lit(lowest, pl.Int64).alias("rank"),
        )
    )
    return out


def merge_layers(lf: pl.LazyFrame, layout: RankLayout) -> pl.LazyFrame:
    """One replica's rows, and every shard combined (see the module docstring)."""
    lowest = min(layout.ranks) if layout.ranks else 0
    columns = lf.collect_schema().names()
    lf = lf.with_row_index("_i").with_columns(
        pl.col("layer").cast(pl.String), pl.col("kind").cast(pl.String)
    )
    names = sorted(layout.shards)
    is_shard = pl.col("layer").is_in(names) & pl.col("kind").is_in(SHARDABLE_KINDS)
    whole = lf.filter(pl.col("rank") == lowest)
    if names:
        whole = whole.filter(~is_shard)
        merged = _combine_shards(lf.filter(is_shard), layout, columns)
        whole = pl.concat([whole.select(["_i", *columns]), merged], how="vertical_relaxed")
    out = whole.sort("_i").select(
        [pl.col(c).cast(pl.Categorical) if c in ("layer", "kind") else pl.col(c) for c in columns]
    )
    return out.with_columns(pl.lit(lowest, pl.Int64).alias("rank"))


def _combine_shards(lf: pl.LazyFrame, layout: RankLayout, columns: list[str]) -> pl.LazyFrame:
    keys = [
        (r, name, repr(off), layout.global_numel.get(name, -1))
        for name, by_rank in layout.shards.items()
        for r, off in by_rank.items()
    ]
    key_frame = pl.LazyFrame(
        {
            "rank": [k[0] for k in keys],
            "layer": [k[1] for k in keys],
            "_key": [k[2] for k in keys],
            "_global": [k[3] for k in keys],
        },
        schema={"rank": pl.Int64, "layer": pl.String, "_key": pl.String, "_global": pl.Int64},
    )
    group = ["step", "layer", "kind"]
    lf = (
        lf.with_columns(pl.col("rank").cast(pl.Int64))
        .join(key_frame, on=["rank", "layer"], how="inner")
        # a rank's rewrite of a step (resume) wins; a replica of a shard counts once
        .sort("_i")
        .unique([*group, "rank"], keep="last", maintain_order=True)
        .sort("rank", maintain_order=True)
        .unique([*group, "_key"], keep="first", maintain_order=True)
    )
    n = pl.col("numel")
    live = (n > 0) & ~pl.col("missing")
    f64 = pl.Float64
    aggs = [
        pl.col("_i").min(),
        pl.col("_global").first(),
        n.sum().alias("numel"),
        pl.col("missing").all().alias("missing"),
        live.any().alias("_live"),
        (pl.col("mean").cast(f64) * n).filter(live).sum().alias("_s1"),
        (pl.col("norm").cast(f64) ** 2).filter(live).sum().alias("_s2"),
        pl.col("absmax").cast(f64).filter(live).nan_max().alias("absmax"),
        (pl.col("frac_zero").cast(f64) * n).filter(live).sum().alias("_z"),
        (pl.col("frac_nonfinite").cast(f64) * n).filter(live).sum().alias("_nf"),
        pl.col("numel").filter(live).sum().alias("_n"),
    ]
    if "update_ratio" in columns:
        ratio = pl.col("update_ratio").cast(f64)
        known = live & ratio.is_finite() & (ratio > 0)
        aggs.append(((pl.col("norm").cast(f64) / ratio) ** 2).filter(known).sum().alias("_w2"))
    agg = lf.group_by(group, maintain_order=True).agg(aggs)
    nn = pl.col("_n").cast(f64)
    s1, s2 = pl.col("_s1"), pl.col("_s2")
    var = ((s2 - s1**2 / nn) / (nn - 1)).clip(lower_bound=0.0)
    dead = ~pl.col("_live")
    stats = {
        "mean": s1 / nn,
        "std": pl.when(nn > 1).then(var.sqrt()).otherwise(float("nan")),
        "norm": s2.sqrt(),
        "frac_zero": pl.col("_z") / nn,
        "frac_nonfinite": pl.col("_nf") / nn,
    }
    exprs = [
        pl.when(dead).then(float("nan")).otherwise(e).cast(pl.Float32).alias(k)
        for k, e in stats.items()
    ]
    exprs.append(pl.when(dead).then(float("nan")).otherwise(pl.col("absmax")).cast(pl.Float32))
    if "update_ratio" in columns:
        ratio = pl.when(pl.col("kind") == fmt.KIND_UPDATE).then(s2.sqrt() / pl.col("_w2").sqrt())
        exprs.append(ratio.cast(pl.Float32).alias("update_ratio"))
    merged = agg.filter(pl.col("numel") == pl.col("_global")).with_columns(exprs)
    if "hist" in columns:
        merged = merged.join(_sum_hists(lf, group), on=group, how="left")
    present = merged.collect_schema().names()
    return merged.select(
        [
            "_i",
            *[pl.col(c) if c in present else pl.lit(None).alias(c) for c in columns if c != "rank"],
            pl.lit(None, pl.Int64).alias("rank"),
        ]
    )


def _sum_hists(lf: pl.LazyFrame, group: list[str]) -> pl.LazyFrame:
    """Bin-wise sums of the shards' histograms (null where a shard has none)."""
    h = lf.filter(pl.col("hist").is_not_null() & (pl.col("numel") > 0)).select(*group, "hist")
    return (
        h.with_columns(pl.int_ranges(0, pl.col("hist").list.len()).alias("_bin"))
        .explode(["hist", "_bin"])
        .group_by([*group, "_bin"])
        .agg(pl.col("hist").sum())
        .sort("_bin")
        .group_by(group)
        .agg(pl.col("hist"))
    )


def ranks_text(run: Any) -> str | None:
    """The header line of a run with several ranks: which view the report shows."""
    ranks = tuple(getattr(run, "ranks", ()) or ())
    if len(ranks) < 2:
        return None
    layout = getattr(run, "layout", None)
    wrapper = f"{layout.wrapper}, " if layout is not None and layout.wrapper else ""
    listed = ", ".join(map(str, ranks))
    if getattr(run, "merged", False):
        shards = ""
        if layout is not None and layout.sharded:
            shards = f"; {len(layout.shards)} sharded parameters combined across ranks"
        return (
            f"{len(ranks)} ({wrapper}ranks {listed}): merged view, scalars averaged over "
            f"ranks{shards}; layer statistics of replicas from rank {ranks[0]}; --rank R "
            "for one rank"
        )
    return f"rank {run.rank} of {len(ranks)} ({wrapper}ranks {listed}): one rank's view"
