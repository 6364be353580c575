"""Which findings of a live run are new: each problem is reported once.

A finding is *the same* as one already reported when it has the same signature, its
layers overlap (or either has none) and its step range overlaps (or either has none).
The reported one then grows to cover both, so a finding whose range merely grows as the
run goes on, or that a trailing window shows a later part of, is never new; a problem of
the same signature at other steps or in other layers is.
"""

from __future__ import annotations

from dataclasses import dataclass

from runlens.findings import Finding


def same(a: Finding, b: Finding) -> bool:
    """Same signature, overlapping layers (or either none), overlapping steps (or either
    none)."""
    if a.signature != b.signature:
        return False
    if a.layers and b.layers and not set(a.layers).intersection(b.layers):
        return False
    return a.steps is None or b.steps is None or not (
        a.steps[1] < b.steps[0] or a.steps[0] > b.steps[1]
    )


@dataclass
class _Known:
    signature: str
    layers: set[str]
    steps: tuple[int, int] | None


class Seen:
    """The findings reported so far, grown as they are seen again."""

    def __init__(self) -> None:
        self._known: list[_Known] = []

    def __len__(self) -> int:
        return len(self._known)

    def is_new(self, f: Finding) -> bool:
        """True (and remember it) when no reported finding is the same as ``f``."""
        for k in self._known:
            if k.signature != f.signature:
                continue
            if k.layers and f.layers and not k.layers.intersection(f.layers):
                continue
            if k.steps is not None and f.steps is not None:
                if f.steps[1] < k.steps[0] or f.steps[0] > k.steps[1]:
                    continue
                k.steps = (min(k.steps[0], f.steps[0]), max(k.steps[1], f.steps[1]))
            elif f.steps is not None:
                k.steps = f.steps
            k.layers.update(f.layers)
            return False
        self._known.append(_Known(f.signature, set(f.layers), f.steps))
        return True
