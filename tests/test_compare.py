"""`runlens compare` on real recorded training.

One MLP classifier on a learnable 4-class problem, recorded with the Collector at three
learning rates (SGD, momentum 0.9): too low to learn in 100 steps, good, and so high the
loss blows up to NaN. Plus a shorter, deeper run without validation, and unreadable
directories. Expectations are checked against the recorded curves, not
hard-coded numbers.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from runlens_collect import Collector

import runlens
from runlens.cli import cli
from runlens.compare import CompareOptions, compare, flatten, metric_mode
from runlens.errors import RunlensError
from runlens.report import compare_json, compare_markdown, compare_terminal
from runlens.run import load_run

LOW, GOOD, HIGH = 1e-4, 3e-2, 10.0
STEPS = 100
VAL_EVERY = 10
SHORT = 60


def train(run_dir: Path, lr: float, steps: int = STEPS, depth: int = 1, val: bool = True) -> Path:
    """Train the MLP and record it with the Collector; validation every VAL_EVERY steps."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(768, 20, generator=g)
    y = (x @ torch.randn(20, 4, generator=g)).argmax(1)
    torch.manual_seed(1)
    layers: list[torch.nn.Module] = []
    width = 20
    for _ in range(depth):
        layers += [torch.nn.Linear(width, 32), torch.nn.ReLU()]
        width = 32
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 4))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    config: dict[str, object] = {"lr": lr, "num_classes": 4}
    config["optimizer"] = {"name": "sgd", "momentum": 0.9}
    config["model"] = {"depth": depth}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only add contention
    try:
        _record(run_dir, model, opt, config, x, y, g, steps, val)
    finally:
        torch.set_num_threads(threads)
    return run_dir


def _record(
    run_dir: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    config: dict[str, object],
    x: torch.Tensor,
    y: torch.Tensor,
    g: torch.Generator,
    steps: int,
    val: bool,
) -> None:
    with Collector(model, opt, run_dir=run_dir, config=config) as col:
        for step in range(steps):
            idx = torch.randint(0, 512, (32,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
            if val and step % VAL_EVERY == VAL_EVERY - 1:
                with torch.no_grad():
                    out = model(x[512:])
                    vl = torch.nn.functional.cross_entropy(out, y[512:]).item()
                    va = (out.argmax(1) == y[512:]).float().mean().item()
                col.log({"val/loss": vl, "val/accuracy": va})


@pytest.fixture(scope="session")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    for name, lr in (("lr_low", LOW), ("lr_good", GOOD), ("lr_high", HIGH)):
        train(root / name, lr)
    return root


@pytest.fixture(scope="session")
def odd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run that differs in shape: shorter, deeper, no validation at all."""
    root = tmp_path_factory.mktemp("odd")
    train(root / "deep_short", GOOD, steps=SHORT, depth=2, val=False)
    return root


@pytest.fixture(scope="session")
def cmp3(sweep: Path) -> runlens.Comparison:
    # Baseline = the good run (the first given), as when comparing against a known-good run.
    return compare([sweep / "lr_good", sweep / "lr_low", sweep / "lr_high"])


def final_level(run_dir: Path, name: str) -> float:
    """The final level as docs/report-schema.md defines it, from the raw values: the
    median of the last h + 1 finite values, window 2h + 1 = a tenth of the points (3..11)."""
    s = load_run(run_dir).scalar(name)
    assert s is not None
    x = s.values[np.isfinite(s.values)]
    window = 1 if x.size < 3 else max(3, min(10, x.size // 10) | 1)
    return float(np.median(x[-(window // 2 + 1) :]))


# -- ranking and metric rule ------------------------------------------------------------


def test_ranking_follows_recorded_val_loss(sweep: Path, cmp3: runlens.Comparison) -> None:
    assert cmp3.metric == "val/loss" and cmp3.mode == "min"
    high = cmp3.run("lr_high")
    raw = load_run(sweep / "lr_high").scalar("val/loss")
    assert raw is not None
    # The blown-up run ends non-finite: it has no rank and comes last.
    assert not math.isfinite(raw.values[-1])
    assert high.metric_nonfinite and high.rank is None
    assert cmp3.labels[-1] == "lr_high"
    good, low = (
        final_level(sweep / "lr_good", "val/loss"),
        final_level(sweep / "lr_low", "val/loss"),
    )
    expected = ["lr_good", "lr_low"] if good < low else ["lr_low", "lr_good"]
    assert list(cmp3.labels[:2]) == expected
    assert [r.rank for r in cmp3.runs[:2]] == [1, 2]
    assert cmp3.run("lr_good").metric_final == pytest.approx(good)
    # The summary table reuses the engine's RunSummary.
    assert cmp3.run("lr_low").report.summary.steps == STEPS


def test_higher_is_better_metric_reverses_the_order(sweep: Path) -> None:
    c = compare([sweep / "lr_low", sweep / "lr_good"], CompareOptions(metric="val/accuracy"))
    assert c.mode == "max"
    acc = {r.label: r.metric_final for r in c.runs}
    assert acc["lr_good"] is not None and acc["lr_low"] is not None
    best = max(acc, key=lambda k: acc[k] or -1.0)
    assert c.runs[0].label == best and c.runs[0].rank == 1


def test_metric_direction_rule() -> None:
    assert metric_mode("val/loss")[0] == "min"
    assert metric_mode("val/top1_accuracy")[0] == "max"
    assert metric_mode("eval/F1")[0] == "max"
    assert metric_mode("val/perplexity")[0] == "min"
    assert metric_mode("something")[0] == "min"


def test_unknown_metric_is_a_clear_error(sweep: Path) -> None:
    with pytest.raises(RunlensError, match="no run has the metric 'val/bleu'"):
        compare([sweep / "lr_low"], CompareOptions(metric="val/bleu"))


# -- config -----------------------------------------------------------------------------


def test_config_diff_only_lr(cmp3: runlens.Comparison) -> None:
    config_keys = [d.key for d in cmp3.config_diff if d.section == "config"]
    assert config_keys == ["lr"]
    lr = next(d for d in cmp3.config_diff if d.key == "lr")
    assert dict(zip(cmp3.labels, lr.values, strict=True)) == {
        "lr_good": GOOD,
        "lr_low": LOW,
        "lr_high": HIGH,
    }
    # Nothing that is equal in all runs is listed, whatever section it is in.
    for d in cmp3.config_diff:
        assert len({json.dumps(v) for v in d.values}) > 1 or not all(d.present)


def test_flatten_nested_config() -> None:
    assert flatten({"opt": {"lr": 1, "betas": [0.9, 0.99]}, "a": 2}) == {
        "opt.lr": 1,
        "opt.betas": [0.9, 0.99],
        "a": 2,
    }


# -- findings -----------------------------------------------------------------------------


def test_findings_matrix_matches_each_runs_analysis(cmp3: runlens.Comparison) -> None:
    high = [row for row in cmp3.findings if row.cells[cmp3.labels.index("lr_high")]]
    names = {row.signature for row in high}
    assert names & {"nan-inf", "loss-divergence"}
    # The matrix is exactly what analyzing each run on its own finds.
    for i, r in enumerate(cmp3.runs):
        alone = runlens.analyze(r.path)
        got = {row.signature for row in cmp3.findings if row.cells[i] is not None}
        assert got == {f.signature for f in alone.findings}
    group = next(g for g in cmp3.groups if g.signature == "nan-inf")
    assert "lr_high" in group.runs and "lr_good" not in group.runs
    for label in cmp3.clean_runs:
        assert not cmp3.run(label).report.findings


# -- separation ----------------------------------------------------------------------------


def test_diverging_run_separates_before_the_sane_one(cmp3: runlens.Comparison) -> None:
    seps = {s.run: s for s in cmp3.separations if s.curve == "train/loss"}
    high, low = seps["lr_high"], seps["lr_low"]
    assert high.step is not None and low.step is not None
    assert high.step < low.step
    # The blown-up run is above the baseline where it separates, the too-slow run too.
    assert high.nonfinite or (high.delta is not None and high.delta > 0)
    assert low.delta is not None and low.delta > 0


def test_separation_point_is_where_curves_really_part(
    sweep: Path, cmp3: runlens.Comparison
) -> None:
    from runlens.context import Context

    sep = next(s for s in cmp3.separations if s.run == "lr_low" and s.curve == "train/loss")
    a = Context(load_run(sweep / "lr_good")).train_loss
    b = Context(load_run(sweep / "lr_low")).train_loss
    assert a is not None and b is not None and sep.step is not None
    assert np.array_equal(a.steps, b.steps)
    delta = b.smooth - a.smooth
    # Same seed and data: the first loss (before any update) is identical in both runs.
    assert delta[0] == 0 and sep.step > 0
    assert delta[sep.step] == pytest.approx(sep.delta)
    assert sep.threshold is not None and abs(delta[sep.step]) > sep.threshold
    # Sustained, and the runs stay apart: the gap at the end is larger still.
    assert np.all(np.abs(delta[sep.step : sep.step + 5]) > sep.threshold)
    assert abs(delta[-1]) > abs(delta[sep.step])


def test_identical_runs_never_separate(sweep: Path, tmp_path: Path) -> None:
    shutil.copytree(sweep / "lr_good", tmp_path / "copy")
    c = compare([sweep / "lr_good", tmp_path / "copy"])
    assert all(s.at is None for s in c.separations)
    assert c.config_diff == () or all(d.section != "config" for d in c.config_diff)
    assert len(set(c.labels)) == 2  # same run name twice: labels disambiguated by path


def test_by_time_aligns_on_seconds(sweep: Path) -> None:
    c = compare([sweep / "lr_good", sweep / "lr_high"], CompareOptions(by="time"))
    assert c.by == "time"
    sep = next(s for s in c.separations if s.curve == "train/loss")
    assert sep.overlap is not None and sep.overlap[1] > sep.overlap[0] >= 0
    if sep.at is not None:
        assert sep.overlap[0] <= sep.at <= sep.overlap[1]
        assert sep.step is not None and 0 <= sep.step < STEPS


# -- layers -----------------------------------------------------------------------------


def test_layer_differences(sweep: Path, cmp3: runlens.Comparison) -> None:
    low = [d for d in cmp3.layer_diffs if d.run == "lr_low"]
    # lr 300x smaller: updates per step are orders of magnitude smaller in every layer.
    ratios = {d.layer: d.ratio for d in low if d.stat == "update_ratio"}
    m = load_run(sweep / "lr_low").layer_matrix("update", "update_ratio")
    assert m is not None
    assert set(ratios) == set(m.layers)
    assert all(r is not None and r < 0.1 for r in ratios.values())
    # The NaN run's gradients are non-finite at the end: flagged without a ratio.
    high = [d for d in cmp3.layer_diffs if d.run == "lr_high" and d.stat == "grad_norm"]
    assert high and all(d.value is None and d.ratio is None for d in high)


def test_different_lengths_depths_and_missing_validation(sweep: Path, odd: Path) -> None:
    c = compare([sweep / "lr_good", odd / "deep_short"])
    # One run has no val/loss: the default metric falls back to train/loss.
    assert c.metric == "train/loss"
    deep = next(d for d in c.layer_sets if d.run == "deep_short")
    assert deep.only_in_run and not deep.only_in_baseline
    assert {d.key for d in c.config_diff if d.section == "config"} == {"model.depth"}
    sep = next(s for s in c.separations if s.run == "deep_short")
    assert sep.overlap == (0.0, SHORT - 1.0)  # compared only where both have steps
    assert sep.compared_points == SHORT
    assert c.run("deep_short").report.summary.steps == SHORT
    # Asking for val/loss ranks the run without it last, with a warning.
    c2 = compare([odd / "deep_short", sweep / "lr_good"], CompareOptions(metric="val/loss"))
    assert c2.labels == ("lr_good", "deep_short") and c2.run("deep_short").rank is None
    assert any("no val/loss" in w for w in c2.warnings)


# -- inputs and errors ----------------------------------------------------------------------


def test_glob_and_folder_inputs_with_an_unreadable_run(sweep: Path, tmp_path: Path) -> None:
    bad = tmp_path / "lr_broken"
    bad.mkdir()
    (bad / "run.json").write_text('{"schema_version": 99}')
    c = compare([str(sweep / "lr_*"), bad, tmp_path / "missing"])
    assert set(c.labels) == {"lr_low", "lr_good", "lr_high"}
    paths = {Path(e.path).name: e.message for e in c.errors}
    assert "schema version 99" in paths["lr_broken"]
    assert "no such run directory" in paths["missing"]
    # A folder of runs expands to its runs.
    assert set(compare([sweep]).labels) == {"lr_low", "lr_good", "lr_high"}


def test_nothing_readable_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RunlensError, match="no run could be read"):
        compare([tmp_path / "nope", str(tmp_path / "x_*")])


def test_sweep_loads_in_parallel_with_progress(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from runlens.compare import progress_bar

    n = 24
    for i in range(n):
        src = sweep / ("lr_low", "lr_good", "lr_high")[i % 3]
        shutil.copytree(src, tmp_path / f"run_{i:02d}")
    seen: list[tuple[int, int]] = []
    with progress_bar() as bar:  # stderr is not a TTY here: shown because n > 10

        def track(done: int, total: int) -> None:
            seen.append((done, total))
            bar(done, total)

        c = compare([str(tmp_path / "run_*")], on_progress=track)
    assert len(c.runs) == n and not c.errors
    assert c.baseline.startswith("lr_low")  # run_00: first in sorted glob order
    assert [d for d, _ in seen] == list(range(1, n + 1)) and seen[-1][1] == n
    assert f"{n}/{n}" in capsys.readouterr().err
    # Equal runs rank equal-valued and the blown-up copies come last.
    assert all(r.metric_nonfinite for r in c.runs[-n // 3 :])
    # A Run object given among paths keeps its place as the baseline.
    c2 = compare([load_run(sweep / "lr_good"), sweep / "lr_high"])
    assert c2.baseline == "lr_good"


# -- reporters and CLI ----------------------------------------------------------------------


def test_reporters_show_and_escape(sweep: Path, tmp_path: Path) -> None:
    hostile = tmp_path / "[red]x|*y*"
    shutil.copytree(sweep / "lr_low", hostile)
    meta = json.loads((hostile / "run.json").read_text())
    meta["name"] = "[red]x|*y*"
    (hostile / "run.json").write_text(json.dumps(meta))
    c = compare([sweep / "lr_good", hostile, sweep / "lr_high"])
    term = compare_terminal.render(c)
    assert "[red]x|*y*" in term and "nan-inf" in term and "lr" in term
    md = compare_markdown.render(c)
    assert "\\[red\\]x\\|\\*y\\*" in md and "[red]x|*y*" not in md
    data = json.loads(compare_json.render(c))
    assert data["runs"][0]["label"] == c.labels[0]


def test_cli_compare_json_fields_and_exit_codes(sweep: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cmp.json"
    res = runner.invoke(
        cli,
        ["compare", str(sweep / "lr_good"), str(sweep / "lr_*"), "--format", "json", "-o",
         str(out), "--set", "nan-inf.nonexistent=1"],
    )  # fmt: skip
    assert res.exit_code == 2 and "nonexistent" in res.output
    res = runner.invoke(
        cli, ["compare", str(sweep / "lr_good"), str(sweep / "lr_*"), "--format", "json", "-o",
              str(out)]
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["schema_version"] == 1 and data["metric"] == "val/loss"
    assert data["baseline"] == "lr_good"
    assert [r["label"] for r in data["runs"]][-1] == "lr_high"
    for key in ("config_diff", "findings", "groups", "separations", "layer_diffs", "errors"):
        assert key in data
    assert {d["key"] for d in data["config_diff"] if d["section"] == "config"} == {"lr"}
    assert data["runs"][0]["summary"]["steps"] == STEPS

    res = runner.invoke(cli, ["compare", str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert res.output.startswith("runlens: error: no run could be read")
    assert "Traceback" not in res.output
    res = runner.invoke(cli, ["compare", str(sweep / "lr_good"), "--by", "wallclock"])
    assert res.exit_code == 2
    res = runner.invoke(cli, ["compare", "--help"])
    assert res.exit_code == 0 and "Examples" in res.output
    res = runner.invoke(cli, ["compare", str(sweep / "lr_good"), str(tmp_path / "gone")])
    assert res.exit_code == 0 and "gone" in res.output
