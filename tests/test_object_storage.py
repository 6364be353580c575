"""analyze / compare / triage / watch on object storage, against a real S3-compatible
server started here (moto's server mode on 127.0.0.1), credentials and endpoint from the
standard AWS environment variables, exactly as a user's job would have them."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

import runlens
from runlens.errors import RunLoadError
from runlens.fleet.triage import triage
from runlens.live import Watcher, WatchOptions

pytest.importorskip("s3fs", reason="object storage needs runlens[s3] (s3fs)")
moto_server = pytest.importorskip("moto.server", reason="the S3 server needs moto[server]")

SAMPLES = Path(__file__).resolve().parent.parent / "sample_runs"
RUNLENS = [sys.executable, "-c", "from runlens.cli import main; main()"]
BUCKET = "team-runs"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A live S3 endpoint and an s3fs client; the AWS_* environment points at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "RUNLENS_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    local = tmp_path_factory.mktemp("runs")
    for name in ("loss-divergence", "nan-inf", "healthy-classifier"):
        shutil.copytree(SAMPLES / name, local / name)
    hf = local / "hf-run" / "checkpoint-300"
    hf.mkdir(parents=True)
    history = [{"loss": 2.0 - 0.01 * s, "step": s} for s in range(0, 300, 5)]
    (hf / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    (hf / "model.safetensors").write_bytes(b"\0" * 100_000)
    (local / "broken").mkdir()
    (local / "broken" / "run.json").write_text("{nope")
    fs.put(str(local) + "/", f"{BUCKET}/runs/", recursive=True)
    yield fs, local
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def test_analyze_s3_run_equals_local(s3):
    _, local = s3
    remote = runlens.analyze(f"s3://{BUCKET}/runs/loss-divergence")
    here = runlens.analyze(local / "loss-divergence")
    assert remote.run.path == f"s3://{BUCKET}/runs/loss-divergence"
    assert [f.signature for f in remote.findings] == [f.signature for f in here.findings]
    assert [f.evidence for f in remote.findings] == [f.evidence for f in here.findings]
    assert remote.summary == here.summary


def test_cli_analyze_and_compare_over_s3(s3):
    proc = subprocess.run(
        [
            *RUNLENS,
            "analyze",
            f"s3://{BUCKET}/runs/nan-inf",
            "--format",
            "json",
            "--fail-on",
            "error",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stderr  # nan-inf is an error: --fail-on works too
    report = json.loads(proc.stdout)
    assert report["run"]["path"] == f"s3://{BUCKET}/runs/nan-inf"
    assert [f["signature"] for f in report["findings"]] == ["nan-inf"]
    cmp = runlens.compare([f"s3://{BUCKET}/runs"])
    assert set(cmp.labels) == {"loss-divergence", "nan-inf", "healthy-classifier", "hf-run"}
    assert [e.path for e in cmp.errors] == [f"s3://{BUCKET}/runs/broken"]


def test_imported_log_on_s3_mirrors_only_what_it_reads(s3):
    rep = runlens.analyze(f"s3://{BUCKET}/runs/hf-run")
    assert rep.run.source_format == "hf-trainer" and rep.summary.steps == 60
    cache = Path(os.environ["RUNLENS_CACHE_DIR"]) / "remote"
    assert list(cache.rglob("trainer_state.json"))
    assert not list(cache.rglob("model.safetensors"))  # weights stay in the bucket


def test_s3_errors_are_one_line(s3):
    with pytest.raises(RunLoadError, match="no such run directory or log: s3://team-runs/nope"):
        runlens.analyze(f"s3://{BUCKET}/nope")
    with pytest.raises(RunLoadError, match=f"s3://{BUCKET}/runs holds 5 runs"):
        runlens.analyze(f"s3://{BUCKET}/runs")
    proc = subprocess.run(
        [*RUNLENS, "analyze", "nosuchproto://b/run"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("runlens: error: ") and len(proc.stderr.splitlines()) == 1


def test_triage_over_s3_equals_local_and_is_incremental_by_etag(s3, tmp_path):
    fs, local = s3
    url = f"s3://{BUCKET}/runs"
    remote = triage(url, tmp_path / "remote")
    triage(local, tmp_path / "local")
    assert (remote.runs, remote.analyzed) == (5, 5)

    def table(out: Path, prefix: str) -> pl.DataFrame:
        df = pl.read_parquet(out / "findings" / "**" / "*.parquet", hive_partitioning=True)
        df = df.with_columns(pl.col("path", "error").str.replace(prefix, "", literal=True))
        # Reports and fingerprints name where the run was; an imported log's run id and
        # start (its file's time, without wall times in the log) too. Nothing else differs.
        imported = pl.col("source_format") != "runlens"
        df = df.with_columns(
            pl.when(~imported).then(pl.col(c)).alias(c) for c in ("run_id", "started_at", "date")
        )
        return df.drop("report", "fingerprint").sort("path", "signature", nulls_last=True)

    assert table(tmp_path / "remote", url).equals(table(tmp_path / "local", str(local)))
    broken = pl.from_arrow(remote.rows).filter(pl.col("status") == "error")
    assert broken["path"].to_list() == [f"{url}/broken"]

    again = triage(url, tmp_path / "remote")
    assert (again.analyzed, again.reused) == (0, 5)
    # A new segment uploaded to one run: a new ETag listed, that run analyzed again.
    seg = local / "nan-inf" / "scalars" / "rank=0" / "part-000000.parquet"
    fs.put(str(seg), f"{BUCKET}/runs/nan-inf/scalars/rank=0/part-000001.parquet")
    third = triage(url, tmp_path / "remote")
    assert (third.analyzed, third.reused) == (1, 4)


def test_watch_polls_a_run_synced_to_s3(s3, tmp_path):
    """A run uploaded segment by segment (as a sync job would) is followed by polling."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from runlens_collect import format as fmt

    fs, _ = s3
    src = SAMPLES / "loss-divergence"
    url = f"s3://{BUCKET}/live/run1"
    meta = json.loads((src / "run.json").read_text())
    meta["status"] = "running"
    fs.pipe(f"{BUCKET}/live/run1/run.json", json.dumps(meta).encode())
    tables = {
        t: pq.read_table(src / t / "rank=0" / "part-000000.parquet") for t in ("scalars", "layers")
    }
    w = Watcher(url, WatchOptions(interval=0.01))
    events = []
    for seq, lo in enumerate(range(0, 300, 50)):
        for t, tab in tables.items():
            part = tab.filter(
                pc.and_(pc.greater_equal(tab["step"], lo), pc.less(tab["step"], lo + 50))
            )
            path = tmp_path / f"{t}-{seq}.parquet"
            pq.write_table(part, path)
            fs.put(str(path), f"{BUCKET}/live/run1/{t}/rank=0/part-{seq:06d}.parquet")
        events += w.poll()
    live = [e.finding.signature for e in events if e.kind == "finding"]
    assert "loss-divergence" in live
    meta["status"] = fmt.STATUS_FINISHED
    fs.pipe(f"{BUCKET}/live/run1/run.json", json.dumps(meta).encode())
    for _ in range(3):
        events += w.poll()
        if w.done:
            break
    assert w.done and events[-1].kind == "finished"
    assert w.stats.segments_read == 12  # each uploaded segment downloaded and read once


def test_discovery_on_s3_is_the_discovery_on_disk(s3, tmp_path):
    """The same files locally and in the bucket: the same runs (one discovery, run on a
    listing for the bucket), runs appended in one CSV file included; weights stay put."""
    from runlens.discover import discover

    fs, _ = s3
    local = tmp_path / "mixed"
    shutil.copytree(SAMPLES / "nan-inf", local / "runlens" / "nan-inf")
    rows = "\n".join(f"{e},{2.0 - 0.1 * e},{2.1 - 0.1 * e}" for e in range(6))
    log = local / "keras" / "training.log"
    log.parent.mkdir(parents=True)
    log.write_text(f"epoch,loss,val_loss\n{rows}\n{rows}\n")  # a second fit appended
    version = local / "lightning_logs" / "version_0"
    version.mkdir(parents=True)
    (version / "metrics.csv").write_text(f"epoch,train_loss,val_loss\n{rows}\n")
    (version / "checkpoint.ckpt").write_bytes(b"\0" * 1000)
    fs.put(str(local) + "/", f"{BUCKET}/mixed/", recursive=True)
    url = f"s3://{BUCKET}/mixed"
    here, there = discover(local), discover(url)
    assert [r.label for r in here.runs] == [
        "keras/training.log#1",
        "keras/training.log#2",
        "lightning_logs/version_0",
        "runlens/nan-inf",
    ]
    assert [r.label for r in there.runs] == [f"{url}/{r.label}" for r in here.runs]
    assert [(r.format, r.part, r.lines) for r in there.runs] == [
        (r.format, r.part, r.lines) for r in here.runs
    ]
    assert not list(Path(os.environ["RUNLENS_CACHE_DIR"]).rglob("checkpoint.ckpt"))
