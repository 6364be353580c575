"""A large fraction of ReLU units output zero for every example, persistently."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Finding
from runlens.needs import LayerStat
from runlens.run import LayerMatrix
from runlens.signatures import _layers as L
from runlens.signatures.base import NotChecked, Param, Params, Signature


class DeadRelu(Signature):
    """Dying ReLU: units that output zero for every example and stay that way.

    What it detects:
        ReLU-family layers (``ReLU``, ``ReLU6``, ``RReLU``, ``Threshold``) where, after the
        early transient, the fraction of *dead* units — zero for every example of the batch
        (the collector's ``frac_dead_units``) — is at least ``dead_fraction`` on at least
        ``min_fraction`` of the recorded steps. Runs whose batches have fewer than
        ``min_examples`` examples are skipped: a healthy unit that is zero half the time is
        zero for a whole batch of ``E`` examples with probability ~0.5**E, which is large
        for tiny batches. When no layer's type is known, every layer with activation
        statistics is checked.

    Why it matters:
        A dead unit has zero gradient for every input, so nothing can revive it: its
        incoming weights stop learning and the layer loses capacity for good. Large
        learning rates, a large negative bias or an unlucky initialization can kill most of
        a layer in a few steps; the loss then plateaus above what the model could reach.

    Evidence:
        The dead fraction of each flagged layer (median after the transient), the share of
        steps it was above the threshold, and the step range.

    How to fix:
        Lower the learning rate (or add warm-up); initialize biases at zero or slightly
        positive and weights with Kaiming initialization; use LeakyReLU, ELU, GELU or SiLU;
        add BatchNorm before the activation.

    References:
        Lu, Shin, Su & Karniadakis, "Dying ReLU and Initialization: Theory and Numerical
        Examples" (2019, arXiv:1903.06733); Maas et al., "Rectifier Nonlinearities Improve
        Neural Network Acoustic Models" (ICML 2013, LeakyReLU); Zhang et al.,
        "AUTOTRAINER" (ICSE 2021) — dying-ReLU rule.
    """

    name = "dead-relu"
    summary = "a large fraction of ReLU units zero for every example, persisting"
    category = "layer"
    severity = "warning"
    requires = ("layers:activation",)
    needs = (
        LayerStat(fmt.KIND_ACTIVATION, "frac_dead_units"),
        LayerStat(fmt.KIND_OUTPUT, "numel"),
    )
    params = (
        Param(
            "dead_fraction",
            0.5,
            "fraction of a layer's units dead (zero for the whole batch) to flag the layer",
            "AUTOTRAINER (Zhang et al. 2021) flags dying ReLU when most neurons are inactive; "
            "0.5 is our calibration (healthy sample runs stay under 0.1)",
        ),
        Param(
            "min_fraction",
            0.8,
            "fraction of post-transient recorded steps on which the layer must be that dead",
            "runlens default: dead units do not recover, so the condition should persist",
        ),
        Param(
            "min_examples",
            8,
            "smallest batch (model output elements / output width) for which 'zero for every "
            "example' is evidence of a dead unit",
            "runlens default: a unit zero half the time is zero for 8 examples w.p. 0.4%",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        m = ctx.layer(fmt.KIND_ACTIVATION, "frac_dead_units")
        if m is None:
            raise NotChecked("no frac_dead_units activation statistic", "not-recorded")
        cols = _relu_columns(ctx, m)
        if cols.size == 0:
            raise NotChecked(
                "no ReLU-family layer among the recorded activations", "not-applicable"
            )
        examples = _examples_per_unit(ctx)
        if examples is not None and examples < p.min_examples:
            # with a batch of 1, every zero output is "zero for every example"
            raise NotChecked(
                f"each unit sees {examples:g} example(s) per batch, needs "
                f"{int(p.min_examples)} to call a unit dead",
                "not-applicable",
            )
        hit = L.persistent_layers(ctx, m, cols, p.dead_fraction, p.min_fraction)
        if hit is None:
            return []
        sp = hit.steps
        worst = hit.medians[0]
        names = hit.layers
        parts = ", ".join(f"`{n}` {v:.0%}" for n, v in zip(names[:4], hit.medians, strict=False))
        return [
            Finding(
                signature=self.name,
                severity="error" if worst >= 0.99 else "warning",
                confidence=hit.confidence(p.dead_fraction),
                summary=(
                    f"{len(names)} ReLU layer(s) have most units dead (zero for every example): "
                    f"{parts} (threshold {p.dead_fraction:.0%})" + hit.step_text
                ),
                fix="Lower the learning rate or add warm-up, use Kaiming init with zero or "
                "slightly positive biases, switch to LeakyReLU/GELU, or add BatchNorm.",
                steps=sp,
                layers=tuple(names),
                evidence=hit.evidence("dead fraction", p.dead_fraction, p.min_fraction),
                causes=(
                    "learning rate too high",
                    "negative bias or unlucky initialization",
                    "no normalization before the ReLU",
                ),
            )
        ]


def _examples_per_unit(ctx: Context) -> float | None:
    """Examples each unit sees per batch, at least: the model output's elements divided
    by its width (the batch size for a classifier; more for convolutions or sequences)."""
    out = ctx.layer(fmt.KIND_OUTPUT, "numel")
    width = ctx.run.output_width
    if out is None or not width:
        return None
    n = out.values[np.isfinite(out.values)]
    return float(np.median(n)) / width if n.size else None


def _relu_columns(ctx: Context, m: LayerMatrix) -> np.ndarray:
    types = [ctx.module_type(n) for n in m.layers]
    relu = [j for j, t in enumerate(types) if t in L.RELU_FAMILY]
    if relu:
        return np.array(relu, dtype=int)
    if all(not t for t in types):
        return np.arange(len(m.layers))
    return np.array([], dtype=int)
