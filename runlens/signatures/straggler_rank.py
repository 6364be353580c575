"""One rank persistently slower than the others: the job waits on it."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.signatures._ranks import rank_scalars, require_ranks
from runlens.signatures.base import NotChecked, Param, Params, Signature
from runlens.signatures.input_bound import unreliable_data_time


class StragglerRank(Signature):
    """A straggler: one rank slower than the others, step after step.

    What it detects:
        Per rank, the time it waits for its next batch (``time/data``) and its step time
        (``time/step``). A rank is a straggler when, after the early transient, its median
        excess over the median of the other ranks — of the data wait, or of the step time —
        is at least ``min_excess_ms`` and at least ``min_share`` of the job's median step
        time, and it is the slowest rank on at least ``persist`` of the steps. Under
        synchronous data parallelism every rank waits for the slowest at each collective,
        so the step times even out and the straggler shows as the rank whose own wait for
        data (or own step, without collectives) is longer; a rank slow in its *compute*
        makes the others wait inside the collective, which the collector does not time
        (not detected: see docs/distributed.md).

    Why it matters:
        A synchronous job runs at the pace of its slowest rank: every other rank idles for
        the straggler's excess at every step. The share reported is the fraction of the
        job's time spent waiting on it (the speed-up if it kept pace).

    Evidence:
        The rank, which time it is slower in, its median excess (ms), the share of the
        job's step time and the fraction of steps where it was the slowest.

    How to fix:
        Look at what is different on that rank: its host (a slow or shared node, thermal
        throttling, another job), its data (a larger shard, slower storage, fewer loader
        workers on its node), its work (rank-0-only logging, evaluation or checkpointing
        inside the step). Give its loader more workers, move rank-0 extras out of the
        training loop, or exclude the node.

    References:
        Megatron-LM, ``--log-straggler`` (min/max-rank throughput per interval);
        Holistic Trace Analysis (HTA), temporal breakdown and straggler detection across
        ranks; Wu et al., "FALCON: Pinpointing and Mitigating Stragglers for Large-Scale
        Hybrid-Parallel Training" (2024).
    """

    name = "straggler-rank"
    summary = "one rank persistently slower than the others: the job waits on it"
    category = "system"
    severity = "warning"
    requires = (fmt.TIME_STEP,)
    params = (
        Param(
            "min_excess_ms",
            5.0,
            "median excess of the rank's data wait or step time over the other ranks' "
            "(milliseconds) below which it is not flagged",
            "runlens default: host-clock timings on a shared machine jitter by a few ms",
        ),
        Param(
            "min_share",
            0.1,
            "that excess as a share of the job's median step time",
            "Megatron-LM's straggler detector reports ranks below 90% of the best "
            "throughput; 10% of the step is the same margin",
        ),
        Param(
            "persist",
            0.7,
            "fraction of the measured steps on which the rank must be the slowest",
            "runlens default: a persistent straggler, not one slow step (a checkpoint)",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        require_ranks(ctx)
        names = (fmt.TIME_STEP, fmt.TIME_DATA)
        tables = rank_scalars(ctx.run, names)
        if fmt.TIME_STEP not in tables:
            raise NotChecked(f"no per-rank {fmt.TIME_STEP}", "not-recorded")
        step_t = tables[fmt.TIME_STEP]
        if len(step_t.ranks) < 2:
            raise NotChecked(f"{fmt.TIME_STEP} of only one rank", "not-recorded")
        job = np.nanmax(step_t.values, axis=1)  # the job's step: its slowest rank
        late = step_t.steps > ctx.transient_end
        if late.sum() < 10:
            late = np.ones(step_t.steps.size, bool)
        if late.sum() < 10:
            raise NotChecked.too_few(int(late.sum()), f"steps with per-rank {fmt.TIME_STEP}", 10)
        job_step = float(np.nanmedian(job[late]))
        candidates = []
        measures = [(fmt.TIME_STEP, step_t)]
        if fmt.TIME_DATA in tables and unreliable_data_time(ctx.run.meta, "runlens") is None:
            measures.insert(0, (fmt.TIME_DATA, tables[fmt.TIME_DATA]))
        for what, t in measures:
            keep = t.steps > ctx.transient_end
            if keep.sum() < 10:
                keep = np.ones(t.steps.size, bool)
            v = t.values[keep]
            v = v[np.isfinite(v).all(axis=1)]
            if v.shape[0] < 10:
                continue
            for k, rank in enumerate(t.ranks):
                others = np.delete(v, k, axis=1)
                excess = v[:, k] - np.median(others, axis=1)
                slowest = float(np.mean(v[:, k] >= others.max(axis=1)))
                med = float(np.median(excess))
                if (
                    med * 1e3 >= p.min_excess_ms
                    and med >= p.min_share * job_step
                    and slowest >= p.persist
                ):
                    waited = float(np.clip(excess, 0, None).sum())
                    share = waited / max(job_step * v.shape[0], 1e-12)
                    candidates.append((share, rank, what, med, slowest, v.shape[0]))
        if not candidates:
            return []
        share, rank, what, med, slowest, n = max(candidates)
        kind = "waits for its data" if what == fmt.TIME_DATA else "takes longer per step"
        return [
            Finding(
                signature=self.name,
                severity="warning",
                confidence=float(min(1.0, 0.5 + slowest / 2)),
                summary=(
                    f"rank {rank} is a straggler: it {kind} {fmt_num(med * 1e3)} ms longer than "
                    f"the other ranks (median over {n} steps; slowest on {slowest:.0%} of "
                    f"them); the job waits on it about {min(share, 1.0):.0%} of its time"
                ),
                fix="Find what differs on that rank (node, data shard, loader workers, rank-0 "
                "extras inside the step) and even it out, or exclude the node.",
                steps=(int(step_t.steps[late][0]), int(step_t.steps[late][-1])),
                series=(what,),
                evidence=(
                    Evidence("straggler rank", float(rank)),
                    Evidence(f"median excess of {what}", med * 1e3, p.min_excess_ms, ">=", "ms"),
                    Evidence("share of the job's step time", share, p.min_share, ">="),
                    Evidence("steps it was the slowest", slowest, p.persist, ">="),
                    Evidence("job step time (median)", job_step * 1e3, unit="ms"),
                ),
                causes=(
                    "a slow input pipeline on that rank (fewer workers, slower storage, a "
                    "larger shard)",
                    "a slow or shared node",
                    "rank-specific work inside the step (logging, evaluation, checkpoints)",
                ),
            )
        ]
