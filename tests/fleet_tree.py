"""A tree of runs like a team's shared folder, built from the recorded sample runs.

``build_tree(root, copies)`` writes every sample run ``copies`` times under
``team-N/YYYY-MM-DD/...`` (run.json start dates varied so the table has several date
partitions), the same curves as imported logs (TensorBoard event files written by
TensorBoard's own SummaryWriter, Lightning-style metrics.csv, Hugging Face
trainer_state.json with checkpoint weights next to it), and broken runs. It returns what
each run must come out as: the sample it was copied from (whose findings the triage must
reproduce) or the error it must report.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from runlens_collect import format as fmt

from runlens.run import load_run

SAMPLES = Path(__file__).resolve().parent.parent / "sample_runs"
DAY = 86400.0


@dataclass(frozen=True)
class Expect:
    rel: str
    sample: str | None  # the sample run copied (findings must match its analysis)
    error: str | None = None  # substring of the error a broken run must report
    source_format: str = "runlens"


def sample_names() -> list[str]:
    return sorted(p.parent.name for p in SAMPLES.glob("*/run.json"))


def build_tree(root: Path, copies: int = 6, logs: int = 11) -> list[Expect]:
    out: list[Expect] = []
    names = sample_names()
    for c in range(copies):
        for i, name in enumerate(names):
            rel = f"team-{c % 3}/day-{c}/{name}-{c}"
            dest = root / rel
            shutil.copytree(SAMPLES / name, dest)
            meta = json.loads((dest / fmt.RUN_JSON).read_text())
            meta["start_time"] = 1_790_000_000.0 + DAY * ((c + i) % 4)
            fmt.write_json_atomic(meta, dest / fmt.RUN_JSON)
            out.append(Expect(rel, name))
    curves = [n for n in names if n.startswith(("loss-", "overfitting", "healthy-c"))]
    for k in range(logs):
        name = curves[k % len(curves)]
        out.append(_csv(root, f"imports/csv-{k}", name))
        out.append(_hf(root, f"imports/hf-{k}", name))
        if k < 4:
            out.append(_tb(root, f"imports/tb-{k}", name))
    out += _broken(root)
    return out


def _series(name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    run = load_run(SAMPLES / name)
    out = {}
    for s in (fmt.TRAIN_LOSS, fmt.VAL_LOSS):
        ser = run.scalar(s)
        if ser is not None:
            out[s] = (ser.steps, ser.values)
    return out


def _csv(root: Path, rel: str, name: str) -> Expect:
    d = root / rel
    d.mkdir(parents=True)
    series = _series(name)
    steps = sorted({int(s) for st, _ in series.values() for s in st})
    cols = {
        k.replace("/", "_"): dict(zip(st.tolist(), v.tolist(), strict=True))
        for k, (st, v) in series.items()
    }
    lines = ["step," + ",".join(cols)]
    for s in steps:
        lines.append(f"{s}," + ",".join(repr(c[s]) if s in c else "" for c in cols.values()))
    (d / "metrics.csv").write_text("\n".join(lines) + "\n")
    return Expect(rel, None, source_format="csv")


def _hf(root: Path, rel: str, name: str) -> Expect:
    d = root / rel
    series = _series(name)
    history = []
    for key, hf_key in ((fmt.TRAIN_LOSS, "loss"), (fmt.VAL_LOSS, "eval_loss")):
        if key in series:
            st, v = series[key]
            history += [
                {hf_key: float(x), "step": int(s)}
                for s, x in zip(st, v, strict=True)
                if np.isfinite(x)
            ]
    history.sort(key=lambda h: h["step"])
    ck = d / "checkpoint-300"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"log_history": history, "global_step": 300}))
    (ck / "model.safetensors").write_bytes(b"\0" * 4096)  # weights: never read
    return Expect(rel, None, source_format="hf-trainer")


def _tb(root: Path, rel: str, name: str) -> Expect:
    from torch.utils.tensorboard import SummaryWriter

    d = root / rel
    w = SummaryWriter(str(d))
    for key, (st, v) in _series(name).items():
        for s, x in zip(st, v, strict=True):
            w.add_scalar(key, float(x), int(s), walltime=1_790_000_000.0 + float(s))
    w.close()
    return Expect(rel, None, source_format="tensorboard")


def _broken(root: Path) -> list[Expect]:
    out = []
    d = root / "broken/bad-json"
    d.mkdir(parents=True)
    (d / "run.json").write_text("{not json")
    out.append(Expect("broken/bad-json", None, "unreadable run.json"))
    d = root / "broken/future-version"
    shutil.copytree(SAMPLES / "loss-spike", d)
    meta = json.loads((d / "run.json").read_text())
    meta["schema_version"] = 99
    (d / "run.json").write_text(json.dumps(meta))
    out.append(Expect("broken/future-version", None, "schema version 99"))
    d = root / "broken/bad-hf"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text("{}")
    out.append(Expect("broken/bad-hf", None, "no log_history", "hf-trainer"))
    d = root / "broken/bad-csv"
    d.mkdir(parents=True)
    (d / "metrics.csv").write_text("step,loss\nx,y\n")
    out.append(Expect("broken/bad-csv", None, "holds no numbers", "csv"))
    d = root / "broken/garbage-segments"
    seg = d / "scalars" / "rank=0"
    seg.mkdir(parents=True)
    (seg / "part-000000.parquet").write_bytes(b"garbage")
    out.append(Expect("broken/garbage-segments", None, "no run.json and no segments"))
    d = root / "broken/not-an-object"
    d.mkdir(parents=True)
    (d / "run.json").write_text("[]")
    out.append(Expect("broken/not-an-object", None, "unreadable run.json"))
    return out
