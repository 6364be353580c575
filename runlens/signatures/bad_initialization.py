"""Activation scale collapsing or exploding through depth at step 0, or weight scales far
from the fan-in rule for the layer's activation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.needs import LayerStat
from runlens.run import full_param_name
from runlens.signatures._layers import name_list
from runlens.signatures.base import NotChecked, Param, Params, Signature, run_parts

# Layers whose weight has a fan-in in the usual sense (He / Glorot apply).
_FAN_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "LazyLinear")
# Activations that set the gain: ReLU-like -> He, saturating -> Glorot.
_HE = ("ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "CELU", "GELU", "SiLU", "Mish")
_GLOROT = ("Tanh", "Sigmoid", "Softsign", "Hardtanh", "Hardsigmoid")
# Modules skipped when looking for the activation that follows a layer.
_PASS_THROUGH = ("Norm", "Dropout", "Pool", "Identity", "Flatten", "Unflatten")


@dataclass(frozen=True)
class _Layer:
    path: str
    weight: str
    fan_in: int
    fan_out: int
    act: str | None
    """'he' / 'glorot' / None (no activation follows: the head, or unknown)."""


class BadInitialization(Signature):
    """Activations that shrink or blow up layer by layer at step 0, or weights whose scale
    does not match their fan-in.

    What it detects:
        From the first recorded step (step 0 of any run, or an ``init_check`` run), two
        symptoms of a bad initialization:

        * activation scale through depth: the standard deviation of each hidden linear/conv
          layer's output against the first one's (the head is left out). A ratio above
          ``act_factor`` (exploding) or below ``1 / act_factor`` (collapsing) anywhere is
          flagged; the evidence gives last/first.
        * weight scale against fan-in, for linear/conv layers followed by a known
          activation: He, ``std ≈ sqrt(2 / fan_in)``, for ReLU-like activations, Glorot,
          ``std ≈ sqrt(2 / (fan_in + fan_out))``, for tanh/sigmoid. Flagged when at least
          ``min_fraction`` of those layers (and 2) are off by more than ``weight_factor``×
          either way. PyTorch's default init (``1/sqrt(3·fan_in)``) is within 2.5× of both.

        fan_in / fan_out come from the parameter shapes in run.json's model summary; the
        following activation is the next activation module in model order (norm, dropout
        and pooling modules skipped). An initial loss far above ln(C) is reported by
        ``bad-initial-loss``; when both fire the report links it to this finding.

    Why it matters:
        With each layer multiplying the signal's scale by a factor ≠ 1, a deep network's
        activations and gradients vanish or explode geometrically with depth before any
        training happens: the first updates are wasted (or produce NaNs), deep layers do
        not learn, and the learning rate that works for one layer is wrong for the next.

    Evidence:
        Activation std ratio (last/first hidden layer) and the most extreme layer against
        ``act_factor``; the number of layers whose weight std is off against
        ``min_fraction``; the median ratio weight std / expected std.

    How to fix:
        Use fan-in scaled initialization: ``nn.init.kaiming_normal_(w, nonlinearity="relu")``
        for ReLU nets, ``nn.init.xavier_uniform_(w, gain=nn.init.calculate_gain("tanh"))``
        for tanh, or PyTorch's default; zero or small biases. For very deep nets add
        normalization (BatchNorm/LayerNorm), residual connections with a scaled last layer,
        or LSUV (rescale each layer to unit output variance on one batch).

    References:
        He et al., "Delving Deep into Rectifiers" (ICCV 2015): std = sqrt(2 / fan_in) for
        ReLU; Glorot & Bengio, "Understanding the difficulty of training deep feedforward
        neural networks" (AISTATS 2010): variance 2 / (fan_in + fan_out); Mishkin & Matas,
        "All you need is a good init" (ICLR 2016): LSUV, unit variance per layer.
    """

    name = "bad-initialization"
    summary = "activations collapse/explode through depth at step 0, or weights off fan-in scale"
    category = "sanity"
    severity = "warning"
    requires = ("layers:weight|layers:activation",)
    needs = (
        LayerStat(fmt.KIND_ACTIVATION, "std"),
        LayerStat(fmt.KIND_WEIGHT, "std"),
    )
    params = (
        Param(
            "act_factor",
            100.0,
            "a hidden layer's activation std more than this factor above or below the first "
            "hidden layer's is flagged",
            "runlens default: default-initialized 10-layer ReLU MLPs stay within 10× "
            "(bias keeps a floor); LSUV (Mishkin & Matas 2016) targets 1×",
        ),
        Param(
            "weight_factor",
            4.0,
            "weight std more than this factor from the He / Glorot std counts as off",
            "runlens default; PyTorch's default init is 2.45× below He (kaiming_uniform, "
            "a=sqrt(5))",
        ),
        Param(
            "min_fraction",
            0.5,
            "share of checked layers with off-scale weights needed to flag ('most layers')",
        ),
        Param(
            "max_first_step",
            10,
            "runs whose first layer statistics come later than this (resumed runs) are skipped",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        layers = _fan_layers(ctx)
        parts = run_parts(
            ctx,
            (
                ("activation scale through depth", lambda: _activation_part(ctx, p, layers)),
                ("weight scale against fan-in", lambda: _weight_part(ctx, p, layers)),
            ),
        )
        found = [x for x in parts if x is not None]
        if not found:
            return []
        first_step = min(x.first_step for x in found)
        flagged: list[str] = []
        for x in found:
            flagged += [n for n in x.flagged if n not in flagged]
        return [
            Finding(
                signature=self.name,
                severity="warning",
                confidence=min(1.0, 0.6 + 0.2 * len(found)),
                summary=f"bad initialization at step {first_step}: "
                + "; ".join(x.problem for x in found),
                fix="Initialize with fan-in scaling (kaiming_normal_ for ReLU, xavier_ for "
                "tanh, or PyTorch's default), add normalization for deep nets, or use LSUV.",
                steps=(first_step, first_step),
                layers=tuple(flagged),
                evidence=tuple(e for x in found for e in x.evidence),
                causes=(
                    "weights drawn with a fixed std (e.g. normal(0, 1)) instead of fan-in scaling",
                    "an init meant for another activation (Glorot for a ReLU net, or the "
                    "reverse) in a deep net without normalization",
                ),
            )
        ]


@dataclass(frozen=True)
class _Problem:
    problem: str
    flagged: tuple[str, ...]
    evidence: tuple[Evidence, ...]
    first_step: int


def _activation_part(ctx: Context, p: Params, layers: list[_Layer]) -> _Problem | None:
    """Activation std of each hidden layer at the first recorded step vs the first one's."""
    act = ctx.layer(fmt.KIND_ACTIVATION, "std")
    if act is None:
        raise NotChecked("no activation std statistics", "not-recorded")
    hidden = [lay for lay in layers[:-1] if lay.path in act.layers]
    if len(hidden) < 2:
        raise NotChecked(
            f"{len(hidden)} hidden linear/conv layer(s) with activation statistics, needs 2",
            "not-applicable",
        )
    if act.steps[0] > p.max_first_step:
        raise NotChecked(_late(int(act.steps[0]), "activation", p), "not-recorded")
    first_step = int(act.steps[0])
    stds = np.array([act.column(lay.path)[0] for lay in hidden])
    ok = np.isfinite(stds) & (stds > 0)
    if ok.sum() < 2 or not ok[0]:
        raise NotChecked(
            f"{int(ok.sum())} hidden layer(s) with a finite, non-zero activation std at step "
            f"{first_step}, needs 2 including the first",
            "not-recorded",
        )
    rel = np.where(ok, stds / stds[0], np.nan)
    j = int(np.nanargmax(np.abs(np.log(rel))))
    last = rel[np.flatnonzero(ok)[-1]]
    if not (rel[j] > p.act_factor or rel[j] < 1 / p.act_factor):
        return None
    way = "explode" if rel[j] > 1 else "collapse"
    op = ">" if rel[j] > 1 else "<"
    bound = p.act_factor if rel[j] > 1 else 1 / p.act_factor
    return _Problem(
        problem=(
            f"activation std {way}s through depth: {fmt_num(stds[0])} after "
            f"`{hidden[0].path}` to {fmt_num(stds[j])} after `{hidden[j].path}` "
            f"({fmt_num(rel[j])}×)"
        ),
        flagged=(hidden[j].path,),
        evidence=(
            Evidence("activation std, most extreme / first layer", rel[j], bound, op),
            Evidence("activation std, last / first hidden layer", last),
        ),
        first_step=first_step,
    )


def _weight_part(ctx: Context, p: Params, layers: list[_Layer]) -> _Problem | None:
    """Weight std at the first recorded step vs the He / Glorot std for its fan-in."""
    w = ctx.layer(fmt.KIND_WEIGHT, "std")
    if w is None:
        raise NotChecked("no weight std statistics", "not-recorded")
    checked = [lay for lay in layers if lay.act and lay.weight in w.layers]
    if len(checked) < 2:
        raise NotChecked(
            f"{len(checked)} linear/conv layer(s) followed by a known activation, needs 2",
            "not-applicable",
        )
    if w.steps[0] > p.max_first_step:
        raise NotChecked(_late(int(w.steps[0]), "weight", p), "not-recorded")
    ratios = np.array([w.column(lay.weight)[0] / _expected_std(lay) for lay in checked])
    fin = np.isfinite(ratios) & (ratios > 0)
    off = fin & ((ratios > p.weight_factor) | (ratios < 1 / p.weight_factor))
    n_off, n = int(off.sum()), int(fin.sum())
    if not (n and n_off >= max(2, math.ceil(p.min_fraction * n))):
        return None
    names = [lay.weight for lay, o in zip(checked, off, strict=True) if o]
    med = float(np.median(ratios[off]))
    rules = " / ".join(
        sorted({"he": "He", "glorot": "Glorot"}[r] for r in {lay.act for lay in checked} if r)
    )
    return _Problem(
        problem=(
            f"{n_off} of {n} weight matrices are {fmt_num(med)}× the {rules} scale "
            f"for their fan-in ({name_list(names)})"
        ),
        flagged=tuple(names),
        evidence=(
            Evidence("share of layers with off-scale weights", n_off / n, p.min_fraction, ">="),
            Evidence("median weight std / expected std (off layers)", med, p.weight_factor),
        ),
        first_step=int(w.steps[0]),
    )


def _late(step: int, what: str, p: Params) -> str:
    return (
        f"the first {what} statistics are at step {step}, after max_first_step "
        f"{int(p.max_first_step)} (resumed run?): the initialization was not recorded"
    )


def _expected_std(lay: _Layer) -> float:
    if lay.act == "he":
        return math.sqrt(2.0 / lay.fan_in)
    return math.sqrt(2.0 / (lay.fan_in + lay.fan_out))


def _fan_layers(ctx: Context) -> list[_Layer]:
    """Linear/conv layers in model order with fans and the activation that follows."""
    mods = [
        m for m in (ctx.run.meta.get("model") or {}).get("modules", []) or [] if isinstance(m, dict)
    ]
    out: list[_Layer] = []
    for i, mod in enumerate(mods):
        if str(mod.get("type")) not in _FAN_LAYERS:
            continue
        path = str(mod.get("path") or "")
        weight = None
        for prm in mod.get("params", []) or []:
            name = str(prm.get("name", ""))
            shape = prm.get("shape")
            if name.rsplit(".", 1)[-1] == "weight" and isinstance(shape, list) and len(shape) >= 2:
                full = full_param_name(path, name)
                k = math.prod(int(s) for s in shape[2:])
                weight = (full, int(shape[1]) * k, int(shape[0]) * k)
        if weight is None or weight[1] <= 0:
            continue
        out.append(_Layer(path, weight[0], weight[1], weight[2], _next_activation(mods, i)))
    return out


def _next_activation(mods: list[dict[str, object]], i: int) -> str | None:
    for mod in mods[i + 1 :]:
        t = str(mod.get("type"))
        if t in _HE:
            return "he"
        if t in _GLOROT:
            return "glorot"
        if t in _FAN_LAYERS or (mod.get("params") and not any(s in t for s in _PASS_THROUGH)):
            return None  # another layer with weights comes first: no known activation
    return None
