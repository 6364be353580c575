"""The training batch that reaches the model is much smaller than intended."""

from __future__ import annotations

import numpy as np
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Evidence, Finding, fmt_num
from runlens.signatures._probes import on_steps, series
from runlens.signatures.base import NotChecked, Param, Params, Signature

CONFIG_KEYS = (
    "batch_size",
    "train_batch_size",
    "per_device_train_batch_size",
    "batch",
    "bs",
)
"""Config keys naming the training batch size (the first positive int found is used)."""


class BatchCollapse(Signature):
    """Each training step feeds the model far fewer examples than intended.

    What it detects:
        The examples per training step that reach the model — the first dimension of the
        model's input summed over the step's training forwards, recorded by the collector's
        input probe from the tensor's shape (``probe/input/examples``; no device work) —
        against what was intended: the batch size in the run's config (divided by the
        world size, in case it is global), or the batch of the evaluation forwards
        (``probe/input/eval_batch``). Fires when the median examples per step is at most
        1/``max_ratio`` of the configured batch, or — when the config names no batch size —
        a single example per step against an evaluation batch at least ``eval_ratio`` times
        larger.

    Why it matters:
        An indexing slip between the loader and the model (``x[0]`` meant to drop an extra
        dimension, ``batch[0]`` on a tensor instead of an (inputs, labels) pair, a
        ``collate_fn`` returning one example) trains on one example of each batch: the
        loss is noisy, BatchNorm statistics are garbage, a run costs the full data-loading
        time for a fraction of the data, and the curve looks like a too-high learning rate.

    Evidence:
        The median examples per step, the configured batch size, the evaluation batch,
        their ratios against the thresholds.

    How to fix:
        Check the indexing and reshaping between the DataLoader and ``model(...)``:
        ``x.squeeze(1)`` (not ``x[0]``) to drop a singleton dimension, unpack ``inputs,
        labels = batch``, and check ``collate_fn`` and ``batch_size``/``batch_sampler``.

    References:
        PyTorch docs, "Data loading: automatic batching" (``batch_size=None`` disables it)
        and ``Tensor.squeeze``; Keskar et al., "On Large-Batch Training..." (2017) and
        McCandlish et al. (2018) on how gradient noise scales with the batch.
    """

    name = "batch-collapse"
    summary = "the training batch reaching the model is far smaller than intended"
    category = "bug"
    severity = "warning"
    requires = (fmt.INPUT_EXAMPLES,)
    params = (
        Param(
            "max_ratio",
            8.0,
            "configured batch (per rank) / examples per step at or above which it collapsed",
            "runlens default: a factor 8 is beyond any last-batch or per-device ambiguity",
        ),
        Param(
            "eval_ratio",
            8.0,
            "evaluation batch / examples per step at or above which a one-example training "
            "step is a collapse",
            "runlens default; evaluation batches are usually 1–4× the training batch",
        ),
        Param("min_steps", 5, "steps with an input recorded", "runlens default"),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        steps, examples = series(ctx, fmt.INPUT_EXAMPLES)
        ok = np.isfinite(examples) & (examples > 0)
        if ok.sum() < p.min_steps:
            raise NotChecked.too_few(int(ok.sum()), "steps with a recorded input", int(p.min_steps))
        train = float(np.median(examples[ok]))
        world = ctx.run.meta.get("world_size")
        world = world if isinstance(world, int) and world > 0 else 1
        configured = _configured(ctx)
        per_rank = configured / world if configured else None
        _, ev = series(ctx, fmt.INPUT_EVAL_BATCH)
        ev = ev[np.isfinite(ev) & (ev > 0)]
        eval_batch = float(np.median(ev)) if ev.size else None
        by_config = per_rank is not None and per_rank / train >= p.max_ratio
        # The evaluation batch stands in for the intention only when the config names none
        # (a configured batch of 1 is deliberate).
        by_eval = (
            per_rank is None
            and eval_batch is not None
            and train <= 1
            and eval_batch / train >= p.eval_ratio
        )
        if not (by_config or by_eval):
            return []
        forwards = on_steps(ctx, fmt.INPUT_FORWARDS, steps[ok])
        fw = float(np.nanmedian(forwards)) if np.isfinite(forwards).any() else 1.0
        intended = []
        evidence = [Evidence("examples per training step (median)", train)]
        if per_rank is not None:
            intended.append(f"the configured batch size {fmt_num(configured)}")
            evidence.append(
                Evidence(
                    "configured batch per rank / examples per step",
                    per_rank / train,
                    p.max_ratio,
                    ">=",
                )
            )
        if eval_batch is not None:
            intended.append(f"the evaluation batch {fmt_num(eval_batch)}")
            evidence.append(
                Evidence(
                    "evaluation batch / examples per step", eval_batch / train, p.eval_ratio, ">="
                )
            )
        evidence.append(Evidence("training forwards per step (median)", fw))
        return [
            Finding(
                signature=self.name,
                severity="warning",
                confidence=0.9 if by_config else 0.7,
                summary=(
                    f"only {fmt_num(train)} example(s) per training step reach the model "
                    f"(first input dimension over {fmt_num(fw)} forward(s)), against "
                    + " and ".join(intended)
                    + ": an indexing or reshaping slip between the loader and the model "
                    "drops the rest of each batch"
                ),
                fix=(
                    "Check the code between the DataLoader and model(...): use x.squeeze(1), "
                    "not x[0], to drop a singleton dimension; unpack inputs, labels = batch; "
                    "check collate_fn and batch_size."
                ),
                steps=(int(steps[ok][0]), int(steps[ok][-1])),
                evidence=tuple(evidence),
                causes=(
                    "x[0] / batch[0] indexing that keeps one example",
                    "a collate_fn or batch_sampler yielding single examples",
                    "batch_size=None (automatic batching off)",
                ),
            )
        ]


def _configured(ctx: Context) -> float | None:
    for key in CONFIG_KEYS:
        b = ctx.run.config.get(key)
        if isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0:
            return float(b)
    return None
