"""Coverage in every report, and a task (chance level) that is stated, never guessed.

Runs are recorded here with the real Collector (and the real Hugging Face Trainer where
transformers is installed), then analyzed: a signature that could not look must be listed
as not checked with its reason, a report says "No problems found" only when the main
checks ran, and ln(C) comes from the config, ``--task`` or run.json's ``task`` — never
from the output's width (ln(64) for a 64-output regression) or from HF's default
``num_labels=2`` (ln(2) for a GPT-2 language model).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from runlens_collect import Collector, lr_range_test
from runlens_collect import format as fmt
from torch import nn

import runlens
from runlens.cli import cli
from runlens.errors import OptionError
from runlens.findings import Report
from runlens.plotdata import build_plot_data
from runlens.report import _common, compare_terminal, html, json_report, markdown, terminal
from runlens.signatures import RANK_SIGNATURES, REGISTRY
from runlens.task import TaskInfo, parse_task, resolve_task

CLASSES = 4


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models: intra-op threads only add contention on a shared 2-core box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNLENS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def blobs(n: int, seed: int, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """CLASSES Gaussian blobs: learnable, so a healthy run's loss falls."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, dim, generator=g) * 3
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


def mixed_mlp(out: int = CLASSES, seed: int = 0) -> nn.Sequential:
    """ReLU and Tanh layers, so dead-relu and saturated-activations both have columns."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(),
        nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, out),
    )  # fmt: skip


def train(
    run_dir: Path,
    model: nn.Module,
    steps: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    config: dict[str, object],
    lr: float = 0.05,
) -> Path:
    """Plain SGD loop recorded with the Collector; validation on a held-out slice."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    n = len(x) * 3 // 4
    with Collector(model, opt, run_dir=run_dir, config=config, activation_every=1) as col:
        for _ in range(steps):
            loss = loss_fn(model(x[:n]), y[:n])
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
            with torch.no_grad():
                col.log({"val/loss": loss_fn(model(x[n:]), y[n:])})
    return run_dir


def skipped(report: Report) -> dict[str, tuple[str, str]]:
    return {s.signature: (s.kind, s.reason) for s in report.skipped}


def chance_evidence(report: Report) -> list[float]:
    """Every chance-level number a finding quoted."""
    names = ("chance level ln(C)", "ln(C)")  # bad-initial-loss, loss-flat; underfitting
    return [e.value for f in report.findings for e in f.evidence if e.name in names]


# -- NotChecked: every signature says when it could not look ------------------------------

JUDGE_ONE_POINT = {
    "nan-inf": "a single point is finite or not",
    "bad-initial-loss": "judges the loss of the first steps, which a 2-step run has",
    "bad-initialization": "judges the weights and activations at step 0",
    "train-eval-mode": "a forward's mode is known at one step (its part about training in "
    "eval mode needs more steps and is noted as not checked)",
}
"""Signatures whose job needs no history: on a 2-step run they look, and may say nothing."""


@pytest.fixture(scope="module")
def two_step_report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    x, y = blobs(256, seed=0)
    run = train(
        tmp_path_factory.mktemp("short") / "run",
        mixed_mlp(),
        2,
        F.cross_entropy,
        x,
        y,
        {"num_classes": CLASSES},
    )
    return runlens.analyze(run)


RANK_NAMES = {s.name for s in RANK_SIGNATURES}  # one process: nothing to compare


def test_every_signature_says_not_checked_on_a_two_step_run(two_step_report: Report) -> None:
    report = two_step_report
    got = skipped(report)
    cov = report.coverage
    assert set(cov.ran) == set(JUDGE_ONE_POINT), (cov.ran, got)
    for name in REGISTRY:
        if name in JUDGE_ONE_POINT:
            continue
        kind, reason = got[name]
        if name in ("cannot-overfit-batch", "lr-range-test") or name in RANK_NAMES:
            assert kind == "not-applicable", (name, reason)
            continue
        # Recorded, but too short: the reason says how many points there were.
        assert kind == "too-few-points", (name, kind, reason)
        assert reason.startswith("only ") and ", needs " in reason, (name, reason)
    assert got["loss-spike"][1] == "only 2 finite train/loss points, needs 20"
    assert got["overfitting"][1] == "only 2 val/loss evaluations with a finite value, needs 3"
    assert got["frozen-layer"][1] == "only 2 recorded steps of layer statistics, needs 5"


def test_a_short_run_is_not_called_clean(two_step_report: Report) -> None:
    report = two_step_report
    cov = report.coverage
    assert not report.findings
    assert not cov.complete
    assert {"loss-spike", "loss-divergence", "overfitting", "exploding-gradients"} <= set(
        cov.main_not_run
    )
    line = _common.verdict(report)
    assert not line.startswith(_common.NO_PROBLEMS), line
    assert line.startswith(f"Nothing found by the {len(cov.ran)} checks that ran, but ")
    text = terminal.render(report, width=200)
    assert _common.NO_PROBLEMS not in text
    assert re.search(
        r"too few points +loss-spike, noisy-loss, underfitting: only 2 finite train/loss "
        r"points, needs 20",
        text,
    )
    assert re.search(  # short epoch-level logs are checked from 10 points on
        r"too few points +loss-divergence, loss-flat, val-below-train: only 2 finite "
        r"train/loss points, needs 10",
        text,
    )
    md = markdown.render(report)
    assert "### Coverage" in md and _common.NO_PROBLEMS not in md
    data = json.loads(json_report.render(report))
    assert data["coverage"]["complete"] is False
    assert data["coverage"]["main_not_run"] == list(cov.main_not_run)
    page = html.render(report, build_plot_data(runlens.load_run(report.run.path), report))
    assert f"Coverage: {len(cov.ran)} checks ran, {len(report.not_checked)} could not run" in page
    assert _common.NO_PROBLEMS not in page


def test_sanity_signatures_say_not_checked_on_too_short_sweeps(tmp_path: Path) -> None:
    x, y = blobs(32, seed=1)
    model = mixed_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cfg = {"num_classes": CLASSES}
    # overfit_one_batch needs 2 steps; an overfit run recorded by hand can have 1
    # (docs/playbook.md: the kind in run.json is what the analyzer goes by).
    train(tmp_path / "o", model, 1, F.cross_entropy, x, y, cfg)
    meta = json.loads((tmp_path / "o" / fmt.RUN_JSON).read_text())
    fmt.write_json_atomic({**meta, "kind": "overfit_one_batch"}, tmp_path / "o" / fmt.RUN_JSON)
    lr_range_test(model, opt, [(x, y)], F.cross_entropy, tmp_path / "l", steps=5, config=cfg)
    over = runlens.analyze(tmp_path / "o")
    assert skipped(over)["cannot-overfit-batch"] == (
        "too-few-points",
        "only 1 finite train/loss points, needs 2",
    )
    assert over.coverage.main == ("cannot-overfit-batch",) and not over.coverage.complete
    sweep = runlens.analyze(tmp_path / "l")
    kind, reason = skipped(sweep)["lr-range-test"]
    assert kind == "too-few-points" and "fewer than 8 usable points" in reason
    assert _common.NO_PROBLEMS not in _common.verdict(sweep)


def test_healthy_run_says_no_problems_and_lists_what_ran(tmp_path: Path) -> None:
    x, y = blobs(512, seed=2)
    run = train(tmp_path / "ok", mixed_mlp(), 80, F.cross_entropy, x, y, {"num_classes": CLASSES})
    report = runlens.analyze(run)
    assert not [f for f in report.findings if f.severity != "info"], report.findings
    cov = report.coverage
    assert cov.complete and not cov.main_not_run
    assert set(cov.main) >= {"loss-spike", "overfitting", "vanishing-gradients"}
    assert set(cov.clean) | set(cov.found) | set(skipped(report)) == set(REGISTRY)
    assert _common.verdict(report).startswith(f"{_common.NO_PROBLEMS} ({len(cov.ran)} checks ran")
    text = terminal.render(report, width=200)
    assert "found nothing   " in text and "loss-spike" in text.split("found nothing")[1]


def test_not_applicable_checks_do_not_make_a_run_incomplete(tmp_path: Path) -> None:
    """A linear classifier has no depth: the depth checks do not apply, which is not a
    gap in the analysis."""
    x, y = blobs(512, seed=4)
    torch.manual_seed(0)
    run = train(tmp_path / "lin", nn.Linear(8, CLASSES), 80, F.cross_entropy, x, y,
                {"num_classes": CLASSES})  # fmt: skip
    report = runlens.analyze(run)
    got = skipped(report)
    assert got["vanishing-gradients"] == (
        "not-applicable",
        "1 weight layer(s) receive a gradient; comparing first and last layers needs 3",
    )
    # a root Linear has no child modules, so no activation rows either
    assert got["bad-initialization"] == (
        "not-recorded",
        "no activation std statistics; 0 linear/conv layer(s) followed by a known "
        "activation, needs 2",
    )
    parts = {(p.signature, p.part): p.kind for p in report.coverage.partial}
    assert parts[("exploding-gradients", "ratio over depth")] == "not-applicable"
    assert "exploding-gradients" in report.coverage.ran  # growth over steps was checked
    assert "vanishing-gradients" in report.coverage.main
    assert report.coverage.complete, report.coverage.main_not_run
    assert _common.verdict(report).startswith(_common.NO_PROBLEMS)


def test_missing_activations_of_a_compiled_model_say_why(
    two_step_report: Report, tmp_path: Path
) -> None:
    """run.json's collector block (kinds_in_effect, compiled) explains a missing kind."""
    src = Path(two_step_report.run.path)
    run_dir = tmp_path / "compiled"
    shutil.copytree(src, run_dir)
    layers = run_dir / fmt.LAYERS_DIR
    for part in layers.rglob("*.parquet"):  # keep every kind but activations
        table = pq.read_table(part)
        pq.write_table(table.filter(pc.not_equal(table["kind"], fmt.KIND_ACTIVATION)), part)
    meta = json.loads((run_dir / fmt.RUN_JSON).read_text())
    meta["collector"]["compiled"] = True
    meta["collector"]["kinds_in_effect"] = [k for k in fmt.KINDS if k != fmt.KIND_ACTIVATION]
    fmt.write_json_atomic(meta, run_dir / fmt.RUN_JSON)
    got = skipped(runlens.analyze(run_dir))
    want = (
        "needs layers:activation (not recorded: the model was compiled, activation hooks are off)"
    )
    assert got["dead-relu"] == ("not-recorded", want)
    assert got["activation-explosion"] == ("not-recorded", want)


def test_a_broken_signature_is_an_internal_error(two_step_report: Report, monkeypatch) -> None:
    class Broken(REGISTRY["nan-inf"]):  # type: ignore[misc,valid-type]
        name = "test-broken"

        def detect(self, ctx, p):  # type: ignore[no-untyped-def]
            raise ZeroDivisionError("division by zero")

    monkeypatch.setitem(REGISTRY, Broken.name, Broken)
    report = runlens.analyze(two_step_report.run.path)
    assert skipped(report)["test-broken"] == (
        "internal-error",
        "internal error: ZeroDivisionError: division by zero",
    )
    assert "test-broken" not in report.coverage.ran
    assert "signature test-broken failed: ZeroDivisionError: division by zero" in report.warnings
    lines = [ln for ln in _common.coverage_lines(report) if ln.heading == "internal error"]
    assert [ln.text for ln in lines] == ["test-broken: ZeroDivisionError: division by zero"]


# -- task: stated, never guessed ----------------------------------------------------------


def hot_head(model: nn.Sequential, scale: float = 200.0) -> nn.Sequential:
    """A last layer initialized far too large: confident wrong predictions at step 0."""
    with torch.no_grad():
        model[-1].weight.mul_(scale)
    return model


@pytest.fixture(scope="module")
def hot_classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same badly initialized 4-class classifier, recorded with num_classes in its
    config, and without it and with a cross entropy written by hand (no loss function the
    collector can see: nothing says the task)."""
    root = tmp_path_factory.mktemp("hot")
    x, y = blobs(256, seed=3)
    with_cfg = train(
        root / "cfg", hot_head(mixed_mlp()), 30, F.cross_entropy, x, y, {"num_classes": CLASSES}
    )

    def hand_written_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -out.log_softmax(-1).gather(1, y[:, None]).mean()

    without = train(root / "bare", hot_head(mixed_mlp()), 30, hand_written_ce, x, y, {})
    return with_cfg, without


def test_classifier_with_num_classes_gets_the_chance_check(hot_classifier) -> None:
    with_cfg, _ = hot_classifier
    report = runlens.analyze(with_cfg)
    f = next(f for f in report.findings if f.signature == "bad-initial-loss")
    ev = {e.name: e.value for e in f.evidence}
    assert ev["chance level ln(C)"] == pytest.approx(math.log(CLASSES))
    assert ev["initial loss / ln(C)"] > 2
    assert report.coverage.task.source == "config num_classes"
    # The same run analyzed with the task turned off does not look at all.
    off = runlens.analyze(with_cfg, runlens.AnalyzeOptions(task="unknown"))
    assert "bad-initial-loss" not in {f.signature for f in off.findings}
    assert skipped(off)["bad-initial-loss"][0] == "task-unknown"


def test_task_stated_on_the_command_line(hot_classifier) -> None:
    _, bare = hot_classifier
    runner = CliRunner()
    plain = json.loads(runner.invoke(cli, ["analyze", str(bare), "--format", "json"]).stdout)
    assert plain["coverage"]["task"]["type"] == "unknown"
    assert "bad-initial-loss" not in [f["signature"] for f in plain["findings"]]
    kinds = {s["signature"]: s["kind"] for s in plain["skipped"]}
    assert kinds["bad-initial-loss"] == kinds["logits-as-probabilities"] == "task-unknown"
    stated = runner.invoke(
        cli, ["analyze", str(bare), "--format", "json", "--task", f"classification:{CLASSES}"]
    )
    data = json.loads(stated.stdout)
    assert data["coverage"]["task"] == {
        "type": "classification",
        "num_classes": CLASSES,
        "source": "--task",
        "ignored": [],
        "chance_level": pytest.approx(math.log(CLASSES)),
    }
    assert "bad-initial-loss" in [f["signature"] for f in data["findings"]]
    bad = runner.invoke(cli, ["analyze", str(bare), "--task", "classification:ten"])
    assert bad.exit_code == 2
    assert bad.stderr.startswith("runlens: error: --task 'classification:ten': expected")


def test_wide_regression_output_gets_no_chance_check(tmp_path: Path) -> None:
    """64 outputs trained with MSE and no task info (the squared error written by hand: no
    loss function the collector sees): ln(64) would be a guess."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, 64, generator=g) * 10  # targets far from 0: a large initial MSE

    def hand_written_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (out - y).pow(2).mean()

    run = train(
        tmp_path / "reg", mixed_mlp(out=64), 40, hand_written_mse, x, y, {"lr": 0.01}, lr=0.01
    )
    loaded = runlens.load_run(run)
    assert loaded.output_width == 64  # the shape the old guess read C from
    report = runlens.analyze(loaded)
    first_loss = float(loaded.scalar("train/loss").values[0])
    assert first_loss > 2 * math.log(64)  # the guess would have called this a bad init
    assert not chance_evidence(report)
    assert report.coverage.task.type == "unknown" and report.coverage.task.chance_level is None
    kind, reason = skipped(report)["bad-initial-loss"]
    assert kind == "task-unknown" and "--task classification:C" in reason
    assert skipped(report)["logits-as-probabilities"][0] == "task-unknown"
    assert skipped(report)["not-learning"][0] == "task-unknown"  # no accuracy logged either
    # underfitting judges a plateau against ln(C) only: without it, not checked at all
    assert skipped(report)["underfitting"][0] == "task-unknown"
    text = terminal.render(report, width=200)
    assert re.search(r"\n  task +unknown: chance-level checks off", text)
    assert re.search(
        r"\n  task unknown +not-learning, bad-initial-loss, logits-as-probabilities: ", text
    )
    assert re.search(r"\n  task unknown +underfitting: need the number of classes C", text)
    # Stated as a regression, the chance level does not apply: nothing left to ask for.
    stated = runlens.analyze(run, runlens.AnalyzeOptions(task="regression"))
    assert skipped(stated)["bad-initial-loss"][0] == "not-applicable"
    assert not stated.coverage.partial or all(
        p.kind != "task-unknown" for p in stated.coverage.partial
    )


def test_run_json_task_is_read_and_config_wins(hot_classifier, tmp_path: Path) -> None:
    """The collector's side of the contract: run.json ``task`` written with
    fmt.task_record is what the analyzer uses when the config says nothing."""
    _, bare = hot_classifier
    meta_path = bare / fmt.RUN_JSON
    original = meta_path.read_text()
    try:
        meta = json.loads(original)
        assert meta.get("task") is None  # no loss function seen: null reads as unknown
        meta["task"] = fmt.task_record("classification", CLASSES, "loss:cross_entropy")
        fmt.write_json_atomic(meta, meta_path)
        report = runlens.analyze(bare)
        assert report.coverage.task.source == "run.json task (loss:cross_entropy)"
        assert chance_evidence(report) == [pytest.approx(math.log(CLASSES))] * len(
            chance_evidence(report)
        )
        assert "bad-initial-loss" in {f.signature for f in report.findings}
        meta["task"] = fmt.task_record("language-modeling", 32, "model:GPT2LMHeadModel")
        fmt.write_json_atomic(meta, meta_path)
        lm = runlens.analyze(bare)
        assert skipped(lm)["bad-initial-loss"][0] == "not-applicable"
        meta["task"] = {"type": "segmentation-ish", "num_classes": "many"}  # malformed
        fmt.write_json_atomic(meta, meta_path)
        assert runlens.analyze(bare).coverage.task.type == "unknown"
    finally:
        meta_path.write_text(original)


def test_task_record_and_read_task_round_trip() -> None:
    rec = fmt.task_record("classification", 10, "loss:cross_entropy")
    assert fmt.read_task({"task": rec}) == rec
    assert fmt.read_task({}) is None and fmt.read_task({"task": None}) is None
    assert fmt.read_task({"task": {"type": "classification", "num_classes": True}}) == {
        "type": "classification",
        "num_classes": None,
        "source": "",
    }
    with pytest.raises(ValueError):
        fmt.task_record("segmentation", 3)
    with pytest.raises(ValueError):
        fmt.task_record("classification", 0)
    assert set(fmt.new_run_json("0", "x", 0.0)) == set(fmt.RUN_JSON_KEYS)


@pytest.mark.parametrize(
    ("meta", "config", "stated", "want"),
    [
        # stated > config > run.json
        ({"task": fmt.task_record("classification", 5, "loss:cross_entropy")},
         {"num_classes": 3}, "classification:7", ("classification", 7, "--task")),
        ({"task": fmt.task_record("classification", 5, "loss:cross_entropy")},
         {"num_classes": 3}, None, ("classification", 3, "config num_classes")),
        ({"task": fmt.task_record("classification", 5, "loss:cross_entropy")}, {}, None,
         ("classification", 5, "run.json task (loss:cross_entropy)")),
        # a type from the config, the count from run.json
        ({"task": fmt.task_record("classification", 5, "loss:cross_entropy")},
         {"task": "classification"}, None,
         ("classification", 5, "config task; run.json task (loss:cross_entropy)")),
        # a count from a source of another type is not taken
        ({"task": fmt.task_record("language-modeling", 50257, "model:GPT2LMHeadModel")},
         {"task": "classification"}, None, ("classification", None, "config task")),
        ({}, {"task": "regression", "num_classes": 3}, None, ("regression", None, "config task")),
        ({}, {"task": "classification:12"}, None, ("classification", 12, "config task")),
        # Hugging Face num_labels: a classifier's is the class count, an LM's is a default
        ({"model": {"class": "BertForSequenceClassification"}},
         {"model_type": "bert", "num_labels": 3}, None, ("classification", 3, "config num_labels")),
        ({"model": {"class": "GPT2LMHeadModel"}}, {"model_type": "gpt2", "num_labels": 2}, None,
         ("unknown", None, None)),
        ({}, {"model_type": "gpt2", "num_labels": 2}, None, ("unknown", None, None)),
        ({}, {"num_labels": 6}, None, ("classification", 6, "config num_labels")),
        # nothing stated, whatever the output shape
        ({"model": {"output_shape": [8, 64]}}, {}, None, ("unknown", None, None)),
        ({}, {"num_classes": 10}, "unknown", ("unknown", None, None)),
    ],
)  # fmt: skip
def test_resolve_task_order(meta, config, stated, want) -> None:
    t = resolve_task(meta, config, parse_task(stated) if stated else None)
    assert (t.type, t.num_classes, t.source) == want
    chance = math.log(want[1]) if want[0] == "classification" and want[1] else None
    assert t.chance_level == (pytest.approx(chance) if chance else None)


def test_ignored_num_labels_is_said() -> None:
    t = resolve_task(
        {"model": {"class": "GPT2LMHeadModel"}}, {"model_type": "gpt2", "num_labels": 2}
    )
    assert t.ignored == (
        "config num_labels=2 ignored: the model GPT2LMHeadModel is a language model",
    )
    kind, reason = t.why_no_chance()
    assert kind == "task-unknown" and "num_labels=2 ignored" in reason


@pytest.mark.parametrize("spec", ["", "classification:0", "regression:3", "vision", "cls:x"])
def test_bad_task_specs_are_one_line_errors(spec: str) -> None:
    with pytest.raises(OptionError, match="expected TYPE or TYPE:CLASSES"):
        runlens.AnalyzeOptions(task=spec)


def test_task_info_text() -> None:
    assert (
        TaskInfo("classification", 10, "config").describe() == "classification, 10 classes (config)"
    )
    assert parse_task("lm:50257").describe() == (
        "language-modeling, 50257 tokens in the vocabulary (--task)"
    )


# -- Hugging Face Trainer: a causal LM is never judged against ln(2) ----------------------


def _hf_train(out: Path, model: nn.Module, labels: Callable[[torch.Tensor], torch.Tensor],
              steps: int, logging_steps: int) -> Path:  # fmt: skip
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from runlens_collect.integrations.hf import RunlensTrainerCallback

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 32, (64, 12), generator=gen)
    data = [{"input_ids": r, "labels": labels(r)} for r in ids]
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, callbacks=[RunlensTrainerCallback()]
    )
    trainer.train()
    trainer.state.save_to_json(str(out / "trainer_state.json"))
    return out


@pytest.fixture(scope="module")
def hf_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 trained 14 steps, loss logged every 2nd step: 7 loss points, like a
    real job at the default logging_steps=500."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0
    )
    return _hf_train(
        tmp_path_factory.mktemp("hf-lm"),
        transformers.GPT2LMHeadModel(config),
        lambda r: r,
        steps=14,
        logging_steps=2,
    )


def test_hf_causal_lm_is_not_judged_against_ln2(hf_lm: Path) -> None:
    run = runlens.load_run(hf_lm / "runlens")
    assert run.config["model_type"] == "gpt2" and "num_labels" not in run.config
    loss = run.scalar("train/loss")
    assert len(loss) == 14  # every step, whatever logging_steps is (the collector's own)
    assert float(loss.values[0]) > 2 * math.log(2)  # ln(2) would make this a bad init
    report = runlens.analyze(run)
    assert not chance_evidence(report)
    assert "bad-initial-loss" not in {f.signature for f in report.findings}
    t = report.coverage.task
    assert (t.type, t.num_classes) == ("language-modeling", 32) and t.chance_level is None
    assert t.source == "run.json task (model:GPT2LMHeadModel)"
    assert skipped(report)["bad-initial-loss"][0] == "not-applicable"
    # The analyzer still distrusts a bare num_labels next to a language-model class.
    meta = dict(run.meta, task=None, config={"model_type": "gpt2", "num_labels": 2})
    t = runlens.analyze(replace(run, meta=meta)).coverage.task
    assert t.type == "unknown" and t.chance_level is None
    assert any("num_labels=2 ignored" in i and "GPT2LMHeadModel" in i for i in t.ignored)


def test_short_hf_log_says_too_few_points_not_no_problems(hf_lm: Path) -> None:
    """The Trainer's own trainer_state.json, imported: 7 loss points."""
    for report in (
        runlens.analyze(hf_lm / "trainer_state.json"),
        runlens.analyze(hf_lm / "runlens"),
    ):
        got = skipped(report)
        kind, reason = got["loss-spike"]
        assert kind == "too-few-points"
        n = 7 if report is not None and report.run.source_format != "runlens" else 14
        assert reason == f"only {n} finite train/loss points, needs 20", reason
        assert got["overfitting"][0] in ("not-recorded", "too-few-points")
        assert not report.coverage.complete
        line = _common.verdict(report)
        # Random tokens: the loss rightly stays flat over 14 steps (loss-flat, from 10
        # points); whatever is found, the verdict never says the run is clean.
        assert _common.NO_PROBLEMS not in line and "could not run" in line, line
        assert not chance_evidence(report)
    imported = runlens.analyze(hf_lm / "trainer_state.json")
    assert imported.coverage.task.type == "unknown"  # a trainer_state has no model class
    needs = [s for s in imported.skipped if s.reason.startswith("needs layers:")]
    assert len(needs) >= 8 and all(s.kind == "not-recorded" for s in needs)
    why = "(an imported hf-trainer log has no layer statistics)"
    assert all(s.reason.endswith(why) for s in needs)


def test_hf_sequence_classifier_num_labels_is_trusted(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, num_labels=3,
        pad_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2ForSequenceClassification(config)
    out = _hf_train(tmp_path, model, lambda r: r[0] % 3, steps=6, logging_steps=1)
    report = runlens.analyze(out / "runlens")
    t = report.coverage.task
    # From the loss the model computed (HF's CrossEntropyLoss over num_labels logits).
    assert (t.type, t.num_classes) == ("classification", 3)
    assert t.source == "run.json task (loss:cross_entropy)"
    assert t.chance_level == pytest.approx(math.log(3))
    assert "bad-initial-loss" in report.coverage.ran


# -- compare: the per-run view says which runs were not fully checked ---------------------


def test_compare_marks_runs_whose_checks_did_not_all_run(
    two_step_report: Report, tmp_path: Path
) -> None:
    x, y = blobs(512, seed=2)
    full = train(tmp_path / "full", mixed_mlp(), 80, F.cross_entropy, x, y, {"num_classes": 4})
    c = runlens.compare([full, Path(two_step_report.run.path)])
    text = compare_terminal.render(c, width=200)
    n = len(c.run("run").report.not_checked)
    assert f"run (incomplete: {n} checks could not run)" in text
    runs = {r["label"]: r for r in c.to_dict()["runs"]}
    assert runs["full"]["coverage"]["complete"] is True
    assert runs["run"]["coverage"]["complete"] is False
    page = html.render_comparison(c, [{"smoothing": 0.9} for _ in c.runs])
    assert "not every main check ran in run" in page
    assert np.isfinite(c.run("full").metric_final or np.nan)
