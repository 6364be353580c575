"""Statistics of many tensors streamed through a bounded buffer: no copy of the model.

The flat-buffer reductions of ``stats`` (row reductions over a chunked, zero-padded
``(chunks, C)`` matrix, a ``segment_reduce`` of the per-chunk partials) need the tensors
in one buffer. Here the buffer is bounded: a ``StreamPlan`` cuts a list of tensors into
*pieces* (whole tensors, or runs of rows along dim 0 when a tensor is larger than the
buffer, or flat runs when a single row is), packs consecutive pieces into *groups* that
each fit the buffer, and reduces group after group: one ``torch._foreach_copy_`` (a
multi-tensor kernel) into the buffer, the same row reductions as before, and the
per-piece partial sums combined into per-tensor values at the end. Every statistic is a
sum, a count or a maximum, so the combination is exact; the non-finite gather of
``stats.row_partials`` runs per group, which only makes it more exact.

A model that fits the buffer is one group: the same ops as the old whole-model flat copy.
The same code runs on CPU and CUDA (no host syncs: static shapes, ``unsafe``
``segment_reduce``, sync-free histogram counts), so the CPU tests exercise the CUDA path.

``Region`` is one group laid out in a buffer (views of the pieces, pad views, chunk counts
and histogram code offsets); the snapshot of the update's rotating subsets uses the same
regions, bound to the snapshot buffer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from runlens_collect import stats
from runlens_collect.stats import BIN_STRIDE, NBINS, NRAW


@dataclass(frozen=True)
class Piece:
    """A part of tensor ``item``: rows ``start:stop`` along dim 0 (``flat``: elements
    ``start:stop`` of the flattened tensor); ``whole`` when it is the entire tensor."""

    item: int
    start: int
    stop: int
    numel: int
    shape: tuple[int, ...]  # the piece's shape (as copied into the buffer)
    whole: bool
    flat: bool = False


def split_item(item: int, shape: tuple[int, ...], cap: int, chunk: int) -> list[Piece]:
    """Pieces of one tensor whose padded size is at most ``cap`` elements (a multiple of
    ``chunk``): the whole tensor, else runs of rows along dim 0, else flat runs."""
    numel = math.prod(shape)
    if _padded(numel, chunk) <= cap or not shape:
        return [Piece(item, 0, shape[0] if shape else 1, numel, shape, True)]
    rows, width = shape[0], numel // max(1, shape[0])
    per = cap // width if width else 0
    while per > 0 and _padded(per * width, chunk) > cap:
        per -= 1
    if per >= 1:
        return [
            Piece(item, a, min(rows, a + per), (min(rows, a + per) - a) * width,
                  (min(rows, a + per) - a, *shape[1:]), False)
            for a in range(0, rows, per)
        ]  # fmt: skip
    return [
        Piece(item, a, min(numel, a + cap), min(numel, a + cap) - a, (min(numel, a + cap) - a,),
              False, flat=True)
        for a in range(0, numel, cap)
    ]  # fmt: skip


def _padded(n: int, chunk: int) -> int:
    return max(1, math.ceil(n / chunk)) * chunk


def piece_of(t: torch.Tensor, p: Piece) -> torch.Tensor:
    """The part of ``t`` that piece ``p`` describes (a view; a flat piece of a
    non-contiguous tensor is taken from a reshaped copy, the only copy here)."""
    if p.whole:
        return t
    if p.flat:
        return t.reshape(-1)[p.start : p.stop]
    return t[p.start : p.stop]


class Region:
    """Pieces laid out chunk-aligned, zero padded, from offset 0 of a buffer.

    ``lengths`` holds each piece's chunk count on the device (for ``segment_reduce``).
    ``bind(buf)`` makes the views into ``buf`` (a float32 buffer of at least ``numel``
    elements); several regions may share one buffer, one at a time (``owner`` tracks who
    wrote it last, so padding is re-zeroed only when another region used it).
    """

    def __init__(self, pieces: Sequence[Piece], chunk: int, device: torch.device) -> None:
        self.pieces = list(pieces)
        self.chunk = chunk
        chunks = [max(1, math.ceil(p.numel / chunk)) for p in self.pieces]
        self.rows = sum(chunks)
        self.numel = self.rows * chunk
        self.pads = np.asarray(
            [c * chunk - p.numel for c, p in zip(chunks, self.pieces, strict=True)], np.int64
        )
        self.offsets = np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(np.int64) * chunk
        # Per piece, not per row: metadata must not grow with the model (rows are 1/1024
        # of its elements; pieces are its tensors).
        self.lengths = torch.tensor(chunks, dtype=torch.int64, device=device)
        self.views: list[torch.Tensor] = []
        self.pad_views: list[torch.Tensor] = []
        self.matrix: torch.Tensor | None = None
        self.buf: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.pieces)

    def bind(self, buf: torch.Tensor) -> None:
        if buf.numel() < self.numel:
            raise ValueError(f"buffer of {buf.numel()} elements, region needs {self.numel}")
        self.buf = buf
        self.matrix = buf[: self.numel].view(self.rows, self.chunk)
        self.views, self.pad_views = [], []
        for p, off, pad in zip(self.pieces, self.offsets, self.pads, strict=True):
            self.views.append(buf[off : off + p.numel].view(p.shape))
            if pad:
                self.pad_views.append(buf[off + p.numel : off + p.numel + pad])

    def claim(self, owners: dict[int, int]) -> None:
        """Zero the padding unless this region was the buffer's last writer (the sign
        written over a region keeps zeros zero; another region's data does not)."""
        assert self.buf is not None
        key = self.buf.data_ptr()
        if owners.get(key) != id(self):
            if self.pad_views:
                torch._foreach_zero_(self.pad_views)
            owners[key] = id(self)


def region_raw(
    region: Region,
    hist: bool,
    spare: torch.Tensor | None,
    consumable: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RAW rows (len(region), NRAW) float64 of the pieces now in the region, and their
    histograms (len(region), NBINS) float64 when ``hist`` (padding in the zero bin).

    ``spare``: a float32 scratch buffer (flat) for the sign and the histogram's codes and
    bins (rows go through it in blocks when it is smaller than the region);
    ``consumable``: the region's content is not needed afterwards (the sign or the codes
    may go over it).
    """
    m = region.matrix
    assert m is not None
    if consumable and not hist:
        part, amax = stats.row_partials(m, m)
    else:
        parts = [
            stats.row_partials(m[r0:r1], _spare_as(spare, m[r0:r1], m.dtype))
            for r0, r1 in _blocks(m, spare)
        ]
        if len(parts) == 1:
            part, amax = parts[0]
        else:
            part = torch.cat([p for p, _ in parts])
            amax = torch.cat([a for _, a in parts])
    counts = None
    if hist:
        n = len(region)
        bases = torch.arange(0, n * BIN_STRIDE, BIN_STRIDE, dtype=torch.int32, device=m.device)
        # output_size: repeat_interleave would otherwise read the total back (a sync)
        bases = torch.repeat_interleave(bases, region.lengths, output_size=region.rows)
        counts = hist_counts(m, bases.view(-1, 1), n, spare, consumable)
    sums = torch.segment_reduce(part, "sum", lengths=region.lengths, axis=0, unsafe=True)
    mx = torch.segment_reduce(amax, "max", lengths=region.lengths, unsafe=True)
    return torch.cat([sums, mx.double().unsqueeze(1)], dim=1), counts


def hist_counts(
    m: torch.Tensor,
    bases: torch.Tensor | None,
    n: int,
    spare: torch.Tensor | None,
    consumable: bool,
) -> torch.Tensor:
    """Format-bin counts (n, NBINS) float64 of the rows of ``m`` (2-D), row r counted for
    piece ``bases[r] // BIN_STRIDE`` (all rows one piece without ``bases``).

    The sign+exponent codes are turned into bins (``stats.bins_into``) and counted with
    BIN_STRIDE counters per piece. Codes go over ``m`` itself when ``consumable`` (else
    into the spare's first half) and bins into the spare, in blocks of rows that fit.
    """
    if consumable and m.dtype == torch.float32:
        codes = stats._codes(m, m.view(torch.int32))
        blocks = _blocks(m, spare)
        half = 0
    else:
        codes = None
        half_spare = spare[: spare.numel() // 2] if spare is not None else None
        blocks = _blocks(m, half_spare)
        half = (spare.numel() // 2) * 4 if spare is not None else 0
    counts = None
    for r0, r1 in blocks:
        if codes is None:
            block = stats._codes(m[r0:r1], _spare_as(spare, m[r0:r1], torch.int32))
        else:
            block = codes[r0:r1]
        out = _spare_as(spare, block.reshape(-1), torch.int32, offset=half)
        bins = stats.bins_into(block, out)
        if bases is not None:
            bins.view(block.shape).add_(bases[r0:r1])
        c = stats.count_codes(bins, n * BIN_STRIDE)
        counts = c if counts is None else counts.add_(c)
    assert counts is not None
    return counts.view(n, BIN_STRIDE)[:, :NBINS]


def _blocks(m: torch.Tensor, spare: torch.Tensor | None) -> list[tuple[int, int]]:
    """Row ranges of ``m`` that fit the spare buffer (the whole matrix without one)."""
    rows, width = m.shape
    if spare is None or spare.numel() >= m.numel():
        return [(0, rows)]
    per = max(1, spare.numel() // max(1, width))
    return [(r, min(rows, r + per)) for r in range(0, rows, per)]


def _spare_as(
    spare: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype, offset: int = 0
) -> torch.Tensor | None:
    """The spare buffer's bytes from ``offset`` viewed as ``like``'s shape in ``dtype``
    (None when they do not fit)."""
    if spare is None:
        return None
    size = torch.empty((), dtype=dtype).element_size()
    nbytes = like.numel() * size
    raw = spare.view(torch.uint8)
    if offset + nbytes > raw.numel():
        return None
    return raw[offset : offset + nbytes].view(dtype).view(like.shape)


class StreamPlan:
    """Tensors (by shape) cut into pieces and packed into regions of at most ``cap``
    elements, reduced region by region through one buffer (see the module doc).

    Args:
        shapes: the tensors' shapes (complex tensors: their ``view_as_real`` shape).
        cap: elements of the buffer the regions go through.
        device: where the statistics are computed.
        chunk: row width of the chunked layout (default: from the sizes, at most
            ``max_chunk``).
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, ...]],
        cap: int,
        device: torch.device,
        chunk: int | None = None,
        max_chunk: int = 1024,
    ) -> None:
        numels = [math.prod(s) for s in shapes]
        # A chunk never wider than the buffer (tiny budgets in tests).
        chunk = chunk or stats.chunk_size_for(
            numels, max_chunk=max_chunk, min_chunk=min(64, max_chunk)
        )
        self.chunk = min(chunk, 1 << max(0, cap.bit_length() - 1))
        self.cap = max(self.chunk, cap // self.chunk * self.chunk)
        self.shapes = [tuple(s) for s in shapes]
        self.pieces: list[Piece] = []
        for i, s in enumerate(self.shapes):
            self.pieces += split_item(i, s, self.cap, self.chunk)
        self.regions: list[Region] = []
        group: list[Piece] = []
        size = 0
        for p in self.pieces:
            need = _padded(p.numel, self.chunk)
            if group and (size + need > self.cap or p.item == group[-1].item):
                self.regions.append(Region(group, self.chunk, device))
                group, size = [], 0
            group.append(p)
            size += need
        if group:
            self.regions.append(Region(group, self.chunk, device))
        self.split = len(self.pieces) > len(self.shapes)
        per_item = np.bincount([p.item for p in self.pieces], minlength=len(self.shapes))
        self.item_lengths = torch.tensor(per_item, dtype=torch.int64, device=device)
        # Padding counted in the zero bin, per tensor (the writer subtracts it).
        pads = np.zeros(len(self.shapes), np.int64)
        for r in self.regions:
            np.add.at(pads, [p.item for p in r.pieces], r.pads)
        self.pads = pads
        self.numel = max((r.numel for r in self.regions), default=0)

    def __len__(self) -> int:
        return len(self.shapes)

    def bind(self, buf: torch.Tensor) -> None:
        for r in self.regions:
            r.bind(buf)

    def reduce(
        self,
        srcs: Sequence[torch.Tensor | None],
        hist: bool,
        spare: torch.Tensor | None,
        owners: dict[int, int],
        scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """RAW rows (len(self), NRAW) float64 of the tensors ``srcs`` (None: missing,
        its row holds leftovers and must be masked), then their histograms
        (len(self), NBINS) when ``hist``; of ``srcs / scale`` when a (device) ``scale``
        is given (gradients still multiplied by an AMP loss scale)."""
        raws, counts = [], []
        for region in self.regions:
            region.claim(owners)
            dst, src = [], []
            for p, v in zip(region.pieces, region.views, strict=True):
                t = srcs[p.item]
                if t is not None:
                    dst.append(v)
                    src.append(piece_of(t, p))
            if dst:
                torch._foreach_copy_(dst, src)
                if scale is not None:
                    region.matrix.div_(scale)  # zero padding stays zero
            raw, c = region_raw(region, hist, spare, consumable=True)
            raws.append(raw)
            counts.append(c)
        raw = torch.cat(raws) if len(raws) > 1 else raws[0]
        cnt = None
        if hist:
            cnt = torch.cat(counts) if len(counts) > 1 else counts[0]
        if self.split:
            raw, cnt = combine_pieces(raw, cnt, self.item_lengths)
        return raw, cnt


def combine_pieces(
    raw: torch.Tensor, counts: torch.Tensor | None, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-tensor RAW rows (and code counts) from per-piece ones, pieces in tensor order:
    sums add up, the maximum is the maximum."""
    sums = torch.segment_reduce(raw[:, : NRAW - 1], "sum", lengths=lengths, axis=0, unsafe=True)
    mx = torch.segment_reduce(raw[:, NRAW - 1], "max", lengths=lengths, unsafe=True)
    out = torch.cat([sums, mx.unsqueeze(1)], dim=1)
    if counts is not None:
        counts = torch.segment_reduce(counts, "sum", lengths=lengths, axis=0, unsafe=True)
    return out, counts


# -- one tensor (activations, the model output) -------------------------------------------


def dense_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous tensor without copying when possible: itself, else its dims
    permuted into memory order (channels_last, transposed outputs: nothing computed here
    depends on the order of the elements), else a contiguous copy (a view with gaps)."""
    if x.is_contiguous():
        return x
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), -x.shape[d]))
    y = x.permute(order)
    return y if y.is_contiguous() else x.contiguous()


def single_stats(
    x: torch.Tensor,
    spare: torch.Tensor | None,
    row_len: int | None = None,
    hist: bool = False,
    max_width: int = 1024,
) -> tuple[torch.Tensor, tuple[int, int, int], torch.Tensor | None]:
    """``stats.SINGLE`` values (float64) of one tensor, its shape facts for
    ``stats.single_to_raw`` and its histogram (NBINS,) when ``hist``: the statistics of
    ``stats.tensor_raw`` / ``stats.tensor_hist``, with every temporary bounded by the spare
    buffer (rows go through it in blocks; a tensor that fits is one block).

    ``row_len``: the rows the shape facts count (the model output's last dimension, for
    ``row_sum_mean``); default the row view's. The reductions themselves run over rows of
    at most ``max_width`` elements whatever the tensor's shape (the non-finite count
    gathers whole rows). Non-finite counts are completed on the device (rows beyond the
    gathered ones count whole), so the shape facts say ``(rows, 0, width)`` and
    ``finite_rows`` is shipped as ``rows``.
    """
    x = x.detach()
    if not x.is_floating_point():
        x = x.float()
    n = x.numel()
    if n == 0:
        vals, shape = stats.tensor_raw(x)
        h = torch.zeros(stats.NBINS, dtype=torch.float64, device=x.device) if hist else None
        return vals, shape, h
    base = dense_view(x)
    width = row_width(n, max_width)
    rows = base.reshape(-1, width)
    nrows = n // row_len if row_len else rows.shape[0]
    per = rows.shape[0]
    if spare is not None:
        per = max(1, min(per, spare.numel() * 4 // max(1, width * x.element_size())))
    vecs = [
        _block_single(b, _spare_as(spare, b, b.dtype))
        for b in (rows[r0 : r0 + per] for r0 in range(0, rows.shape[0], per))
    ]
    f64 = torch.float64
    if len(vecs) == 1:
        v = vecs[0]
        out = torch.cat([v[:5], torch.full((1,), float(nrows), dtype=f64, device=v.device), v[6:]])
    else:
        m = torch.stack(vecs)
        sums = m[:, [0, 2, 3, 4]].sum(0)
        out = torch.stack(
            [
                sums[0],
                torch.linalg.vector_norm(m[:, 1]),
                sums[1],
                sums[2],
                sums[3],
                torch.full((), float(nrows), dtype=f64, device=m.device),  # no H2D copy
                m[:, 6].min(),
                m[:, 7].max(),
            ]
        )
    h = hist_counts(rows, None, 1, spare, consumable=False).reshape(-1) if hist else None
    return out, (nrows, 0, width), h


_WIDTHS: dict[tuple[int, int], int] = {}


def row_width(n: int, max_width: int = 1024) -> int:
    """Row width for the reductions of ``n`` elements: the largest power of two up to
    ``max_width`` that divides n, else its largest divisor up to ``max_width``."""
    key = (n, max_width)
    w = _WIDTHS.get(key)
    if w is None:
        w = 1
        p = 1 << (max_width.bit_length() - 1)
        while p >= 16:
            if n % p == 0:
                w = p
                break
            p //= 2
        else:
            w = next(d for d in range(min(n, max_width), 0, -1) if n % d == 0)
        if len(_WIDTHS) > 4096:
            _WIDTHS.clear()
        _WIDTHS[key] = w
    return w


def _block_single(b: torch.Tensor, sign_out: torch.Tensor | None) -> torch.Tensor:
    """One block of rows: (sum, l2, nonzero_rest, nonzero_gathered, nonfinite (gathered
    rows exactly, rows beyond them whole), unused, min, max) as float64."""
    f32, f64 = torch.float32, torch.float64
    width = float(b.shape[1])
    s1 = b.sum(1, dtype=f32)
    nrm = torch.linalg.vector_norm(b, 2, dim=1, dtype=f32)
    lo, hi = torch.aminmax(b)
    idx, g = stats._bad_rows_first(b, nrm)
    nz = torch.linalg.vector_norm(stats._sign(b, sign_out), 2, dim=1, dtype=f32)
    nz = nz.square_().round_()
    fin = torch.isfinite(nrm)
    # Gathered rows are counted from g; bad rows beyond them (only past k of them) count as
    # wholly non-zero and wholly non-finite: sign(NaN) is 0 on CPU, so no bound from it.
    nz = torch.where(fin, nz, width).index_fill_(0, idx, 0.0)
    beyond = ((~fin).sum(dtype=f64) - len(idx)).clamp_(min=0.0)
    nonfinite = torch.count_nonzero(g * 0).to(f64) + beyond * width
    return torch.stack(
        [
            s1.sum(dtype=f64),
            torch.linalg.vector_norm(nrm, 2, dtype=f64),
            nz.sum(dtype=f64),
            torch.count_nonzero(g).to(f64),
            nonfinite,
            nonfinite,  # placeholder (finite_rows, set by the caller)
            lo.to(f64),
            hi.to(f64),
        ]
    )


def saturated_fraction(
    x: torch.Tensor, lo: float, hi: float, spare: torch.Tensor | None
) -> torch.Tensor:
    """Fraction of elements ``<= lo`` or ``>= hi`` (float32 scalar), the comparisons
    written into the spare buffer in blocks (two bools per element)."""
    flat = dense_view(x.detach()).reshape(-1)
    n = flat.numel()
    per = n if spare is None else max(1, spare.numel() * 4 // 2)
    total = None
    for a in range(0, n, per):
        blk = flat[a : a + per]
        b1 = _spare_as(spare, blk, torch.bool)
        b2 = _spare_as(spare, blk, torch.bool, offset=blk.numel())
        if b1 is None or b2 is None:
            hit = (blk <= lo) | (blk >= hi)
        else:
            hit = torch.logical_or(torch.le(blk, lo, out=b1), torch.ge(blk, hi, out=b2), out=b1)
        c = hit.sum(dtype=torch.float32)
        total = c if total is None else total.add_(c)
    assert total is not None
    return total / max(1, n)


def dead_fraction(x: torch.Tensor, channel_first: bool) -> torch.Tensor:
    """Fraction of units that are zero for every example (units: dim 1 after a conv, else
    the last dim). max |x| per unit from ``amax``/``amin`` over the other dims: no
    temporary as large as x."""
    if x.dim() < 2:
        return (x == 0).float().mean().reshape(())
    dims = (0, *range(2, x.dim())) if channel_first else tuple(range(x.dim() - 1))
    alive = torch.maximum(x.amax(dims), x.amin(dims).neg())
    return (alive == 0).sum(dtype=torch.float32) / max(1, alive.numel())
