"""Parameters trained without an optimizer, and optimizer parameters that never train."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Evidence, Finding, Severity
from runlens.needs import LayerStat
from runlens.signatures import _layers as L
from runlens.signatures._probes import probe_json, weights_changed
from runlens.signatures.base import NotChecked, Param, Params, Signature


class OptimizerMismatch(Signature):
    """The optimizer does not hold the parameters that get gradients.

    What it detects:
        * parameters that receive gradients but belong to no param group of the optimizer
          and never change (the collector marks their ``update`` rows missing; weights
          constant) — typically the optimizer was built before a layer was replaced or
          unfrozen (``model.fc = nn.Linear(...)`` after ``SGD(model.parameters())``);
        * tensors the optimizer holds that never receive a gradient: model parameters with
          ``requires_grad=False`` (frozen after the optimizer was built) and tensors that
          are not parameters of the model at all (the replaced layer's old weights). Alone
          this is harmless (reported as info); together with the first it means the
          optimizer trains the wrong tensors.
        Checked at setup (run.json ``probes.optimizer``, written by the collector's
        ``OptimizerProbe`` at setup, after the first step and whenever the param groups
        change) and over the run (per-step gradient and update rows).

    Why it matters:
        The loss goes down only as far as the parameters that do train allow, or not at
        all: with a fine-tuning head outside the optimizer the model is frozen while the
        training loop runs normally. The symptoms (flat loss, underfitting, a "frozen"
        layer) suggest a learning-rate or architecture problem.

    Evidence:
        The parameters with gradients outside the optimizer (names, count, share of the
        model), the tensors the optimizer holds that got no gradient (frozen ones by name,
        foreign ones by count and size), and whether any parameter trains at all.

    How to fix:
        Build the optimizer after the model is final: after replacing layers, after moving
        it to the device and after setting ``requires_grad``, from
        ``[p for p in model.parameters() if p.requires_grad]``. When unfreezing later, add
        the parameters with ``optimizer.add_param_group({"params": ...})``.

    References:
        PyTorch docs, ``torch.optim`` ("construct an optimizer ... after moving the model
        to the device") and ``Optimizer.add_param_group``; PyTorch forum, "Model not
        training after replacing the last layer"; Lou et al., TrainCheck (OSDI 2025).
    """

    name = "optimizer-mismatch"
    summary = "parameters with gradients outside the optimizer, or an optimizer of frozen tensors"
    category = "bug"
    severity = "warning"
    requires = (f"layers:{fmt.KIND_GRAD}", f"layers:{fmt.KIND_UPDATE}")
    needs = (
        LayerStat(fmt.KIND_GRAD, "norm", "max"),
        LayerStat(fmt.KIND_UPDATE, "missing", "mean"),
        LayerStat(fmt.KIND_WEIGHT, "norm"),
        LayerStat(fmt.KIND_WEIGHT, "mean"),
    )
    params = (
        Param(
            "min_steps",
            5,
            "recorded steps of gradient and update rows needed",
            "runlens default (as frozen-layer)",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        # "ever had a gradient" is a max; "missing on every sampled step" a mean of 1
        grad = ctx.layer(fmt.KIND_GRAD, "norm", "max")
        upd = ctx.layer(fmt.KIND_UPDATE, "missing", "mean")
        if grad is None or upd is None:
            raise NotChecked("no gradient or update rows", "not-recorded")
        n = min(len(grad.steps), len(upd.steps))
        if n < p.min_steps:
            raise NotChecked.too_few(
                n, "recorded steps of gradient and update rows", int(p.min_steps)
            )
        g = grad.values
        info = L.param_info(ctx)
        got_grad = {}
        for j, name in enumerate(grad.layers):
            col = g[:, j][np.isfinite(g[:, j])]
            live = bool((col > 0).any())
            if live and info.get(name) and info[name].requires_grad is False:
                # A frozen parameter's .grad left over from before it was frozen: constant.
                live = bool(col.max() != col.min())
            got_grad[name] = live
        # Outside the optimizer: missing on every step that sampled the parameter (NaN: a
        # step that did not sample it, the collector's memory budget).
        v = upd.values
        outside_all = ((v == 1) | np.isnan(v)).all(axis=0) & (v == 1).any(axis=0)
        held = {name: not bool(outside_all[j]) for j, name in enumerate(upd.layers)}
        changed = weights_changed(ctx)
        names = [n for n in upd.layers if n in got_grad]
        outside = [n for n in names if got_grad[n] and not held[n] and not changed.get(n, False)]
        training = [n for n in names if got_grad[n] and held[n]]
        idle = [n for n in names if held[n] and not got_grad[n]]
        facts = probe_json(ctx, "optimizer")
        foreign = int(facts.get("foreign") or 0)
        foreign_numel = int(facts.get("foreign_numel") or 0)
        if not outside and not idle and not foreign:
            return []
        idle_frozen = [n for n in idle if info.get(n) and info[n].requires_grad is False]
        numel = {n: _numel(info, n) for n in names}
        total = sum(numel.values()) or 1
        nothing_trains = not training
        parts, evidence = [], []
        if outside:
            share = sum(numel[n] for n in outside) / total
            parts.append(
                f"{len(outside)} parameter tensor(s) get gradients but are in no param group "
                f"of the optimizer and never change ({L.name_list(outside)}, {share:.0%} of "
                "the parameters)"
            )
            evidence += [
                Evidence("tensors with gradients outside the optimizer", len(outside), 0, ">"),
                Evidence("share of parameter elements outside the optimizer", share),
            ]
        if idle or foreign:
            held_n = int(facts.get("tensors") or sum(held.values()))
            what = []
            if idle_frozen:
                what.append(
                    f"{len(idle_frozen)} with requires_grad=False ({L.name_list(idle_frozen)})"
                )
            other_idle = [n for n in idle if n not in idle_frozen]
            if other_idle:
                what.append(f"{len(other_idle)} that get no gradient ({L.name_list(other_idle)})")
            if foreign:
                what.append(
                    f"{foreign} that are not parameters of this model ({foreign_numel:,} "
                    "elements: a replaced layer, or another model)"
                )
            parts.append(f"the optimizer holds {held_n} tensor(s), of which " + "; ".join(what))
            evidence += [
                Evidence("optimizer tensors without a gradient", len(idle)),
                Evidence("optimizer tensors not in the model", foreign),
            ]
        evidence.append(Evidence("parameter tensors that train", len(training)))
        # Holding frozen or foreign tensors alone costs memory, not correctness.
        severity: Severity = ("error" if nothing_trains else "warning") if outside else "info"
        summary = "; ".join(parts)
        if outside and nothing_trains:
            summary = "nothing trains: " + summary
        return [
            Finding(
                signature=self.name,
                severity=severity,
                confidence=0.95 if outside else 0.5,
                summary=summary,
                fix=(
                    "Build the optimizer after the model is final (layers replaced, "
                    "requires_grad set), from [p for p in model.parameters() if "
                    "p.requires_grad]; when unfreezing later, call "
                    "optimizer.add_param_group({'params': ...})."
                ),
                steps=ctx.steps,
                layers=tuple(outside or idle),
                evidence=tuple(evidence),
                causes=(
                    "optimizer built before a layer was replaced (model.fc = nn.Linear(...))",
                    "optimizer built from the trainable parameters before unfreezing others",
                    "requires_grad switched off after the optimizer was built",
                    "a submodule created after the optimizer",
                ),
            )
        ]


def _numel(info: dict[str, L.ParamInfo], name: str) -> int:
    i = info.get(name)
    if i is None or i.shape is None:
        return 0
    return int(np.prod(i.shape)) if i.shape else 1
