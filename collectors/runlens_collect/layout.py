"""The typed layout of a step's packed statistics: the one protocol between the training
thread, which packs a step into one float64 buffer, and the writer thread, which decodes it.

A step's buffer is a run of *sections* (rows of one kind for some layers), then the
step's device scalars::

    [section 0 | section 1 | ... | scalar 0, scalar 1, ...]
    section = rows x width values (RAW or SINGLE columns, then extra), then rows x NBINS
              histogram counts when ``hist``

``Section`` describes one section's shape and how to decode it; ``StepLayout`` is the
ordered sections plus the scalar names, with offsets and the total size computed once.
Both are immutable and built once: the statistics modules build their sections at setup
(or once per tensor shape), and ``LayoutCache`` hands out the same ``StepLayout`` for the
same sections and names, so a step costs a dict lookup, and the writer groups steps by
layout identity. The training thread checks the packed size against the layout before
the copy; the writer checks the buffer against the layout before decoding, and reports a
mismatch (``LayoutError``) as an internal error through the collector's one warning.

Only what varies from step to step travels beside the layout in the package: each
section's ``missing`` mask (rows whose tensor had no value this step) and the step of each
device scalar.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from runlens_collect import format as fmt
from runlens_collect.stats import NBINS, NRAW, NSINGLE

MAX_CACHED = 1024
"""Layouts (and per-shape sections) kept before a cache starts over: a run whose tensor
shapes never repeat (variable sequence lengths) must not grow memory without bound."""


class LayoutError(ValueError):
    """A package disagrees with its layout: a bug in the collector, never the user's."""


@dataclass(frozen=True, eq=False)
class Section:
    """Rows of one kind in a step's buffer. Compared by identity: built once and reused.

    Attributes:
        name: unique within a step (``grad``, ``weight``, ``update``, ``output``,
            ``activation:<module path>``); ``ratio_ref`` refers to sections by it.
        kind: the rows' kind (format.KINDS).
        layers: int32 layer ids (into the writer's layer-name list), one per row.
        numels: int64 element count of each row's tensor.
        extra: columns after the RAW ones (e.g. ``frac_dead_units``).
        hist: NBINS histogram counts per row follow the columns.
        pads: zero padding per row counted in the histogram's zero bin (flat layouts).
        negate: the data holds -x (updates measured as before - after).
        ratio_ref: name of an earlier section holding ``||w_before||²`` per row, the
            denominator of ``update_ratio``.
        write: False when the section only feeds another one (``ratio_ref``).
        grad_norm: emit the total L2 norm of the non-missing rows as ``grad_norm``.
        has_missing: a per-step missing mask travels with the package.
        single: one tensor's SINGLE values instead of RAW: (rows, gathered rows, row width).
        derived: columns derived on the host from the SINGLE values, before ``extra``:
            ``min``, ``max``, ``row_sum_mean`` (the sum over the rows' count).
    """

    name: str
    kind: str
    layers: np.ndarray
    numels: np.ndarray
    extra: tuple[str, ...] = ()
    hist: bool = False
    pads: np.ndarray | None = None
    negate: bool = False
    ratio_ref: str | None = None
    write: bool = True
    grad_norm: bool = False
    has_missing: bool = False
    single: tuple[int, int, int] | None = None
    derived: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in fmt.KINDS:
            raise LayoutError(f"section {self.name!r}: unknown kind {self.kind!r}")
        if len(self.layers) != len(self.numels):
            raise LayoutError(f"section {self.name!r}: {len(self.layers)} layers, numels differ")
        if self.pads is not None and len(self.pads) != len(self.layers):
            raise LayoutError(f"section {self.name!r}: pads do not match the rows")
        if self.single is not None and len(self.layers) != 1:
            raise LayoutError(f"section {self.name!r}: a single-tensor section has one row")
        if self.derived and self.single is None:
            raise LayoutError(f"section {self.name!r}: derived columns need SINGLE values")

    @property
    def rows(self) -> int:
        return len(self.layers)

    @property
    def width(self) -> int:
        return (NSINGLE if self.single else NRAW) + len(self.extra)

    @property
    def size(self) -> int:
        """float64 values of this section in the buffer."""
        return self.rows * (self.width + (NBINS if self.hist else 0))


@dataclass(frozen=True, eq=False)
class StepLayout:
    """The sections of one step's buffer in order, then its device scalars' names."""

    sections: tuple[Section, ...]
    scalars: tuple[str, ...] = ()
    offsets: tuple[int, ...] = field(init=False)
    ratio_index: tuple[int | None, ...] = field(init=False)
    scalar_offset: int = field(init=False)
    size: int = field(init=False)

    def __post_init__(self) -> None:
        offsets, ratio, index = [], [], {}
        off = 0
        for i, s in enumerate(self.sections):
            if s.name in index:
                raise LayoutError(f"section {s.name!r} twice in one step")
            ref = None
            if s.ratio_ref is not None:
                ref = index.get(s.ratio_ref)
                if ref is None or self.sections[ref].rows != s.rows:
                    raise LayoutError(
                        f"section {s.name!r}: ratio_ref {s.ratio_ref!r} is not an earlier "
                        "section with the same rows"
                    )
            index[s.name] = i
            offsets.append(off)
            ratio.append(ref)
            off += s.size
        object.__setattr__(self, "offsets", tuple(offsets))
        object.__setattr__(self, "ratio_index", tuple(ratio))
        object.__setattr__(self, "scalar_offset", off)
        object.__setattr__(self, "size", off + len(self.scalars))

    def check(
        self, size: int, missing: Sequence[np.ndarray | None], scalar_steps: Sequence[int]
    ) -> None:
        """Raise LayoutError unless a package's buffer and per-step data fit this layout."""
        if size != self.size:
            raise LayoutError(
                f"internal error: the buffer holds {size} values, its layout {self.size}"
            )
        if len(scalar_steps) != len(self.scalars):
            raise LayoutError(
                f"internal error: {len(scalar_steps)} scalar steps for "
                f"{len(self.scalars)} device scalars"
            )
        if len(missing) != len(self.sections):
            raise LayoutError(
                f"internal error: {len(missing)} missing masks for {len(self.sections)} sections"
            )
        for s, m in zip(self.sections, missing, strict=True):
            if (m is not None) != s.has_missing or (m is not None and m.shape != (s.rows,)):
                raise LayoutError(f"internal error: section {s.name!r}: bad missing mask")


class LayoutCache:
    """One StepLayout per distinct (sections, scalar names): built once, then looked up."""

    def __init__(self) -> None:
        self._layouts: dict[tuple[tuple[Section, ...], tuple[str, ...]], StepLayout] = {}

    def get(self, sections: tuple[Section, ...], scalars: tuple[str, ...]) -> StepLayout:
        key = (sections, scalars)
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) >= MAX_CACHED:
                self._layouts.clear()
            layout = self._layouts[key] = StepLayout(sections, scalars)
        return layout
