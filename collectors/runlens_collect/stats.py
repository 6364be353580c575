"""Device-side statistics: every reduction stays on the tensor's device, nothing syncs.

The per-parameter statistics of one kind (weight, grad or update) are computed on a
*chunked flat buffer*: tensors are copied (one ``torch._foreach_copy_``) into their own
runs of fixed-size chunks of a float32 buffer, zero padded to a chunk boundary. A handful
of row reductions over the ``(chunks, C)`` matrix (``row_partials``) then covers all of
them at once, and a ``segment_reduce`` over the (small) per-chunk partials gives
per-tensor values. On CPU this is ~10x faster than one op per tensor (dispatch costs ~5 µs
an op) and much faster than ``_foreach_norm(inf)`` or ``_foreach_powsum`` (which are
per-tensor loops there); on CUDA each op is one kernel regardless of the number of
tensors. The collector streams the tensors through a *bounded* buffer, group by group
(``stream.py``, within the memory budget); ``FlatLayout``/``flat_raw``/``flat_hist``
(the whole set in one buffer) and ``tensor_raw``/``tensor_hist`` remain the reference
forms the tests compare with.

Raw statistics are sums, from which the writer thread derives the published columns on
the host (see ``RAW``): that keeps the training thread's work to a few kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from runlens_collect import format as fmt

NO_FLOAT64_DEVICES: set[str] = {"mps"}
"""Device types without float64: statistics travel as float32 from there (exact counts up
to 2**24 per tensor and bin instead of 2**53)."""


def wire_dtype(device: torch.device) -> torch.dtype:
    """The dtype a step's statistics are computed and shipped in from ``device``:
    float64, or float32 where the device has no float64 (``NO_FLOAT64_DEVICES``)."""
    return torch.float32 if device.type in NO_FLOAT64_DEVICES else torch.float64


RAW: tuple[str, ...] = ("sum", "sumsq", "nonzero", "nonfinite", "absmax")
"""Raw per-tensor reductions, in this order (float64): sum of x, sum of x², count of
x != 0 (NaN counts as non-zero), count of non-finite x, max |x| (NaN if any NaN)."""
NRAW = len(RAW)
NBINS = fmt.HIST_NUM_BINS
CODES = 512
"""Histogram pre-bins: the sign bit and the 8 exponent bits of a float32, which are
floor(log2|x|) + 127 for normal numbers. Counting these codes takes two integer ops per
element (no log2, no float rounding: ~4x faster than binning by value on CPU); a fixed
(CODES, NBINS) 0/1 matrix then folds the counts into the format's bins."""


def code_map() -> np.ndarray:
    """(CODES, NBINS) float64 0/1 matrix from float32 sign+exponent code to format bin.
    Exponent 255 (inf, NaN) maps nowhere: non-finite values are not counted."""
    m = np.zeros((CODES, NBINS), np.float64)
    for code in range(CODES):
        negative, biased = code >> 8, code & 255
        if biased == 255:
            continue
        octave = biased - 127  # zero and subnormals (biased 0) land far below the zero bin
        if octave < fmt.HIST_LOG2_MIN:
            b = fmt.HIST_ZERO_BIN
        else:
            k = min(octave, fmt.HIST_LOG2_MAX) - fmt.HIST_LOG2_MIN
            b = fmt.HIST_ZERO_BIN - 1 - k if negative else fmt.HIST_ZERO_BIN + 1 + k
        m[code, b] = 1.0
    return m


_CODE_MAP = code_map()
_code_maps: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

BIN_STRIDE = NBINS + 1
"""Bins per tensor when codes are turned into bins before counting: the format's bins,
then one for non-finite values (dropped)."""


def bin_lut() -> np.ndarray:
    """(CODES,) int32: the format bin of each sign+exponent code (NBINS: non-finite)."""
    lut = np.full(CODES, NBINS, np.int32)
    hit = _CODE_MAP.any(1)
    lut[hit] = _CODE_MAP[hit].argmax(1)
    return lut


_BIN_LUT = bin_lut()
_bin_luts: dict[torch.device, torch.Tensor] = {}


def bin_lut_on(device: torch.device) -> torch.Tensor:
    """The code-to-bin table on ``device`` (cached; moved at setup: a host-to-device copy
    on a later step would wait for the device)."""
    lut = _bin_luts.get(device)
    if lut is None:
        lut = _bin_luts[device] = torch.from_numpy(_BIN_LUT).to(device)
    return lut


def bins_into(codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The format bin (int32, flat) of each code, into ``out`` (int32, flat) when given:
    counting bins instead of codes takes BIN_STRIDE counters per tensor instead of CODES
    (68 against 512: the counts of many small tensors stay small)."""
    lut = bin_lut_on(codes.device)
    if out is None:
        return torch.index_select(lut, 0, codes.reshape(-1))
    return torch.index_select(lut, 0, codes.reshape(-1), out=out)


def code_map_on(device: torch.device) -> torch.Tensor:
    """The (CODES, NBINS) code-to-bin matrix on ``device`` in its wire dtype (cached)."""
    key = (device, wire_dtype(device))
    t = _code_maps.get(key)
    if t is None:
        t = _code_maps[key] = torch.from_numpy(_CODE_MAP).to(device=device, dtype=key[1])
    return t


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
        # Histogram code offset of each chunk's tensor (see flat_hist).
        base = torch.repeat_interleave(
            torch.arange(len(chunks), dtype=torch.int32), torch.tensor(chunks, dtype=torch.int64)
        )
        self.code_base = (base * CODES).view(-1, 1).to(device)

    def __len__(self) -> int:
        return len(self.numels)


NONFINITE_CHUNKS = 16
"""Rows (chunks) per call whose zero and non-finite values are counted exactly (see
row_partials)."""


def _bad_rows_first(m: torch.Tensor, norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of NONFINITE_CHUNKS rows (fewer if m has fewer), those with an inf/NaN norm
    first, and a copy of those rows (taken before a sign_out may overwrite m). Any rows
    count exactly, so which good rows fill the rest does not matter."""
    k = min(NONFINITE_CHUNKS, m.shape[0])
    idx = norm.nan_to_num(nan=math.inf).topk(k, sorted=False).indices
    return idx, m[idx]


def _sign(m: torch.Tensor, sign_out: torch.Tensor | None) -> torch.Tensor:
    return torch.sign(m, out=sign_out) if sign_out is not None else m.sign()


def row_partials(
    m: torch.Tensor, sign_out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row raw statistics of a 2-D float matrix: ``(rows, 4)`` float64 partial sums
    (sum, sumsq, nonzero, nonfinite) and the float32 max |x| of each row.

    Few cheap passes (sum, L2 norm, max, min, sign, L2 norm of the sign), since the data
    has usually left the cache and each pass costs a read of it. ``sign_out``, when
    given, receives the sign (it may be ``m`` itself where m is scratch, or any spare
    buffer of m's shape and dtype): a fresh temporary of that size costs page faults on
    CPU. The sign trick counts non-zeros (``sign(x)²`` is 1 exactly where x != 0) at a
    fraction of the cost of ``count_nonzero`` or ``x != 0`` on CPU.

    Zero and non-finite counts need care only in rows holding inf/NaN, which are rare:
    those rows are found from the row norms and counted exactly on a fixed number
    (NONFINITE_CHUNKS) of gathered rows, so no data-dependent shape and no host sync.
    Beyond that many bad rows the remaining bad rows count as wholly non-finite (an upper
    bound) and wholly non-zero (``sign(NaN)`` is 0 on CPU, so their sign count is no bound).
    """
    f32 = torch.float32
    s1 = m.sum(1, dtype=f32)
    norm = torch.linalg.vector_norm(m, 2, dim=1, dtype=f32)
    # max |x| without an |x| temporary; amax/amin propagate NaN, as maximum does.
    absmax = torch.maximum(m.amax(1), m.amin(1).neg()).to(f32)
    idx, g = _bad_rows_first(m, norm)
    nonzero = torch.linalg.vector_norm(_sign(m, sign_out), 2, dim=1, dtype=f32)
    nonzero = nonzero.square_().round_()
    # Exact counts in the gathered rows with float ops (bool reductions are slow on CPU):
    # |g| with NaN/inf set to 1 has sign 1 exactly where g != 0; g * 0 is NaN exactly
    # where g is not finite.
    nonzero.index_put_((idx,), g.abs().nan_to_num_(nan=1.0, posinf=1.0).sign_().sum(1))
    nonfinite = torch.zeros_like(s1).index_put_((idx,), (g * 0).nan_to_num_(nan=1.0).sum(1))
    beyond = (~torch.isfinite(norm)).index_fill_(0, idx, False)
    width = float(m.shape[1])
    nonfinite = torch.where(beyond, width, nonfinite)
    nonzero = torch.where(beyond, width, nonzero)
    part = torch.stack([s1, norm, nonzero, nonfinite], dim=1).to(wire_dtype(m.device))
    part[:, 1].square_()
    return part, absmax


def flat_raw(layout: FlatLayout, sign_out: torch.Tensor | None = None) -> torch.Tensor:
    """Raw statistics (``RAW``) of every tensor in the layout: shape (len(layout), NRAW).

    Row partials over the ``(chunks, C)`` matrix, then a ``segment_reduce`` over the
    (small) per-chunk partials gives per-tensor values. ``sign_out``: see row_partials
    (``layout.matrix`` itself where the buffer's content is no longer needed).
    """
    part, amax = row_partials(layout.matrix, sign_out)
    # unsafe=True: skip the lengths validation, which would sync with the device.
    sums = torch.segment_reduce(part, "sum", lengths=layout.lengths, axis=0, unsafe=True)
    mx = torch.segment_reduce(amax, "max", lengths=layout.lengths, unsafe=True)
    return torch.cat([sums, mx.to(sums.dtype).unsqueeze(1)], dim=1)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """A 2-D ``(rows, cols)`` view of a tensor for row reductions (a copy only when x is
    not contiguous). Rows of a power-of-two width up to 1024 when the size allows, so the
    reductions vectorise and the non-finite gather stays small; else the last dimension."""
    x = x.detach()
    n = x.numel()
    for c in (1024, 512, 256, 128, 64, 32, 16):
        if n % c == 0:
            return x.reshape(-1, c)
    if x.dim() >= 2 and x.shape[-1] > 1:
        return x.reshape(-1, x.shape[-1])
    return x.reshape(1, max(1, n)) if n else x.reshape(0, 1)


def _codes(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """int32 sign+exponent code (0..CODES-1) of each element of a float tensor, into
    ``out`` (int32, x's shape) when given: a fresh temporary costs page faults on CPU."""
    if x.dtype != torch.float32:
        # float16/bfloat16 convert exactly; finite float64 beyond float32's range must stay
        # in the overflow bins rather than turn into inf (clamp keeps NaN; inf stays inf).
        if x.dtype == torch.float64:
            x = torch.where(torch.isinf(x), x, x.clamp(-(2.0**100), 2.0**100))
        x = x.float()
    bits = x.view(torch.int32)
    if out is None or out.shape != bits.shape:
        codes = torch.bitwise_right_shift(bits, 23)
    else:
        codes = torch.bitwise_right_shift(bits, 23, out=out)
    return codes.bitwise_and_(CODES - 1)


def count_codes(codes: torch.Tensor, size: int, bincount: bool | None = None) -> torch.Tensor:
    """float64 counts of each value in [0, size) of a 1-D integer tensor, on its device.

    ``torch.bincount`` is the fastest on CPU (2x ``index_add_``), but on CUDA it reads
    ``max()`` back to the host to size its output, a sync; elsewhere an ``index_add_`` of
    ones into a fixed-size int64 vector does the same without one. ``bincount`` forces
    either path (default: by device).
    """
    wd = wire_dtype(codes.device)
    if bincount is None:
        bincount = codes.device.type == "cpu"
    if bincount:
        return torch.bincount(codes, minlength=size).to(wd)
    ones = torch.ones((), dtype=torch.int64, device=codes.device).expand(codes.numel())
    counts = torch.zeros(size, dtype=torch.int64, device=codes.device)
    return counts.index_add_(0, codes, ones).to(wd)


def flat_hist(layout: FlatLayout, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Fixed-bin counts of every tensor: (len(layout), NBINS) float64.

    One count for all tensors: each tensor's codes are offset by its own block of
    CODES; one small matmul folds codes into bins. Zero padding lands in the zero bin; the
    writer subtracts it (``FlatLayout.pads``).
    """
    n = len(layout)
    codes = _codes(layout.matrix, scratch).add_(layout.code_base)
    counts = count_codes(codes.view(-1), n * CODES)
    # float64: exact for counts up to 2**53
    return counts.view(n, CODES) @ code_map_on(counts.device)


SINGLE: tuple[str, ...] = (
    "sum",
    "l2",
    "nonzero_rest",
    "nonzero_gathered",
    "nonfinite_gathered",
    "finite_rows",
    "min",
    "max",
)
"""Raw statistics of one tensor as shipped (float64), finished into ``RAW`` on the host by
``single_to_raw``: the device does the passes over the data and the host the arithmetic
on a few numbers (each op on the device costs ~5 us of dispatch on CPU, whatever its size).
"""
NSINGLE = len(SINGLE)


def tensor_raw(
    x: torch.Tensor, rows: torch.Tensor | None = None, sign_out: torch.Tensor | None = None
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Raw statistics of one tensor: the ``SINGLE`` vector (NSINGLE,) float64 and the
    host-side shape facts ``(rows, gathered rows, row width)`` that ``single_to_raw`` needs.

    ``rows`` is a 2-D view of x (default ``as_rows(x)``); ``sign_out`` a spare buffer of its
    shape and dtype (see row_partials). Non-zero and non-finite counts are exact as in
    row_partials: rows with inf/NaN (up to NONFINITE_CHUNKS) are gathered and counted
    element by element, any beyond count as wholly non-finite and non-zero.
    """
    if rows is None:
        x = x.detach()
        rows = as_rows(x if x.is_floating_point() else x.float())
    if not rows.is_floating_point():
        rows = rows.float()
    f32, f64 = torch.float32, wire_dtype(rows.device)
    r, width = rows.shape
    if rows.numel() == 0:
        vals = [0.0, 0.0, 0.0, 0.0, 0.0, float(r), math.nan, math.nan]
        return torch.tensor(vals, dtype=f64, device=rows.device), (r, 0, width)
    s1 = rows.sum(1, dtype=f32)
    nrm = torch.linalg.vector_norm(rows, 2, dim=1, dtype=f32)
    lo, hi = torch.aminmax(rows)
    idx, g = _bad_rows_first(rows, nrm)
    nz = torch.linalg.vector_norm(_sign(rows, sign_out), 2, dim=1, dtype=f32)
    nz = nz.square_().round_()
    # Gathered rows are counted from g; other bad rows (only beyond k of them) count as
    # wholly non-zero: sign(NaN) is 0 on CPU, so their sign count is no bound.
    fin = torch.isfinite(nrm)
    nz = torch.where(fin, nz, float(width)).index_fill_(0, idx, 0.0)
    out = torch.stack(
        [
            s1.sum(dtype=f64),
            torch.linalg.vector_norm(nrm, 2, dtype=f64),
            nz.sum(dtype=f64),
            torch.count_nonzero(g).to(f64),
            torch.count_nonzero(g * 0).to(f64),  # NaN exactly where g is not finite
            fin.sum(dtype=f64),
            lo.to(f64),
            hi.to(f64),
        ]
    )
    return out, (r, len(idx), width)


def single_to_raw(single: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """``RAW`` columns (..., NRAW) from ``SINGLE`` columns (..., NSINGLE) (host side)."""
    r, k, width = shape
    s = np.asarray(single, np.float64)
    bad_rows = r - s[..., 5]
    beyond = np.maximum(bad_rows - k, 0.0)  # bad rows not gathered
    with np.errstate(invalid="ignore"):
        absmax = np.maximum(s[..., 7], -s[..., 6])  # NaN stays NaN
    return np.stack(
        [
            s[..., 0],
            s[..., 1] ** 2,
            np.rint(s[..., 2] + s[..., 3]),
            np.rint(s[..., 4] + beyond * width),
            absmax,
        ],
        axis=-1,
    )


def tensor_hist(x: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Fixed-bin counts (NBINS,) float64 of one tensor; non-finite values are not counted.
    ``scratch``: an int32 buffer of x's shape for the codes (optional)."""
    x = x.detach()
    codes = _codes(x if x.is_floating_point() else x.float(), scratch).reshape(-1)
    counts = count_codes(codes, CODES)
    return counts @ code_map_on(counts.device)
