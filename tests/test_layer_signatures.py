"""Finer checks of the layer signatures on real recorded training runs.

The committed sample runs (``sample_runs/<name>``, recorded by ``layer_scenarios.py`` with
the real collector) are analyzed here; two extra tiny runs are recorded on the fly: one
without activation statistics and one with a batch of a single example.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from runlens.engine import AnalyzeOptions, analyze
from runlens.findings import Finding, Report
from runlens.links import CAUSES
from runlens.run import load_run
from runlens.signatures import LAYER_SIGNATURES, REGISTRY
from runlens.signatures.base import DOC_SECTIONS

SAMPLES = Path(__file__).resolve().parent.parent / "sample_runs"


@pytest.fixture(scope="session")
def reports() -> dict[str, Report]:
    cache: dict[str, Report] = {}

    class _Lazy(dict):  # analyze each sample once, on first use
        def __missing__(self, name: str) -> Report:
            cache[name] = analyze(SAMPLES / name)
            self[name] = cache[name]
            return cache[name]

    return _Lazy()


def _one(report: Report, signature: str) -> Finding:
    found = [f for f in report.findings if f.signature == signature]
    assert len(found) == 1, [f.signature for f in report.findings]
    return found[0]


def _names(report: Report) -> set[str]:
    return {f.signature for f in report.findings if f.severity in ("warning", "error")}


# -- evidence names the right layers and steps --------------------------------------------


def test_frozen_layer_names_the_detached_layer(reports: dict[str, Report]) -> None:
    f = _one(reports["frozen-layer"], "frozen-layer")
    # `inp` sits before the stray .detach(); `hidden` and `out` train normally.
    assert set(f.layers) == {"inp.weight", "inp.bias"}
    assert "no gradient" in f.summary and "`inp.weight`" in f.summary
    run = load_run(SAMPLES / "frozen-layer")
    assert f.steps is not None and f.steps[1] == run.meta["last_step"]


def test_vanishing_gradients_names_the_earliest_layers(reports: dict[str, Report]) -> None:
    f = _one(reports["vanishing-gradients"], "vanishing-gradients")
    run = load_run(SAMPLES / "vanishing-gradients")
    weights = [n for n in run.layer_names if n.endswith("weight")]
    assert f.layers[0] == weights[0]
    assert set(f.layers) <= set(weights[: len(weights) // 2])
    ratio = next(e for e in f.evidence if e.name.startswith("first/last ratio"))
    assert ratio.threshold is not None and ratio.value < ratio.threshold / 100  # wide margin
    # The numbers in the summary are the measured ones.
    g = run.layer_matrix("grad", "norm")
    assert g is not None
    first = np.nanmedian(g.column(weights[0])[g.steps > 10])
    assert first < 1e-6


def test_dead_relu_names_the_layer_with_the_negative_bias(reports: dict[str, Report]) -> None:
    f = _one(reports["dead-relu"], "dead-relu")
    assert f.layers == ("1",)  # the ReLU after `0`, whose biases start at -2.5
    dead = next(e for e in f.evidence if e.name.startswith("dead fraction of 1"))
    assert dead.value >= 0.7


def test_saturation_and_explosion_name_layers(reports: dict[str, Report]) -> None:
    sat = _one(reports["saturated-activations"], "saturated-activations")
    assert sat.layers[0] == "1"  # the first Tanh, fed with inputs scaled ×20
    exp = _one(reports["activation-explosion"], "activation-explosion")
    run = load_run(SAMPLES / "activation-explosion")
    act = run.layer_matrix("activation", "norm")
    assert act is not None and act.layers[-1] in exp.layers and act.layers[0] in exp.layers


def test_update_ratio_findings_quote_the_heuristic(reports: dict[str, Report]) -> None:
    tiny = _one(reports["tiny-updates"], "tiny-updates")
    large = _one(reports["large-updates"], "large-updates")
    assert "1e-3" in tiny.summary and "1e-3" in large.summary
    ratio = lambda f: next(e.value for e in f.evidence if e.name == "median update/weight ratio")  # noqa: E731
    assert ratio(tiny) < 1e-5 < 1e-3 < 0.04 < ratio(large)
    # Steps start after the early transient, not at step 0.
    assert tiny.steps is not None and tiny.steps[0] > 0


def test_logits_as_probabilities_quotes_the_floor(reports: dict[str, Report]) -> None:
    f = _one(reports["logits-as-probabilities"], "logits-as-probabilities")
    assert f.severity == "error"
    m = re.search(r"floor ([0-9.]+)", f.summary)
    assert m and abs(float(m.group(1)) - np.log1p(7 / np.e)) < 1e-3  # 8 classes


def test_input_bound_measures_the_wait(reports: dict[str, Report]) -> None:
    f = _one(reports["input-bound"], "input-bound")
    share = next(e for e in f.evidence if e.name.startswith("data share"))
    assert share.value > 0.6


# -- linking: root cause first -------------------------------------------------------------


def test_vanishing_gradients_explains_tiny_updates(reports: dict[str, Report]) -> None:
    r = reports["vanishing-gradients"]
    sigs = [f.signature for f in r.findings]
    root = _one(r, "vanishing-gradients")
    tiny = _one(r, "tiny-updates")
    assert tiny.explained_by == "vanishing-gradients"
    assert "tiny-updates" in root.explains and root.explained_by is None
    assert sigs.index("vanishing-gradients") < sigs.index("tiny-updates")


def test_exploding_gradients_ranked_before_the_nan_it_causes(reports: dict[str, Report]) -> None:
    r = reports["exploding-gradients"]
    # The loss also blows up to ~1e13 and stays (loss-divergence): another symptom of the
    # same root, so only the root's first place and the NaN's link are fixed here.
    sigs = [f.signature for f in r.findings]
    assert sigs[0] == "exploding-gradients" and "nan-inf" in sigs[1:]
    assert _one(r, "nan-inf").explained_by == "exploding-gradients"


@pytest.mark.parametrize(
    "sample", ["vanishing-gradients", "exploding-gradients", "tiny-updates", "large-updates"]
)
def test_each_root_cause_comes_before_what_it_explains(
    reports: dict[str, Report], sample: str
) -> None:
    r = reports[sample]
    sigs = [f.signature for f in r.findings]
    linked = [f for f in r.findings if f.explained_by is not None]
    assert linked, sigs  # these runs all have co-occurring findings
    assert r.findings[0].explained_by is None
    for f in linked:
        assert sigs.index(f.explained_by) < sigs.index(f.signature)
        assert f.signature in _one(r, f.explained_by).explains


def test_causes_table_names_only_known_signatures() -> None:
    # input-bound is about speed: it explains nothing and nothing explains it.
    layer_names = {s.name for s in LAYER_SIGNATURES} - {"input-bound"}
    mentioned = {c for causes in CAUSES.values() for c in causes} | set(CAUSES)
    assert layer_names <= mentioned
    for sym, causes in CAUSES.items():
        assert sym not in causes


# -- thresholds are parameters -------------------------------------------------------------


@pytest.mark.parametrize(
    ("sample", "signature", "param", "value"),
    [
        ("tiny-updates", "tiny-updates", "max_ratio", 1e-7),
        ("large-updates", "large-updates", "min_ratio", 1.0),
        ("dead-relu", "dead-relu", "dead_fraction", 0.95),
        ("vanishing-gradients", "vanishing-gradients", "ratio", 1e-9),
        ("input-bound", "input-bound", "data_fraction", 0.99),
    ],
)
def test_threshold_override_changes_the_verdict(
    reports: dict[str, Report], sample: str, signature: str, param: str, value: float
) -> None:
    assert signature in _names(reports[sample])
    r = analyze(SAMPLES / sample, AnalyzeOptions(overrides={signature: {param: value}}))
    assert signature not in {f.signature for f in r.findings}


# -- healthy real architectures raise nothing ----------------------------------------------


@pytest.mark.parametrize("sample", ["healthy-cnn-bn", "healthy-transformer"])
def test_healthy_architectures_are_clean(reports: dict[str, Report], sample: str) -> None:
    r = reports[sample]
    assert _names(r) == set(), [f.summary for f in r.findings]
    assert not [s for s in r.skipped if "internal error" in s.reason]
    # ...and the health table covers their layers (the encoder's ReLU is functional, so
    # only the CNN has ReLU modules with a dead fraction).
    assert any(row.grad_norm is not None for row in r.layers)
    if sample == "healthy-cnn-bn":
        assert any(row.dead_fraction is not None for row in r.layers)


# -- runs recorded here: no activation data, a batch of one --------------------------------


def _record(run_dir: Path, batch: int, steps: int, **collector_kw: object) -> None:
    torch = pytest.importorskip("torch")
    from runlens_collect import Collector

    torch.set_num_threads(1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with Collector(model, opt, run_dir=run_dir, config={"num_classes": 4}, **collector_kw) as c:
        for _ in range(steps):
            idx = torch.randint(0, 512, (batch,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            c.step(loss=loss)


def test_no_activation_data_skips_activation_signatures(tmp_path: Path) -> None:
    _record(tmp_path / "run", batch=32, steps=40, kinds=("weight", "grad", "update", "output"))
    r = analyze(tmp_path / "run")
    skipped = {s.signature: s.reason for s in r.skipped}
    for name in ("dead-relu", "saturated-activations", "activation-explosion"):
        assert "layers:activation" in skipped[name]
    assert not [s for s in r.skipped if "internal error" in s.reason]
    ran = {s.name for s in LAYER_SIGNATURES} - set(skipped)
    assert {"frozen-layer", "tiny-updates", "large-updates", "exploding-gradients"} <= ran


def test_batch_of_one_is_not_called_dead_relu(tmp_path: Path) -> None:
    _record(tmp_path / "run", batch=1, steps=60, activation_every=2)
    run = load_run(tmp_path / "run")
    dead = run.layer_matrix("activation", "frac_dead_units")
    assert dead is not None
    # With one example, every zero output counts as a "dead" unit: ~half of them.
    assert np.nanmedian(dead.column("1")) >= 0.3
    r = analyze(run)
    assert "dead-relu" not in {f.signature for f in r.findings}
    # The guard is the min_examples parameter: lowering it lets the raw numbers through.
    r2 = analyze(
        tmp_path / "run",
        AnalyzeOptions(overrides={"dead-relu": {"min_examples": 1, "dead_fraction": 0.3}}),
    )
    assert "dead-relu" in {f.signature for f in r2.findings}


# -- documentation and coverage ------------------------------------------------------------


@pytest.mark.parametrize("sig", LAYER_SIGNATURES, ids=lambda s: s.name)
def test_layer_signature_is_documented(sig: type) -> None:
    doc = sig.doc()
    for section in DOC_SECTIONS:
        assert f"{section}:" in doc, f"{sig.name}: missing section {section!r}"
    assert REGISTRY[sig.name] is sig
    assert sig.requires and sig.params
    for p in sig.params:
        assert p.doc and p.source


def test_every_layer_signature_has_a_sample_run() -> None:
    import sys

    sys.path.insert(0, str(SAMPLES.parent))
    from sample_runs.layer_scenarios import SCENARIOS

    expected = {name for s in SCENARIOS for name in s.expect}
    assert {s.name for s in LAYER_SIGNATURES} <= expected
    for s in SCENARIOS:
        assert (SAMPLES / s.name / "run.json").exists(), f"{s.name} not recorded"
