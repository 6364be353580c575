"""Input handling: folders of runs, Keras/fastai/Lightning/HF layouts, appended runs and
bad input, on logs written the way the real tools write them (tests/log_writers.py) from
tiny real trainings, through the library and the command line."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_runs import recorded
from click.testing import CliRunner
from log_writers import (
    Training,
    hf_log_history,
    lightning_csv_runs,
    noisy_label_training,
    write_fastai_history,
    write_hf_checkpoint,
    write_hf_tensorboard,
    write_keras_csvlogger,
    write_keras_history,
    write_keras_tensorboard,
)

import runlens
from runlens.cli import cli
from runlens.discover import discover
from runlens.errors import RunLoadError
from runlens.importers import default_names, resolve_names
from runlens.sources import open_found, open_run


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNLENS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def training() -> Training:
    return noisy_label_training()


@pytest.fixture(scope="session")
def training_b() -> Training:
    return noisy_label_training(steps=400, lr=3e-3, seed=5)


@pytest.fixture(scope="session")
def lightning_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lightning_csv_runs(tmp_path_factory.mktemp("lightning"))


def invoke(*args: object) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result: object, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("runlens: error: "), result.stderr
    assert "Traceback" not in result.output
    for frag in fragments:
        assert frag in lines[0], lines[0]


def reports_in(text: str) -> list[str]:
    """The run names of the terminal reports in ``text``, in order."""
    return [ln.split(None, 1)[1] for ln in text.splitlines() if ln.startswith("run ")]


# -- folders of runs -------------------------------------------------------------------------


def test_tensorboard_runs_folder_is_analyzed_run_by_run(
    tmp_path: Path, training: Training, training_b: Training
) -> None:
    runs = tmp_path / "out" / "runs"  # the HF Trainer's logging_dir layout
    write_hf_tensorboard(runs / "May02_10-11-12_gpu1", training_b)
    write_hf_tensorboard(runs / "May01_09-00-00_gpu1", training)
    found = discover(runs)
    assert [r.label for r in found.runs] == ["May01_09-00-00_gpu1", "May02_10-11-12_gpu1"]
    assert {r.format for r in found.runs} == {"tensorboard"}
    assert all(r.reason == "TensorBoard event files" for r in found.runs)
    # The library refuses to pick one and names them.
    with pytest.raises(RunLoadError, match=r"holds 2 runs .*May01_09-00-00_gpu1"):
        open_run(runs)

    r = invoke("analyze", runs)
    assert r.exit_code == 0, r.output
    assert reports_in(r.stdout) == ["May01_09-00-00_gpu1", "May02_10-11-12_gpu1"]
    assert r.stdout.startswith(f"runlens: {runs}: 2 runs, one report each")
    # Each report read its own run: the first one's val loss is the first training's.
    first = r.stdout.split("runlens report")[1]
    best = min(e["val_loss"] for e in training.evals)
    assert "val loss" in first and "0 signatures checked" not in r.stdout
    assert training.evals[-1]["val_loss"] > best
    # --fail-on: the worst exit status over the runs (both overfit: a warning each).
    assert invoke("analyze", runs, "--fail-on", "warning").exit_code == 1


def test_lightning_logs_folder_from_the_real_csvlogger(lightning_logs: Path) -> None:
    found = discover(lightning_logs)
    assert [r.label for r in found.runs] == ["version_0", "version_1"]
    assert all(r.format == "csv" and "metrics.csv" in r.reason for r in found.runs)
    for item in found.runs:
        run = open_found(item)
        with open(item.path / "metrics.csv") as fh:
            rows = list(csv.DictReader(fh))
        step_rows = [r for r in rows if r["train_loss_step"]]
        # on_step + on_epoch: train_loss_step is train/loss, train_loss_epoch keeps apart.
        tl = run.scalar("train/loss")
        assert tl is not None and tl.steps.tolist() == [int(r["step"]) for r in step_rows]
        assert tl.values == pytest.approx([float(r["train_loss_step"]) for r in step_rows])
        assert "train/loss_epoch" in run.scalar_names and "val/loss" in run.scalar_names
        assert not any("both map to" in w for w in run.warnings), run.warnings
        # hparams.yaml holds max_epochs=20; EarlyStopping may end it before.
        report = runlens.analyze(run)
        epochs_done = max(int(r["epoch"]) for r in rows) + 1
        assert report.summary.planned_length == 20 and report.summary.planned_unit == "epoch"
        if epochs_done < 20:
            assert report.run.status == "stopped"
            assert f"stopped after epoch {epochs_done} of 20 planned" in report.summary.end_reason
        else:
            assert report.run.status == "finished"
        assert report.run.config["max_epochs"] == 20
    statuses = {runlens.analyze(open_found(r)).run.status for r in found.runs}
    assert "stopped" in statuses  # EarlyStopping ended at least one of them early
    r = invoke("analyze", lightning_logs, "--format", "markdown")
    assert r.exit_code == 0, r.output
    assert r.stdout.count("## runlens report: version\\_") == 2


def test_folder_of_runlens_runs_json_lists_every_report(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    parent = tmp_path / "sweep"
    shutil.copytree(recorded(tmp_path_factory, "healthy"), parent / "a_healthy")
    shutil.copytree(recorded(tmp_path_factory, "nan"), parent / "b_nan")
    r = invoke("analyze", parent, "--format", "json", "--fail-on", "error")
    assert r.exit_code == 1, r.output  # nan-inf is an error in b_nan: the worst wins
    doc = json.loads(r.stdout)
    assert doc["kind"] == "runs" and doc["runs_found"] == 2 and doc["errors"] == []
    assert [x["label"] for x in doc["reports"]] == ["a_healthy", "b_nan"]
    for x in doc["reports"]:
        assert x["format"] == "runlens" and x["reason"] == "runlens run directory"
        single = json.loads(invoke("analyze", parent / x["label"], "--format", "json").stdout)
        assert x["summary"] == single["summary"] and x["findings"] == single["findings"]
    assert "nan-inf" in {f["signature"] for f in doc["reports"][1]["findings"]}


def test_folder_of_csv_logs_with_an_unreadable_one(tmp_path: Path, training: Training) -> None:
    d = tmp_path / "logs"
    d.mkdir()
    write_keras_csvlogger(d / "a.csv", training.epochs())
    write_fastai_history(d / "b.csv", training.epochs())
    (d / "c.csv").write_text("epoch,loss\nsoon,later\n")  # a header, but no numbers
    (d / "notes.md").write_text("# not a log\n")
    (d / "tb").mkdir()  # an event file cut to garbage: found, but unreadable
    (d / "tb" / "events.out.tfevents.1700000000.host").write_bytes(b"\x07" * 300)
    found = discover(d)
    assert [r.label for r in found.runs] == ["a.csv", "b.csv", "tb"]
    assert found.notes == ("c.csv: skipped, not a metrics CSV",)
    r = invoke("analyze", d)
    assert r.exit_code == 2  # tb cannot be read: bad input is the worst status
    assert reports_in(r.stdout) == ["a", "b"]
    assert "runlens: c.csv: skipped, not a metrics CSV" in r.stdout
    assert "runlens: error: tb: " in r.stderr and "Traceback" not in r.output


def test_html_of_several_runs_needs_a_folder(tmp_path: Path, training: Training) -> None:
    d = tmp_path / "logs"
    d.mkdir()
    write_keras_csvlogger(d / "run1.csv", training.epochs())
    write_keras_csvlogger(d / "run2.csv", training.epochs()[:12])
    assert_one_line_error(
        invoke("analyze", d, "--format", "html", "-o", tmp_path / "x.html"),
        "holds 2 runs (run1.csv, run2.csv)",
        "-o DIR",
    )
    pages = tmp_path / "pages"
    r = invoke("analyze", d, "--format", "html", "-o", pages)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in pages.iterdir()) == ["run1.csv.html", "run2.csv.html"]
    assert "runlens report: run1" in (pages / "run1.csv.html").read_text()


def test_nothing_readable_is_one_line_saying_what_was_looked_for(tmp_path: Path) -> None:
    d = tmp_path / "junk"
    (d / "sub").mkdir(parents=True)
    (d / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (d / "sub" / "config.yaml").write_text("lr: 0.1\n")
    r = invoke("analyze", d)
    assert_one_line_error(r, "no runs found", "TensorBoard event files", "trainer_state.json",
                          "metrics.csv", "training.log")  # fmt: skip


# -- Keras -------------------------------------------------------------------------------------


def test_keras_training_log_is_read(tmp_path: Path, training: Training) -> None:
    f = tmp_path / "training.log"  # CSVLogger's file name in Keras' own examples
    rows = training.epochs()
    write_keras_csvlogger(f, rows)
    run = open_run(f)
    assert run.source_format == "csv" and run.x_axis == "epoch"
    assert run.scalar_names == ("lr/0", "train/accuracy", "train/loss", "val/accuracy",
                                "val/loss")  # fmt: skip
    vl = run.scalar("val/loss")
    assert vl.steps.tolist() == list(range(len(rows)))
    assert vl.values == pytest.approx([r["val_loss"] for r in rows])
    report = runlens.analyze(run)
    assert report.run.x_axis == "epoch" and report.summary.last_step == len(rows) - 1


@pytest.mark.parametrize("index", [True, False], ids=["pandas-index", "no-index"])
def test_keras_history_csv_without_epoch_column(
    tmp_path: Path, training: Training, index: bool
) -> None:
    f = tmp_path / "history.csv"
    rows = training.epochs()
    write_keras_history(f, rows, index=index)
    run = open_run(f)
    assert run.x_axis == "epoch"
    assert run.scalar_names == ("train/accuracy", "train/loss", "val/accuracy", "val/loss")
    tl = run.scalar("train/loss")
    assert tl.steps.tolist() == list(range(len(rows)))  # epoch = row index
    assert tl.values == pytest.approx([r["loss"] for r in rows])
    assert any("row index is used as the epoch" in w for w in run.warnings)
    r = invoke("analyze", f, "--format", "json")
    assert r.exit_code == 0
    assert any("row index is used as the epoch" in w for w in json.loads(r.stdout)["warnings"])


def test_keras_tensorboard_train_and_validation_dirs_are_one_run(
    tmp_path: Path, training: Training
) -> None:
    logs = tmp_path / "logs"
    rows = training.epochs()
    write_keras_tensorboard(logs, rows)
    found = discover(logs)
    assert [(r.label, r.format) for r in found.runs] == [(".", "tensorboard")]
    run = open_run(logs)
    assert run.x_axis == "epoch"
    assert {"train/loss", "val/loss", "train/accuracy", "val/accuracy", "lr/0"} <= set(
        run.scalar_names
    )
    assert run.scalar("val/loss").values == pytest.approx([r["val_loss"] for r in rows])


# -- appended runs ---------------------------------------------------------------------------


def test_keras_append_runs_are_split_never_merged(tmp_path: Path, training: Training) -> None:
    f = tmp_path / "training.log"
    rows = training.epochs()
    write_keras_csvlogger(f, rows[:10])  # CSVLogger(append=True) over three fits:
    write_keras_csvlogger(f, rows[:12], append=True)  # no header again, epoch from 0
    write_keras_csvlogger(f, rows[:8], append=True)
    found = discover(f)
    assert [r.label for r in found.runs] == ["training.log#1", "training.log#2", "training.log#3"]
    assert [r.lines for r in found.runs] == [(2, 11), (12, 23), (24, 31)]
    assert found.notes == (
        "training.log: 3 runs appended in one file: lines 2–11, 12–23, 24–31 (epoch went back "
        "from 9 to 0 at line 12; epoch went back from 11 to 0 at line 24)",
    )
    lengths = [len(open_found(r).scalar("val/loss")) for r in found.runs]
    assert lengths == [10, 12, 8]
    with pytest.raises(RunLoadError, match="holds 3 runs"):
        open_run(f)
    r = invoke("analyze", f)
    assert r.exit_code == 0, r.output
    assert "3 runs appended in one file: lines 2–11, 12–23, 24–31" in r.stdout
    assert reports_in(r.stdout) == [f"training (run {k} of 3)" for k in (1, 2, 3)]
    assert "epochs 0–11" in r.stdout.split("runlens report")[2]
    # compare takes every part too
    c = runlens.compare([f])
    assert sorted(len(x.label) > 0 for x in c.runs) == [True] * 3


def test_repeated_header_starts_a_new_run(tmp_path: Path, training: Training) -> None:
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    rows = training.epochs()
    write_keras_csvlogger(a, rows[:5])
    write_keras_csvlogger(b, rows[:7])
    both = tmp_path / "both.csv"
    both.write_bytes(a.read_bytes() + b.read_bytes())  # `cat a.csv b.csv > both.csv`
    found = discover(both)
    assert [r.lines for r in found.runs] == [(2, 6), (8, 14)]
    assert "header repeated at line 7" in found.notes[0]


def test_resumed_run_stays_one_run_with_a_warning(tmp_path: Path, training: Training) -> None:
    f = tmp_path / "metrics.csv"
    rows = training.epochs()
    write_keras_csvlogger(f, rows[:10])
    write_keras_csvlogger(f, rows[6:15], append=True)  # resumed from the epoch-6 checkpoint
    found = discover(f)
    assert len(found.runs) == 1
    run = open_found(found.runs[0])
    vl = run.scalar("val/loss")
    assert vl.steps.tolist() == list(range(15))
    assert any("goes back from 9 to 6 at line 12" in w for w in run.warnings), run.warnings


# -- column conventions ------------------------------------------------------------------------


def test_fastai_metrics_are_validation_metrics(tmp_path: Path, training: Training) -> None:
    f = tmp_path / "history.csv"
    rows = training.epochs()
    write_fastai_history(f, rows)
    run = open_run(f)
    assert run.scalar_names == ("train/loss", "val/accuracy", "val/error_rate", "val/loss")
    assert run.scalar("val/accuracy").values == pytest.approx([r["val_accuracy"] for r in rows])
    assert run.scalar("train/loss").values == pytest.approx([r["loss"] for r in rows])
    assert run.x_axis == "epoch"


def test_fastai_time_column_gives_wall_times(tmp_path: Path) -> None:
    # What fastai writes for epochs of 1m05s, 1m03s and 1h00m02s (format_time).
    f = tmp_path / "history.csv"
    f.write_text(
        "epoch,train_loss,valid_loss,accuracy,time\n"
        "0,0.9,0.8,0.6,01:05\n1,0.7,0.75,0.65,01:03\n2,0.6,0.74,0.66,1:00:02\n"
    )
    run = open_run(f)
    w = run.scalar("train/loss").wall_time
    assert np.diff(w).tolist() == [63.0, 3602.0]


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        # Keras: X beside val_X is a training metric; acc/lr spellings of Keras 2.
        (["loss", "acc", "val_loss", "val_acc", "lr", "mae", "val_mae"],
         {"loss": "train/loss", "acc": "train/accuracy", "val_loss": "val/loss",
          "val_acc": "val/accuracy", "lr": "lr/0", "mae": "train/mae", "val_mae": "val/mae"}),
        (["loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"],
         {"loss": "train/loss", "accuracy": "train/accuracy", "val_loss": "val/loss",
          "val_accuracy": "val/accuracy", "learning_rate": "lr/0"}),
        # Lightning: *_step / *_epoch from on_step=True, on_epoch=True.
        (["epoch", "train_loss_step", "train_loss_epoch", "val_loss", "train_acc_step",
          "train_acc_epoch", "val_acc"],
         {"train_loss_step": "train/loss", "train_loss_epoch": "train/loss_epoch",
          "val_loss": "val/loss", "train_acc_step": "train/accuracy",
          "train_acc_epoch": "train/accuracy_epoch", "val_acc": "val/accuracy",
          "epoch": "epoch"}),
        # HF with a dict of eval datasets: the validation set is the primary one.
        (["loss", "eval_test_loss", "eval_validation_loss", "eval_validation_wer",
          "eval_test_wer", "learning_rate", "grad_norm"],
         {"loss": "train/loss", "eval_validation_loss": "val/loss",
          "eval_validation_wer": "val/wer", "eval_test_loss": "val/test_loss",
          "eval_test_wer": "val/test_wer", "learning_rate": "lr/0", "grad_norm": "grad_norm"}),
        # ... and with a plain eval_loss, eval_<name>_loss are extra losses, kept apart.
        (["loss", "eval_loss", "eval_ce_loss"],
         {"loss": "train/loss", "eval_loss": "val/loss", "eval_ce_loss": "val/ce_loss"}),
        # no set named like validation: the first logged one is primary.
        (["eval_squad_loss", "eval_squad_f1", "eval_adv_loss"],
         {"eval_squad_loss": "val/loss", "eval_squad_f1": "val/f1",
          "eval_adv_loss": "val/adv_loss"}),
    ],
    ids=["keras2", "keras3", "lightning", "hf-eval-sets", "hf-extra-loss", "hf-first-set"],
)  # fmt: skip
def test_column_conventions(names: list[str], expected: dict[str, str]) -> None:
    got, warnings = resolve_names(names)
    assert got == expected and warnings == []
    assert {k: v[0] for k, v in default_names(names).items()} == expected


def test_hf_eval_sets_from_a_trainer_state(tmp_path: Path, training: Training) -> None:
    out = tmp_path / "whisper-small-hi"
    write_hf_checkpoint(out, training, max_steps=1500, eval_sets=("test", "validation"))
    run = open_run(out)
    names = set(run.scalar_names)
    assert {"val/loss", "val/accuracy", "val/test_loss", "val/test_accuracy"} <= names
    assert run.scalar("val/loss").values == pytest.approx([e["val_loss"] for e in training.evals])
    assert run.scalar("val/test_loss").values == pytest.approx(
        [e["test_loss"] for e in training.evals]
    )
    report = runlens.analyze(run)
    assert report.summary.task_metric == "val/accuracy"  # the primary set's, not test's


# -- planned length, duplicate steps -------------------------------------------------------------


def test_hf_log_that_stops_before_max_steps_is_not_finished(
    tmp_path: Path, training: Training
) -> None:
    last = int(training.steps[-1]["step"])
    write_hf_checkpoint(tmp_path / "cut", training, max_steps=10990)
    report = runlens.analyze(tmp_path / "cut")
    assert report.run.status == "stopped"
    assert report.summary.end_reason.startswith(f"stopped at step {last} of 10,990 planned")
    assert "checkpoint-600/trainer_state.json" in report.summary.end_reason
    r = invoke("analyze", tmp_path / "cut")
    assert f"stopped (stopped at step {last} of 10,990 planned" in r.stdout
    write_hf_checkpoint(tmp_path / "done", training, max_steps=last)
    done = runlens.analyze(tmp_path / "done")
    assert done.run.status == "finished" and "reached the 600 steps planned" in (
        done.summary.end_reason
    )


def test_benign_duplicate_steps_are_not_warnings(tmp_path: Path, training: Training) -> None:
    write_hf_checkpoint(tmp_path / "hf", training, max_steps=600)
    history = json.loads((tmp_path / "hf" / "checkpoint-600" / "trainer_state.json").read_text())[
        "log_history"
    ]
    steps = [e["step"] for e in history]
    assert len(steps) > len(set(steps))  # train and eval entries share eval steps
    report = runlens.analyze(tmp_path / "hf")
    assert not [w for w in report.warnings if "more than once" in w], report.warnings
    # Two training entries at one step with different losses: a genuine conflict.
    bad = hf_log_history(training)
    i = next(k for k, e in enumerate(bad) if "loss" in e)
    bad.insert(i + 1, dict(bad[i], loss=bad[i]["loss"] + 1.0))
    write_hf_checkpoint(tmp_path / "conflict", training, max_steps=600, history=bad)
    report = runlens.analyze(tmp_path / "conflict")
    dup = [w for w in report.warnings if "more than once" in w]
    assert dup and "train/loss: 1 steps" in dup[0], report.warnings


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("training.log", b"\x00\x01\x02garbage\xff\xfe", "not a readable CSV"),
        ("training.log", b"epoch,loss,val_loss\n", "not a metrics CSV"),
        ("metrics.csv", b"epoch,loss\nsoon,0.5\n", "holds no numbers"),
        ("trainer_state.json", b'{"global_step": 3}', "no log_history"),
        ("history.csv", b"\xff\xfe,\x00l\x00o\x00s\x00s\x00\n", "CSV"),
    ],
    ids=["binary-log", "header-only", "no-numbers", "no-history", "utf16"],
)
def test_bad_input_is_one_line_through_the_cli(
    tmp_path: Path, name: str, content: bytes, fragment: str
) -> None:
    f = tmp_path / name
    f.write_bytes(content)
    for fmt in ("terminal", "json"):
        assert_one_line_error(invoke("analyze", f, "--format", fmt), fragment)


def test_import_of_an_appended_file_names_the_runs(tmp_path: Path, training: Training) -> None:
    f = tmp_path / "training.log"
    write_keras_csvlogger(f, training.epochs()[:5])
    write_keras_csvlogger(f, training.epochs()[:5], append=True)
    assert_one_line_error(
        invoke("import", f, "-o", tmp_path / "out"), "holds 2 runs (training.log#1"
    )


def test_hf_log_without_steps_counts_epochs_and_its_plan(
    tmp_path: Path, training: Training
) -> None:
    # Older Trainer versions / custom loops: log_history entries with an epoch, no step.
    rows = training.epochs()[:12]
    history = [{"epoch": float(r["epoch"]), "loss": r["loss"], "eval_loss": r["val_loss"]}
               for r in rows]  # fmt: skip
    state = {"log_history": history, "epoch": 12.0, "num_train_epochs": 30}
    f = tmp_path / "trainer_state.json"
    f.write_text(json.dumps(state))
    report = runlens.analyze(f)
    assert report.run.x_axis == "epoch" and report.run.status == "stopped"
    assert report.summary.end_reason.startswith("stopped after epoch 12 of 30 planned")
    assert report.summary.last_step == 11
