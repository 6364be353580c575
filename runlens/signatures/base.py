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
* ``detect(ctx, p)`` — returns findings (possibly none). It never prints and never opens
  files: it reads only through the :class:`~runlens.context.Context`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    from runlens.context import Context
    from runlens.findings import Finding, Severity

Category = Literal["curve", "layer", "system", "sanity"]
DOC_SECTIONS = ("What it detects", "Why it matters", "Evidence", "How to fix", "References")


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
