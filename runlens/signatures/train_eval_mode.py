"""Evaluation in training mode, training in eval mode, modules out of step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import SEVERITY_ORDER, Evidence, Finding, Severity, fmt_num
from runlens.signatures import _layers as L
from runlens.signatures._probes import on_steps, probe_json, series, step_list
from runlens.signatures.base import NotChecked, Param, Params, Signature


@dataclass(frozen=True)
class _Problem:
    severity: Severity
    confidence: float
    summary: str
    fix: str
    steps: tuple[int, int] | None
    evidence: tuple[Evidence, ...]
    layers: tuple[str, ...] = ()


class TrainEvalMode(Signature):
    """The model is in the wrong mode (train/eval) for what it is doing.

    What it detects:
        From the collector's mode probe (``runlens_collect.probes.ModeProbe``), which
        counts the root module's forwards per step by (grad enabled, ``model.training``)
        — ``probe/mode/train_grad``, ``train_nograd``, ``eval_grad``, ``eval_nograd`` —
        and notes mode-dependent modules (dropout with p > 0, BatchNorm/InstanceNorm with
        running statistics, ``spectral_norm``) whose own flag differs from the root's:

        * **evaluation in training mode**: no-grad forwards run in training mode and none
          in eval mode in the whole run, in a model with mode-dependent modules, in a run
          that logs validation metrics (``model.eval()`` missing before validation);
        * **training in eval mode**: for at least ``min_steps`` steps and ``min_fraction``
          of the run, the only grad-enabled forwards of a step ran in eval mode
          (``model.train()`` not called again after an evaluation);
        * **modules out of step**: mode-dependent modules left in training mode while the
          model evaluates (warning), or in eval mode while it trains (info: often
          deliberate, frozen BatchNorm statistics);
        * **evaluation before any training forward** whose loss is absurd: the first
          validation loss is more than ``first_eval_ratio`` times the first training loss
          (and the chance level ln(C) when known). A ``torch.nn.utils.spectral_norm``
          layer runs its power iteration only in training mode, so before the first
          training forward it divides the weight by an estimate from random vectors.

    Why it matters:
        In training mode dropout drops units and BatchNorm normalizes with batch
        statistics (and updates its running averages with validation data): validation
        numbers are noisy, pessimistic and leak. In eval mode during training dropout is
        off and BatchNorm never learns its statistics: the model overfits and its running
        statistics stay at their initial values. An absurd first evaluation sends people
        looking for an initialization problem that is not there.

    Evidence:
        The forward counts by mode, the steps involved, the mode-dependent modules by
        class and the ones out of step by name; for the first evaluation, its loss against
        the first training loss and ln(C).

    How to fix:
        ``model.eval()`` before validation and ``model.train()`` at the start of every
        training step or epoch (after any evaluation); do not override ``train()`` of
        submodules unless freezing them on purpose; run one training step (or use
        ``torch.nn.utils.parametrizations.spectral_norm``, which iterates at registration)
        before evaluating a spectral-norm model.

    References:
        PyTorch docs, ``nn.Module.eval`` / ``train`` and ``torch.no_grad`` vs eval mode;
        PyTorch docs, ``torch.nn.utils.spectral_norm`` (power iteration in training mode);
        PyTorch forum, "Model.eval() gives incorrect loss for model with batchnorm layers";
        Lou et al., TrainCheck (OSDI 2025).
    """

    name = "train-eval-mode"
    summary = "evaluation in training mode, training in eval mode, modules out of step"
    category = "bug"
    severity = "warning"
    requires = (fmt.MODE_TRAIN_GRAD,)
    params = (
        Param("min_steps", 5, "training steps in eval mode needed", "runlens default"),
        Param(
            "min_fraction",
            0.1,
            "share of the steps that must train in eval mode",
            "runlens default",
        ),
        Param(
            "first_eval_ratio",
            4.0,
            "first validation loss / first training loss (and / ln(C)) above which an "
            "evaluation before any training forward is absurd",
            "an untrained model's loss on held-out data equals its training loss up to "
            "batch noise (same distribution, no training yet); runlens default",
        ),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        steps, tg = series(ctx, fmt.MODE_TRAIN_GRAD)
        if steps.size == 0:
            raise NotChecked("no mode counts recorded", "not-recorded")
        counts = {
            "train_grad": tg,
            "train_nograd": on_steps(ctx, fmt.MODE_TRAIN_NOGRAD, steps),
            "eval_grad": on_steps(ctx, fmt.MODE_EVAL_GRAD, steps),
            "eval_nograd": on_steps(ctx, fmt.MODE_EVAL_NOGRAD, steps),
        }
        counts = {k: np.nan_to_num(v) for k, v in counts.items()}
        modes = probe_json(ctx, "modes")
        sensitive = {str(k): int(v) for k, v in (modes.get("sensitive") or {}).items()}
        if steps.size < p.min_steps:
            nc = NotChecked.too_few(int(steps.size), "steps with mode counts", int(p.min_steps))
            ctx.not_checked_part("training in eval mode", nc.reason, nc.kind)
        problems = [
            x
            for x in (
                _eval_in_train_mode(steps, counts, sensitive, _has_validation(ctx)),
                _train_in_eval_mode(steps, counts, sensitive, p),
                _out_of_step(ctx, steps, modes),
                _eval_before_training(ctx, modes, p),
            )
            if x is not None
        ]
        if not problems:
            return []
        problems.sort(key=lambda x: (SEVERITY_ORDER[x.severity], -x.confidence))
        head = problems[0]
        spans = [x.steps for x in problems if x.steps is not None]
        return [
            Finding(
                signature=self.name,
                severity=head.severity,
                confidence=head.confidence,
                summary="; ".join(x.summary for x in problems),
                fix=" ".join(dict.fromkeys(x.fix for x in problems)),
                steps=(min(a for a, _ in spans), max(b for _, b in spans)) if spans else None,
                layers=tuple(dict.fromkeys(n for x in problems for n in x.layers)),
                evidence=tuple(e for x in problems for e in x.evidence),
                causes=(
                    "model.eval() missing before validation",
                    "model.train() not called again after an evaluation",
                    "a submodule's mode set separately (train() overridden, .eval() on a part)",
                    "evaluation before the first training step of a spectral-norm model",
                ),
            )
        ]


def _kinds(sensitive: dict[str, int]) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in sorted(sensitive.items())) or "none"


def _has_validation(ctx: Context) -> bool:
    return any(n.startswith(("val/", "eval/", "valid/")) for n in ctx.run.scalar_names)


def _eval_in_train_mode(
    steps: np.ndarray, c: dict[str, np.ndarray], sensitive: dict[str, int], validated: bool
) -> _Problem | None:
    tn, en = c["train_nograd"], c["eval_nograd"]
    if tn.sum() == 0 or en.sum() > 0 or not sensitive or not validated:
        # Proper evaluations exist, the mode changes nothing in this model, or nothing was
        # validated (no-grad forwards inside training: pseudo-labels, a teacher pass).
        return None
    at = steps[tn > 0]
    return _Problem(
        severity="warning",
        confidence=0.9,
        summary=(
            f"evaluation ran with the model in training mode: {int(tn.sum())} no-grad "
            f"forwards at {at.size} step(s) ({step_list(at, 5)}), none in eval mode, so its "
            f"mode-dependent modules ({_kinds(sensitive)}) behaved as in training: "
            "validation numbers are noisy and pessimistic (and BatchNorm statistics absorb "
            "validation data)"
        ),
        fix="Call model.eval() before validation and model.train() after it.",
        steps=(int(at[0]), int(at[-1])),
        evidence=(
            Evidence("no-grad forwards in training mode", float(tn.sum()), 0, ">"),
            Evidence("no-grad forwards in eval mode", float(en.sum()), 0, "<="),
            Evidence("mode-dependent modules", float(sum(sensitive.values()))),
        ),
    )


def _train_in_eval_mode(
    steps: np.ndarray, c: dict[str, np.ndarray], sensitive: dict[str, int], p: Params
) -> _Problem | None:
    tg, eg = c["train_grad"], c["eval_grad"]
    bad = (tg == 0) & (eg > 0)
    n = int(bad.sum())
    trained = (tg > 0) | (eg > 0)
    if n < p.min_steps or n < p.min_fraction * max(int(trained.sum()), 1) or not sensitive:
        return None
    at = steps[bad]
    mid_run = bool(((tg > 0) & (steps < at[0])).any())
    where = (
        f"from step {int(at[0])} on, after training in training mode before it "
        "(model.train() not called again after an evaluation?)"
        if mid_run
        else "from the start"
    )
    return _Problem(
        severity="warning",
        confidence=0.9 if mid_run else 0.5,
        summary=(
            f"{n} of {int(trained.sum())} training steps ran with the model in eval mode, "
            f"{where}: its mode-dependent modules ({_kinds(sensitive)}) were off (dropout) or "
            "frozen at their running statistics (BatchNorm)"
        ),
        fix=(
            "Call model.train() at the start of every training step or epoch, after any "
            "evaluation (ignore if BatchNorm/dropout are frozen on purpose)."
        ),
        steps=(int(at[0]), int(at[-1])),
        evidence=(
            Evidence("training steps in eval mode", n, p.min_steps, ">="),
            Evidence(
                "share of training steps in eval mode",
                n / max(int(trained.sum()), 1),
                p.min_fraction,
                ">=",
            ),
            Evidence("first step in eval mode", int(at[0])),
        ),
    )


def _out_of_step(ctx: Context, steps: np.ndarray, modes: dict) -> _Problem | None:
    de = on_steps(ctx, fmt.MODE_DISAGREE_EVAL, steps)
    dt = on_steps(ctx, fmt.MODE_DISAGREE_TRAIN, steps)
    names_e = [str(n) for n in modes.get("disagree_eval") or []]
    names_t = [str(n) for n in modes.get("disagree_train") or []]
    if np.nansum(de) > 0:
        at = steps[np.nan_to_num(de) > 0]
        return _Problem(
            severity="warning",
            confidence=0.8,
            summary=(
                f"{int(np.nanmax(de))} mode-dependent module(s) stayed in training mode while "
                f"the model evaluated ({L.name_list(names_e)}; {at.size} step(s)): evaluation "
                "is not deterministic"
            ),
            fix="Do not put submodules back in training mode during evaluation (no "
            "submodule.train() after model.eval(), no train() override forcing it).",
            steps=(int(at[0]), int(at[-1])),
            evidence=(
                Evidence(
                    "modules in training mode during evaluation", float(np.nanmax(de)), 0, ">"
                ),
            ),
            layers=tuple(names_e),
        )
    if np.nansum(dt) > 0:
        at = steps[np.nan_to_num(dt) > 0]
        return _Problem(
            severity="info",
            confidence=0.5,
            summary=(
                f"{int(np.nanmax(dt))} mode-dependent module(s) were in eval mode while the "
                f"model trained ({L.name_list(names_t)}): fine if frozen on purpose (BatchNorm "
                "statistics when fine-tuning)"
            ),
            fix="If not deliberate, call model.train() after setting submodule modes.",
            steps=(int(at[0]), int(at[-1])),
            evidence=(Evidence("modules in eval mode during training", float(np.nanmax(dt))),),
            layers=tuple(names_t),
        )
    return None


def _eval_before_training(ctx: Context, modes: dict, p: Params) -> _Problem | None:
    _, before = series(ctx, fmt.MODE_EVALS_BEFORE_TRAIN)
    if before.size == 0 or not np.isfinite(before[0]) or before[0] <= 0:
        return None
    val, train = ctx.val_loss, ctx.train_loss
    if val is None or train is None or len(val) == 0 or len(train) == 0:
        return None
    v0, t0 = float(val.raw[0]), float(train.raw[0])
    if int(val.steps[0]) > int(train.steps[0]) or not (np.isfinite(v0) and np.isfinite(t0)):
        return None
    chance = ctx.task.chance_level
    ref = max(abs(t0), chance or 0.0)
    ratio = v0 / ref if ref > 0 else float("inf")
    if not ratio > p.first_eval_ratio:
        return None
    spectral = [str(n) for n in modes.get("spectral_norm") or []]
    why = (
        f"its spectral-norm layers ({L.name_list(spectral)}) had never run their power "
        "iteration (it runs only in training mode)"
        if spectral
        else "modules whose eval-mode output depends on state set by training forwards"
    )
    lnc = f" and ln(C) = {fmt_num(chance)}" if chance else ""
    return _Problem(
        severity="warning",
        confidence=0.9 if spectral else 0.6,
        summary=(
            f"the first evaluation ran before any training-mode forward and gave val loss "
            f"{fmt_num(v0)}, {fmt_num(ratio)}× the first training loss {fmt_num(t0)}{lnc}: "
            f"{why}"
        ),
        fix=(
            "Run the first evaluation after a training step, or use "
            "torch.nn.utils.parametrizations.spectral_norm (it iterates at registration)."
            if spectral
            else "Run the first evaluation after a training step."
        ),
        steps=(int(val.steps[0]), int(val.steps[0])),
        evidence=(
            Evidence("eval forwards before the first training forward", float(before[0])),
            Evidence(
                "first val loss / max(first train loss, ln C)", ratio, p.first_eval_ratio, ">"
            ),
            Evidence("first val loss", v0),
            Evidence("first train loss", t0),
        ),
        layers=tuple(spectral),
    )
