"""The same training batch seen again and again."""

from __future__ import annotations

from collections import Counter

import numpy as np
from runlens_collect import format as fmt

from runlens.context import Context
from runlens.findings import Evidence, Finding
from runlens.signatures._probes import on_steps, series, step_list
from runlens.signatures.base import NotChecked, Param, Params, Signature


class DuplicateBatches(Signature):
    """Training batches that repeat exactly.

    What it detects:
        Steps whose training input is exactly one seen before. The collector's input probe
        (``runlens_collect.probes.InputProbe``) fingerprints each step's input on the
        device: its sum, its sum of squares and an order-free projection (the input as
        (batch, rest), summed over the batch, dotted with fixed weights:
        ``probe/input/sum``, ``probe/input/sumsq``, ``probe/input/proj``). Two batches
        with the same examples have the same three numbers whatever their order; two
        different batches almost never do. Repeats are classified by their distance to
        the previous occurrence:

        * at a short fixed distance (≤ ``max_short``; e.g. every batch twice in a row):
          several DataLoader workers producing the same data — a random generator held by
          the dataset (``np.random.default_rng`` / ``RandomState`` / ``random.Random``
          built in ``__init__``) is copied into every worker process with the same state,
          and PyTorch reseeds only the global ``random``, ``numpy`` and ``torch`` RNGs;
          the same for an ``IterableDataset`` that does not shard by
          ``get_worker_info()``;
        * the same batches in the same order every period (an epoch, at one fixed
          distance, all batches new within the first period, however short): no
          shuffling, or a ``DistributedSampler`` whose ``set_epoch`` is never called;
        Every step the same batch is not reported: deliberate full-batch training and one
        batch fetched again and again (``next(iter(loader))`` in the loop) look alike.

    Why it matters:
        Duplicated batches shrink the effective data and the number of distinct gradient
        estimates: the model sees half (or a quarter) of the augmentations or samples it
        should, overfits sooner and generalizes worse, while the loss curve looks normal.

    Evidence:
        The share of steps that repeat an earlier batch against ``min_fraction``; the
        distinct batches; the most common distance to the previous occurrence and the
        share of repeats at it against ``min_regular``; example steps.

    How to fix:
        Seed per worker: ``DataLoader(..., worker_init_fn=seed_worker)`` with ``def
        seed_worker(i): info = torch.utils.data.get_worker_info();
        info.dataset.rng = np.random.default_rng(info.seed)`` (or draw randomness from
        ``torch``'s generator, which PyTorch reseeds per worker); shard an
        ``IterableDataset`` by ``get_worker_info().id``; shuffle (``shuffle=True``) and call
        ``sampler.set_epoch(epoch)`` every epoch with a ``DistributedSampler``.

    References:
        PyTorch docs, "Data loading: randomness in multi-process data loading" and
        ``IterableDataset`` (duplicate data across workers); T. Pärnamaa, "Using PyTorch +
        NumPy? You're making a mistake" (2021); PyTorch docs, ``DistributedSampler``
        (``set_epoch``).
    """

    name = "duplicate-batches"
    summary = "the same training batch repeated (DataLoader workers sharing an RNG, no shuffle)"
    category = "bug"
    severity = "warning"
    requires = (fmt.INPUT_SUM, fmt.INPUT_SUMSQ, fmt.INPUT_PROJ)
    params = (
        Param(
            "min_fraction",
            0.1,
            "share of steps repeating an earlier batch",
            "runlens default: a forked RNG in k workers repeats (k-1)/k of the batches",
        ),
        Param(
            "min_regular",
            0.8,
            "share of the repeats at the most common distance (random sampling with "
            "replacement repeats at scattered distances and is not flagged)",
            "runlens default",
        ),
        Param(
            "max_short",
            16,
            "repeat distance up to which repeats that keep bringing new batches come from "
            "parallel workers (a cycle of the same batches is an epoch at any distance)",
            "runlens default: DataLoader num_workers rarely exceeds 16",
        ),
        Param(
            "rel_tol",
            1e-5,
            "relative tolerance on the fingerprint (float32 sums of the same data agree "
            "bit for bit; reordered examples within ~1e-6)",
            "float32 ε = 1.2e-7 per rounding, a few levels of summation: reordered examples "
            "agree to ~1e-6",
        ),
        Param("min_steps", 20, "fingerprinted steps needed", "runlens default"),
    )

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        steps, sq = series(ctx, fmt.INPUT_SUMSQ)
        s1 = on_steps(ctx, fmt.INPUT_SUM, steps)
        pr = on_steps(ctx, fmt.INPUT_PROJ, steps)
        n_el = on_steps(ctx, fmt.INPUT_EXAMPLES, steps) * on_steps(ctx, fmt.INPUT_NUMEL, steps)
        ok = np.isfinite(sq) & np.isfinite(s1) & np.isfinite(pr)
        steps, sq, s1, pr, n_el = steps[ok], sq[ok], s1[ok], pr[ok], n_el[ok]
        if steps.size < p.min_steps:
            raise NotChecked.too_few(
                int(steps.size), "fingerprinted training steps", int(p.min_steps)
            )
        prev = _previous_occurrence(sq, s1, pr, n_el, p.rel_tol)
        dup = prev >= 0
        n_dup = int(dup.sum())
        distinct = steps.size - n_dup
        share = n_dup / steps.size
        if share < p.min_fraction or distinct == 1:
            # Every step the same batch: full-batch training and one batch fetched again
            # and again look the same.
            return []
        dist = steps[dup] - steps[prev[dup]]
        d, count = Counter(dist.tolist()).most_common(1)[0]
        regular = count / n_dup
        evidence = (
            Evidence("share of steps repeating an earlier batch", share, p.min_fraction, ">="),
            Evidence("distinct batches", distinct),
            Evidence("most common distance to the previous occurrence (steps)", d),
            Evidence("share of repeats at that distance", regular, p.min_regular, ">="),
        )
        rep = steps[dup]
        where = f"e.g. steps {step_list(rep, 6)}"
        if regular < p.min_regular:
            return []  # scattered repeats: sampling with replacement, small data
        # A cycle: every batch was new within the first period and then comes back in the
        # same order (epochs without shuffling, however short). Parallel workers keep
        # bringing new batches, each repeated at the short distance.
        cycle = distinct <= d + max(1, 0.05 * d)
        if d <= p.max_short and not cycle:
            conf = min(1.0, 0.6 + share)
            summary = (
                f"{n_dup} of {steps.size} training batches ({share:.0%}) repeat the batch "
                f"{d} step(s) earlier exactly ({where}): several DataLoader workers produce "
                "the same data (a random generator copied into every worker with the same "
                "state, or an IterableDataset not sharded per worker)"
            )
            fix = (
                "Seed each worker: DataLoader(..., worker_init_fn=seed_worker) with "
                "seed_worker reseeding the dataset's generator from "
                "torch.utils.data.get_worker_info().seed (or draw randomness from torch); "
                "shard an IterableDataset by get_worker_info().id."
            )
        else:
            conf = 0.6
            summary = (
                f"{n_dup} of {steps.size} training batches ({share:.0%}) are the batches of "
                f"{d} steps earlier, in the same order ({where}): every epoch repeats the "
                "same batches — no shuffling, or DistributedSampler.set_epoch() never called"
            )
            fix = (
                "Shuffle the training data (DataLoader(shuffle=True)), and with a "
                "DistributedSampler call sampler.set_epoch(epoch) at the start of every epoch."
            )
        return [
            Finding(
                signature=self.name,
                severity="warning",
                confidence=conf,
                summary=summary,
                fix=fix,
                steps=(int(rep[0]), int(rep[-1])),
                evidence=evidence,
                causes=(
                    "a random generator held by the dataset, copied into each DataLoader worker",
                    "an IterableDataset that every worker iterates in full",
                    "no shuffling, or DistributedSampler.set_epoch() not called",
                    "the same batch fetched again every step",
                ),
            )
        ]


def _previous_occurrence(
    sq: np.ndarray, s1: np.ndarray, pr: np.ndarray, n_el: np.ndarray, rel_tol: float
) -> np.ndarray:
    """For each step, the index of the latest earlier step with the same fingerprint (-1
    for none). Sums are compared with a tolerance scaled by ‖x‖·√n (their largest possible
    size), the sum of squares relative to itself."""
    n = sq.size
    scale = np.sqrt(np.abs(sq) * np.where(np.isfinite(n_el) & (n_el > 0), n_el, 1.0))
    order = np.argsort(sq, kind="stable")
    sorted_sq = sq[order]
    prev = np.full(n, -1, np.int64)
    for i in range(n):
        lo = np.searchsorted(sorted_sq, sq[i] * (1 - rel_tol) - 1e-300, "left")
        hi = np.searchsorted(sorted_sq, sq[i] * (1 + rel_tol) + 1e-300, "right")
        if hi - lo <= 1:
            continue
        cand = order[lo:hi]
        cand = cand[cand < i]
        if cand.size == 0:
            continue
        tol = rel_tol * np.maximum(scale[cand], scale[i]) + 1e-30
        same = (np.abs(s1[cand] - s1[i]) <= tol) & (np.abs(pr[cand] - pr[i]) <= tol)
        if same.any():
            prev[i] = int(cand[same].max())
    return prev
