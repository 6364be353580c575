"""Isolated sudden jumps of the training loss that recover."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from runlens_collect import format as fmt

from runlens import series as S
from runlens.context import Context
from runlens.findings import Evidence, Finding, Severity, fmt_num
from runlens.signatures._curves import TINY, confidence, loss_view
from runlens.signatures.base import Param, Params, Signature

INPUT_OUTLIER = 0.5
"""An input batch whose RMS is more than 50% away from the rolling median of the batches
around it is an outlier (batches of one distribution vary by a few percent: the RMS of n
i.i.d. elements has a relative spread of about 1/√(2n))."""


class LossSpike(Signature):
    """A few steps where the loss jumps far above its recent level, then comes back.

    What it detects:
        Points of the training loss (after the transient) more than ``z`` robust noise
        units and at least ``min_rel`` (relative) above the rolling median of the
        surrounding steps, which return close to that baseline within ``recover_steps``
        points, with the list of their steps. Every such spike is reported, however many:
        above ``max_fraction`` of the points they *recur* and are reported as noise (info)
        unless most of them coincide with outlier input batches. With the collector's input
        probe the report says what each spike step's batch looked like: an input whose RMS
        (from ``probe/input/sumsq`` over its element count) is more than 50% and ``z``
        robust units away from the rolling median of the batches around it, or non-finite,
        marks a bad batch; normal inputs with a ``grad_norm`` spike mark wrong targets or a
        numerical fault (overflow, a bad kernel or device).

    Why it matters:
        A spike is one step with a huge gradient: a corrupted or mislabelled batch, a
        numerically bad example, or an update too large for the current curvature. Even
        when the loss recovers, the step can knock the weights to a worse region, and in
        large-scale training repeated spikes precede divergence.

    Evidence:
        The number of spike events and their steps; the largest score (robust σ above the
        baseline) against ``z``; the largest relative jump against ``min_rel``; the
        fraction of spiky points against ``max_fraction``; with the input probe, the spikes
        with an outlier input batch and those with normal inputs but a gradient blow-up.

    How to fix:
        Inspect the batches at the listed steps (bad samples, wrong scaling, label
        errors); with outlier inputs, fix the data path that produced them (decoding,
        normalization, device copies from reused pinned buffers); clip gradients; lower the
        learning rate or Adam's ε/β2 sensitivity; for large models, skip batches whose loss
        or gradient norm is an outlier and resume from a checkpoint before repeated spikes.

    References:
        Chowdhery et al., PaLM (2022) §5.1: restart before the spike and skip batches;
        Team OLMo, "2 OLMo 2 Furious" (2024): a "spike score" of loss/gradient-norm points
        many σ above a rolling average; Zhang et al., AUTOTRAINER (ICSE 2021).
    """

    name = "loss-spike"
    summary = "isolated sudden jumps far above the smoothed curve that recover"
    category = "curve"
    severity = "warning"
    requires = ("train/loss",)
    params = (
        Param(
            "z",
            6.0,
            "robust noise units (σ from the rolling MAD) above the rolling median",
            "in the spirit of OLMo 2's spike score (points many σ above a rolling average); "
            "the value 6 is runlens calibration (injected spikes score > 15σ)",
        ),
        Param(
            "min_rel",
            0.5,
            "a spike is also at least this fraction above its baseline",
            "runlens default: keeps tiny wobbles of very smooth curves out",
        ),
        Param("window", 25, "rolling-median window (points) of the baseline", "runlens default"),
        Param(
            "recover_steps",
            20,
            "points within which the loss must return near the baseline",
            "runlens default; a loss that stays up is loss-divergence",
        ),
        Param(
            "max_fraction",
            0.02,
            "above this fraction of spiky points the spikes recur: reported as noise (info) "
            "unless most coincide with outlier input batches",
            "runlens calibration (batch-size-1 sample ≈ 5%, spike sample < 1%)",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        v = loss_view(ctx)
        spikes = S.find_spikes(
            v.steps, v.raw, threshold=p.z, window=int(p.window), min_rel=p.min_rel
        )
        if not spikes:
            return []
        fraction = len(spikes) / len(v)
        # Above max_fraction the spikes recur: still reported (a bad batch every 20 steps
        # is a fault, not noise), but as noise unless something marks them as faults.
        recurring = fraction > p.max_fraction
        events: list[list[S.Spike]] = []
        for sp in spikes:  # adjacent spiky points are one event
            if events and sp.index - events[-1][-1].index <= 3:
                events[-1].append(sp)
            else:
                events.append([sp])
        recovered = []
        for ev in events:
            top = max(ev, key=lambda s: s.score)
            after = v.raw[ev[-1].index + 1 : ev[-1].index + 1 + int(p.recover_steps)]
            limit = top.baseline + 0.5 * p.min_rel * abs(top.baseline)
            if after.size and np.any(after <= limit):
                recovered.append(top)
        if not recovered:
            return []
        worst = max(recovered, key=lambda s: s.score)
        rel = max((s.value - s.baseline) / max(abs(s.baseline), TINY) for s in recovered)
        steps = [s.step for s in recovered]
        shown = ", ".join(str(s) for s in steps[:8]) + (" …" if len(steps) > 8 else "")
        cause = _attribute(ctx, steps, p)
        bad_batches = cause.bad_input >= max(1, 0.5 * len(steps))
        severity: Severity = "info" if recurring and not bad_batches else "warning"
        if recurring:
            head = (
                f"the loss spikes again and again: {len(recovered)} single-step spikes at "
                f"step {shown} ({fraction:.1%} of the points, more than isolated spikes); the "
                f"largest reached {fmt_num(worst.value)} against a baseline of "
                f"{fmt_num(worst.baseline)} ({worst.score:.0f}σ) at step {worst.step}, and the "
                "loss recovered each time"
            )
        else:
            head = (
                f"{len(recovered)} loss spike(s) at step {shown}; the largest reached "
                f"{fmt_num(worst.value)} against a baseline of {fmt_num(worst.baseline)} "
                f"({worst.score:.0f}σ) at step {worst.step}, and the loss recovered"
            )
        summary = head + cause.text(len(steps), recurring)
        return [
            Finding(
                signature=self.name,
                severity=severity,
                confidence=confidence(worst.score, p.z),
                summary=summary,
                steps=(steps[0], steps[-1]),
                evidence=(
                    Evidence("spike events", len(recovered)),
                    Evidence("largest score (robust σ)", worst.score, p.z, ">"),
                    Evidence("largest jump / baseline", rel, p.min_rel, ">="),
                    Evidence(
                        "fraction of spiky points",
                        fraction,
                        p.max_fraction,
                        ">" if recurring else "<=",
                    ),
                    *cause.evidence,
                    *(Evidence("spike at step", s) for s in steps[:5]),
                ),
                causes=cause.causes,
                fix=cause.fix,
            )
        ]


@dataclass(frozen=True)
class _Cause:
    """What the spike steps' inputs and gradients say (input probe, grad_norm)."""

    checked: bool
    bad_input: int
    grad_only: int
    ratio: float
    """Largest |input RMS / its rolling median - 1| + 1 at a spike with an outlier input."""
    layer: str | None = None
    """At spikes with normal inputs and a gradient blow-up: the parameter whose gradient
    norm jumped most against its own median (where the blow-up started, usually)."""

    def text(self, n: int, recurring: bool) -> str:
        if not self.checked:
            return (
                "; heavy-tailed noise rather than isolated faults (see noisy-loss)"
                if recurring
                else ""
            )
        if self.bad_input:
            return (
                f"; {self.bad_input} of {n} coincide with an outlier input batch (input RMS "
                f"up to {fmt_num(self.ratio)}× its usual level): bad batches"
            )
        if self.grad_only:
            where = f", most in `{self.layer}`" if self.layer else ""
            return (
                f"; the input batch{'es were' if n > 1 else ' was'} normal, the gradient norm "
                f"blew up at {self.grad_only} of {n}{where}: wrong targets in those batches or "
                "a numerical fault"
            )
        normal = (
            "; the input batch was normal" if n == 1 else f"; the inputs were normal at all {n}"
        )
        return normal + (
            ": heavy-tailed noise rather than faulty batches (see noisy-loss)" if recurring else ""
        )

    @property
    def evidence(self) -> tuple[Evidence, ...]:
        if not self.checked:
            return ()
        return (
            Evidence("spikes with an outlier input batch", self.bad_input),
            Evidence("spikes with normal inputs and a gradient-norm blow-up", self.grad_only),
        )

    @property
    def causes(self) -> tuple[str, ...]:
        if self.checked and self.bad_input:
            return (
                "corrupted batches: decoding/normalization skipped, a device copy read before "
                "it finished, garbage samples",
                "an occasional update too large for the local curvature (LR too high)",
            )
        if self.checked:
            return (
                "mislabelled or unusual targets in those batches (inputs were normal)",
                "a numerical fault: fp16 overflow, a bad kernel or device",
                "an occasional update too large for the local curvature (LR too high)",
            )
        return (
            "corrupted, mislabelled or wrongly scaled batches",
            "an occasional update too large for the local curvature (LR too high)",
            "Adam with a small ε dividing by a tiny second moment",
        )

    @property
    def fix(self) -> str:
        if self.checked and self.bad_input:
            return (
                "Find the batches at these steps and fix the data path that produced them "
                "(decoding and normalization, non_blocking copies from reused pinned buffers); "
                "skip batches whose input statistics are outliers; clip gradients meanwhile."
            )
        if self.checked:
            return (
                "Check the targets of the batches at these steps and rerun one of those steps "
                "deterministically (fp16 overflow, a bad kernel or device); clip gradients."
            )
        return (
            "Inspect the batches at these steps, clip gradients, lower the LR; for large "
            "runs skip outlier batches and restart before repeated spikes."
        )


def _attribute(ctx: Context, steps: list[int], p: Params) -> _Cause:
    """Count spikes whose input batch is an outlier (its RMS far from its rolling median,
    or non-finite) and spikes with normal inputs but a gradient-norm spike."""
    sq = ctx.curve(fmt.INPUT_SUMSQ)
    if sq is None or len(sq) < 5:
        return _Cause(False, 0, 0, float("nan"))
    n_el = _on(ctx, fmt.INPUT_EXAMPLES, sq.steps) * _on(ctx, fmt.INPUT_NUMEL, sq.steps)
    with np.errstate(invalid="ignore", divide="ignore"):
        rms = np.sqrt(sq.raw / np.where(n_el > 0, n_el, np.nan))
    base = S.rolling_median(rms, int(p.window))
    mad = S.rolling_mad(rms, int(p.window))
    with np.errstate(invalid="ignore", divide="ignore"):
        dev = np.abs(rms / base - 1)
        z = np.abs(rms - base) / np.maximum(mad, np.finfo(np.float64).tiny)
    far = np.isfinite(dev) & (dev > INPUT_OUTLIER) & (z > p.z)
    outlier = ~np.isfinite(sq.raw) | far
    gn = ctx.curve(fmt.GRAD_NORM)
    grad_spike: set[int] = set()
    if gn is not None and len(gn) >= 5:
        grad_spike = {
            s.step
            for s in S.find_spikes(
                gn.steps, gn.raw, threshold=p.z, window=int(p.window), min_rel=1.0
            )
        }
    at = dict(zip(sq.steps.tolist(), range(len(sq)), strict=True))
    bad, grad_only, worst = 0, 0, float("nan")
    grad_steps = []
    for s in steps:
        i = at.get(s)
        if i is not None and outlier[i]:
            bad += 1
            r = float(dev[i] + 1) if np.isfinite(dev[i]) else float("inf")
            worst = r if not np.isfinite(worst) else max(worst, r)
        elif s in grad_spike:
            grad_only += 1
            grad_steps.append(s)
    return _Cause(True, bad, grad_only, worst, _jumped_layer(ctx, grad_steps))


def _jumped_layer(ctx: Context, steps: list[int]) -> str | None:
    """The parameter whose gradient norm at ``steps`` is furthest above its own median."""
    g = ctx.layer(fmt.KIND_GRAD, "norm")
    if g is None or not steps:
        return None
    rows = np.isin(g.steps, steps)
    if not rows.any():
        return None
    v = np.where(np.isfinite(g.values) & (g.values > 0), g.values, np.nan)
    ok = np.isfinite(v).sum(axis=0) >= 5
    if not ok.any():
        return None
    med = np.full(v.shape[1], np.nan)
    med[ok] = np.nanmedian(v[:, ok], axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        jump = np.where(ok, v[rows] / med, np.nan)
    if not np.isfinite(jump).any():
        return None
    return g.layers[
        int(np.nanargmax(np.nanmax(np.where(np.isfinite(jump), jump, -np.inf), axis=0)))
    ]


def _on(ctx: Context, name: str, steps: np.ndarray) -> np.ndarray:
    c = ctx.curve(name)
    out = np.full(len(steps), np.nan)
    if c is None:
        return out
    idx = np.clip(np.searchsorted(c.steps, steps), 0, max(len(c) - 1, 0))
    hit = c.steps[idx] == steps if len(c) else np.zeros(len(steps), bool)
    out[hit] = c.raw[idx[hit]]
    return out
