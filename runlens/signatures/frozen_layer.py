"""Parameters that get no gradient or never change while the rest of the model trains."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Evidence, Finding
from runlens.needs import LayerStat
from runlens.signatures import _layers as L
from runlens.signatures.base import NotChecked, Param, Params, Signature


class FrozenLayer(Signature):
    """Parameters that never train while others do.

    What it detects:
        Parameters that, on every recorded step, either get no gradient (``requires_grad``
        is False, a stray ``.detach()``/``torch.no_grad()`` cuts them off the graph, or
        they are unused in the forward pass) or get a gradient of exactly zero — while at
        least one other parameter does change. When *every* parameter is frozen while an
        optimizer runs, the loss is cut off from the model: an error. Parameters that get
        gradients but are in no optimizer param group are ``optimizer-mismatch``'s, and
        updates of exactly 0 despite gradients are ``stalled-optimizer``'s.

    Why it matters:
        A frozen layer keeps its random initialization: the model is effectively smaller
        than intended, and the bug is silent — the loss still goes down, just not as far.
        Freezing on purpose (fine-tuning a pretrained backbone) is fine: parameters frozen
        only by ``requires_grad=False`` are reported as info, not as a warning.

    Evidence:
        The frozen parameters by name, why each one is frozen (no gradient, zero gradient,
        ``requires_grad=False``), and the fraction of the model's parameter elements they
        hold.

    How to fix:
        Look for ``.detach()``, ``.data``, ``torch.no_grad()`` or ``.numpy()`` round trips
        in the forward pass; check ``requires_grad`` on each parameter; build the optimizer
        from ``model.parameters()`` *after* creating every submodule (and after moving the
        model to the device); make sure every submodule is used in ``forward``.

    References:
        Schoop et al., "UMLAUT: Debugging Deep Learning Programs using Program Structure,
        Model Behavior, and Neural Network Pruning" (CHI 2021); Wardat et al.,
        "DeepDiagnosis" (ICSE 2022) — unchanged-weight rules; PyTorch docs, "Autograd
        mechanics: excluding subgraphs from backward".
    """

    name = "frozen-layer"
    summary = "parameters that get no gradient or never change while others train"
    category = "layer"
    severity = "warning"
    requires = ("layers:weight|layers:grad",)
    # "ever had a gradient / ever moved": over windows of a long run, the largest value;
    # "never in the optimizer": the share of steps marked missing.
    needs = (
        LayerStat(fmt.KIND_GRAD, "norm", "max"),
        LayerStat(fmt.KIND_UPDATE, "missing", "mean"),
        LayerStat(fmt.KIND_UPDATE, "update_ratio", "max"),
        LayerStat(fmt.KIND_WEIGHT, "norm"),
    )
    params = (
        Param(
            "min_steps",
            5,
            "recorded steps needed before a parameter can be called frozen",
            "runlens default: a handful of steps rules out a first step without gradients",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        names = list(ctx.run.layer_names)
        if not names:
            raise NotChecked(
                "no parameter names (no weight statistics, no model summary in run.json)",
                "not-recorded",
            )
        rows = [
            len(m.steps)
            for m in (
                ctx.layer(fmt.KIND_GRAD, "norm", "max"),
                ctx.layer(fmt.KIND_UPDATE, "missing", "mean"),
                ctx.layer(fmt.KIND_WEIGHT, "norm"),
            )
            if m is not None
        ]
        if max(rows, default=0) < int(p.min_steps):
            raise NotChecked.too_few(
                max(rows, default=0), "recorded steps of layer statistics", int(p.min_steps)
            )
        reasons = _frozen_reasons(ctx, names, int(p.min_steps))
        if not reasons:
            return []
        if len(reasons) == len(names):
            return _all_frozen(self.name, ctx, names, reasons)
        if not _others_train(ctx, reasons):
            return []
        frozen = [n for n in names if n in reasons]
        info = L.param_info(ctx)
        numel = {n: _numel(info, n) for n in names}
        total = sum(v for v in numel.values() if v)
        frozen_elems = sum(numel[n] or 0 for n in frozen)
        share = frozen_elems / total if total else float("nan")
        by_reason: dict[str, list[str]] = {}
        for n in frozen:
            by_reason.setdefault(reasons[n], []).append(n)
        detail = "; ".join(f"{r}: {L.name_list(ns)}" for r, ns in by_reason.items())
        steps = ctx.steps
        intentional = all(r == "requires_grad=False" for r in reasons.values())
        return [
            Finding(
                signature=self.name,
                # requires_grad=False is written on purpose (fine-tuning a backbone) far more
                # often than by mistake: said, not warned about. A lost graph never is.
                severity="info" if intentional else "warning",
                confidence=0.6 if intentional else 0.9,
                summary=(
                    f"{len(frozen)} of {len(names)} parameter tensors never trained while the "
                    f"others did ({detail})"
                    + (f", {share:.0%} of the parameters" if np.isfinite(share) else "")
                ),
                fix="Remove stray .detach()/.data/torch.no_grad() from forward, check "
                "requires_grad, and use every submodule in forward. Ignore if freezing is "
                "intended (fine-tuning).",
                steps=steps,
                layers=tuple(frozen),
                evidence=(
                    Evidence("frozen parameter tensors", len(frozen)),
                    Evidence("share of parameter elements frozen", share),
                    *(Evidence(f"{r} (tensors)", len(ns)) for r, ns in by_reason.items()),
                ),
                causes=(
                    "a .detach()/.data/no_grad() in the forward pass",
                    "requires_grad=False left on",
                    "a submodule not used in forward",
                ),
            )
        ]


def _numel(info: dict[str, L.ParamInfo], name: str) -> int | None:
    i = info.get(name)
    if i is None or i.shape is None:
        return None
    return int(np.prod(i.shape)) if i.shape else 1


def _frozen_reasons(ctx: Context, names: list[str], min_steps: int) -> dict[str, str]:
    info = L.param_info(ctx)
    reasons: dict[str, str] = {}
    for n in names:
        if info.get(n) is not None and info[n].requires_grad is False:
            reasons[n] = "requires_grad=False"
    grad = ctx.layer(fmt.KIND_GRAD, "norm", "max")
    if grad is not None and len(grad.steps) >= min_steps:
        v = grad.values
        has = np.isfinite(v) & (v > 0)
        any_finite = np.isfinite(v).any(axis=0)
        for j, n in enumerate(grad.layers):
            if n in reasons or has[:, j].any():
                continue
            reasons[n] = "zero gradient" if any_finite[j] else "no gradient"
        # Parameters the weight rows know but that never had a gradient row.
        for n in names:
            if n not in reasons and n not in grad.layers:
                reasons[n] = "no gradient"
    # Parameters outside the optimizer (update rows missing) are optimizer-mismatch's. An
    # update of exactly 0 with a gradient is float underflow of a tiny step (vanishing
    # gradients, a tiny LR: those findings explain it) or a stalled optimizer
    # (stalled-optimizer), so it is not called frozen here.
    upd = ctx.layer(fmt.KIND_UPDATE, "missing", "mean")
    if upd is None:
        w = ctx.layer(fmt.KIND_WEIGHT, "norm")
        if w is not None and len(w.steps) >= min_steps:
            v = np.where(np.isfinite(w.values), w.values, np.nan)
            with np.errstate(invalid="ignore"):
                constant = (np.nanmax(v, axis=0) == np.nanmin(v, axis=0)) & (
                    np.nanmax(np.abs(v), axis=0) > 0
                )
            for j, n in enumerate(w.layers):
                if n not in reasons and constant[j]:
                    reasons[n] = "never updated"
    return reasons


def _all_frozen(
    name: str, ctx: Context, names: list[str], reasons: dict[str, str]
) -> list[Finding]:
    """Every parameter frozen: an error when the run was training (an optimizer stepped),
    nothing for a recording of inference or evaluation."""
    collector = ctx.run.meta.get("collector") or {}
    trains = ctx.lr is not None or fmt.KIND_UPDATE in (collector.get("kinds_in_effect") or ())
    if not trains:
        return []
    by_reason: dict[str, list[str]] = {}
    for n in names:
        by_reason.setdefault(reasons[n], []).append(n)
    detail = "; ".join(f"{r}: {L.name_list(ns)}" for r, ns in by_reason.items())
    return [
        Finding(
            signature=name,
            severity="error",
            confidence=0.9,
            summary=(
                f"no parameter trained: all {len(names)} parameter tensors got no gradient or "
                f"a zero one on every recorded step ({detail}) while the optimizer ran — the "
                "loss is cut off from the model"
            ),
            fix="Find where the loss loses the graph: a .detach()/.item()/.numpy() or "
            "torch.no_grad() between the model output and the loss, or requires_grad switched "
            "off everywhere.",
            steps=ctx.steps,
            layers=tuple(names),
            evidence=(
                Evidence("frozen parameter tensors", len(names)),
                Evidence("share of parameter elements frozen", 1.0),
                *(Evidence(f"{r} (tensors)", len(ns)) for r, ns in by_reason.items()),
            ),
            causes=(
                "the loss computed from a detached output",
                "the forward pass run under torch.no_grad()",
                "requires_grad switched off on every parameter",
            ),
        )
    ]


def _others_train(ctx: Context, reasons: dict[str, str]) -> bool:
    upd = ctx.layer(fmt.KIND_UPDATE, "update_ratio", "max")
    if upd is not None:
        v = upd.values
        moved = (np.isfinite(v) & (v > 0)).any(axis=0)
        return any(moved[j] for j, n in enumerate(upd.layers) if n not in reasons)
    w = ctx.layer(fmt.KIND_WEIGHT, "norm")
    if w is None:
        return False
    v = np.where(np.isfinite(w.values), w.values, np.nan)
    with np.errstate(invalid="ignore"):
        changed = np.nanmax(v, axis=0) != np.nanmin(v, axis=0)
    return any(changed[j] for j, n in enumerate(w.layers) if n not in reasons)
