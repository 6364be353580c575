"""`runlens triage` over a tree of 200+ runs (copies of the sample runs, imported logs,
broken runs): in-process, in a process pool and on Ray give the same table; the table
holds each run's real findings; unchanged runs are not analyzed again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
from fleet_tree import SAMPLES, build_tree
from runlens_collect import format as fmt

import runlens
from runlens.engine import AnalyzeOptions
from runlens.fleet.triage import TriageOptions, triage

RUNLENS = [sys.executable, "-c", "from runlens.cli import main; main()"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNLENS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tree")
    return root, build_tree(root)


@pytest.fixture(scope="module")
def sample_truth() -> dict[str, set[tuple[str, str, tuple]]]:
    out = {}
    for d in SAMPLES.glob("*/run.json"):
        rep = runlens.analyze(d.parent)
        out[d.parent.name] = {(f.signature, f.severity, f.steps) for f in rep.findings}
    return out


def read_table(out: Path) -> pl.DataFrame:
    df = pl.read_parquet(out / "findings" / "**" / "*.parquet", hive_partitioning=True)
    return df.sort("path", "signature", "step_start", "summary", nulls_last=True)


@pytest.mark.slow
def test_triage_of_200_runs_in_process_pool_and_ray_gives_one_table(tmp_path, tree, sample_truth):
    root, expected = tree
    # Six copies of every sample run: the tree grows with the samples (224 runs with 32).
    n = len(expected)
    assert n >= 200
    inline = triage(root, tmp_path / "inline")
    assert (inline.runs, inline.analyzed, inline.reused) == (n, n, 0)
    df = read_table(tmp_path / "inline")
    assert df["path"].n_unique() == n

    by_path = {p: g for (p,), g in df.group_by("path")}
    for e in expected:
        g = by_path[str(root / e.rel)]
        if e.error is not None:
            assert g["status"].to_list() == ["error"], e
            assert e.error in g["error"][0], (e, g["error"][0])
            continue
        assert g["error"].is_null().all()
        assert g["source_format"][0] == e.source_format
        if e.sample is not None:  # a copy of a sample: exactly the sample's findings
            got = {
                (r["signature"], r["severity"], (r["step_start"], r["step_end"]))
                for r in g.iter_rows(named=True)
                if r["signature"] is not None
            }
            want = {(s, sev, steps) for s, sev, steps in sample_truth[e.sample]}
            assert got == want, e
            assert g["steps"][0] > 0 and g["runlens_version"][0] == runlens.__version__
    # Several date partitions (start dates were varied), one report per readable run.
    assert df["date"].n_unique() >= 4
    reports = list((tmp_path / "inline" / "reports").glob("*.md"))
    assert len(reports) == n - sum(e.error is not None for e in expected)

    pool = triage(root, tmp_path / "pool", TriageOptions(workers=2))
    assert pool.analyzed == n
    assert read_table(tmp_path / "pool").equals(df)

    pytest.importorskip("ray", reason="Ray not installed (pip install 'runlens[ray]')")
    on_ray = triage(root, tmp_path / "ray", TriageOptions(workers=2, ray="local"))
    assert on_ray.analyzed == n
    assert read_table(tmp_path / "ray").equals(df)


def test_triage_is_incremental(tmp_path):
    root = tmp_path / "runs"
    for name in ("loss-spike", "nan-inf", "healthy-classifier"):
        shutil.copytree(SAMPLES / name, root / name)
    out = tmp_path / "out"
    first = triage(root, out)
    assert (first.analyzed, first.reused) == (3, 0)
    again = triage(root, out)
    assert (again.analyzed, again.reused) == (0, 3)
    assert read_table(out).equals(_only_first(first))

    # A new segment lands in one run: only that run is analyzed again.
    seg = root / "nan-inf" / "scalars" / "rank=0" / "part-000000.parquet"
    shutil.copy(seg, seg.with_name("part-000001.parquet"))
    third = triage(root, out)
    assert (third.analyzed, third.reused) == (1, 2)
    # A run deleted: its rows and report go.
    report = json.loads((out / "manifest.json").read_text())["runs"][str(root / "loss-spike")]
    assert (out / report["report"]).is_file()
    shutil.rmtree(root / "loss-spike")
    fourth = triage(root, out)
    assert (fourth.runs, fourth.analyzed, fourth.removed) == (2, 0, 1)
    assert not (out / report["report"]).exists()
    assert str(root / "loss-spike") not in read_table(out)["path"].to_list()
    # Other analysis options: everything again.
    opts = TriageOptions(analyze=AnalyzeOptions(overrides={"loss-spike": {"z": 8}}))
    assert triage(root, out, opts).analyzed == 2


def _only_first(result) -> pl.DataFrame:
    df = pl.from_arrow(result.rows)
    assert isinstance(df, pl.DataFrame)
    return (
        df.with_columns(pl.col("date").str.to_date())
        .sort("path", "signature", "step_start", "summary", nulls_last=True)
        .select(read_table_columns(df))
    )


def read_table_columns(df: pl.DataFrame) -> list[str]:
    # Hive partitioning puts the partition column last.
    return [c for c in df.columns if c != "date"] + ["date"]


def test_partition_by_status_and_queries_from_the_docs(tmp_path):
    root = tmp_path / "runs"
    for name in ("loss-divergence", "nan-inf", "healthy-regression", "overfitting"):
        shutil.copytree(SAMPLES / name, root / name)
    meta = json.loads((root / "nan-inf" / fmt.RUN_JSON).read_text())
    meta["status"] = "crashed"
    (root / "nan-inf" / fmt.RUN_JSON).write_text(json.dumps(meta))
    out = tmp_path / "out"
    triage(root, out, TriageOptions(partition_by="status"))
    assert sorted(p.name for p in (out / "findings").iterdir()) == [
        "status=crashed",
        "status=finished",
    ]
    # The polars query of docs/triage.md: runs per signature.
    q = (
        pl.scan_parquet(f"{out}/findings/**/*.parquet", hive_partitioning=True)
        .filter(pl.col("severity") == "error")
        .group_by("signature")
        .agg(pl.col("run").n_unique().alias("runs"))
        .sort("runs", descending=True)
        .collect()
    )
    assert dict(q.iter_rows()) == {"loss-divergence": 1, "nan-inf": 1}
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(
        f"""
        SELECT run, status, step_start, e.value AS rise
        FROM read_parquet('{out}/findings/**/*.parquet', hive_partitioning = true),
             unnest(evidence) AS t(e)
        WHERE signature = 'loss-divergence' AND e.name = 'rise / loss scale'
        """
    ).fetchall()
    assert [r[:2] for r in rows] == [("loss-divergence", "finished")]
    assert rows[0][3] > 0.5


def test_cli_triage_prints_summary_and_writes_files(tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(SAMPLES / "nan-inf", root / "a")
    (root / "b").mkdir()
    (root / "b" / "run.json").write_text("{oops")
    out = tmp_path / "out"
    proc = subprocess.run(
        [*RUNLENS, "triage", str(root), "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 runs under" in proc.stdout and "1 unreadable" in proc.stdout
    assert "nan-inf" in proc.stdout and f"{root / 'b'}: not a runlens run" in proc.stdout
    md = (out / "summary.md").read_text()
    link = next(line for line in md.splitlines() if "[nan-inf](" in line)
    target = link.split("](", 1)[1].split(")", 1)[0]
    assert (out / target).read_text().startswith("#")  # the run's Markdown report
    assert "<a href='reports/" in (out / "summary.html").read_text()


def test_cli_triage_bad_root_is_one_line(tmp_path):
    proc = subprocess.run(
        [*RUNLENS, "triage", str(tmp_path / "nope"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"runlens: error: no such folder: {tmp_path / 'nope'}"


def test_discovery_is_the_same_on_disk_and_from_a_listing(tmp_path):
    """Triage finds runs with runlens.discover, the rules of analyze and compare; on
    object storage those rules run on one listing (runlens.listing). The same files give
    the same runs, with the same inputs, both ways."""
    from runlens.discover import _find, run_inputs
    from runlens.fleet.triage import fingerprint
    from runlens.listing import ListedPath, Tree, local_entry

    files = {
        "a/run.json": b"{}",
        "a/scalars/rank=0/part-000000.parquet": b"x",
        "a/ckpt/model.pt": b"w",
        "a/copy/run.json": b"{}",  # a folder inside a run is part of it
        "a/scalars/rank=0/.tmp-x.parquet": b"x",  # being written
        "b/scalars/rank=1/part-000003.parquet": b"x",  # segments, run.json not written yet
        "keras/train/events.out.tfevents.1": b"e",
        "keras/validation/events.out.tfevents.2": b"e",
        "tb/run1/events.out.tfevents.3": b"e",
        "tb/run2/events.out.tfevents.4": b"e",
        "hf/checkpoint-100/trainer_state.json": b"{}",
        "hf/checkpoint-250/trainer_state.json": b"{}",
        "hf/checkpoint-250/model.safetensors": b"w",
        "lightning/version_0/metrics.csv": b"step,train_loss\n0,2\n1,1.5\n",
        "lightning/version_0/hparams.yaml": b"lr: 1\n",
        "logs/history.csv": b"epoch,loss\n1,2\n2,1\n",
        "logs/training.log": b"epoch,loss,val_loss\n0,2,2\n1,1,1\n",
        "logs/notes.txt": b"nothing to see\n",
        ".hidden/run.json": b"{}",
    }
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    entries = [local_entry(tmp_path / rel, rel) for rel in files]
    tree = Tree(
        "mem://bucket/x",
        entries,
        lambda rel: (tmp_path / rel).open("rb"),
        fetch=lambda e: tmp_path / e.rel,
    )

    on_disk, _ = _find(tmp_path, None)
    listed, _ = _find(tree.root(), None)
    got = {r.label: (r.format, sorted(e.rel for e in run_inputs(r, tmp_path))) for r in on_disk}
    assert got == {
        "a": ("runlens", ["a/run.json", "a/scalars/rank=0/part-000000.parquet"]),
        "b": ("runlens", ["b/scalars/rank=1/part-000003.parquet"]),
        "keras": (
            "tensorboard",
            ["keras/train/events.out.tfevents.1", "keras/validation/events.out.tfevents.2"],
        ),
        "tb/run1": ("tensorboard", ["tb/run1/events.out.tfevents.3"]),
        "tb/run2": ("tensorboard", ["tb/run2/events.out.tfevents.4"]),
        "hf": ("hf-trainer", ["hf/checkpoint-250/trainer_state.json"]),
        "lightning/version_0": ("csv", ["lightning/version_0/metrics.csv"]),
        "logs/history.csv": ("csv", ["logs/history.csv"]),
        "logs/training.log": ("csv", ["logs/training.log"]),
    }
    from runlens.discover import _listed_inputs

    assert all(isinstance(r.path, ListedPath) for r in listed)
    assert {r.label: (r.format, sorted(e.rel for e in _listed_inputs(r))) for r in listed} == got
    # The fingerprint follows the inputs only: new weights in a checkpoint change nothing.
    before = {r.label: fingerprint(replace(r, inputs=run_inputs(r, tmp_path))) for r in on_disk}
    (tmp_path / "hf/checkpoint-250/model.safetensors").write_bytes(b"new weights")
    (tmp_path / "a/ckpt/model.pt").write_bytes(b"new weights")
    again, _ = _find(tmp_path, None)
    after = {r.label: fingerprint(replace(r, inputs=run_inputs(r, tmp_path))) for r in again}
    assert after == before
