"""Importers: real logs written by real writers (TensorBoard's SummaryWriter, the CSV
layouts of Lightning's and Keras' CSVLogger, a Hugging Face trainer_state.json) from
tiny real trainings, imported and diagnosed."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.tensorboard import SummaryWriter

import runlens
from runlens.cli import cli
from runlens.engine import analyze
from runlens.errors import RunLoadError
from runlens.importers import canonical_name, detect_format, parse_map, resolve_names
from runlens.importers.tensorboard import layer_and_kind
from runlens.run import load_run
from runlens.signatures import REGISTRY
from runlens.signatures.base import Signature
from runlens.sources import cache_root, open_run

# -- recorded logs (session-scoped: each training runs once) --------------------------


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNLENS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tb_diverging(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Regression with a learning rate growing 15% a step: the loss overflows to inf/NaN
    (around step 40). Histograms of weights, gradients and a ReLU activation every 5
    steps while they are finite."""
    torch.manual_seed(0)
    logdir = tmp_path_factory.mktemp("tb") / "diverge"
    x = torch.randn(64, 8) * 3
    y = x @ torch.randn(8, 1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    w = SummaryWriter(str(logdir))
    first_bad = None
    truth: dict = {}
    for step in range(60):
        lr = 1e-3 * 1.15**step
        for group in opt.param_groups:
            group["lr"] = lr
        h = model[1](model[0](x))
        loss = torch.nn.functional.mse_loss(model[2](h), y)
        opt.zero_grad()
        loss.backward()
        w.add_scalar("Loss/train", loss.item(), step)
        w.add_scalar("learning_rate", lr, step)
        if first_bad is None and not math.isfinite(loss.item()):
            first_bad = step
        finite = all(torch.isfinite(p).all() and torch.isfinite(p.grad).all()
                     for p in model.parameters())  # fmt: skip
        if step % 5 == 0 and finite and torch.isfinite(h).all():
            for name, p in model.named_parameters():
                w.add_histogram(f"weights/{name}", p, step)
                w.add_histogram(f"{name}/grad", p.grad, step)
                truth[(step, name)] = (p.norm().item(), p.grad.norm().item(), p.numel())
            w.add_histogram("activations/relu", h, step)
            truth[(step, "relu")] = (h == 0).float().mean().item()
        opt.step()
    w.close()
    assert first_bad is not None, "the fixture must diverge"
    return {"dir": logdir, "first_bad": first_bad, "truth": truth}


def _overfit_training(steps: int = 240, eval_every: int = 10) -> dict:
    """A small MLP memorizes 48 randomly labelled points: train loss falls, and the loss on
    held-out random labels rises. Returns per-step and per-eval logs."""
    torch.manual_seed(1)
    xtr, ytr = torch.randn(48, 10), torch.randint(0, 4, (48,))
    xva, yva = torch.randn(48, 10), torch.randint(0, 4, (48,))
    model = torch.nn.Sequential(torch.nn.Linear(10, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    train, evals = [], []
    for step in range(steps):
        idx = torch.randint(0, 48, (16,))
        loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9).item()
        opt.step()
        train.append({"step": step, "epoch": step // 12, "loss": loss.item(), "grad_norm": gn})
        if (step + 1) % eval_every == 0:
            with torch.no_grad():
                out = model(xva)
                vl = torch.nn.functional.cross_entropy(out, yva).item()
                va = (out.argmax(1) == yva).float().mean().item()
            evals.append({"step": step, "epoch": step // 12, "val_loss": vl, "val_acc": va})
    assert evals[-1]["val_loss"] > 1.5 * min(e["val_loss"] for e in evals)
    return {"train": train, "evals": evals, "lr": 3e-3}


@pytest.fixture(scope="session")
def overfit() -> dict:
    return _overfit_training()


@pytest.fixture(scope="session")
def lightning_csv(tmp_path_factory: pytest.TempPathFactory, overfit: dict) -> Path:
    """The layout of Lightning's CSVLogger: sorted header, one sparse row per log call."""
    d = tmp_path_factory.mktemp("lightning") / "lightning_logs" / "version_0"
    d.mkdir(parents=True)
    rows = [{"train_loss": t["loss"], "epoch": t["epoch"], "step": t["step"]}
            for t in overfit["train"]]  # fmt: skip
    for e in overfit["evals"]:
        rows.append({"val_loss": e["val_loss"], "val_acc": e["val_acc"], "epoch": e["epoch"],
                     "step": e["step"]})  # fmt: skip
    rows.sort(key=lambda r: r["step"])  # validation rows follow the training row of a step
    keys = sorted(set().union(*rows))
    with open(d / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (d / "hparams.yaml").write_text("lr: 0.003\n")
    return d


@pytest.fixture(scope="session")
def keras_csv(tmp_path_factory: pytest.TempPathFactory, overfit: dict) -> Path:
    """Keras' CSVLogger: ``epoch`` first, then the logs' keys sorted; one row per epoch."""
    f = tmp_path_factory.mktemp("keras") / "training.log.csv"
    epochs: dict[int, dict] = {}
    for t in overfit["train"]:
        epochs.setdefault(t["epoch"], {"losses": [], "val": None})["losses"].append(t["loss"])
    for e in overfit["evals"]:
        epochs[e["epoch"]]["val"] = e
    with open(f, "w", newline="") as fh:
        keys = ["epoch", "accuracy", "learning_rate", "loss", "val_accuracy", "val_loss"]
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for ep, v in sorted(epochs.items()):
            val = v["val"] or {"val_acc": float("nan"), "val_loss": float("nan")}
            writer.writerow({"epoch": ep, "accuracy": 0.5, "learning_rate": overfit["lr"],
                             "loss": float(np.mean(v["losses"])), "val_accuracy": val["val_acc"],
                             "val_loss": val["val_loss"]})  # fmt: skip
    return f


@pytest.fixture(scope="session")
def hf_output(tmp_path_factory: pytest.TempPathFactory, overfit: dict) -> Path:
    """A Trainer output dir with two checkpoints, in the Trainer's trainer_state.json layout."""
    out = tmp_path_factory.mktemp("hf") / "bert-finetune"
    history = []
    events = sorted(
        [("t", t) for t in overfit["train"] if (t["step"] + 1) % 5 == 0]
        + [("e", e) for e in overfit["evals"]],
        key=lambda kv: (kv[1]["step"], kv[0] == "e"),
    )
    for kind, v in events:
        epoch = round((v["step"] + 1) / 12, 4)
        if kind == "t":
            history.append({"epoch": epoch, "grad_norm": v["grad_norm"],
                            "learning_rate": overfit["lr"], "loss": round(v["loss"], 4),
                            "step": v["step"] + 1})  # fmt: skip
        else:
            history.append({"epoch": epoch, "eval_loss": v["val_loss"],
                            "eval_accuracy": v["val_acc"], "eval_runtime": 0.0123,
                            "eval_samples_per_second": 3900.1, "eval_steps_per_second": 81.3,
                            "step": v["step"] + 1})  # fmt: skip
    history.append({"epoch": 20.0, "step": 240, "total_flos": 1234.0, "train_loss": 0.9,
                    "train_runtime": 4.2, "train_samples_per_second": 914.3,
                    "train_steps_per_second": 57.1})  # fmt: skip
    for ckpt, upto in (("checkpoint-100", 100), ("checkpoint-240", 240)):
        d = out / ckpt
        d.mkdir(parents=True)
        state = {
            "best_metric": None, "best_model_checkpoint": None, "epoch": upto / 12,
            "eval_steps": 10, "global_step": upto, "is_hyper_param_search": False,
            "is_local_process_zero": True, "is_world_process_zero": True,
            "log_history": [h for h in history if h["step"] <= upto],
            "logging_steps": 5, "max_steps": 240, "num_train_epochs": 20,
            "save_steps": 100, "total_flos": 1234.0, "train_batch_size": 16,
            "trial_name": None, "trial_params": None,
        }  # fmt: skip
        (d / "trainer_state.json").write_text(json.dumps(state, indent=2))
    return out


def _first_bad_scalar(run: runlens.Run, name: str) -> int:
    s = run.scalar(name)
    assert s is not None
    return int(s.steps[np.argmax(~np.isfinite(s.values))])


# -- detection and names ----------------------------------------------------------------


def test_detect_format(tb_diverging: dict, lightning_csv: Path, keras_csv: Path,
                       hf_output: Path) -> None:  # fmt: skip
    event_file = next(tb_diverging["dir"].glob("*tfevents*"))
    assert detect_format(tb_diverging["dir"]) == "tensorboard"
    assert detect_format(event_file) == "tensorboard"
    assert detect_format(lightning_csv) == "csv"
    assert detect_format(lightning_csv / "metrics.csv") == "csv"
    assert detect_format(keras_csv) == "csv"
    assert detect_format(hf_output) == "hf-trainer"
    assert detect_format(hf_output / "checkpoint-100") == "hf-trainer"
    assert detect_format(hf_output / "checkpoint-100" / "trainer_state.json") == "hf-trainer"
    with pytest.raises(RunLoadError, match="no such"):
        detect_format(lightning_csv / "nope")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("loss", "train/loss"),
        ("train_loss", "train/loss"),
        ("train/loss_step", "train/loss"),
        ("Loss/train", "train/loss"),
        ("val_loss", "val/loss"),
        ("eval_loss", "val/loss"),
        ("validation/loss", "val/loss"),
        ("val/loss", "val/loss"),
        ("val_acc", "val/accuracy"),
        ("eval_accuracy", "val/accuracy"),
        ("accuracy", "train/accuracy"),
        ("lr", "lr/0"),
        ("learning_rate", "lr/0"),
        ("lr-Adam", "lr/0"),
        ("lr-AdamW/pg2", "lr/1"),
        ("grad_norm", "grad_norm"),
        ("eval_f1", "val/f1"),
        ("train_acc", "train/accuracy"),
        ("perplexity", "perplexity"),
    ],
)
def test_default_name_mapping(raw: str, expected: str) -> None:
    assert canonical_name(raw)[0] == expected


def test_name_collisions_and_overrides() -> None:
    names, warns = resolve_names(["loss", "train_loss", "val_loss", "eval/loss"])
    assert names["train_loss"] == "train/loss" and names["loss"] == "loss"
    assert names["val_loss"] == "val/loss" and names["eval/loss"] == "eval/loss"
    assert len(warns) == 2 and all("both map to" in w for w in warns)
    names, warns = resolve_names(["val_loss", "eval/loss", "junk"],
                                 parse_map(["eval/loss=val/loss", "junk="]))  # fmt: skip
    assert names == {"eval/loss": "val/loss", "val_loss": "val_loss", "junk": None}
    with pytest.raises(runlens.OptionError, match="--map"):
        parse_map(["no-equals-sign"])


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("grad/fc1.weight", ("fc1.weight", "grad")),
        ("gradients/fc1/weight", ("fc1.weight", "grad")),
        ("fc1.weight/grad", ("fc1.weight", "grad")),
        ("fc1.weight.grad", ("fc1.weight", "grad")),
        ("weights/0.bias", ("0.bias", "weight")),
        ("activations/relu", ("relu", "activation")),
        ("fc1/weight", ("fc1.weight", "weight")),
        ("conv1", ("conv1", "weight")),
    ],
)
def test_histogram_tag_heuristic(tag: str, expected: tuple[str, str]) -> None:
    assert layer_and_kind(tag) == expected


# -- TensorBoard ------------------------------------------------------------------------


def test_tensorboard_nan_loss_is_diagnosed(tb_diverging: dict) -> None:
    report = analyze(tb_diverging["dir"])
    assert report.run.source_format == "tensorboard"
    assert report.run.path == str(tb_diverging["dir"].resolve())
    nan = [f for f in report.findings if f.signature == "nan-inf"]
    assert nan, [f.signature for f in report.findings]
    assert nan[0].steps is not None and nan[0].steps[0] == tb_diverging["first_bad"]
    assert report.summary.end_reason == "imported from tensorboard"


def test_tensorboard_histograms_become_layer_rows(tb_diverging: dict) -> None:
    run = open_run(tb_diverging["dir"])
    assert run.scalar_names == ("lr/0", "train/loss")
    assert set(run.layer_kinds) == {"weight", "grad", "activation"}
    wnorm = run.layer_matrix("weight", "norm")
    gnorm = run.layer_matrix("grad", "norm")
    numel = run.layer_matrix("weight", "numel")
    assert wnorm is not None and gnorm is not None and numel is not None
    checked = 0
    for (step, name), t in tb_diverging["truth"].items():
        if name == "relu":
            dead = run.layer_matrix("activation", "frac_zero")
            assert dead is not None
            i = int(np.searchsorted(dead.steps, step))
            assert dead.column("relu")[i] == pytest.approx(t, abs=1e-6)
            continue
        i = int(np.searchsorted(wnorm.steps, step))
        assert wnorm.column(name)[i] == pytest.approx(t[0], rel=1e-4)
        assert gnorm.column(name)[i] == pytest.approx(t[1], rel=1e-4)
        assert numel.column(name)[i] == t[2]
        checked += 1
    assert checked >= 6
    # What a histogram cannot tell stays null.
    assert run.layer_matrix("weight", "frac_nonfinite") is not None
    assert np.isnan(run.layer_matrix("weight", "frac_nonfinite").values).all()


def test_truncated_event_file(tb_diverging: dict, tmp_path: Path) -> None:
    src = next(tb_diverging["dir"].glob("*tfevents*"))
    data = src.read_bytes()
    cut = tmp_path / "cut" / src.name
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) * 2 // 3])  # killed while writing: a partial record
    run = open_run(cut.parent)
    full = open_run(tb_diverging["dir"])
    n_cut, n_full = len(run.scalar("train/loss")), len(full.scalar("train/loss"))
    assert 0 < n_cut < n_full
    assert any("truncated" in w for w in run.warnings)

    stub = tmp_path / "stub" / src.name
    stub.parent.mkdir()
    stub.write_bytes(data[:10])  # not even one record
    with pytest.raises(RunLoadError, match="truncated") as exc:
        open_run(stub.parent)
    assert "\n" not in str(exc.value)

    garbage = tmp_path / "garbage" / "events.out.tfevents.1.host"
    garbage.parent.mkdir()
    garbage.write_bytes(os.urandom(300))
    with pytest.raises(RunLoadError):
        open_run(garbage)


# -- CSV --------------------------------------------------------------------------------


def test_lightning_csv(lightning_csv: Path, overfit: dict) -> None:
    run = open_run(lightning_csv)
    assert run.source_format == "csv" and run.name == "version_0"
    assert run.scalar_names == ("epoch", "train/loss", "val/accuracy", "val/loss")
    tl, vl = run.scalar("train/loss"), run.scalar("val/loss")
    assert tl is not None and vl is not None
    assert len(tl) == len(overfit["train"]) and len(vl) == len(overfit["evals"])
    assert vl.steps.tolist() == [e["step"] for e in overfit["evals"]]
    assert vl.values == pytest.approx([e["val_loss"] for e in overfit["evals"]])
    assert not any("epoch" in w for w in run.warnings)  # it has a step column


def test_overfitting_found_on_imported_csv(lightning_csv: Path) -> None:
    names = [n for n in REGISTRY if "overfit" in n]
    if not names:
        pytest.skip("no overfitting signature registered yet")
    report = analyze(lightning_csv)
    assert any(f.signature in names for f in report.findings), report.findings


def test_keras_csv_uses_epochs_as_steps(keras_csv: Path, overfit: dict) -> None:
    run = open_run(keras_csv)
    assert run.scalar_names == ("lr/0", "train/accuracy", "train/loss", "val/accuracy",
                                "val/loss")  # fmt: skip
    n_epochs = overfit["train"][-1]["epoch"] + 1
    assert run.scalar("train/loss").steps.tolist() == list(range(n_epochs))
    assert run.x_axis == "epoch"
    assert any("the x axis counts epochs" in w for w in run.warnings)
    report = analyze(keras_csv)
    assert report.run.x_axis == "epoch"
    assert any("the x axis counts epochs" in w for w in report.warnings)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x00\x01\x02\xff\xfe garbage \x00\n\x89PNG", "CSV"),
        (b"name,colour\nfoo,0.7\nbar,0.8\n", "no step or epoch column"),
        (b"", "CSV"),
        (b"step,loss\nabc,0.5\n", "step"),
    ],
)
def test_malformed_csv(tmp_path: Path, content: bytes, match: str) -> None:
    f = tmp_path / "metrics.csv"
    f.write_bytes(content)
    with pytest.raises(RunLoadError, match=match) as exc:
        open_run(f)
    assert "\n" not in str(exc.value)


# -- Hugging Face ------------------------------------------------------------------------


def test_hf_trainer_state(hf_output: Path, overfit: dict) -> None:
    run = open_run(hf_output)  # the output dir: the latest checkpoint's state is read
    assert run.source_format == "hf-trainer" and run.name == "bert-finetune"
    assert set(run.scalar_names) >= {"train/loss", "val/loss", "val/accuracy", "lr/0",
                                     "grad_norm", "epoch", "val/runtime"}  # fmt: skip
    vl = run.scalar("val/loss")
    assert vl is not None and len(vl) == len(overfit["evals"])
    assert vl.steps[-1] == 240
    assert run.scalar("train/loss").steps[-1] == 240  # summary "train_loss" is no point
    assert run.meta["summary_extras"]["train_runtime"] == 4.2
    assert run.config["train_batch_size"] == 16
    one = open_run(hf_output / "checkpoint-100")
    assert one.scalar("val/loss").steps[-1] == 100
    report = analyze(hf_output)
    assert report.summary.final_val_loss is not None
    assert report.summary.extras["train_runtime"] == 4.2


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"global_step": 10, "epoch": 1.0}', "no log_history"),
        ('{"log_history": [}', "invalid JSON"),
        ('{"log_history": [{"foo": "bar", "step": 1}]}', "no metrics"),
        ("[1, 2, 3]", "no log_history"),
    ],
)
def test_malformed_trainer_state(tmp_path: Path, content: str, match: str) -> None:
    f = tmp_path / "trainer_state.json"
    f.write_text(content)
    with pytest.raises(RunLoadError, match=match):
        open_run(f)


# -- cache, mapping, skipped signatures --------------------------------------------------


def test_cache_reused_until_log_changes(keras_csv: Path, tmp_path: Path) -> None:
    f = tmp_path / keras_csv.name
    shutil.copy(keras_csv, f)
    first = open_run(f)
    stamp = (first.path / "run.json").stat().st_mtime_ns
    entries = set(cache_root().iterdir())
    second = open_run(f)
    assert second.path == first.path
    assert (second.path / "run.json").stat().st_mtime_ns == stamp  # not converted again
    assert set(cache_root().iterdir()) == entries
    assert sorted(os.listdir(tmp_path)) == [f.name]  # nothing written next to the log
    with open(f, "a") as fh:
        fh.write("999,0.5,0.003,0.1,0.2,9.0\n")
    third = open_run(f)
    assert third.path != first.path
    assert third.scalar("val/loss").steps[-1] == 999


def test_map_override(lightning_csv: Path) -> None:
    run = open_run(lightning_csv, mapping={"val_acc": "val/top1", "epoch": ""})
    assert "val/top1" in run.scalar_names and "val/accuracy" not in run.scalar_names
    assert "epoch" not in run.scalar_names
    with pytest.raises(RunLoadError, match="--map"):
        open_run(open_run(lightning_csv).path, mapping={"a": "b"})


def test_skipped_layer_signatures_are_reported(lightning_csv: Path, monkeypatch) -> None:
    class NeedsGrads(Signature):
        """Test signature.

        What it detects: nothing. Why it matters: -. Evidence: -. How to fix: -.
        References: -.
        """

        name = "test-needs-grads"
        summary = "needs layer gradients"
        category = "layer"
        severity = "warning"
        requires = ("layers:grad",)
        params = ()

        def detect(self, ctx, p):  # type: ignore[no-untyped-def]
            return []

    monkeypatch.setitem(REGISTRY, NeedsGrads.name, NeedsGrads)
    report = analyze(lightning_csv)
    skipped = {s.signature for s in report.skipped}
    assert "test-needs-grads" in skipped
    n = sum("layers:" in s.reason for s in report.skipped)
    line = [w for w in report.warnings if w.startswith("layer statistics not available")]
    assert line == [f"layer statistics not available in this log: {n} signatures skipped"]


# -- command line ------------------------------------------------------------------------


def test_cli_import_then_analyze(lightning_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "imported"
    res = CliRunner().invoke(cli, ["import", str(lightning_csv), "-o", str(out),
                                   "--map", "val_acc=val/top1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    run = load_run(out)
    assert run.source_format == "csv" and "val/top1" in run.scalar_names
    assert run.meta["imported"]["source"] == str(lightning_csv.resolve())
    res = CliRunner().invoke(cli, ["import", str(lightning_csv), "-o", str(out)])
    assert res.exit_code == 2 and "not empty" in res.output


def test_cli_analyze_forced_format_and_errors(keras_csv: Path, tmp_path: Path) -> None:
    txt = tmp_path / "log.dat"  # a name that says nothing, and is not sniffed
    shutil.copy(keras_csv, txt)
    res = CliRunner().invoke(cli, ["analyze", str(txt), "--format", "json"])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    res = CliRunner().invoke(cli, ["analyze", str(txt), "--input-format", "csv",
                                   "--format", "json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["run"]["source_format"] == "csv"
    bad = tmp_path / "trainer_state.json"
    bad.write_text("{}")
    res = CliRunner().invoke(cli, ["analyze", str(bad)])
    assert res.exit_code == 2
    assert res.output.startswith("runlens: error: ") and res.output.count("\n") == 1


def test_compare_imported_logs(lightning_csv: Path, hf_output: Path, tmp_path: Path) -> None:
    from runlens.compare import CompareOptions, compare

    comparison = compare([lightning_csv, hf_output], CompareOptions(workers=1))
    assert not comparison.errors
    assert comparison.metric == "val/loss"  # both imported logs have it, under their names
    paths = [r.path for r in comparison.runs]
    assert paths == [str(lightning_csv.resolve()), str(hf_output.resolve())]
    res = CliRunner().invoke(
        cli,
        ["compare", str(lightning_csv), str(hf_output), "--format", "json",
         "--map", "val_loss=val/xent"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    # --map applies to every imported input: the CSV's val loss is now val/xent.
    assert json.loads(res.output)["metric"] == "train/loss"
