"""Gradients carried over from one optimizer step to the next (no zero_grad)."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.signatures import _layers as L
from runlens.signatures._probes import on_steps, probe_json, series, weights_changed
from runlens.signatures.base import NotChecked, Param, Params, Signature


class GradientNotReset(Signature):
    """Gradients are never reset: each update applies the sum of all past gradients.

    What it detects:
        At the first backward pass of an optimizer step, the parameters still hold the
        gradient of the previous step: ``optimizer.zero_grad()`` is missing, or is called on
        another optimizer than the one holding these parameters (a GAN's discriminator
        optimizer zeroed twice, the generator's never). The collector's gradient probe
        (``runlens_collect.probes.GradCarryProbe``) puts a tensor hook on one parameter
        (the smallest, usually a bias) of up to 8 modules spread over the model; the hook
        runs before autograd adds the incoming
        gradient to ``p.grad`` and records, at the first pass after each
        ``optimizer.step()``, ``‖p.grad‖²`` (carried) and ``‖incoming‖²`` (new) on the
        device (``probe/grad/carry_sq``, ``probe/grad/new_sq``, which parameters carried
        in ``probe/grad/carry_mask``). Later passes of the same optimizer step (gradient
        accumulation) are only counted (``probe/grad/passes``), so accumulation done right
        — several ``backward()``, one ``step()``, one ``zero_grad()`` — carries nothing and
        is not flagged. Fires when the carried gradient is above ``min_ratio`` of the new
        one on ``min_fraction`` of the measured steps.

    Why it matters:
        ``backward()`` adds into ``.grad``. Without a reset, step t applies g_1 + … + g_t:
        the update grows linearly (with momentum, faster), the loss diverges or oscillates
        and the gradient norm explodes. The symptoms (loss-divergence,
        exploding-gradients, large-updates) look like a too-high learning rate, and
        lowering it only delays the blow-up.

    Evidence:
        The share of measured steps that carried a gradient against ``min_fraction``; the
        median ‖carried‖ / ‖new‖ against ``min_ratio``; how the carried norm grew; the
        backward passes per optimizer step; the probed parameters that carried.

    How to fix:
        Call ``optimizer.zero_grad()`` before ``loss.backward()`` in every step, on the
        optimizer that holds these parameters (``opt_g.zero_grad()`` before the generator's
        backward). To accumulate gradients over k batches, call ``zero_grad()`` right
        after each ``optimizer.step()`` and divide the loss by k.

    References:
        PyTorch docs, ``torch.optim.Optimizer.zero_grad`` and "Zeroing out gradients in
        PyTorch" recipe; PyTorch forum, "Why do we need to set the gradients manually to
        zero in pytorch?"; Lou et al., TrainCheck (OSDI 2025): gradient-reset invariants.
    """

    name = "gradient-not-reset"
    summary = "gradients carried over between optimizer steps (missing or misplaced zero_grad)"
    category = "bug"
    severity = "error"
    requires = (fmt.GRAD_CARRY_SQ,)  # new_sq is absent while every .grad was None
    params = (
        Param(
            "min_ratio",
            0.01,
            "‖carried gradient‖ / ‖new gradient‖ above which a step carried a gradient",
            "correct code carries exactly 0 (zero_grad sets .grad to None or zeros: PyTorch "
            "docs); 1% only keeps float noise out",
        ),
        Param(
            "min_fraction",
            0.5,
            "share of measured steps (after the first) that must carry a gradient",
            "runlens default: a missing zero_grad carries on every step, a conditional "
            "reset on most",
        ),
        Param("min_steps", 5, "measured steps needed", "runlens default"),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        steps, carry_sq = series(ctx, fmt.GRAD_CARRY_SQ)
        new_sq = on_steps(ctx, fmt.GRAD_NEW_SQ, steps)
        # new_sq is absent when every probed .grad was None (nothing carried, nothing to
        # measure: the collector skips the norms); such a step carried exactly 0.
        reset = (carry_sq == 0) & np.isnan(new_sq)
        ok = np.isfinite(carry_sq) & ((np.isfinite(new_sq) & (new_sq > 0)) | reset)
        ok[:1] = False  # the first optimizer step has nothing to carry
        if ok.sum() < p.min_steps:
            raise NotChecked.too_few(
                int(ok.sum()), "steps with a measured gradient", int(p.min_steps)
            )
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(reset[ok], 0.0, np.sqrt(carry_sq[ok] / new_sq[ok]))
        carried = ratio > p.min_ratio
        share = float(carried.mean())
        if share < p.min_fraction:
            return []
        st = steps[ok]
        hit = st[carried]
        carry = np.sqrt(carry_sq[ok][carried])
        q = max(1, carry.size // 4)
        growth = float(np.median(carry[-q:]) / max(np.median(carry[:q]), 1e-300))
        passes = on_steps(ctx, fmt.GRAD_PASSES, st)
        passes_med = float(np.nanmedian(passes)) if np.isfinite(passes).any() else float("nan")
        names = _carrying_params(ctx, st[carried])
        changed = weights_changed(ctx)
        if names and changed and not any(changed.get(n, True) for n in names):
            # No optimizer applies these gradients (optimizer-mismatch): their pile-up is
            # harmless, and the mismatch is the bug to report.
            return []
        med = float(np.median(ratio[carried]))
        where = f" ({L.name_list(names)})" if names else ""
        accum = (
            f"; {passes_med:.0f} backward passes per optimizer step"
            if np.isfinite(passes_med) and passes_med > 1
            else ""
        )
        return [
            Finding(
                signature=self.name,
                severity="error",
                confidence=0.95 if share >= 0.9 else 0.8,
                summary=(
                    f"gradients are never reset between optimizer steps: at the first backward "
                    f"pass of {int(carried.sum())} of {carried.size} steps the probed parameters"
                    f"{where} still held the previous gradient (median ‖carried‖/‖new‖ = "
                    f"{fmt_num(med)}, growing {fmt_num(growth)}× over the run){accum}: each "
                    "update applies the sum of all past gradients"
                ),
                fix=(
                    "Call optimizer.zero_grad() before loss.backward() in every step, on the "
                    "optimizer that holds these parameters; when accumulating over k batches, "
                    "call zero_grad() right after each optimizer.step(). Lowering the learning "
                    "rate would only delay the blow-up."
                ),
                steps=(int(hit[0]), int(hit[-1])),
                layers=tuple(names),
                evidence=(
                    Evidence("share of steps carrying a gradient", share, p.min_fraction, ">="),
                    Evidence("median ‖carried‖ / ‖new‖ gradient", med, p.min_ratio, ">"),
                    Evidence("growth of the carried gradient (last/first quarter)", growth),
                    Evidence("backward passes per optimizer step (median)", passes_med),
                    Evidence("probed parameters that carried", float(len(names))),
                ),
                causes=(
                    "optimizer.zero_grad() missing from the training loop",
                    "zero_grad() called on another optimizer (GAN: the discriminator's twice)",
                    "zero_grad() inside a condition that is rarely true",
                ),
            )
        ]


def _carrying_params(ctx: Context, steps: np.ndarray) -> list[str]:
    """Probed parameters whose bit is set in ``probe/grad/carry_mask`` on any of ``steps``."""
    names = probe_json(ctx, "grad").get("params") or []
    mask = on_steps(ctx, fmt.GRAD_CARRY_MASK, steps)
    bits = 0
    for m in mask[np.isfinite(mask)]:
        bits |= int(m)
    return [str(n) for i, n in enumerate(names) if bits >> i & 1]
