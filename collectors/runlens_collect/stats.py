"""Device-side statistics: every reduction stays on the tensor's device, nothing syncs.

The per-parameter statistics of one kind (weight, grad or update) are computed on a
*chunked flat buffer*: every tensor is copied (one ``torch._foreach_copy_``) into its own
run of fixed-size chunks of a single float32 buffer, zero padded to a chunk boundary. A
handful of row reductions over the ``(chunks, C)`` matrix then covers all tensors at once,
and a ``segment_reduce`` over the (small) per-chunk partials gives per-tensor values. On
CPU this is ~10x faster than one op per tensor (dispatch costs ~5 µs an op) and much faster
than ``_foreach_norm(inf)`` or ``_foreach_powsum`` (which are per-tensor loops there); on
CUDA each op is one kernel regardless of the number of tensors.

Raw statistics are sums, from which the writer thread derives the published columns on
the host (see ``RAW``): that keeps the training thread's work to a few kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from runlens_collect import format as fmt

RAW: tuple[str, ...] = ("sum", "sumsq", "nonzero", "nonfinite", "absmax")
"""Raw per-tensor reductions, in this order (float64): sum of x, sum of x², count of
x != 0 (NaN counts as non-zero), count of non-finite x, max |x| (NaN if any NaN)."""
NRAW = len(RAW)
NBINS = fmt.HIST_NUM_BINS
_TRASH = NBINS  # per-tensor extra bin that swallows non-finite values
_ZERO = fmt.HIST_ZERO_BIN
_OCT_LO = fmt.HIST_LOG2_MIN - 1  # octaves below this are "zero"
_OCT_HI = fmt.HIST_LOG2_MAX  # octaves at or above this overflow


def chunk_size_for(numels: Sequence[int], max_chunk: int = 1024, min_chunk: int = 64) -> int:
    """Largest power-of-two chunk with at most ~25% zero padding (tiny tensors need small)."""
    total = max(1, sum(numels))
    c = max_chunk
    while c > min_chunk:
        padded = sum(max(1, math.ceil(n / c)) * c for n in numels)
        if padded <= 1.25 * total:
            break
        c //= 2
    return c


class FlatLayout:
    """A zero-padded, chunked float32 buffer with one flat view per source tensor."""

    def __init__(self, numels: Sequence[int], device: torch.device, chunk: int | None = None):
        self.numels = [int(n) for n in numels]
        self.chunk = chunk or chunk_size_for(self.numels)
        chunks = [max(1, math.ceil(n / self.chunk)) for n in self.numels]
        self.num_chunks = sum(chunks)
        self.pads = [c * self.chunk - n for c, n in zip(chunks, self.numels, strict=True)]
        self.pads_array = np.asarray(self.pads, np.int64)  # shared by every step's Block
        self.buf = torch.zeros(self.num_chunks * self.chunk, dtype=torch.float32, device=device)
        self.matrix = self.buf.view(self.num_chunks, self.chunk)
        self.views: list[torch.Tensor] = []
        off = 0
        for c, n in zip(chunks, self.numels, strict=True):
            self.views.append(self.buf[off : off + n])
            off += c * self.chunk
        self.lengths = torch.tensor(chunks, dtype=torch.int64, device=device)
        # Histogram bin base of each chunk's tensor (float32 is exact for < 2**24 bins).
        base = torch.repeat_interleave(
            torch.arange(len(chunks), dtype=torch.float32), torch.tensor(chunks, dtype=torch.int64)
        )
        self.bin_base = (base * (NBINS + 1)).view(-1, 1).to(device)

    def __len__(self) -> int:
        return len(self.numels)


NONFINITE_CHUNKS = 64
"""Chunks per kind whose non-finite values are counted exactly (see flat_raw)."""


def flat_raw(layout: FlatLayout) -> torch.Tensor:
    """Raw statistics (``RAW``) of every tensor in the layout: shape (len(layout), NRAW).

    Six passes over the buffer (sum, L2, abs, max, sign, sum). Zero and non-finite counts
    need care only in chunks holding inf/NaN, which are rare: those are found from the
    chunk norms and counted exactly on a fixed number (NONFINITE_CHUNKS) of gathered
    chunks, so no data-dependent shape and no host sync. Beyond that many bad chunks a
    kind's remaining bad chunks count as wholly non-finite (an upper bound).
    """
    x = layout.matrix
    s1 = x.sum(1)
    norm = torch.linalg.vector_norm(x, 2, dim=1)
    a = x.abs()
    amax = a.amax(1)
    nonzero = a.sign_().sum(1)  # exact where the chunk is finite
    bad = ~torch.isfinite(norm)
    k = min(NONFINITE_CHUNKS, layout.num_chunks)
    idx = torch.argsort(bad.to(torch.uint8), descending=True, stable=True)[:k]
    g = x[idx]
    nonzero.index_put_((idx,), (g != 0).sum(1, dtype=torch.float32))
    nonfinite = torch.zeros_like(s1).index_put_(
        (idx,), (~torch.isfinite(g)).sum(1, dtype=torch.float32)
    )
    beyond = bad.index_put_((idx,), torch.zeros((), dtype=torch.bool, device=x.device))
    nonfinite = torch.where(beyond, float(layout.chunk), nonfinite)
    part = torch.stack([s1, norm, nonzero, nonfinite], dim=1).double()
    part[:, 1].square_()
    # unsafe=True: skip the lengths validation, which would sync with the device.
    sums = torch.segment_reduce(part, "sum", lengths=layout.lengths, axis=0, unsafe=True)
    mx = torch.segment_reduce(amax, "max", lengths=layout.lengths, unsafe=True)
    return torch.cat([sums, mx.double().unsqueeze(1)], dim=1)


def hist_index(x: torch.Tensor) -> torch.Tensor:
    """Float bin index (format.hist_bin_index) of each element; NaN where x is not finite."""
    a = x.abs()
    nonfinite = a * 0  # NaN where x is inf or NaN, else 0
    # floor(log2|x|) clipped to [lo, hi], shifted so that 0 means "the zero bin"
    k = a.log2_().floor_().clamp_(_OCT_LO, _OCT_HI).sub_(_OCT_LO)
    return k.mul_(torch.sign(x)).add_(nonfinite).add_(_ZERO)


def flat_hist(layout: FlatLayout) -> torch.Tensor:
    """Fixed-bin counts of every tensor: (len(layout), NBINS) int64.

    One bincount for all tensors: each tensor's indices are offset by its own block of
    NBINS + 1 bins, the last of which swallows non-finite values. Zero padding lands in the
    zero bin; the writer subtracts it (``FlatLayout.pads``).
    """
    n = len(layout)
    idx = hist_index(layout.matrix).nan_to_num_(nan=float(_TRASH)).add_(layout.bin_base)
    counts = torch.bincount(idx.view(-1).to(torch.int64), minlength=n * (NBINS + 1))
    return counts.view(n, NBINS + 1)[:, :NBINS]


def tensor_raw(x: torch.Tensor) -> torch.Tensor:
    """Raw statistics (``RAW``) of one tensor as a float64 vector of NRAW values.

    Counts come from |x| rather than ``vector_norm(ord=0)`` (a slow path on CPU: 6x the
    rest for a 2M-element output): ``|x| * 0`` is NaN exactly where x is not finite, and
    ``sign(|x|)`` with non-finite values first set to 1 is 1 exactly where x != 0 (torch's
    sign of NaN is not 1, hence the nan_to_num)."""
    x = x.detach().reshape(-1)
    if not x.is_floating_point():
        x = x.float()
    a = x.abs()
    f32 = torch.float32
    amax = a.amax().float()
    nonfinite = (a * 0).nan_to_num_(nan=1.0).sum(dtype=f32)
    nonzero = a.nan_to_num_(nan=1.0, posinf=1.0).sign_().sum(dtype=f32)
    return torch.stack(
        [
            x.sum(dtype=f32),
            torch.linalg.vector_norm(x, 2, dtype=f32).square(),
            nonzero,
            nonfinite,
            amax,
        ]
    ).double()


def tensor_hist(x: torch.Tensor) -> torch.Tensor:
    """Fixed-bin counts (NBINS,) int64 of one tensor; non-finite values are not counted."""
    idx = hist_index(x.detach().reshape(-1).float()).nan_to_num_(nan=float(_TRASH))
    return torch.bincount(idx.to(torch.int64), minlength=NBINS + 1)[:NBINS]
