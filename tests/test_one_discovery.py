"""`runlens analyze`, `runlens compare` and `runlens triage` find the same runs in the same
folder: one discovery (runlens.discover) for all three, on a mixed tree as teams have it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pytest
from log_writers import (
    Training,
    noisy_label_training,
    write_hf_checkpoint,
    write_hf_tensorboard,
    write_keras_csvlogger,
)

from runlens.compare import expand_inputs
from runlens.discover import discover
from runlens.fleet.triage import triage

SAMPLES = Path(__file__).resolve().parent.parent / "sample_runs"
RUNLENS = [sys.executable, "-c", "from runlens.cli import main; main()"]

EXPECTED = [
    "hf",
    "keras/training.log#1",
    "keras/training.log#2",
    "lightning_logs/version_0",
    "lightning_logs/version_1",
    "runlens/healthy-classifier",
    "runlens/loss-spike",
    "tb/runs/May01_host-a",
    "tb/runs/May02_host-b",
]


@pytest.fixture(scope="module")
def training() -> Training:
    return noisy_label_training(steps=200)


def _lightning_csv(path: Path, tr: Training, epochs: int) -> None:
    """Lightning CSVLogger layout: step rows with train_loss, epoch rows with val_loss."""
    path.parent.mkdir(parents=True)
    lines = ["epoch,step,train_loss,val_loss"]
    per = tr.steps_per_epoch
    for s in tr.steps[: epochs * per]:
        lines.append(f"{(int(s['step']) - 1) // per},{int(s['step'])},{s['loss']},")
    for e in tr.evals[:epochs]:
        lines.append(f"{(int(e['step']) - 1) // per},{int(e['step'])},,{e['val_loss']}")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, training: Training) -> Path:
    root = tmp_path_factory.mktemp("team")
    for name in ("healthy-classifier", "loss-spike"):
        shutil.copytree(SAMPLES / name, root / "runlens" / name)
    write_hf_tensorboard(root / "tb" / "runs" / "May01_host-a", training)
    write_hf_tensorboard(root / "tb" / "runs" / "May02_host-b", training)
    hf = root / "hf"
    write_hf_checkpoint(hf, training, max_steps=200)
    (hf / "checkpoint-200" / "model.safetensors").write_bytes(b"\0" * 1000)
    (hf / "runs").mkdir()  # the Trainer's own TensorBoard folder belongs to the HF run
    write_hf_tensorboard(hf / "runs" / "May03_host-c", training)
    _lightning_csv(root / "lightning_logs" / "version_0" / "metrics.csv", training, 8)
    _lightning_csv(root / "lightning_logs" / "version_1" / "metrics.csv", training, 10)
    (root / "lightning_logs" / "version_1" / "hparams.yaml").write_text("lr: 0.001\n")
    log = root / "keras" / "training.log"
    log.parent.mkdir()
    write_keras_csvlogger(log, training.epochs()[:6])
    write_keras_csvlogger(log, training.epochs()[:5], append=True)  # a second fit appended
    (root / "notes.txt").write_text("not a log\n")
    return root


def test_analyze_compare_and_triage_find_the_same_runs(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNLENS_CACHE_DIR", str(tmp_path / "cache"))
    found = discover(tree)
    assert [r.label for r in found.runs] == EXPECTED
    where = {r.location for r in found.runs}
    assert len(where) == len(EXPECTED)

    proc = subprocess.run(
        [*RUNLENS, "analyze", str(tree), "--format", "json"],
        capture_output=True,
        text=True,
        env={**os.environ, "RUNLENS_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["errors"] == []
    assert [r["label"] for r in doc["reports"]] == EXPECTED

    compared, errors = expand_inputs([tree])
    assert errors == []
    assert [r.location for r in compared] == [r.location for r in found.runs]

    result = triage(tree, tmp_path / "out")
    triaged = set(result.rows.column("path").to_pylist())
    assert triaged == where
    assert result.rows.filter(pc.is_valid(result.rows["error"])).num_rows == 0
