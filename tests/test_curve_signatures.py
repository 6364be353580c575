"""Curve signatures on real recorded training: fresh recordings, threshold overrides,
scale invariance, odd input, documentation."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from runlens_collect import format as fmt

import runlens
from runlens.series import ema_debiased
from runlens.signatures import CURVE_SIGNATURES
from runlens.signatures.base import DOC_SECTIONS

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sample_runs.scenarios import by_name  # noqa: E402 (needs ROOT on sys.path)

SAMPLES = ROOT / "sample_runs"
CURVE_NAMES = tuple(s.name for s in CURVE_SIGNATURES)
SERIOUS = ("error", "warning")


def serious(report: runlens.Report) -> set[str]:
    return {f.signature for f in report.findings if f.severity in SERIOUS}


def curve_findings(path: Path, **kw: object) -> set[str]:
    return serious(runlens.analyze(path, runlens.AnalyzeOptions(only=CURVE_NAMES, **kw)))


# -- fresh recordings: the whole path (train → collector → analyzer) works today ---------

FRESH = ("healthy-classifier", "loss-spike", "val-below-train", "noisy-loss")


@pytest.fixture(scope="session")
def fresh_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fresh_curve_runs")
    out = {}
    for name in FRESH:
        by_name(name).record(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", FRESH)
def test_fresh_recording_gives_the_expected_diagnosis(fresh_runs: dict[str, Path], name: str):
    got = curve_findings(fresh_runs[name])
    expect = set(by_name(name).expect)
    assert got == expect, f"{name}: expected {expect or 'healthy'}, got {got}"


# -- evidence is consistent with the verdict ---------------------------------------------

_OPS = {
    ">": np.greater,
    ">=": np.greater_equal,
    "<": np.less,
    "<=": np.less_equal,
    "|·| <=": lambda v, t: abs(v) <= t,
}


@pytest.mark.parametrize("name", [n for n in CURVE_NAMES if n != "nan-inf"])
def test_finding_evidence_holds_against_its_thresholds(name: str) -> None:
    report = runlens.analyze(SAMPLES / name, runlens.AnalyzeOptions(only=(name,)))
    (f,) = [f for f in report.findings if f.signature == name]
    compared = [e for e in f.evidence if e.threshold is not None]
    assert compared, "a finding must show at least one number against its threshold"
    for e in compared:
        assert _OPS[e.op](e.value, e.threshold), f"{name}: {e} does not hold"
    assert any(ch.isdigit() for ch in f.summary)  # the summary carries the numbers
    assert f.causes and f.fix


# -- overrides change the verdict ---------------------------------------------------------


def test_raising_a_threshold_silences_a_finding() -> None:
    path = SAMPLES / "loss-spike"
    assert "loss-spike" in curve_findings(path)
    # the injected spikes score ~400σ; nothing reaches 10 000σ
    assert "loss-spike" not in curve_findings(path, overrides={"loss-spike": {"z": 1e4}})


def test_lowering_a_threshold_flags_a_healthy_run() -> None:
    path = SAMPLES / "healthy-classifier"
    assert curve_findings(path) == set()
    got = curve_findings(path, overrides=runlens.parse_set(["noisy-loss.max_noise=0.01"]))
    assert got == {"noisy-loss"}


def test_unknown_parameter_is_a_clean_error() -> None:
    with pytest.raises(runlens.OptionError, match="no parameter"):
        runlens.parse_set(["loss-spike.nope=1"])


# -- scale invariance: the verdicts do not depend on the units of the loss ----------------


def _copy(src: Path, dst: Path, factor: float) -> Path:
    """Copy of a run with its losses multiplied by ``factor``, declared a regression run
    (chance level ln(C) is tied to the units, so it is taken out of the comparison)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("layers"))
    for seg in (dst / fmt.SCALARS_DIR).glob(fmt.SEGMENT_GLOB):
        t = pq.read_table(seg)
        names = t.column("name").cast(pa.string()).to_numpy(zero_copy_only=False)
        values = t.column("value").to_numpy(zero_copy_only=False).copy()
        values[np.isin(names, ["train/loss", "val/loss"])] *= factor
        t = t.set_column(t.schema.get_field_index("value"), "value", pa.array(values))
        fmt.write_segment(t, seg)
    meta = json.loads((dst / fmt.RUN_JSON).read_text())
    meta["config"]["task"] = "regression"
    fmt.write_json_atomic(meta, dst / fmt.RUN_JSON)
    return dst


# underfitting is not here: "high" means high against the chance level ln(C), which is in
# the units of a cross-entropy loss; on a regression it does not run (next test).
@pytest.mark.parametrize(
    "name", ["healthy-regression", "loss-divergence", "loss-flat", "overfitting"]
)
def test_verdict_is_scale_invariant(tmp_path: Path, name: str) -> None:
    ref = curve_findings(_copy(SAMPLES / name, tmp_path / "x1", 1.0))
    assert set(by_name(name).expect) <= ref
    for factor in (1e-20, 1e20):
        assert curve_findings(_copy(SAMPLES / name, tmp_path / f"x{factor}", factor)) == ref


def test_underfitting_needs_the_chance_level(tmp_path: Path) -> None:
    """The underfitting sample is found against ln(8); declared a regression (no chance
    level) the same curves are not judged, and the coverage says why."""
    assert "underfitting" in curve_findings(SAMPLES / "underfitting")
    report = runlens.analyze(_copy(SAMPLES / "underfitting", tmp_path / "reg", 1.0))
    assert "underfitting" not in {f.signature for f in report.findings}
    (skip,) = [s for s in report.skipped if s.signature == "underfitting"]
    assert skip.kind == "not-applicable"
    assert "chance level" in skip.reason and "regression" in skip.reason


# -- odd input never raises ----------------------------------------------------------------


def write_run(path: Path, series: dict[str, np.ndarray], config: dict | None = None) -> Path:
    """A run with only scalars, written in the format contract (no collector)."""
    path.mkdir(parents=True)
    meta = fmt.new_run_json("0" * 32, path.name, time.time())
    meta.update(status=fmt.STATUS_FINISHED, config=config or {"num_classes": 10})
    fmt.write_json_atomic(meta, path / fmt.RUN_JSON)
    steps, names, values = [], [], []
    for name, v in series.items():
        v = np.asarray(v, dtype=np.float64)
        steps += list(range(v.size))
        names += [name] * v.size
        values += v.tolist()
    table = pa.table(
        {
            "step": pa.array(steps, pa.int64()),
            "wall_time": pa.array(np.arange(len(steps), dtype=np.float64)),
            "name": pa.array(names, pa.string()).dictionary_encode(),
            "value": pa.array(values, pa.float64()),
        }
    ).cast(fmt.SCALARS_SCHEMA)
    fmt.write_segment(table, fmt.segment_path(path, fmt.SCALARS_DIR, 0, 0))
    return path


_rng = np.random.default_rng(0)
ODD = {
    "empty": np.array([]),
    "one": np.array([2.3]),
    "two": np.array([2.3, np.nan]),
    "all-nan": np.full(200, np.nan),
    "all-inf": np.full(200, np.inf),
    "zeros": np.zeros(200),
    "negative": -np.linspace(1, 5, 200),
    "huge": 1e300 * (1 + _rng.random(200)),
    "tiny": 1e-300 * (1 + _rng.random(200)),
    "alternating-inf": np.where(np.arange(200) % 2, np.inf, 1.0),
}


@pytest.mark.parametrize("kind", list(ODD))
def test_odd_curves_never_raise(tmp_path: Path, kind: str) -> None:
    loss = ODD[kind]
    run = write_run(tmp_path / kind, {"train/loss": loss, "val/loss": loss[::10]})
    report = runlens.analyze(run, runlens.AnalyzeOptions(only=CURVE_NAMES))
    assert not [s for s in report.skipped if "internal error" in s.reason], report.skipped
    got = serious(report)
    if kind in ("empty", "one", "zeros"):
        assert got == set()
    if kind in ("all-nan", "all-inf", "alternating-inf", "two"):
        assert "nan-inf" in got


def test_constant_loss_is_flat_not_anything_else(tmp_path: Path) -> None:
    run = write_run(tmp_path / "const", {"train/loss": np.full(300, 2.302585)})
    # ln(10) with num_classes 10: flat, and at the chance level (explained by loss-flat)
    report = runlens.analyze(run, runlens.AnalyzeOptions(only=CURVE_NAMES))
    assert serious(report) == {"loss-flat", "not-learning"}
    (nl,) = [f for f in report.findings if f.signature == "not-learning"]
    assert nl.explained_by == "loss-flat"
    other = write_run(tmp_path / "const3", {"train/loss": np.full(300, 3.0)})
    assert curve_findings(other) == {"loss-flat"}  # flat, but not at ln(10)


# -- documentation ------------------------------------------------------------------------


@pytest.mark.parametrize("sig", CURVE_SIGNATURES, ids=lambda s: s.name)
def test_signature_is_documented(sig: type) -> None:
    doc = sig.doc()
    for section in DOC_SECTIONS:
        assert f"{section}:" in doc, f"{sig.name} lacks '{section}'"
    # the loss curve it reads comes first (val-spike reads the validation loss only)
    assert sig.requires and any(c in sig.requires[0] for c in ("train/loss", "val/loss"))
    for p in sig.params:
        assert p.doc and p.source, f"{sig.name}.{p.name} needs a doc and a source"


def test_final_loss_is_the_level_the_run_ended_at_not_a_carried_spike(tmp_path):
    """A one-step blow-up near the end leaves the EMA's last value ~10^6 for many steps;
    the summary's final loss is the level the run actually ended at."""
    loss = np.linspace(2.3, 1.0, 200) + 0.01 * _rng.standard_normal(200)
    loss[190] = 1e7
    run = write_run(tmp_path / "late-spike", {"train/loss": loss})
    final = runlens.analyze(run).summary.final_train_loss
    assert final is not None and 0.95 < final < 1.1
    assert ema_debiased(loss, 0.9)[-1] > 1e5  # what the EMA's last value says
