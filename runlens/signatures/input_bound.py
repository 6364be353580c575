"""Most of each step spent waiting for data rather than computing."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens import series as S
from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.signatures.base import NotChecked, Param, Params, Signature


class InputBound(Signature):
    """Training that waits for its input pipeline.

    What it detects:
        After the early transient (worker start-up, the first batches), the median share
        of a step spent waiting for data — ``time/data / (time/data + time/compute)`` — is
        at least ``data_fraction``, and the median wait is at least ``min_data_ms`` (a
        tiny model whose whole step takes a millisecond is not worth optimizing).
        Medians ignore the occasional slow step (evaluation, checkpointing, logging).
        Only where ``time/data`` measures the device's wait: the collector's host clock on
        CPU, or CUDA events (run.json ``collector.data_time``); host time on an
        asynchronous device also counts queued device work (an ``.item()`` after the step)
        as waiting for data, so such runs are not judged.

    Why it matters:
        The accelerator idles while the loader works: the run takes longer and costs more
        than it needs to, and larger models or batches will not speed it up. This is the
        most common performance problem of training loops.

    Evidence:
        The median data and compute time per step, the data share, and the number of
        steps measured.

    How to fix:
        Use ``DataLoader(num_workers=N, pin_memory=True, persistent_workers=True,
        prefetch_factor=...)``; move decoding/augmentation out of ``__getitem__`` or onto
        the GPU; cache preprocessed data; avoid per-item Python work (batch the
        transforms); read from local fast storage.

    References:
        PyTorch docs, "Performance Tuning Guide" (DataLoader workers, pinned memory);
        TensorFlow docs, "Better performance with the tf.data API" and "Analyze tf.data
        performance" (input-bound step-time analysis).
    """

    name = "input-bound"
    summary = "most of each step spent waiting for data rather than computing"
    category = "system"
    severity = "warning"
    requires = ("time/data", "time/compute")
    params = (
        Param(
            "data_fraction",
            0.5,
            "median share of a step spent waiting for data above which training is input-bound",
            "TensorFlow profiler's input-pipeline analysis calls a step input-bound when "
            "waiting dominates; 0.5 (more than half) is our choice",
        ),
        Param(
            "min_data_ms",
            3.0,
            "median wait for data (milliseconds) below which the run is not flagged",
            "runlens default: our calibration (CPU sample runs with an in-memory loader wait "
            "well under 1 ms)",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        d, c = ctx.curve(fmt.TIME_DATA), ctx.curve(fmt.TIME_COMPUTE)
        if d is None or c is None:
            raise NotChecked(f"needs {fmt.TIME_DATA} and {fmt.TIME_COMPUTE}", "not-recorded")
        why = unreliable_data_time(ctx.run.meta, ctx.run.source_format)
        if why is not None:
            raise NotChecked(why, "not-recorded")
        cv = S.align(c.steps, c.raw, d.steps)
        ok = np.isfinite(d.raw) & np.isfinite(cv) & (d.raw >= 0) & (cv >= 0)
        late = ok & (d.steps > ctx.transient_end)
        if late.sum() < 5:
            late = ok
        if late.sum() < 5:
            raise NotChecked.too_few(int(late.sum()), "steps with data and compute times", 5)
        data, comp = d.raw[late], cv[late]
        total = data + comp
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(total > 0, data / total, np.nan)
        if not np.isfinite(share).any():
            raise NotChecked(
                f"{fmt.TIME_DATA} + {fmt.TIME_COMPUTE} is 0 at every step", "not-recorded"
            )
        med_share = float(np.nanmedian(share))
        med_data, med_comp = float(np.median(data)), float(np.median(comp))
        if not (med_share >= p.data_fraction and med_data * 1e3 >= p.min_data_ms):
            return []
        steps = d.steps[late]
        speedup = (med_data + med_comp) / max(med_comp, 1e-9)
        return [
            Finding(
                signature=self.name,
                severity="warning",
                confidence=float(min(1.0, 0.5 + (med_share - p.data_fraction) * 1.5)),
                summary=(
                    f"training is input-bound: {med_share:.0%} of each step is spent waiting "
                    f"for data ({fmt_num(med_data * 1e3)} ms data vs {fmt_num(med_comp * 1e3)} ms "
                    f"compute, median over {late.sum()} steps; threshold "
                    f"{p.data_fraction:.0%}); a fast loader would make steps up to "
                    f"{speedup:.1f}× faster"
                ),
                fix="Use DataLoader(num_workers>0, pin_memory=True, persistent_workers=True), "
                "move per-item work out of __getitem__, cache preprocessed data.",
                steps=(int(steps[0]), int(steps[-1])),
                evidence=(
                    Evidence("data share of step time (median)", med_share, p.data_fraction, ">="),
                    Evidence("time/data (median)", med_data * 1e3, p.min_data_ms, ">=", "ms"),
                    Evidence("time/compute (median)", med_comp * 1e3, unit="ms"),
                    Evidence("steps measured", float(late.sum())),
                ),
                causes=(
                    "DataLoader with num_workers=0",
                    "slow per-item decoding or augmentation in __getitem__",
                    "slow storage or network reads",
                ),
            )
        ]


def unreliable_data_time(meta: dict, source_format: str) -> str | None:
    """Why ``time/data`` does not measure the device's wait for data (None: it does)."""
    if source_format != "runlens":
        return None  # an imported log's own timing: taken as its tool defines it
    collector = meta.get("collector") if isinstance(meta.get("collector"), dict) else {}
    mode = collector.get("data_time")
    device = str(meta.get("device") or "cpu")
    if mode is None:  # recorded before the collector said how: host clock
        mode = fmt.DATA_TIME_HOST if device.startswith("cpu") else fmt.DATA_TIME_UNRELIABLE
    if mode == fmt.DATA_TIME_UNRELIABLE:
        return (
            f"{fmt.TIME_DATA} was measured on the host clock while the model ran on {device}, "
            "which works asynchronously: host time then includes queued device work, not "
            "only the wait for data"
        )
    return None
