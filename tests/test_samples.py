"""The committed sample runs are diagnosed as their scenarios say.

Every scenario of ``sample_runs/scenarios.py`` was recorded from real CPU training by
``sample_runs/make_samples.py``. Each run must produce every expected signature at warning
or error severity, and a healthy run (``expect == ()``) no warning or error at all.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import runlens
from runlens.signatures import BUG_SIGNATURES, CURVE_SIGNATURES, LAYER_SIGNATURES

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sample_runs.scenarios import SCENARIOS  # noqa: E402 (needs ROOT on sys.path)

SERIOUS = ("error", "warning")


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_sample_run_diagnosis(scenario) -> None:
    run_dir = ROOT / "sample_runs" / scenario.name
    assert (run_dir / "run.json").is_file(), (
        f"{run_dir} is not recorded: python sample_runs/make_samples.py --only {scenario.name}"
    )
    report = runlens.analyze(run_dir)
    serious = {f.signature: f for f in report.findings if f.severity in SERIOUS}
    crashed = [s for s in report.skipped if s.reason.startswith("internal error")]
    assert not crashed, crashed
    got = {k: f.summary for k, f in serious.items()}
    if not scenario.expect:
        assert not serious, got
    for name in scenario.expect:
        assert name in serious, f"{name} not reported; got {got}"
        f = serious[name]
        assert f.summary and f.fix and f.evidence and f.steps is not None
        assert 0.0 < f.confidence <= 1.0


def test_every_signature_has_a_triggering_sample() -> None:
    expected = {name for s in SCENARIOS for name in s.expect}
    checked = [*CURVE_SIGNATURES, *LAYER_SIGNATURES, *BUG_SIGNATURES]
    missing = sorted(sig.name for sig in checked if sig.name not in expected)
    assert not missing, f"signatures with no sample run that must trigger them: {missing}"


def test_there_are_healthy_samples() -> None:
    assert sum(1 for s in SCENARIOS if not s.expect) >= 2
