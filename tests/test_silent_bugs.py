"""Silent bugs (issue 16): the collector's probes record what they claim, and the bug
signatures name the bug on fresh recordings of real training code — against ground truth
computed here, not against numbers copied from a run.

The committed bug/twin sample runs are walked by tests/test_samples.py; this file checks
the probes' numbers, the edge cases of each signature and the root-cause links.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from runlens_collect import Collector
from runlens_collect import format as fmt
from runlens_collect.probes import GradCarryProbe, InputProbe, ModeProbe, OptimizerProbe
from torch import nn

import runlens
from runlens.links import BUG_CAUSES, CAUSES

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_runs"


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))


def _scalar(run_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    s = runlens.load_run(run_dir).scalar(name)
    assert s is not None, f"{name} not recorded"
    return s.steps, s.values


def _findings(run_dir: Path, *names: str) -> dict[str, runlens.Finding]:
    report = runlens.analyze(run_dir, runlens.AnalyzeOptions(only=names or None))
    return {f.signature: f for f in report.findings}


def _evidence(f: runlens.Finding, name: str) -> float:
    (e,) = [e for e in f.evidence if e.name == name]
    return e.value


# -- the input probe ----------------------------------------------------------------------


def test_input_fingerprint_matches_the_batch_and_ignores_example_order(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 6)
    batches = [x, x[torch.randperm(8)], torch.randn(8, 6), torch.randn(5, 6)]
    with Collector(model, opt, run_dir=tmp_path) as col:
        for xb in batches:
            opt.zero_grad()
            model(xb).sum().backward()
            opt.step()
            col.step(loss=0.0)
            with torch.no_grad():
                model.eval()
                model(torch.randn(32, 6))
                model.train()
    _, s = _scalar(tmp_path, fmt.INPUT_SUM)
    _, sq = _scalar(tmp_path, fmt.INPUT_SUMSQ)
    _, proj = _scalar(tmp_path, fmt.INPUT_PROJ)
    _, examples = _scalar(tmp_path, fmt.INPUT_EXAMPLES)
    steps, eval_batch = _scalar(tmp_path, fmt.INPUT_EVAL_BATCH)
    w = torch.cos(1.61803 * torch.arange(6, dtype=torch.float32) + 0.5)
    for i, xb in enumerate(batches):
        assert s[i] == pytest.approx(float(xb.double().sum()), rel=1e-5, abs=1e-5)
        assert sq[i] == pytest.approx(float(xb.double().square().sum()), rel=1e-5)
        assert proj[i] == pytest.approx(float((xb.sum(0) * w).double().sum()), rel=1e-5, abs=1e-5)
    # Reordered examples: the same fingerprint (to float rounding); a new batch: another.
    assert sq[1] == pytest.approx(sq[0], rel=1e-6) and proj[1] == pytest.approx(proj[0], abs=1e-4)
    assert abs(sq[2] - sq[0]) > 1e-3 * sq[0]
    assert examples.tolist() == [8, 8, 8, 5]
    # The evaluation after step k is counted with step k + 1's forwards.
    assert steps.tolist() == [1, 2, 3] and eval_batch.tolist() == [32, 32, 32]


def test_eval_mode_training_is_still_fingerprinted(tmp_path: Path) -> None:
    model = _mlp().eval()  # trained in eval mode: the forwards are still the training ones
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Collector(model, opt, run_dir=tmp_path) as col:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 6)).sum().backward()
            opt.step()
            col.step(loss=0.0)
    _, examples = _scalar(tmp_path, fmt.INPUT_EXAMPLES)
    _, eval_grad = _scalar(tmp_path, fmt.MODE_EVAL_GRAD)
    assert examples.tolist() == [4, 4, 4] and eval_grad.tolist() == [1, 1, 1]


# -- the mode probe ---------------------------------------------------------------------------


def test_mode_counts_and_modules_out_of_step(tmp_path: Path) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Collector(model, opt, run_dir=tmp_path) as col:
        model.eval()
        with torch.no_grad():
            model(torch.randn(2, 6))  # an evaluation before any training forward
        model.train()
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(4, 6)).sum().backward()
            opt.step()
            col.step(loss=0.0)
            with torch.no_grad():
                model(torch.randn(4, 6))  # no-grad in training mode
            model.eval()
            model[2].train()  # dropout forced back into training mode
            with torch.no_grad():
                model(torch.randn(4, 6))
            model.train()
    counts = {n: _scalar(tmp_path, n)[1].tolist() for n in (
        fmt.MODE_TRAIN_GRAD, fmt.MODE_TRAIN_NOGRAD, fmt.MODE_EVAL_NOGRAD, fmt.MODE_EVAL_GRAD
    )}  # fmt: skip
    assert counts[fmt.MODE_TRAIN_GRAD] == [1, 1, 1, 1]
    assert counts[fmt.MODE_TRAIN_NOGRAD] == [0, 1, 1, 1]
    assert counts[fmt.MODE_EVAL_NOGRAD] == [1, 1, 1, 1]
    assert counts[fmt.MODE_EVAL_GRAD] == [0, 0, 0, 0]
    assert _scalar(tmp_path, fmt.MODE_EVALS_BEFORE_TRAIN)[1].tolist() == [1]
    assert _scalar(tmp_path, fmt.MODE_DISAGREE_EVAL)[1].tolist() == [0, 1, 1, 1]
    meta = json.loads((tmp_path / fmt.RUN_JSON).read_text())
    assert meta["probes"]["modes"]["sensitive"] == {"Dropout": 1}
    assert meta["probes"]["modes"]["disagree_eval"] == ["2"]
    assert meta["collector"]["probes"] == ["inputs", "modes", "grad", "optimizer"]


# -- the gradient carry-over probe --------------------------------------------------------------


@pytest.mark.parametrize("reset", ["missing", "set_to_none", "zeros"])
def test_carried_gradient_is_the_previous_steps_gradient(tmp_path: Path, reset: str) -> None:
    """Against the gradients themselves: carry_sq is Σ ‖p.grad‖² the step started from,
    new_sq Σ ‖first incoming gradient‖². zero_grad()'s default leaves .grad None: nothing
    to measure, carry_sq is a 0 and new_sq absent; zero_grad(set_to_none=False) leaves
    zeros: both measured, carry 0."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = GradCarryProbe(max_params=2)
    held: list[float] = []  # Σ ‖p.grad‖² of the probed parameters after each step
    incoming: list[float] = []  # Σ ‖gradient this step's backward delivered‖²
    with Collector(model, opt, run_dir=tmp_path, probes=[probe]) as col:
        for _ in range(8):
            if reset != "missing":
                opt.zero_grad(set_to_none=reset == "set_to_none")
            before = [None if p.grad is None else p.grad.clone() for p in probe._params]
            nn.functional.cross_entropy(
                model(torch.randn(8, 6)), torch.randint(0, 3, (8,))
            ).backward()
            opt.step()
            col.step(loss=0.0)
            held.append(sum(float(p.grad.double().square().sum()) for p in probe._params))
            incoming.append(
                sum(
                    float((p.grad - (0 if b is None else b)).double().square().sum())
                    for p, b in zip(probe._params, before, strict=True)
                )
            )
    names = json.loads((tmp_path / fmt.RUN_JSON).read_text())["probes"]["grad"]["params"]
    assert names == ["0.bias", "2.bias"]  # the smallest tensor of each probed module
    _, carry = _scalar(tmp_path, fmt.GRAD_CARRY_SQ)
    _, mask = _scalar(tmp_path, fmt.GRAD_CARRY_MASK)
    run = runlens.load_run(tmp_path)
    new = run.scalar(fmt.GRAD_NEW_SQ)
    if reset == "set_to_none":
        assert carry.tolist() == [0.0] * 8 and mask.tolist() == [0.0] * 8
        assert new is None  # every .grad was None: no device work, nothing to compare with
    elif reset == "zeros":
        assert carry.tolist() == [0.0] * 8 and mask.tolist() == [0.0] * 8
        assert new.steps.tolist() == list(range(1, 8))  # step 0: .grad None before the first pass
        np.testing.assert_allclose(new.values, incoming[1:], rtol=1e-5)
    else:
        assert carry[0] == 0.0
        np.testing.assert_allclose(carry[1:], held[:-1], rtol=1e-5)
        np.testing.assert_allclose(new.values, incoming[1:], rtol=1e-5)
        assert mask[1:].tolist() == [3.0] * 7
    found = {f.signature for f in runlens.analyze(tmp_path).findings}
    assert ("gradient-not-reset" in found) == (reset == "missing")


def test_accumulation_within_a_step_carries_nothing(tmp_path: Path) -> None:
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Collector(model, opt, run_dir=tmp_path) as col:
        for _ in range(4):
            for _ in range(3):
                model(torch.randn(2, 6)).sum().backward()
            opt.step()
            opt.zero_grad()
            col.step(loss=0.0)
    assert _scalar(tmp_path, fmt.GRAD_CARRY_SQ)[1].tolist() == [0.0] * 4
    assert _scalar(tmp_path, fmt.GRAD_PASSES)[1].tolist() == [3] * 4
    assert _scalar(tmp_path, fmt.INPUT_FORWARDS)[1].tolist() == [3] * 4
    assert _scalar(tmp_path, fmt.INPUT_EXAMPLES)[1].tolist() == [6] * 4


# -- the optimizer probe ----------------------------------------------------------------------


def test_optimizer_membership_at_setup_and_after_changes(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model[0].requires_grad_(False)
    model[2] = nn.Linear(4, 3)  # replaced after the optimizer was built
    with Collector(model, opt, run_dir=tmp_path) as col:
        for step in range(3):
            model(torch.randn(2, 6)).sum().backward()
            opt.step()
            col.step(loss=0.0)
            if step == 1:
                opt.add_param_group({"params": list(model[2].parameters())})
    facts = json.loads((tmp_path / fmt.RUN_JSON).read_text())["probes"]["optimizer"]
    # After add_param_group at step 1 the new head is held: the step-2 check says so.
    assert facts["checked_at"] == [-1, 0, 2]
    assert facts["foreign"] == 2 and facts["foreign_numel"] == 15
    assert facts["frozen_held"] == ["0.weight", "0.bias"]
    assert facts["trainable_outside"] == [] and facts["tensors"] == 6


def test_probes_off_record_nothing_and_the_report_says_why(tmp_path: Path) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Collector(model, opt, run_dir=tmp_path, probes=()) as col:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 6)).sum().backward()
            opt.step()
            col.step(loss=0.0)
    run = runlens.load_run(tmp_path)
    assert not [n for n in run.scalar_names if n.startswith(fmt.PROBE_PREFIX)]
    assert run.meta["probes"] == {} and run.meta["collector"]["probes"] == []
    skipped = {s.signature: s for s in runlens.analyze(tmp_path).skipped}
    s = skipped["gradient-not-reset"]
    assert s.kind == "not-recorded" and "probes=()" in s.reason


def test_a_failing_probe_is_switched_off_with_one_warning(tmp_path: Path) -> None:
    class Broken(InputProbe):
        def _fingerprint(self, x: torch.Tensor, batch: int) -> torch.Tensor:
            raise RuntimeError("boom")

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probes = [Broken(), ModeProbe()]
    with (
        pytest.warns(RuntimeWarning, match="probe:inputs"),
        Collector(model, opt, run_dir=tmp_path, probes=probes) as col,
    ):
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 6)).sum().backward()
            opt.step()
            col.step(loss=0.0)
    assert len(col.warnings) == 1 and "boom" in col.warnings[0]
    # The other probe and the training went on.
    assert _scalar(tmp_path, fmt.MODE_TRAIN_GRAD)[1].tolist() == [1, 1, 1]


def test_probes_never_sync_with_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    main = threading.main_thread()
    for name in ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__"):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, _orig=orig, _name=name, **k):
            if threading.current_thread() is main:
                raise AssertionError(f"Tensor.{_name} on the training thread")
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    probes = [InputProbe(), ModeProbe(), GradCarryProbe(), OptimizerProbe()]
    tokens = nn.Embedding(10, 6)
    with Collector(model, opt, run_dir=tmp_path, probes=probes) as col:
        for _ in range(4):
            for _ in range(2):  # accumulation
                model(torch.randn(4, 6)).sum().backward()
            opt.step()
            col.step(loss=torch.zeros(()))
            model.eval()
            with torch.no_grad():
                model(tokens(torch.randint(0, 10, (3,))))
            model.train()
    monkeypatch.undo()
    assert col.warnings == []


# -- analyzer edge cases --------------------------------------------------------------------------


def test_a_step_without_gradients_is_missing_not_nan(tmp_path: Path) -> None:
    """Collector without the optimizer and zero_grad(set_to_none=True) before col.step():
    no parameter has a gradient when the step is read. That is no NaN."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Collector(model, run_dir=tmp_path) as col:
        for _ in range(30):
            loss = nn.functional.cross_entropy(
                model(torch.randn(16, 6)), torch.randint(0, 3, (16,))
            )
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            col.step(loss=loss)
    run = runlens.load_run(tmp_path)
    assert not run.has_scalar(fmt.GRAD_NORM)
    assert "nan-inf" not in _findings(tmp_path, "nan-inf")


def test_old_runs_nan_grad_norm_on_gradient_free_steps_is_not_nan_inf(tmp_path: Path) -> None:
    """Runs written before the fix have NaN grad_norm where every gradient row is missing."""
    import pyarrow.parquet as pq

    test_a_step_without_gradients_is_missing_not_nan(tmp_path)
    seg = sorted((tmp_path / fmt.SCALARS_DIR).rglob("*.parquet"))[0]
    table = pq.read_table(seg)
    steps = sorted({int(s) for s in table.column("step").to_pylist()})
    import pyarrow as pa

    extra = pa.table(
        {
            "step": pa.array(steps, pa.int64()),
            "wall_time": pa.array([0.0] * len(steps)),
            "name": pa.DictionaryArray.from_arrays(
                pa.array([0] * len(steps), pa.int32()), pa.array([fmt.GRAD_NORM])
            ),
            "value": pa.array([float("nan")] * len(steps)),
        },
        schema=fmt.SCALARS_SCHEMA,
    )
    fmt.write_segment(extra, seg.with_name("part-999999.parquet"))
    assert "nan-inf" not in _findings(tmp_path, "nan-inf")


def test_every_parameter_frozen_while_training_is_an_error(tmp_path: Path) -> None:
    """The loss computed from a detached output: backward() runs, no parameter gets a
    gradient, the optimizer steps on nothing."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with Collector(model, opt, run_dir=tmp_path) as col:
        for _ in range(20):
            out = model(torch.randn(16, 6)).detach().requires_grad_()
            loss = nn.functional.cross_entropy(out, torch.randint(0, 3, (16,)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
    f = _findings(tmp_path, "frozen-layer")["frozen-layer"]
    assert f.severity == "error" and "no parameter trained" in f.summary
    assert set(f.layers) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def _record_inputs(tmp_path: Path, xs: list[torch.Tensor]) -> Path:
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with Collector(model, opt, run_dir=tmp_path, config={"batch_size": 8}) as col:
        for x in xs:
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
            col.step(loss=torch.zeros(()))
    return tmp_path


def test_duplicate_batches_epoch_order_and_full_batch(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    epoch = [torch.randn(8, 6, generator=g) for _ in range(30)]
    run = _record_inputs(tmp_path / "epochs", epoch * 3)  # shuffle=False: same order
    f = _findings(run, "duplicate-batches")["duplicate-batches"]
    assert f.severity == "warning" and "set_epoch" in f.fix.lower() + f.summary.lower()
    assert _evidence(f, "most common distance to the previous occurrence (steps)") == 30
    assert _evidence(f, "share of steps repeating an earlier batch") == pytest.approx(60 / 90)
    # A short epoch (8 batches, within max_short) is still an epoch, not parallel workers.
    short = _record_inputs(tmp_path / "short", epoch[:8] * 5)
    f = _findings(short, "duplicate-batches")["duplicate-batches"]
    assert "every epoch repeats" in f.summary and "workers" not in f.summary
    assert _evidence(f, "most common distance to the previous occurrence (steps)") == 8
    # Full-batch training: the same batch every step, on purpose as often as not.
    full = _record_inputs(tmp_path / "full", [epoch[0]] * 40)
    assert "duplicate-batches" not in _findings(full, "duplicate-batches")
    # Sampling with replacement from a small set repeats at scattered distances: clean.
    pool = epoch[:12]
    picks = torch.randint(0, 12, (60,), generator=g).tolist()
    sampled = _record_inputs(tmp_path / "sampled", [pool[i] for i in picks])
    assert "duplicate-batches" not in _findings(sampled, "duplicate-batches")


def test_batch_collapse_uses_the_configured_batch_per_rank(tmp_path: Path) -> None:
    run = _record_inputs(tmp_path, [torch.randn(1, 6) for _ in range(10)])
    f = _findings(run, "batch-collapse")["batch-collapse"]
    assert _evidence(f, "examples per training step (median)") == 1
    assert _evidence(f, "configured batch per rank / examples per step") == 8
    meta = json.loads((run / fmt.RUN_JSON).read_text())
    meta["world_size"] = 8  # a global batch of 8 over 8 ranks: one each is right
    (run / fmt.RUN_JSON).write_text(json.dumps(meta))
    assert "batch-collapse" not in _findings(run, "batch-collapse")


def test_recurring_spikes_without_input_statistics_are_noise_not_a_warning() -> None:
    """The corrupted-batches sample analyzed without its probe scalars: the same spikes,
    reported, but as recurring noise (info)."""
    run = runlens.load_run(SAMPLES / "corrupted-batches")
    with_probe = _findings(SAMPLES / "corrupted-batches", "loss-spike")["loss-spike"]
    assert with_probe.severity == "warning"
    assert _evidence(with_probe, "spikes with an outlier input batch") == _evidence(
        with_probe, "spike events"
    )
    import dataclasses

    import polars as pl

    scalars = run.scalars.filter(~pl.col("name").cast(pl.String).str.starts_with("probe/"))
    names = tuple(n for n in run.scalar_names if not n.startswith("probe/"))
    run = dataclasses.replace(
        run, scalars=scalars, facts=dataclasses.replace(run.facts, scalar_names=names)
    )
    report = runlens.analyze(run, runlens.AnalyzeOptions(only=("loss-spike",)))
    (f,) = report.findings
    assert f.severity == "info" and "again and again" in f.summary
    assert _evidence(f, "spike events") == _evidence(with_probe, "spike events")


# -- root-cause links -------------------------------------------------------------------------


def test_links_name_only_known_signatures_and_bugs_are_roots() -> None:
    from runlens.signatures import REGISTRY

    for symptom, causes in CAUSES.items():
        assert symptom in REGISTRY and set(causes) <= set(REGISTRY), symptom
    assert {n for n, s in REGISTRY.items() if s.category == "bug"} == BUG_CAUSES


def test_symptoms_of_a_bug_point_at_it_not_at_the_learning_rate() -> None:
    report = runlens.analyze(SAMPLES / "no-zero-grad")
    by = {f.signature: f for f in report.findings}
    root = by["gradient-not-reset"]
    assert root.severity == "error" and report.findings[0].signature == "gradient-not-reset"
    assert "loss-divergence" in root.explains
    div = by["loss-divergence"]
    assert div.explained_by == "gradient-not-reset"
    assert div.fix.startswith("Probably a consequence of gradient-not-reset")
    assert "lower the lr" not in div.fix.lower()


def test_spikes_with_normal_inputs_are_attributed_to_a_numerical_fault(tmp_path: Path) -> None:
    """A faulty kernel in one layer: at a few steps its output is garbage (sign-flipped and
    ×50). The input batches are normal; the gradient blows up, first in that layer."""
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(5)
    centres = torch.randn(4, 6, generator=g) * 1.2
    model = nn.Sequential(
        nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )
    faulty = {120, 200, 260}
    state = {"step": 0}

    def fault(mod: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        return out * -50 if state["step"] in faulty else out

    model[2].register_forward_hook(fault)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    with Collector(model, opt, run_dir=tmp_path, config={"num_classes": 4}) as col:
        for step in range(300):
            state["step"] = step
            y = torch.randint(0, 4, (32,), generator=g)
            x = centres[y] + torch.randn(32, 6, generator=g)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()  # no clipping: grad_norm is recorded after it (format.py)
            opt.step()
            col.step(loss=loss)
    f = _findings(tmp_path, "loss-spike")["loss-spike"]
    spikes = {int(e.value) for e in f.evidence if e.name == "spike at step"}
    assert faulty <= spikes
    assert _evidence(f, "spikes with an outlier input batch") == 0
    assert _evidence(f, "spikes with normal inputs and a gradient-norm blow-up") >= len(faulty)
    assert "most in `2." in f.summary and "numerical fault" in f.summary


@pytest.mark.parametrize("validated", [False, True])
def test_no_grad_train_mode_forwards_are_an_evaluation_only_with_validation(
    tmp_path: Path, validated: bool
) -> None:
    """No-grad forwards in training mode inside training (pseudo-labels from the model
    itself) are not an evaluation; the same forwards with validation metrics logged and no
    eval-mode forward anywhere are one."""
    torch.manual_seed(6)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Collector(model, opt, run_dir=tmp_path) as col:
        for _ in range(12):
            x = torch.randn(8, 6)
            with torch.no_grad():
                target = model(x).argmax(1)  # pseudo-labels, training mode
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            col.step(loss=loss)
            if validated:
                col.log({"val/loss": 1.0})
    found = _findings(tmp_path, "train-eval-mode")
    assert ("train-eval-mode" in found) == validated


def test_a_learning_rate_too_high_is_not_a_gradient_bug(tmp_path: Path) -> None:
    """The loss-divergence sample (SGD with an LR far too high, zero_grad every step)
    recorded afresh with the probes: it diverges, carries no gradient, and its symptoms
    keep their own advice."""
    import sys

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from sample_runs.scenarios import by_name

    by_name("loss-divergence").record(tmp_path / "run")
    report = runlens.analyze(tmp_path / "run")
    by = {f.signature: f for f in report.findings}
    assert "loss-divergence" in by and "gradient-not-reset" not in by
    assert by["loss-divergence"].explained_by is None
    assert set(_scalar(tmp_path / "run", fmt.GRAD_CARRY_SQ)[1]) == {0.0}
    assert "gradient-not-reset" in report.coverage.clean
