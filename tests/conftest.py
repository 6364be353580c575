"""Session-wide test settings."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from runlens_collect import collector
from runlens_collect.config import CollectorConfig


@dataclass(frozen=True)
class _FixedCadence(CollectorConfig):
    overhead: float | None = None


@pytest.fixture(autouse=True, scope="session")
def _fixed_cadence() -> Iterator[None]:
    """Collectors in tests record at their knobs' fixed cadences: the ``overhead`` budget
    thins the cadence by measured wall-clock time, which no test may depend on. Tests of
    the budget pass ``overhead=`` (and a fake clock) explicitly; ``settings=`` is untouched."""
    with pytest.MonkeyPatch.context() as mp:  # session scope: fixtures that record, too
        mp.setattr(collector, "CollectorConfig", _FixedCadence)
        yield
