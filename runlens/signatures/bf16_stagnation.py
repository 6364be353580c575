"""Low-precision weights whose updates round away."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.needs import LayerStat
from runlens.signatures import _layers as L
from runlens.signatures._probes import LOW_PRECISION, numel, on_steps, param_dtype
from runlens.signatures.base import NotChecked, Param, Params, Signature


class Bf16Stagnation(Signature):
    """Weights stored in bf16/fp16 that the optimizer updates in place stop changing.

    What it detects:
        Parameters whose storage type is bfloat16 or float16 (run.json's model summary)
        and that the optimizer holds itself (their ``update`` rows are not missing: no
        float32 master copy in between), whose updates leave most elements exactly
        unchanged: the median share of elements with a zero update (``update`` rows'
        ``frac_zero``) is at least ``min_frozen`` while their gradients are non-zero and
        the learning rate is not 0. An update smaller than half the spacing of the format
        around a weight — about 2^-8 of the weight for bf16 (8 significant bits), 2^-11
        for fp16 — rounds back to the weight.

    Why it matters:
        Pure-bf16 training (``model.to(torch.bfloat16)`` with a plain optimizer) loses
        every update below the format's resolution: with Adam at LR 1e-4 and weights of
        ~0.1 each update is ~1e-3 of the weight, under bf16's 3.9e-3, and the model barely
        trains. It looks like a learning rate that is too small, and raising the LR
        changes the dynamics instead of fixing the precision.

    Evidence:
        The low-precision parameters, the median share of their elements left unchanged
        per step against ``min_frozen``, the median update ratio ‖Δw‖/‖w‖ against the
        format's resolution, the share of the model they hold.

    How to fix:
        Keep float32 master weights: train a float32 model under
        ``torch.autocast(device_type, dtype=torch.bfloat16)``, or keep an fp32 copy in the
        optimizer (mixed-precision frameworks do); or use an optimizer with stochastic
        rounding or Kahan-compensated updates for pure-bf16 weights.

    References:
        Micikevicius et al., "Mixed Precision Training" (ICLR 2018): fp32 master weights
        because small updates vanish in fp16; Kalamkar et al., "A Study of BFLOAT16 for
        Deep Learning Training" (2019); Zamirai et al., "Revisiting BFloat16 Training"
        (2020): stochastic rounding / Kahan summation for pure-bf16 updates.
    """

    name = "bf16-stagnation"
    summary = "bf16/fp16 weights without fp32 master copies whose updates round away"
    category = "bug"
    severity = "warning"
    requires = (f"layers:{fmt.KIND_UPDATE}",)
    needs = (
        LayerStat(fmt.KIND_UPDATE, "frac_zero"),
        LayerStat(fmt.KIND_GRAD, "frac_zero"),
        LayerStat(fmt.KIND_UPDATE, "update_ratio"),
    )
    params = (
        Param(
            "min_frozen",
            0.5,
            "median share of a parameter's elements whose update rounded to exactly 0",
            "runlens default; float32 parameters updated by SGD/Adam have ~0 such elements",
        ),
        Param(
            "min_share",
            0.25,
            "share of the low-precision parameter elements that must stagnate",
            "runlens default",
        ),
        Param("min_steps", 5, "recorded update steps needed", "runlens default"),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        fz = ctx.layer(fmt.KIND_UPDATE, "frac_zero")
        if fz is None:
            raise NotChecked("no update rows", "not-recorded")
        L.require_rows(fz, int(p.min_steps))
        low = {n: param_dtype(ctx, n) for n in fz.layers}
        low = {n: d for n, d in low.items() if d in LOW_PRECISION}
        if not low:
            if not any(param_dtype(ctx, n) for n in fz.layers):
                raise NotChecked(
                    "parameter dtypes not recorded (run.json from an older collector)",
                    "not-recorded",
                )
            raise NotChecked("no bfloat16/float16 parameters", "not-applicable")
        post = L.after_transient(ctx, fz)
        lr = on_steps(ctx, fmt.lr_name(0), fz.steps)
        rows = post & ~(np.isfinite(lr) & (lr == 0))
        gz = ctx.layer(fmt.KIND_GRAD, "frac_zero")
        ratio = ctx.layer(fmt.KIND_UPDATE, "update_ratio")
        stuck, medians = [], {}
        for name in low:
            j = fz.layers.index(name)
            v = fz.values[rows, j]
            v = v[np.isfinite(v)]
            if v.size < p.min_steps:
                continue  # not in the optimizer (rows missing): a master copy updates it
            med = float(np.median(v))
            if gz is not None and name in gz.layers:
                g = gz.values[:, gz.layers.index(name)]
                g = g[np.isfinite(g)]
                if g.size and float(np.median(g)) >= p.min_frozen:
                    continue  # no gradient there to lose
            medians[name] = med
            if med >= p.min_frozen:
                stuck.append(name)
        if not medians:
            raise NotChecked(
                "the low-precision parameters have no update rows (not in the optimizer: "
                "a float32 master copy is updated instead)",
                "not-applicable",
            )
        total = sum(numel(ctx, n) for n in medians) or 1
        share = sum(numel(ctx, n) for n in stuck) / total
        if not stuck or share < p.min_share:
            return []
        dtypes = sorted({low[n] for n in stuck})
        res = max(LOW_PRECISION[d] for d in dtypes)
        r = []
        if ratio is not None:
            for n in stuck:
                if n in ratio.layers:
                    x = ratio.values[rows, ratio.layers.index(n)]
                    r += list(x[np.isfinite(x)])
        upd_ratio = float(np.median(r)) if r else float("nan")
        frozen = float(np.median([medians[n] for n in stuck]))
        return [
            Finding(
                signature=self.name,
                severity="warning",
                confidence=min(1.0, 0.6 + 0.4 * frozen),
                summary=(
                    f"{len(stuck)} {'/'.join(dtypes)} parameter tensor(s) updated in place "
                    f"without float32 master copies ({L.name_list(stuck)}) leave "
                    f"{frozen:.0%} of their elements unchanged per step (median): updates "
                    f"below {'/'.join(dtypes)}'s resolution (~{fmt_num(res)} of the weight) "
                    f"round away; the measured update ratio is {fmt_num(upd_ratio)}"
                ),
                fix=(
                    "Keep float32 master weights: train a float32 model under "
                    "torch.autocast(device_type, dtype=torch.bfloat16) instead of "
                    "model.to(torch.bfloat16), or use an optimizer with stochastic rounding / "
                    "Kahan-compensated updates for pure-bf16 weights."
                ),
                steps=(int(fz.steps[rows][0]), int(fz.steps[rows][-1])) if rows.any() else None,
                layers=tuple(stuck),
                evidence=(
                    Evidence("elements unchanged per step (median)", frozen, p.min_frozen, ">="),
                    Evidence(
                        "share of low-precision elements stagnating", share, p.min_share, ">="
                    ),
                    Evidence("update ratio ‖Δw‖/‖w‖ (median)", upd_ratio, res, "vs"),
                    Evidence("format resolution (relative)", res),
                ),
                causes=(
                    "model.to(torch.bfloat16) / .half() with an optimizer updating it in place",
                    "a learning rate too small for the format (update/weight below 2^-8)",
                ),
            )
        ]
