"""The sample-run table: every recorded sample run and the diagnosis it must produce.

Each :class:`Scenario` trains a tiny real model on CPU and records it with the collector;
``expect`` lists the signatures that MUST be reported at warning or error severity
(an empty tuple means a healthy run: no warning or error at all). ``tests/test_samples.py``
walks this table; ``make_samples.py`` re-records it.
"""

from __future__ import annotations

from sample_runs.bug_data_scenarios import SCENARIOS as BUG_DATA_SCENARIOS
from sample_runs.bug_scenarios import SCENARIOS as BUG_SCENARIOS
from sample_runs.common import Scenario
from sample_runs.curve_scenarios import SCENARIOS as CURVE_SCENARIOS
from sample_runs.layer_scenarios import SCENARIOS as LAYER_SCENARIOS
from sample_runs.sanity_scenarios import SCENARIOS as SANITY_SCENARIOS

__all__ = ["SCENARIOS", "Scenario", "by_name"]

SCENARIOS: list[Scenario] = [
    *CURVE_SCENARIOS,
    *LAYER_SCENARIOS,
    *SANITY_SCENARIOS,
    *BUG_SCENARIOS,
    *BUG_DATA_SCENARIOS,
]

_names = [s.name for s in SCENARIOS]
if len(set(_names)) != len(_names):
    raise RuntimeError(
        f"duplicate scenario names: {sorted(n for n in _names if _names.count(n) > 1)}"
    )


def by_name(name: str) -> Scenario:
    for s in SCENARIOS:
        if s.name == name:
            return s
    raise KeyError(f"no scenario {name!r} (have: {', '.join(_names)})")
