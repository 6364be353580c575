"""Per-rank data for the rank signatures (replica-desync, straggler-rank, rank-imbalance).

The run's default view merges the ranks (runlens.ranks); these helpers read every rank's
own rows (``Run.rank_query``) as numpy arrays aligned on steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.run import Run
from runlens.signatures.base import NotChecked


def require_ranks(ctx: Context) -> tuple[int, ...]:
    """The run's ranks; NotChecked (not applicable) for a single-process run."""
    ranks = tuple(getattr(ctx.run, "ranks", ()) or ())
    if len(ranks) < 2:
        raise NotChecked("one process: no other rank to compare with", "not-applicable")
    return ranks


@dataclass(frozen=True)
class RankTable:
    """``values[i, k]``: a scalar of ``ranks[k]`` at ``steps[i]`` (NaN where not written)."""

    steps: np.ndarray
    ranks: tuple[int, ...]
    values: np.ndarray
    written: np.ndarray
    """Cells a rank wrote (a NaN there is a value, elsewhere a gap)."""


def rank_scalars(run: Run, names: tuple[str, ...]) -> dict[str, RankTable]:
    """Per-rank tables of the scalars ``names`` (the last write of a step wins)."""

    def build(lf: pl.LazyFrame) -> pl.LazyFrame:
        return (
            lf.filter(pl.col("name").cast(pl.String).is_in(list(names)))
            .select(
                pl.col("name").cast(pl.String), "rank", "step", pl.col("value").cast(pl.Float64)
            )
            .with_row_index("_i")
            .unique(["name", "rank", "step"], keep="last", maintain_order=True)
        )

    df = run.rank_query(fmt.SCALARS_DIR, build, ("scalars", names))
    out: dict[str, RankTable] = {}
    if df.height == 0:
        return out
    for name in names:
        sub = df.filter(pl.col("name") == name)
        if sub.height == 0:
            continue
        steps = np.unique(sub["step"].to_numpy())
        ranks = tuple(int(r) for r in sorted(set(sub["rank"].to_list())))
        values = np.full((steps.size, len(ranks)), np.nan)
        written = np.zeros((steps.size, len(ranks)), bool)
        rows = np.searchsorted(steps, sub["step"].to_numpy())
        cols = np.searchsorted(np.array(ranks), sub["rank"].to_numpy())
        values[rows, cols] = sub["value"].fill_null(float("nan")).to_numpy()
        written[rows, cols] = True
        out[name] = RankTable(steps, ranks, values, written)
    return out


def rank_layers(run: Run, kind: str, stats: tuple[str, ...], layers: list[str]) -> pl.DataFrame:
    """Every rank's rows of ``kind`` for ``layers``: rank, step, layer, ``stats``."""

    def build(lf: pl.LazyFrame) -> pl.LazyFrame:
        return (
            lf.filter(
                (pl.col("kind").cast(pl.String) == kind)
                & pl.col("layer").cast(pl.String).is_in(layers)
                & ~pl.col("missing")
            )
            .select("rank", "step", pl.col("layer").cast(pl.String), *stats)
            .unique(["rank", "step", "layer"], keep="last", maintain_order=True)
        )

    return run.rank_query(fmt.LAYERS_DIR, build, ("layers", kind, stats, tuple(layers)))


def first_nonfinite_rank(run: Run) -> tuple[int, tuple[int, ...]] | None:
    """(step, ranks) where a non-finite value appeared first: per rank, the first step
    whose training loss or input (``probe/input/sum``) is not finite, else its first
    ``nonfinite`` event (a layer statistic: after an all-reduce every rank's gradients
    are non-finite at once, so the loss and the input tell the ranks apart first).
    None for a single-process run or when no rank saw one."""
    if len(getattr(run, "ranks", ()) or ()) < 2:
        return None
    hits: dict[int, int] = {}
    for t in rank_scalars(run, (fmt.TRAIN_LOSS, fmt.INPUT_SUM)).values():
        bad = t.written & ~np.isfinite(t.values)
        for k, rank in enumerate(t.ranks):
            rows = np.flatnonzero(bad[:, k])
            if rows.size:
                step = int(t.steps[rows[0]])
                hits[rank] = min(step, hits.get(rank, step))
    if not hits:
        for e in run.events:
            step, rank = e.get("step"), e.get("rank", 0)
            if e.get("kind") != "nonfinite" or not isinstance(step, int):
                continue
            if isinstance(rank, int):
                hits[rank] = min(step, hits.get(rank, step))
    if not hits:
        return None
    first = min(hits.values())
    return first, tuple(sorted(r for r, s in hits.items() if s == first))
