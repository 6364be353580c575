"""What a signature is: a named detector over a run's series, documented where it lives.

A signature module defines one subclass of :class:`Signature` with

* ``name`` — stable kebab-case name (``exploding-gradients``); tools and tests depend on it;
* a docstring with the sections *What it detects*, *Why it matters*, *Evidence*,
  *How to fix* and *References* (``runlens explain NAME`` prints it; a test checks them);
* ``summary`` — one line for the signature table;
* ``requires`` — the series it needs: scalar names (``train/loss``), alternatives joined
  by ``|`` (``val/loss|val/accuracy``), or ``layers:<kind>`` for layer statistics. When one
  is absent the engine skips the signature with a note instead of calling it;
* ``params`` — its thresholds, each with a default, a meaning and a source; users override
  them with ``--set NAME.PARAM=VALUE``;
* ``needs`` — what it reads from the layers table (runlens.needs: ``LayerStat(kind, stat)``
  matrices, ``NONFINITE_ROWS``), so the engine reads everything in one pass before any
  signature runs. Reading something undeclared still works (one more pass);
* ``detect(ctx, p)`` — returns findings (possibly none). It never prints and never opens
  files: it reads only through the :class:`~runlens.context.Context`.

Returning ``[]`` means "looked and found nothing". When a signature cannot look (too few
points, a statistic all NaN, an unknown task, nothing of the kind it checks in this
model), ``detect`` raises :class:`NotChecked` instead; the report's coverage then lists it
as not checked with the reason, and a clean report does not claim it. When only a part of
it cannot run, ``detect`` calls ``ctx.not_checked_part(part, reason, kind)`` and goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

if TYPE_CHECKING:
    from runlens.context import Context
    from runlens.findings import Finding, Severity, SkipKind
    from runlens.needs import Need

Category = Literal["curve", "layer", "system", "sanity", "bug"]
"""``bug``: a mistake in the training code itself (docs/silent-bugs.md), not a symptom."""


class NotChecked(Exception):
    """Raised by ``detect`` when the signature could not look at this run.

    ``kind`` is one of :data:`runlens.findings.SKIP_KINDS` (``too-few-points``,
    ``not-recorded``, ``task-unknown``, ``not-applicable``); ``reason`` says what was
    missing in numbers, e.g. ``only 7 train/loss points after the warm-up, needs 20``.
    """

    def __init__(self, reason: str, kind: SkipKind = "too-few-points") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind: SkipKind = kind

    @classmethod
    def too_few(cls, have: int, what: str, need: int, where: str = "") -> NotChecked:
        """``only 7 train/loss points after the warm-up, needs 20``."""
        where = f" {where}" if where else ""
        return cls(f"only {have} {what}{where}, needs {need}", "too-few-points")

    @classmethod
    def merge(cls, parts: list[NotChecked]) -> NotChecked:
        """One NotChecked for a signature none of whose parts could run (the first part's
        kind, unless one of them is a wanted check: too-few-points beats not-applicable)."""
        wanted = [p for p in parts if p.kind != "not-applicable"]
        kind = (wanted or parts)[0].kind
        return cls("; ".join(dict.fromkeys(p.reason for p in parts)), kind)


DOC_SECTIONS = ("What it detects", "Why it matters", "Evidence", "How to fix", "References")


T = TypeVar("T")


def run_parts(ctx: Context, parts: Sequence[tuple[str, Callable[[], T]]]) -> list[T | None]:
    """Run the independent parts of a signature (e.g. gradient growth over steps and over
    depth). A part that raises :class:`NotChecked` gives None and is noted in the coverage
    as a part not checked; when no part could run the whole signature is not checked."""
    results: list[T | None] = []
    failed: list[tuple[str, NotChecked]] = []
    for name, fn in parts:
        try:
            results.append(fn())
        except NotChecked as nc:
            failed.append((name, nc))
            results.append(None)
    if failed and len(failed) == len(parts):
        raise NotChecked.merge([nc for _, nc in failed])
    for name, nc in failed:
        ctx.not_checked_part(name, nc.reason, nc.kind)
    return results


@dataclass(frozen=True)
class Param:
    """One threshold of a signature."""

    name: str
    default: float
    doc: str
    source: str = "runlens default, tuned on the shipped sample runs"


class Params:
    """Resolved parameter values of one signature: ``p.threshold`` or ``p["threshold"]``."""

    def __init__(self, values: dict[str, float]) -> None:
        self._values = dict(values)

    def __getattr__(self, name: str) -> float:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> float:
        return self._values[name]

    def as_dict(self) -> dict[str, float]:
        return dict(self._values)


class Signature:
    """Base class of every signature. Subclasses set the class attributes below."""

    name: ClassVar[str]
    summary: ClassVar[str]
    category: ClassVar[Category]
    severity: ClassVar[Severity]
    """Default severity of its findings (a finding may lower or raise it)."""
    requires: ClassVar[tuple[str, ...]] = ()
    params: ClassVar[tuple[Param, ...]] = ()
    needs: ClassVar[tuple[Need, ...]] = ()

    def detect(self, ctx: Context, p: Params) -> list[Finding]:
        raise NotImplementedError

    @classmethod
    def defaults(cls) -> dict[str, float]:
        return {prm.name: prm.default for prm in cls.params}

    @classmethod
    def doc(cls) -> str:
        import inspect

        return inspect.cleandoc(cls.__doc__ or "")

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {
            "name": cls.name,
            "category": cls.category,
            "severity": cls.severity,
            "summary": cls.summary,
            "requires": list(cls.requires),
            "params": [
                {"name": p.name, "default": p.default, "doc": p.doc, "source": p.source}
                for p in cls.params
            ],
        }
