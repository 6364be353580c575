"""Which findings of a live run are new: each problem is reported once.

A finding is *the same* as one already reported when it has the same signature, its
layers overlap (or either has none) and its step range overlaps the reported one's (or
either has none) or *continues* it: the reported one reached the end of the data of its
pass (an ongoing problem) and the new one starts later. The reported one then grows to
cover both. So a finding whose range merely grows as the run goes on, whose start moves
with it (a loss climbing exponentially has its half-way point near the end at every
pass), or that a trailing window shows a later part of, is never new; a problem of the
same signature that ended and came back later, or in other layers, is.
"""

from __future__ import annotations

from dataclasses import dataclass

from runlens.findings import Finding


@dataclass
class Sighting:
    """A finding as seen in one pass: its range, and whether it reached the last step
    of the data that pass saw (ongoing)."""

    signature: str
    layers: set[str]
    steps: tuple[int, int] | None
    ongoing: bool

    @classmethod
    def of(cls, f: Finding, last_step: int | None) -> Sighting:
        ongoing = f.steps is not None and last_step is not None and f.steps[1] >= last_step
        return cls(f.signature, set(f.layers), f.steps, ongoing)

    def matches(self, f: Finding) -> bool:
        """``f`` (seen later) is this same problem."""
        if self.signature != f.signature:
            return False
        if self.layers and f.layers and not self.layers.intersection(f.layers):
            return False
        if self.steps is None or f.steps is None:
            return True
        overlap = not (f.steps[1] < self.steps[0] or f.steps[0] > self.steps[1])
        return overlap or (self.ongoing and f.steps[0] > self.steps[1])

    def absorb(self, f: Finding, last_step: int | None) -> None:
        later = Sighting.of(f, last_step)
        if self.steps is not None and f.steps is not None:
            self.steps = (min(self.steps[0], f.steps[0]), max(self.steps[1], f.steps[1]))
        elif f.steps is not None:
            self.steps = f.steps
        self.layers |= later.layers
        self.ongoing = later.ongoing


class Seen:
    """The findings reported so far, grown as they are seen again."""

    def __init__(self) -> None:
        self._known: list[Sighting] = []

    def __len__(self) -> int:
        return len(self._known)

    def is_new(self, f: Finding, last_step: int | None) -> bool:
        """True (and remember it) when no reported finding is the same as ``f``;
        ``last_step`` is the last step of the data ``f`` was found in."""
        for k in self._known:
            if k.matches(f):
                k.absorb(f, last_step)
                return False
        self._known.append(Sighting.of(f, last_step))
        return True
