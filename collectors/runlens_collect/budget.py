"""The collector's device memory: one budget, and every buffer allocated through it.

``memory_budget`` bounds what the collector holds on the device, whatever the model's
size. The default is the larger of ``MIN_BUDGET`` (64 MiB) and 1/``TRAINABLE_FRACTION``
(1/64) of the trainable parameters' bytes: 64 MiB covers every model up to 4 GiB of
trainable parameters (1B float32 parameters); beyond that the budget grows slowly
(1.6%), so the rotation of the update snapshot (``param_stats``) covers every trainable
tensor within at most ~32-64 steps (float32 copies of bfloat16 parameters take twice
their bytes) instead of hundreds. A LoRA run (a few MB trainable) gets 64 MiB.

The budget is split into shares (see ``Workspace``):

* the update snapshot (float32 copies of the trainable parameters of the current
  rotation subset): at most half;
* the streaming buffer the statistics of gradients and weights go through
  (``stream.StreamPlan``): at most a quarter;
* the spare buffer (signs, histogram codes, the activations' temporaries): at most a
  quarter, grown on demand;

of what remains after a reserve of 1/16 (``RESERVE_SHARE``) for the small tensors of a
step.

Each buffer is sized to what the model needs, so a small model holds about what the old
whole-model copies held. ``Workspace.alloc`` refuses an allocation that would exceed the
budget (a collector bug, reported through the one warning); ``peak_bytes`` is the most it
ever held. Temporaries of the reductions are bounded by the buffers they work on (per-row
partials of a block: a few values per 1024 elements).
"""

from __future__ import annotations

import torch

from runlens_collect import stats

MIN_BUDGET = 64 << 20
"""Smallest default memory budget (bytes)."""
TRAINABLE_FRACTION = 64
"""The default budget is at least 1/TRAINABLE_FRACTION of the trainable bytes."""
SNAPSHOT_SHARE = 2
"""The update snapshot gets at most budget // SNAPSHOT_SHARE bytes."""
BUFFER_SHARE = 4
"""The streaming buffer and the spare get at most budget // BUFFER_SHARE bytes each."""
RESERVE_SHARE = 16
"""budget // RESERVE_SHARE (at least min(MIN_RESERVE, budget // 4)) is kept for the small
tensors of a step (per-row and per-tensor partial sums, histogram counts, the gathered
rows of the non-finite count, the packed step) and small fixed buffers; the shares above
divide the rest."""
MIN_RESERVE = 128 << 10


def default_budget(trainable_bytes: int) -> int:
    """The default ``memory_budget``: max(64 MiB, trainable bytes / 64)."""
    return max(MIN_BUDGET, int(trainable_bytes) // TRAINABLE_FRACTION)


class BudgetError(RuntimeError):
    """An allocation that would take the collector over its memory budget."""


class Workspace:
    """The collector's device buffers, each allocated through :meth:`alloc` and counted.

    ``owners`` records which ``stream.Region`` last wrote each buffer (padding is zeroed
    again only when another region used it).
    """

    def __init__(self, device: torch.device, budget: int) -> None:
        self.device = device
        self.budget = int(budget)
        self.held: dict[str, int] = {}
        self.peak_bytes = 0
        self.owners: dict[int, int] = {}
        self._bufs: dict[str, torch.Tensor] = {}
        # Shares of what the reserve leaves (float32 elements each).
        self.reserve = max(self.budget // RESERVE_SHARE, min(MIN_RESERVE, self.budget // 4))
        shared = self.budget - self.reserve
        self.spare_cap = shared // BUFFER_SHARE // 4
        self.stream_cap = shared // BUFFER_SHARE // 4
        self.snapshot_cap = shared // SNAPSHOT_SHARE // 4
        # Row width of the chunked reductions: the non-finite count gathers NONFINITE_CHUNKS
        # rows and makes two temporaries of them: at most a quarter of the reserve.
        per_row = stats.NONFINITE_CHUNKS * 4 * 8  # their bytes per column, x4: a quarter
        self.max_chunk = 1 << max(4, min(10, (self.reserve // per_row).bit_length() - 1))
        self._spare: torch.Tensor | None = None

    @property
    def held_bytes(self) -> int:
        return sum(self.held.values())

    def alloc(self, name: str, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A zeroed buffer of ``numel`` elements named ``name`` (replacing the previous one
        of that name, which is freed first). Raises BudgetError beyond the budget."""
        nbytes = int(numel) * torch.empty((), dtype=dtype).element_size()
        others = self.held_bytes - self.held.get(name, 0)
        if others + nbytes > self.budget:
            raise BudgetError(
                f"{name}: {nbytes} bytes would take the collector to {others + nbytes} of its "
                f"{self.budget}-byte memory budget"
            )
        self.free(name)
        buf = torch.zeros(int(numel), dtype=dtype, device=self.device)
        self._bufs[name] = buf
        self.held[name] = nbytes
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        return buf

    def free(self, name: str) -> None:
        buf = self._bufs.pop(name, None)
        if buf is not None:
            self.owners.pop(buf.data_ptr(), None)
        self.held.pop(name, None)

    def spare(self, numel: int) -> torch.Tensor | None:
        """The spare float32 buffer with at least ``min(numel, spare_cap)`` elements (grown
        on demand; None when the budget leaves no room for a spare at all)."""
        want = min(int(numel), self.spare_cap)
        if self._spare is not None and self._spare.numel() >= want:
            return self._spare
        if want <= 0:
            return self._spare
        self._spare = None  # freed before the larger one is allocated
        try:
            self._spare = self.alloc("spare", want)
        except BudgetError:
            return None
        return self._spare
