"""Distributed runs (issue 18): torchrun --nproc_per_node=2 on CPU with gloo.

Each fixture trains tests/dist_trainer.py once under torchrun (a few seconds) and the
tests check what the ranks recorded against what the ranks computed themselves (their
``.truth`` files: the losses, and under FSDP2 the statistics of the unsharded tensors).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from runlens_collect import format as fmt

from runlens import analyze, load_run
from runlens.cli import cli

pytest.importorskip("torch.distributed")

TRAINER = Path(__file__).with_name("dist_trainer.py")
TIMEOUT = 300


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _torchrun(*args: str) -> list[str]:
    # --standalone: a free port per job, so concurrent test runs never collide.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(TRAINER), *args]  # fmt: skip


def _train(out: Path, mode: str, *extra: str) -> Path:
    proc = subprocess.run(
        _torchrun("--out", str(out), "--mode", mode, *extra),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _truth(out: Path, rank: int) -> dict:
    return json.loads((Path(str(out) + ".truth") / f"rank{rank}.json").read_text())


def _findings(run_dir: Path, rank: int | None = None) -> dict[str, object]:
    report = analyze(load_run(run_dir, rank=rank))
    return {f.signature: f for f in report.findings}


@pytest.fixture(scope="module")
def zero_code(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """`runlens collect -- torchrun ...` on an unmodified DDP script (no Collector)."""
    base = tmp_path_factory.mktemp("dist")
    out = base / "zc"
    runlens = [sys.executable, "-c", "from runlens.cli import main; main()"]
    trainer = _torchrun("--out", str(out), "--mode", "healthy", "--zero-code")
    cmd = [*runlens, "collect", "--overhead", "none", "--out", str(base), "--name", "zc", "--"]
    cmd += trainer
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="module")
def nosync(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("dist") / "nosync", "nosync", "--steps", "30")


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("dist") / "slow", "slow", "--steps", "30")


@pytest.fixture(scope="module")
def samedata(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("dist") / "same", "samedata", "--steps", "30")


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("dist") / "fsdp2", "fsdp2", "--steps", "30")


# -- recording ---------------------------------------------------------------------------


def test_zero_code_torchrun_records_every_rank(zero_code) -> None:
    out, proc = zero_code
    assert "no run recorded" not in proc.stderr
    assert f"run recorded in {out}" in proc.stderr and "ranks 0,1" in proc.stderr
    for table in (fmt.SCALARS_DIR, fmt.LAYERS_DIR):
        assert sorted(p.name for p in (out / table).iterdir()) == ["rank=0", "rank=1"]
    meta = json.loads((out / fmt.RUN_JSON).read_text())
    assert meta["world_size"] == 2 and meta["collector"]["rank"] == 0
    assert meta["distributed"]["wrapper"] == "DDP" and meta["distributed"]["backend"] == "gloo"
    assert meta["distributed"]["n_sharded"] == 0 and meta["distributed"]["n_replicated"] == 4
    run = load_run(out)
    starts = {e["rank"] for e in run.events if e["kind"] == "start"}
    closes = {e["rank"] for e in run.events if e["kind"] == "close"}
    assert starts == closes == {0, 1}
    assert all(e["layout"]["world_size"] == 2 for e in run.events if e["kind"] == "start")


def test_ddp_healthy_merged_loss_is_the_mean_of_the_ranks(zero_code) -> None:
    out, _ = zero_code
    truth = [np.array(_truth(out, r)["losses"]) for r in (0, 1)]
    run = load_run(out)
    assert run.merged and run.ranks == (0, 1) and not run.warnings
    loss = run.scalar(fmt.TRAIN_LOSS)
    assert loss is not None and len(loss) == len(truth[0]) == 60
    np.testing.assert_allclose(loss.values, (truth[0] + truth[1]) / 2, rtol=1e-6)
    assert not np.allclose(truth[0], truth[1])  # the ranks did see different data
    for r in (0, 1):  # the per-rank view is that rank's own loss
        one = load_run(out, rank=r).scalar(fmt.TRAIN_LOSS)
        np.testing.assert_allclose(one.values, truth[r], rtol=1e-6)


def test_ddp_healthy_report_is_clean(zero_code) -> None:
    out, _ = zero_code
    report = analyze(load_run(out))
    assert report.findings == () and report.coverage.complete
    ran = set(report.coverage.clean)
    assert {"replica-desync", "straggler-rank", "rank-imbalance"} <= ran
    assert report.summary.extras["ranks"].startswith("2 (DDP, ranks 0, 1): merged view")


def test_cli_rank_option(zero_code) -> None:
    out, _ = zero_code
    res = CliRunner().invoke(cli, ["analyze", str(out), "--rank", "1"])
    assert res.exit_code == 0, res.output
    assert "rank 1 of 2" in res.output
    res = CliRunner().invoke(cli, ["analyze", str(out), "--rank", "3"])
    assert res.exit_code == 2 and "no rank 3 in this run (ranks: 0, 1)" in res.output


# -- rank signatures -----------------------------------------------------------------------


def test_parameter_outside_sync_is_replica_desync(nosync) -> None:
    found = _findings(nosync)
    f = found["replica-desync"]
    assert f.layers == ("module.0.bias",)
    # its gradient is never all-reduced: the ranks differ from the first step on
    assert f.steps[0] == 0
    ev = {e.name: e.value for e in f.evidence}
    assert ev["first step of desync"] == 0 and ev["largest relative difference"] > 1e-3
    # the weights agree at step 0 (same seed) and differ from step 1: check it directly
    w = {r: load_run(nosync, rank=r).layer_matrix("weight", "norm") for r in (0, 1)}
    col = w[0].layers.index("module.0.bias")
    diff = np.abs(w[0].values[:, col] - w[1].values[:, col])
    assert diff[0] == 0 and diff[1] > 0
    other = w[0].layers.index("module.0.weight")
    np.testing.assert_array_equal(w[0].values[:, other], w[1].values[:, other])


def test_slow_rank_is_straggler(slow) -> None:
    f = _findings(slow)["straggler-rank"]
    ev = {e.name: e.value for e in f.evidence}
    assert ev["straggler rank"] == 1
    assert ev["median excess of time/data"] >= 20  # rank 1 sleeps 30 ms per batch
    assert ev["share of the job's step time"] > 0.3
    assert "rank 1 is a straggler" in f.summary


def test_same_data_on_every_rank_is_rank_imbalance(samedata) -> None:
    found = _findings(samedata)
    f = found["rank-imbalance"]
    assert "same batches" in f.summary
    ev = {e.name: e.value for e in f.evidence}
    assert ev["steps whose batches match on every rank"] == 1.0 and ev["steps compared"] == 30
    # ground truth: with the same batch and synced weights the ranks' losses are equal
    np.testing.assert_array_equal(_truth(samedata, 0)["losses"], _truth(samedata, 1)["losses"])
    assert "replica-desync" not in found


def test_healthy_runs_fire_no_rank_signature(nosync, slow, samedata) -> None:
    rank_sigs = {"replica-desync", "straggler-rank", "rank-imbalance"}
    assert set(_findings(nosync)) & rank_sigs == {"replica-desync"}
    assert set(_findings(slow)) & rank_sigs == {"straggler-rank"}
    assert set(_findings(samedata)) & rank_sigs == {"rank-imbalance"}


# -- FSDP2 ----------------------------------------------------------------------------------


def test_fsdp2_records_local_shards_with_offsets(fsdp2) -> None:
    meta = json.loads((fsdp2 / fmt.RUN_JSON).read_text())
    d = meta["distributed"]
    assert d["wrapper"] == "FSDP2" and d["n_sharded"] == 4
    assert d["shards"]["0.weight"]["offset"] == [0, 0]
    assert d["shards"]["0.weight"]["shape"] == [8, 6]  # 15 rows over 2 ranks: 8 + 7
    run1 = load_run(fsdp2, rank=1)
    start1 = next(e for e in run1.events if e["kind"] == "start" and e["rank"] == 1)
    assert start1["layout"]["shards"]["0.weight"]["offset"] == [8, 0]
    numel = {r: dict(zip(*_last_numels(load_run(fsdp2, rank=r)), strict=True)) for r in (0, 1)}
    assert numel[0]["0.weight"] == 48 and numel[1]["0.weight"] == 42
    assert numel[0]["2.weight"] == 15 and "2.weight" not in numel[1]  # empty shard: no rows


def _last_numels(run) -> tuple[list[str], list[int]]:
    df = run.layer_frame("weight", ("numel",))
    last = df.filter(df["step"] == df["step"].max())
    return last["layer"].to_list(), last["numel"].to_list()


@pytest.mark.parametrize("kind,key", [("weight", "weights"), ("grad", "grads")])
def test_fsdp2_shards_combine_to_the_unsharded_statistics(fsdp2, kind, key) -> None:
    truth = _truth(fsdp2, 0)[key]  # per step: name -> stats of the full tensor
    run = load_run(fsdp2)
    for stat in ("norm", "mean", "std", "absmax", "frac_zero", "numel"):
        m = run.layer_matrix(kind, stat)
        assert m is not None and list(m.steps) == list(range(len(truth)))
        for j, layer in enumerate(m.layers):
            want = np.array([t[layer][stat] for t in truth], float)
            got = m.values[:, j]
            if stat in ("mean", "std"):  # within float32 rounding of the per-element RMS
                rms = np.array([t[layer]["norm"] for t in truth]) / math.sqrt(
                    truth[0][layer]["numel"]
                )
                ok = np.isnan(want) | (np.abs(got - want) <= 1e-6 * rms + 1e-12)
                assert ok.all(), (kind, stat, layer)
            else:
                np.testing.assert_allclose(got, want, rtol=2e-6, err_msg=f"{kind} {stat} {layer}")


def test_the_collector_calls_no_collective(zero_code, nosync, fsdp2) -> None:
    # explicit Collector under DDP and FSDP2 (DTensor parameters read through their local
    # shards): CommDebugMode around optimizer.step() + col.step() counts nothing
    for run_dir in (nosync, fsdp2):
        for r in (0, 1):
            assert _truth(run_dir, r)["collectives"] == 0
        # the count sees collectives: the training's own forward/backward communicate
        assert _truth(run_dir, 0)["training_collectives"] > 0


def test_fsdp2_grad_norm_and_clean_report(fsdp2) -> None:
    truth = _truth(fsdp2, 0)["grads"]
    want = [math.sqrt(sum(t[n]["norm"] ** 2 for n in t)) for t in truth]
    gn = load_run(fsdp2).scalar(fmt.GRAD_NORM)
    np.testing.assert_allclose(gn.values, want, rtol=2e-6)
    assert _findings(fsdp2) == {}


# -- watch and compare: the merged view ---------------------------------------------------


def test_watch_follows_every_rank_merged(zero_code, nosync, slow, samedata) -> None:
    from runlens.live.watcher import Watcher

    out, _ = zero_code
    w = Watcher(out)
    events = w.poll()
    assert not [e for e in events if e.finding is not None]
    snap = w._data.snapshot()
    assert snap.merged and snap.ranks == (0, 1)
    np.testing.assert_array_equal(
        snap.scalar(fmt.TRAIN_LOSS).values, load_run(out).scalar(fmt.TRAIN_LOSS).values
    )
    for run_dir, sig in ((nosync, "replica-desync"), (slow, "straggler-rank"),
                         (samedata, "rank-imbalance")):  # fmt: skip
        seen = [e.finding.signature for e in Watcher(run_dir).poll() if e.finding is not None]
        assert sig in seen


def test_compare_reads_multi_rank_runs_merged(zero_code, nosync) -> None:
    from runlens import compare

    out, _ = zero_code
    cmp = compare([load_run(out), load_run(nosync)])
    by_name = {r.label: r for r in cmp.runs}
    assert set(by_name) == {"zc", "nosync"}
    assert [f.signature for f in by_name["nosync"].report.findings] == ["replica-desync"]
    assert not by_name["zc"].report.findings


# -- DeepSpeed ZeRO 1-2 (only where deepspeed is installed: not a test dependency) ----------


@pytest.mark.parametrize("stage", ["zero1", "zero2"])
def test_deepspeed_zero_records_weights_without_false_alarms(tmp_path, stage) -> None:
    pytest.importorskip("deepspeed")
    out = _train(tmp_path / stage, stage, "--steps", "30")
    meta = json.loads((out / fmt.RUN_JSON).read_text())
    assert meta["distributed"]["wrapper"] == "DeepSpeed"
    # ZeRO keeps gradients in its own partitions and steps flat fp32 copies: no grad or
    # update rows (they would read as frozen layers), no optimizer-membership probe
    assert meta["collector"]["kinds_in_effect"] == ["weight", "activation", "output"]
    truth = [np.array(_truth(out, r)["losses"]) for r in (0, 1)]
    run = load_run(out)
    np.testing.assert_allclose(run.scalar(fmt.TRAIN_LOSS).values, sum(truth) / 2, rtol=1e-6)
    report = analyze(run)
    assert report.findings == ()
    assert "replica-desync" in report.coverage.clean  # weights are whole on every rank


def test_every_rank_signature_fires_on_a_torchrun_job(nosync, slow, samedata) -> None:
    # sample_runs/ holds single-process runs: the rank signatures are shown here instead
    from runlens.signatures import RANK_SIGNATURES

    fired = set(_findings(nosync)) | set(_findings(slow)) | set(_findings(samedata))
    assert {s.name for s in RANK_SIGNATURES} <= fired


def test_nan_inf_names_the_rank_where_it_appeared_first(tmp_path) -> None:
    out = _train(tmp_path / "nan", "nan", "--steps", "14")
    truth = [np.array(_truth(out, r)["losses"]) for r in (0, 1)]
    assert np.isfinite(truth[0][10]) and not np.isfinite(truth[1][10])  # rank 1 first
    assert not np.isfinite(truth[0][11])  # then every rank, through the all-reduce
    f = _findings(out)["nan-inf"]
    assert "it appeared first on rank 1 (step 10)" in f.summary
    ev = {e.name: e.value for e in f.evidence}
    assert ev["first non-finite value on rank 1 at step"] == 10


def test_each_rank_rolls_its_own_segments(tmp_path: Path) -> None:
    """Flushing every step, each rank's writer merges its segments while training runs
    (rolling compaction): few segments per rank before close(), every row once."""
    steps = 60
    out = _train(tmp_path / "rolled", "healthy", "--steps", str(steps), "--flush-steps", "1")
    for rank in (0, 1):
        rolled = _truth(out, rank)["rolled"]
        assert rolled["merges"] > 0
        assert rolled[fmt.SCALARS_DIR] <= 14 and rolled[fmt.LAYERS_DIR] <= 14  # 7 x log8(61)
        run = load_run(out, rank=rank)
        layers = run.layers.filter(pl.col("kind") == fmt.KIND_WEIGHT).collect()
        counts = layers.group_by("step", "layer").len()
        assert counts["len"].max() == 1 and sorted(set(layers["step"])) == list(range(steps))
        loss = run.scalar(fmt.TRAIN_LOSS)
        assert list(loss.steps) == list(range(steps))
        assert np.allclose(loss.values, _truth(out, rank)["losses"], rtol=1e-6)
