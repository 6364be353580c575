"""Analysis of sanity runs (docs/playbook.md): the LR range test's suggested learning rate
and the one-batch overfit verdict, computed from the recorded series.

The collector side (``runlens_collect.sanity``) only records; everything judged is judged
here, from the same data any run has, so a sweep recorded by hand with the Collector and
``kind = "lr_range_test"`` is analyzed the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import OverfitCheck

KIND_LR_RANGE_TEST = "lr_range_test"
KIND_OVERFIT_ONE_BATCH = "overfit_one_batch"
KIND_INIT_CHECK = "init_check"
SANITY_KINDS = (KIND_LR_RANGE_TEST, KIND_OVERFIT_ONE_BATCH, KIND_INIT_CHECK)

# On sanity runs only sanity signatures run, plus these: the loss of an LR range test
# diverges on purpose and an overfit run has no validation, so curve and layer verdicts
# would be noise there.
_ALSO_ON = {
    KIND_LR_RANGE_TEST: (),
    KIND_OVERFIT_ONE_BATCH: ("nan-inf",),
    KIND_INIT_CHECK: ("bad-initial-loss", "nan-inf"),
}


# Sanity signatures that judge only their own kind of run.
_ONLY_ON = {"lr-range-test": KIND_LR_RANGE_TEST, "cannot-overfit-batch": KIND_OVERFIT_ONE_BATCH}


def applies(name: str, category: str, kind: str) -> bool:
    """Whether a signature runs on a run of this kind."""
    if name in _ONLY_ON:
        return kind == _ONLY_ON[name]
    if kind not in SANITY_KINDS:
        return True
    return category == "sanity" or name in _ALSO_ON[kind]


def sanity_info(ctx: Context) -> dict[str, object]:
    """What the collector recorded about the sanity run (config key ``sanity``)."""
    info = ctx.run.config.get("sanity")
    return info if isinstance(info, dict) else {}


# -- LR range test ----------------------------------------------------------------------


@dataclass(frozen=True)
class LRSuggestion:
    """The learning rates an LR range test points at, and where the sweep diverged."""

    suggested_lr: float
    method: str
    valley_lr: float
    steepest_lr: float
    steepest_slope: float
    """d(smoothed loss)/d(log10 lr) at the steepest point (negative)."""
    min_loss_lr: float
    min_loss: float
    initial_loss: float
    valley_steps: tuple[int, int]
    diverged_lr: float | None
    diverged_step: int | None
    points: int
    """Points of the sweep before divergence that the choice was made on."""


def lr_suggestion(
    ctx: Context, diverge_factor: float = 4.0, skip_start: float = 0.1, skip_end: int = 5
) -> LRSuggestion | None:
    """Suggested LR of an LR range test, or None without a usable sweep: needs ``lr/0`` and
    ``train/loss`` and at least 8 points before divergence.

    The smoothed loss (the analysis's debiased EMA) is taken against log10(lr), cut at
    the first point where it exceeds ``diverge_factor`` × its running best (or is not
    finite). Of the remaining points, the first ``skip_start`` fraction and the last
    ``skip_end`` are dropped (fastai does the same: the start is flat, the end is already
    turning up).

    * ``steepest`` (the suggestion, Smith 2017): where the loss falls fastest per decade
      of LR, before the lowest loss. The slope is a least-squares fit over a window of a
      tenth of the points: a plain finite difference picks noise.
    * ``valley`` (fastai's default, reported alongside): the middle of the longest
      decreasing subsequence of the loss. On 100-point sweeps smoothed at 0.9 that
      subsequence collects points of the flat start, which pins valley near the middle
      of the sweep whatever the model (measured: 1.1e-3 for an MLP with plain and with
      ×100 inputs, where steepest moved 2e-2 -> 2.5e-3), so it is not the suggestion.
    """
    lr, loss = ctx.lr, ctx.train_loss
    if lr is None or loss is None:
        return None
    steps, li, ji = np.intersect1d(lr.steps, loss.steps, return_indices=True)
    rates, raw, smooth = lr.raw[li], loss.raw[ji], loss.smooth[ji]
    ok = np.isfinite(rates) & (rates > 0)
    steps, rates, raw, smooth = steps[ok], rates[ok], raw[ok], smooth[ok]
    if steps.size < 8:
        return None
    diverged = None
    best = math.inf
    for i, (r, s) in enumerate(zip(raw, smooth, strict=True)):
        if not (math.isfinite(r) and math.isfinite(s)) or s > diverge_factor * best:
            diverged = i
            break
        best = min(best, float(s))
    n = diverged if diverged is not None else steps.size
    lo = int(n * skip_start)
    hi = n - skip_end if n - skip_end - lo >= 8 else n
    if hi - lo < 8:
        return None
    x = np.log10(rates[lo:hi])
    y = smooth[lo:hi]
    a, b = _longest_valley(y)
    third = (b - a) / 3
    v = min(hi - lo - 1, a + int(third) + int(third / 2))
    slope = _local_slope(x, y, max(5, (hi - lo) // 10))
    m = int(np.argmin(y))
    # The descent that matters ends at the lowest loss; past it the loss is turning up.
    k = int(np.argmin(slope[: m + 1]))
    return LRSuggestion(
        suggested_lr=float(rates[lo + k]),
        method="steepest",
        valley_lr=float(rates[lo + v]),
        steepest_lr=float(rates[lo + k]),
        steepest_slope=float(slope[k]),
        min_loss_lr=float(rates[lo + m]),
        min_loss=float(y[m]),
        initial_loss=float(smooth[0]),
        valley_steps=(int(steps[lo + a]), int(steps[lo + b])),
        diverged_lr=float(rates[diverged]) if diverged is not None else None,
        diverged_step=int(steps[diverged]) if diverged is not None else None,
        points=hi - lo,
    )


def _local_slope(x: np.ndarray, y: np.ndarray, window: int) -> np.ndarray:
    """Least-squares slope dy/dx over a centered window of ``window`` points (a plain
    finite difference picks noise on a 100-point sweep)."""
    half = max(1, window // 2)
    out = np.zeros_like(y)
    for i in range(y.size):
        a, b = max(0, i - half), min(y.size, i + half + 1)
        xs, ys = x[a:b], y[a:b]
        dx = xs - xs.mean()
        den = float(np.dot(dx, dx))
        out[i] = float(np.dot(dx, ys - ys.mean())) / den if den > 0 else 0.0
    return out


def _longest_valley(y: np.ndarray) -> tuple[int, int]:
    """Start and end index of the longest strictly decreasing subsequence (fastai's
    ``valley``: ``lds[i]`` is its length ending at ``i``; the first longest wins)."""
    lds = np.ones(y.size, dtype=np.int64)
    for i in range(1, y.size):
        higher = y[:i] > y[i]
        if higher.any():
            lds[i] = int(lds[:i][higher].max()) + 1
    end = int(np.argmax(lds))
    return max(0, end - int(lds[end]) + 1), end


# -- one-batch overfit ------------------------------------------------------------------


@dataclass(frozen=True)
class OverfitAnalysis:
    check: OverfitCheck
    loss_ok: bool
    grads_ok: bool | None
    """None when the run has no gradient statistics (flow cannot be verified)."""
    checked_params: int


def overfit_analysis(
    ctx: Context, rel_target: float = 0.05, abs_target: float = 1e-3, tail: int = 5
) -> OverfitAnalysis | None:
    """Pass/fail of an overfit run: the loss (median of the last ``tail`` points) must
    reach ``max(rel_target × initial, abs_target)`` and every parameter the optimizer
    held must have received a non-zero gradient at some step."""
    c = ctx.train_loss
    if c is None:
        return None
    raw = c.raw[np.isfinite(c.raw)]
    if raw.size < 2:
        return None
    initial = float(np.median(raw[:3]))
    final = float(np.median(raw[-max(1, int(tail)) :]))
    if not np.isfinite(c.raw[-1]):
        final = float("nan")  # went non-finite: a failure, whatever came before
    target = max(rel_target * initial, abs_target)
    loss_ok = bool(math.isfinite(final) and final <= target)
    held = sanity_info(ctx).get("optimizer_params")
    names = [str(n) for n in held] if isinstance(held, list) else list(ctx.run.layer_names)
    grads_ok, no_grad = _gradient_flow(ctx, names)
    check = OverfitCheck(
        passed=loss_ok and grads_ok is True,
        final_loss=final if math.isfinite(final) else None,
        steps=len(c),
        initial_loss=initial,
        target_loss=target,
        layers_without_grad=tuple(no_grad),
    )
    return OverfitAnalysis(check, loss_ok, grads_ok, len(names))


def _gradient_flow(ctx: Context, names: list[str]) -> tuple[bool | None, list[str]]:
    g = ctx.layer(fmt.KIND_GRAD, "norm", "max")  # any step with a gradient counts
    if g is None or not names:
        return None, []
    no_grad = []
    for name in names:
        if name not in g.layers:
            no_grad.append(name)
            continue
        col = g.column(name)
        if not np.any(np.isfinite(col) & (col > 0)):
            no_grad.append(name)
    return not no_grad, no_grad
