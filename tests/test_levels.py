"""One definition per number: the final, best and best step of a curve (runlens.levels)
are the same in the header, the findings that cite them, the curve table, the JSON and
HTML reports and ``runlens compare``; schedules are never smoothed; the x axis says epoch
when the log counts epochs. Checked on recorded sample runs and on imported logs written
the way the real tools write them (tests/log_writers.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from log_writers import (
    Training,
    noisy_label_training,
    write_hf_checkpoint,
    write_hf_tensorboard,
    write_keras_csvlogger,
)

import runlens
from runlens import levels as L
from runlens.compare import CompareOptions
from runlens.findings import Report, fmt_num
from runlens.plotdata import build_plot_data
from runlens.report import html, json_report, markdown, terminal
from runlens.sources import open_run

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ("healthy-classifier", "overfitting", "loss-divergence", "healthy-schedule",
           "healthy-transformer")  # fmt: skip


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNLENS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def training() -> Training:
    return noisy_label_training()


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory, training: Training) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("imported")
    write_keras_csvlogger(d / "training.log", training.epochs())
    write_hf_checkpoint(d / "hf", training, max_steps=600)
    write_hf_tensorboard(d / "tb", training)
    return {"keras": d / "training.log", "hf": d / "hf", "tb": d / "tb"}


def expected_levels(values: np.ndarray, steps: np.ndarray, mode: str) -> tuple:
    """docs/report-schema.md "Levels", written out independently of runlens.levels:
    medians over 2h + 1 points (cut at the ends), window a tenth of the points, 3..11,
    and 1 (the raw values) below 10 points."""
    ok = np.isfinite(values)
    x, s = values[ok], steps[ok]
    n = x.size
    w = 1 if n < 10 else max(3, min(10, n // 10) | 1)
    h = w // 2
    lv = np.array([np.median(x[max(0, i - h) : i + h + 1]) for i in range(n)])
    i = int(np.argmin(lv) if mode == "min" else np.argmax(lv))
    return float(lv[0]), float(lv[-1]), float(lv[i]), int(s[i])


# -- the definition --------------------------------------------------------------------------


def test_levels_definition_on_a_small_curve() -> None:
    steps = np.arange(0, 110, 10)
    raw = np.array([5.0, 4.0, 9.0, 3.0, np.nan, 3.0, 2.0, 8.0, 6.0, 7.0, 5.0])
    lv = L.levels(steps, raw, "min")
    assert lv is not None and lv.window == 3  # 10 finite points: at least 3
    # finite points 5 4 9 3 3 2 8 6 7 5 -> levels 4.5 5 4 3 3 3 6 7 6 6 (window cut at the ends)
    assert (lv.first, lv.final) == (4.5, 6.0)
    assert (lv.best, lv.best_step) == (3.0, 30)  # first of the tied lowest levels
    assert lv.final_step == 100
    up = L.levels(steps, raw, "max")
    assert (up.best, up.best_step) == (7.0, 80)
    raw_lv = L.levels(steps, raw, "min", window=1)  # a schedule: the raw values
    assert (raw_lv.final, raw_lv.best, raw_lv.best_step) == (5.0, 2.0, 60)
    assert L.levels(steps, np.full(11, np.nan), "min") is None
    # Fewer than 10 points (an epoch-level log): every point is its own level, so a rise
    # at the last of a few evaluations is not halved by a median with the one before.
    few = L.levels(steps[:9], raw[:9], "min")
    assert few is not None and few.window == 1
    assert (few.first, few.final, few.best, few.best_step) == (5.0, 6.0, 2.0, 60)
    assert [L.level_window(n) for n in (1, 2, 3, 9, 10, 29, 40, 60, 99, 100, 10_000)] == [
        1, 1, 1, 1, 3, 3, 5, 7, 9, 11, 11,
    ]  # fmt: skip


@pytest.mark.parametrize("n", [3, 7, 40, 401])
def test_best_is_never_worse_than_final(n: int) -> None:
    rng = np.random.default_rng(n)
    raw = np.cumsum(rng.normal(size=n))
    lv = L.levels(np.arange(n), raw, "min")
    assert lv.best <= lv.final
    assert lv.best_step in set(range(n))
    assert (lv.first, lv.final, lv.best, lv.best_step) == pytest.approx(
        expected_levels(raw, np.arange(n), "min")
    )


# -- every renderer and compare agree ------------------------------------------------------------


def _cases(imported: dict[str, Path]) -> list[Path]:
    return [ROOT / "sample_runs" / n for n in SAMPLES] + list(imported.values())


def _payload(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="runlens-data">(.*?)</script>', page, re.S)
    assert m
    return json.loads(m.group(1))


def _check_one(path: Path) -> None:
    run = open_run(path)
    report = runlens.analyze(run)
    s, unit = report.summary, report.run.x_axis
    facts = []
    for name, final, best, step in (
        ("train/loss", s.final_train_loss, s.best_train_loss, s.best_train_step),
        ("val/loss", s.final_val_loss, s.best_val_loss, s.best_val_step),
    ):
        series = run.scalar(name)
        if series is None:
            continue
        # 1. the summary is the documented definition of the raw values
        first_e, final_e, best_e, step_e = expected_levels(series.values, series.steps, "min")
        assert (final, best, step) == (pytest.approx(final_e), pytest.approx(best_e), step_e)
        fact = f"final {fmt_num(final)} · best {fmt_num(best)} @ {unit} {step}"
        facts.append(fact)
        # 2. the curve table (terminal, markdown) and the JSON curves carry the same
        preview = next(c for c in report.curves if c.name == name)
        assert (preview.first, preview.final, preview.best, preview.best_step) == (
            pytest.approx(first_e), final, best, step)  # fmt: skip
        row = f"{fmt_num(final)} {fmt_num(best)} @ {unit} {step}"
        text = terminal.render(report, width=160)
        assert fact in text and any(
            ln.strip().startswith(name) and re.sub(r" +", " ", ln).endswith(row)
            for ln in text.splitlines()
        ), text
        md = markdown.render(report)
        assert markdown.escape(fact) in md
        assert f"| {fmt_num(final)} | {markdown.escape(f'{fmt_num(best)} @ {unit} {step}')} |" in md
        doc = json.loads(json_report.render(report))
        jc = next(c for c in doc["curves"] if c["name"] == name)
        assert (jc["final"], jc["best"], jc["best_step"]) == (final, best, step)
        # 3. compare: the metric's final/best/best step are the header's
        c = runlens.compare([run], CompareOptions(metric=name, workers=1))
        e = c.runs[0]
        assert (e.metric_final, e.metric_best, e.metric_best_step) == (final, best, step)
    # 4. the HTML page shows the same header facts
    payload = _payload(html.render(report, build_plot_data(run, report)))
    shown = " | ".join(v for _, v in payload["facts"])
    assert all(f in shown for f in facts), (facts, shown)
    assert payload["x_axis"] == unit
    # 5. findings that cite the best validation step name the header's
    for f in report.findings:
        cited = {e.name: e.value for e in f.evidence}
        if f"best val {unit}" in cited and "best val loss" in cited:
            assert cited[f"best val {unit}"] == s.best_val_step
            assert cited["best val loss"] == s.best_val_loss
            assert f"checkpoint from {unit} {s.best_val_step} " in f.fix
            assert f.steps[0] == s.best_val_step


def test_renderers_and_compare_agree_on_final_best_and_best_step(
    imported: dict[str, Path],
) -> None:
    for path in _cases(imported):
        _check_one(path)


def test_the_overfitting_advice_names_the_header_step(imported: dict[str, Path]) -> None:
    for path in (ROOT / "sample_runs" / "overfitting", imported["keras"], imported["hf"]):
        report = runlens.analyze(path)
        f = next(f for f in report.findings if f.signature == "overfitting")
        unit = report.run.x_axis
        assert f"Keep the checkpoint from {unit} {report.summary.best_val_step} " in f.fix


# -- schedules, epochs, task metric -------------------------------------------------------------


def test_schedules_are_never_smoothed() -> None:
    path = ROOT / "sample_runs" / "healthy-schedule"
    run = open_run(path)
    lr = run.scalar("lr/0")
    assert lr is not None and np.ptp(lr.values) > 0  # a real schedule: warm-up and decay
    report = runlens.analyze(run)
    p = next(c for c in report.curves if c.name == "lr/0")
    assert p.schedule and p.smoothed == p.values
    assert p.final == lr.values[-1] and p.first == lr.values[0] and p.best is None
    row = next(ln for ln in terminal.render(report).splitlines() if ln.strip().startswith("lr/0"))
    assert fmt_num(float(lr.values[-1])) in row.split()
    c = runlens.compare([run], CompareOptions(metric="lr/0", workers=1))
    assert c.runs[0].metric_final == lr.values[-1] and c.runs[0].metric_best is None
    data = build_plot_data(run, report)
    assert "ema" not in data["series"]["lr/0"]  # the HTML plots it raw


def test_epoch_axis_everywhere(imported: dict[str, Path]) -> None:
    report = runlens.analyze(imported["keras"])
    assert report.run.x_axis == "epoch"
    f = next(f for f in report.findings if f.signature == "overfitting")
    a, b = f.steps
    text = terminal.render(report, width=120)
    assert f"overfitting  epochs {a}–{b}" in text
    assert re.search(rf"^epochs +{report.summary.steps} recorded, epochs 0–", text, re.M)
    assert " step" not in text.split("Curves")[0].replace("steps", "")
    md = markdown.render(report)
    assert f"- **epochs:** {a}–{b}" in md
    run = open_run(imported["keras"])
    payload = _payload(html.render(report, build_plot_data(run, report)))
    assert payload["x_axis"] == "epoch" and ("epochs", f"{report.summary.steps} recorded, "
                                             f"epochs 0–{report.summary.last_step}") in [
        tuple(x) for x in payload["facts"]
    ]  # fmt: skip
    assert "UNIT + " in html.asset("report.js")  # the viewer labels axes and ranges with it


def test_early_stopping_advice_names_the_task_metric(
    imported: dict[str, Path], training: Training
) -> None:
    report = runlens.analyze(imported["hf"])
    s = report.summary
    assert s.task_metric == "val/accuracy" and s.task_metric_mode == "max"
    acc = np.array([e["val_acc"] for e in training.evals])
    steps = np.array([e["step"] for e in training.evals])
    _, final, best, step = expected_levels(acc, steps, "max")
    assert (s.final_task_metric, s.best_task_metric, s.best_task_metric_step) == (
        pytest.approx(final), pytest.approx(best), step)  # fmt: skip
    f = next(f for f in report.findings if f.signature == "overfitting")
    assert s.best_val_step != step  # this training: accuracy peaked before the loss did
    assert f"Keep the checkpoint from step {s.best_val_step} (lowest val loss)" in f.fix
    assert f"or the one from step {step} where val/accuracy was best ({fmt_num(best)})" in f.fix
    text = terminal.render(report, width=200)
    fact = f"final {fmt_num(final)} · best {fmt_num(best)} @ step {step}"
    assert re.search(rf"^val/accuracy +{re.escape(fact)}$", text, re.M), text


def test_header_shows_no_smoothed_numbers(imported: dict[str, Path]) -> None:
    report: Report = runlens.analyze(imported["tb"])
    text = terminal.render(report)
    assert "(smoothed)" not in text.split("Curves")[0]
