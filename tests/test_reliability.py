"""Reliability (issue 8): crashes, hostile input, and a collector that never hurts training.

Everything here runs on runs recorded with the real Collector (a tiny MLP on CPU) or, for
the property tests, on random runs built in memory in the loader's data model. See also
tests/test_collector*.py (collector failure handling) and tests/test_cli.py (one-line
errors); this file covers what those do not.
"""

from __future__ import annotations

import ast
import errno
import json
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runlens_collect import Collector
from runlens_collect import format as fmt
from torch import nn

import runlens
from runlens import series as S
from runlens.cli import cli
from runlens.report import json_report, markdown, terminal
from runlens.run import Run
from runlens.signatures import RANK_SIGNATURES

REPO = Path(__file__).resolve().parents[1]
RUNLENS_BIN = Path(sys.executable).with_name("runlens")


# -- recorded runs ------------------------------------------------------------------------


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    return x, x[:, :3].argmax(1)


def record(
    run_dir: Path,
    steps: int = 40,
    layer_name: str = "fc1",
    metrics: dict[str, float] | None = None,
    config: dict[str, Any] | None = None,
    **knobs: Any,
) -> Path:
    """SGD on a learnable 3-class problem, recorded with the Collector."""
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            [(layer_name, nn.Linear(8, 16)), ("act", nn.ReLU()), ("head", nn.Linear(16, 3))]
        )
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    cfg = {"lr": 0.1, "num_classes": 3, **(config or {})}
    with Collector(model, opt, run_dir=run_dir, config=cfg, activation_every=5, **knobs) as col:
        for step in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
            if step % 10 == 0:
                col.log({"val/loss": loss.item(), **(metrics or {})})
    return run_dir


@pytest.fixture(scope="session")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # flush_steps=10: several segments per table, so one can be damaged and others survive
    # (not compacted on close)
    return record(tmp_path_factory.mktemp("rel") / "base", steps=40, flush_steps=10, compact=False)


def invoke(*args: object, **kw: Any) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, **kw)


def segments(run: Path, table: str) -> list[Path]:
    return sorted((run / table).glob(fmt.SEGMENT_GLOB))


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def no_traceback(result: Any) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


# -- SIGKILL at random points -------------------------------------------------------------

# One "zygote" process imports torch once and forks each training on request, so twenty
# trials do not pay twenty torch imports. It never runs a parallel region before forking.
ZYGOTE = textwrap.dedent(
    """
    import os, signal, sys, torch
    from torch import nn
    from runlens_collect import Collector

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically

    def train(run_dir, flush_steps):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        x = torch.randn(32, 8); y = x[:, :3].argmax(1)
        col = Collector(model, opt, run_dir=run_dir, flush_steps=flush_steps, flush_seconds=0.05)
        step = 0
        while True:  # trains until killed
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            col.step(loss=loss)
            if step % 7 == 0:
                col.log({"val/loss": loss})
            print(step, flush=True)  # after col.step: this step was handed to the collector
            step += 1

    for line in sys.stdin:
        run_dir, flush_steps, out = line.split()
        pid = os.fork()
        if pid == 0:
            os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
            sys.stdout = os.fdopen(1, "w")
            train(run_dir, int(flush_steps))
        print(pid, flush=True)
    """
)
KILL_TRIALS = 20


def _kill_trial(zygote: Any, lock: Any, run_dir: Path, seed: int) -> tuple[Path, int]:
    """Start a training (forked by the zygote), SIGKILL it at a random moment; return
    (run_dir, last step the training reported, -1 if none)."""
    rng = random.Random(seed)
    out = run_dir.with_suffix(".out")
    with lock:
        zygote.stdin.write(f"{run_dir} {rng.randint(1, 12)} {out}\n")
        zygote.stdin.flush()
        pid = int(zygote.stdout.readline())
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_text().startswith("0\n")):  # first step done
            assert time.monotonic() < deadline, "training never got going"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.8))
    finally:
        os.kill(pid, signal.SIGKILL)
    while _alive(pid):
        time.sleep(0.01)
    steps = [int(s) for s in out.read_text().split() if s.isdigit()]
    return run_dir, max(steps, default=-1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")
def test_sigkill_at_random_points_leaves_an_analyzable_run(tmp_path: Path) -> None:
    import threading

    zygote = subprocess.Popen(
        [sys.executable, "-c", ZYGOTE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lock = threading.Lock()
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            trials = list(
                pool.map(
                    lambda i: _kill_trial(zygote, lock, tmp_path / f"run{i}", 1000 + i),
                    range(KILL_TRIALS),
                )
            )
    finally:
        zygote.kill()
        zygote.wait()
    segments_read = 0
    for i, (run_dir, trained) in enumerate(trials):
        assert trained >= 0
        for table in (fmt.SCALARS_DIR, fmt.LAYERS_DIR):
            for f in segments(run_dir, table):  # every completed segment is valid Parquet
                assert pq.read_table(f).num_rows > 0, f
                segments_read += 1
        r = invoke("analyze", run_dir, "--format", "json")
        no_traceback(r)
        assert r.exit_code == 0, r.output
        summary = json.loads(r.stdout)["summary"]
        assert summary["ended_abnormally"] is True
        assert "ended abnormally" in summary["end_reason"]
        # The report covers what was flushed, never more than what was trained (the kill
        # may land between col.step and the print: +1).
        if summary["last_step"] is not None:
            assert 0 <= summary["last_step"] <= trained + 1
        meta = json.loads((run_dir / fmt.RUN_JSON).read_text())
        assert meta["status"] == fmt.STATUS_RUNNING
        if i == 0:  # the terminal report says it too
            assert "ended abnormally" in invoke("analyze", run_dir).stdout
    assert segments_read > KILL_TRIALS  # the kills did land after some flushes


# -- write failures -----------------------------------------------------------------------


def _train_steps(col: Collector, model: nn.Module, opt: Any, n: int) -> int:
    x, y = _data()
    done = 0
    for _ in range(n):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        col.step(loss=loss)
        done += 1
    return done


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _events(run_dir: Path) -> list[dict[str, Any]]:
    p = run_dir / fmt.EVENTS_JSONL
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("code", [errno.EACCES, errno.ENOSPC])
def test_write_failure_mid_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """The disk goes bad after two good flushes: training runs to the end, one warning,
    events.jsonl records it, the segments written before stay valid and analyzable."""
    real = fmt.write_segment
    calls: list[Path] = []

    def failing(table: pa.Table, path: Any) -> None:
        calls.append(Path(path))
        if len(calls) > 4:  # two flushes (scalars + layers each) succeed
            raise OSError(code, os.strerror(code), str(path))
        real(table, path)

    monkeypatch.setattr(fmt, "write_segment", failing)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.warns(RuntimeWarning) as record_,
        Collector(
            model, opt, run_dir=tmp_path, flush_steps=5, flush_seconds=60, compact=False
        ) as col,
    ):
        done = _train_steps(col, model, opt, 30)
    assert done == 30
    ours = [w for w in record_ if "runlens_collect" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert os.strerror(code) in str(ours[0].message)
    warned = [e for e in _events(tmp_path) if e["kind"] == "warning"]
    assert len(warned) == 1 and os.strerror(code) in warned[0]["message"]
    assert len(calls) > 4  # the failing writes really happened
    for table in (fmt.SCALARS_DIR, fmt.LAYERS_DIR):
        files = segments(tmp_path, table)
        assert len(files) == 2
        steps = pa.concat_tables([pq.read_table(f) for f in files]).column("step").to_pylist()
        assert set(steps) == set(range(10))
    meta = json.loads((tmp_path / fmt.RUN_JSON).read_text())
    assert meta["status"] == fmt.STATUS_FINISHED
    r = invoke("analyze", tmp_path, "--format", "json")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["summary"]["last_step"] == 9


def _train_unwritable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Permission denied on every write after setup (segments, run.json, events.jsonl);
    returns the collector's warnings."""

    def denied(*a: Any, **k: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning) as record_:
        col = Collector(model, opt, run_dir=tmp_path, flush_steps=3)
        for name in ("write_segment", "write_json_atomic", "append_event"):
            monkeypatch.setattr(fmt, name, denied)
        assert _train_steps(col, model, opt, 20) == 20
        col.close()
    assert not segments(tmp_path, fmt.SCALARS_DIR)
    return [str(w.message) for w in record_ if "runlens_collect" in str(w.message)]


def test_nothing_writable_still_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ours = _train_unwritable(tmp_path, monkeypatch)
    assert ours and all("Permission denied" in w for w in ours)


def test_nothing_writable_warns_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(_train_unwritable(tmp_path, monkeypatch)) == 1


# -- hostile input through the CLI ------------------------------------------------------


def _truncate(run: Path) -> str:
    f = segments(run, fmt.SCALARS_DIR)[1]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f"skipped unreadable segment {f.relative_to(run).as_posix()}"


def _corrupt_pages(run: Path) -> str:
    # Data pages garbled, footer intact: only a full read notices.
    f = segments(run, fmt.LAYERS_DIR)[0]
    b = bytearray(f.read_bytes())
    for i in range(8, int(len(b) * 0.4)):
        b[i] = (b[i] * 7 + 3) % 256
    f.write_bytes(bytes(b))
    return f"skipped unreadable segment {f.relative_to(run).as_posix()}"


def _zero_bytes(run: Path) -> str:
    f = segments(run, fmt.LAYERS_DIR)[-1]
    f.write_bytes(b"")
    return f"skipped unreadable segment {f.relative_to(run).as_posix()}"


def _wrong_types(run: Path) -> str:
    f = segments(run, fmt.SCALARS_DIR)[0]
    t = pq.read_table(f)
    t = t.set_column(3, "value", pa.array(["x"] * t.num_rows))
    pq.write_table(t, f)
    return f"skipped segment {f.relative_to(run).as_posix()}: column value has type string"


def _not_parquet(run: Path) -> str:
    f = run / fmt.SCALARS_DIR / "rank=0" / "part-000999.parquet"
    f.write_text("hello, I am not parquet")
    return "skipped unreadable segment scalars/rank=0/part-000999.parquet"


def _no_run_json(run: Path) -> str:
    (run / fmt.RUN_JSON).unlink()
    return "run.json missing"


def _bad_run_json(run: Path) -> str:
    (run / fmt.RUN_JSON).write_text('{"schema_version": 1, "name": ')
    return "run.json unreadable"


def _bad_events(run: Path) -> str:
    with open(run / fmt.EVENTS_JSONL, "ab") as fh:
        fh.write(b'\xff\xfe{"kind": "start", "run_id\n[1, 2]\n')
    return "events.jsonl: skipped 1 malformed line"


def _all_nan(run: Path) -> str:
    for f in segments(run, fmt.SCALARS_DIR):
        t = pq.read_table(f)
        pq.write_table(t.set_column(3, "value", pa.array([math.nan] * t.num_rows)), f)
    return "nan-inf"  # a finding, not a warning


def _duplicate_steps(run: Path) -> str:
    for f in segments(run, fmt.SCALARS_DIR):  # steps 0..39 -> 0..6, non-monotonic
        t = pq.read_table(f)
        steps = pa.array([(39 - s) % 7 for s in t.column("step").to_pylist()], pa.int64())
        pq.write_table(t.set_column(0, "step", steps), f)
    return "steps recorded more than once"


def _two_runs(run: Path) -> str:
    # A second training into the same directory, from step 0 (not a resume).
    with pytest.warns(RuntimeWarning, match="already holds a run"):
        record(run, steps=12, flush_steps=5, resume=False)
    return "this directory holds 2 runs"


WARN_CASES = {
    "truncated-segment": _truncate,
    "corrupt-pages": _corrupt_pages,
    "zero-byte-segment": _zero_bytes,
    "wrong-column-types": _wrong_types,
    "not-parquet": _not_parquet,
    "missing-run-json": _no_run_json,
    "corrupt-run-json": _bad_run_json,
    "garbage-events": _bad_events,
    "all-nan": _all_nan,
    "duplicate-steps": _duplicate_steps,
    "two-runs-one-dir": _two_runs,
}


@pytest.mark.parametrize("case", list(WARN_CASES))
def test_damaged_run_is_analyzed_with_a_warning(base_run: Path, tmp_path: Path, case: str) -> None:
    run = copy_run(base_run, tmp_path / "run")
    expect = WARN_CASES[case](run)
    r = invoke("analyze", run)
    no_traceback(r)
    assert r.exit_code == 0, r.output
    assert r.stderr == ""
    assert expect in r.stdout  # the terminal report shows the warning (or finding)
    j = invoke("analyze", run, "--format", "json")
    assert j.exit_code == 0
    report = json.loads(j.stdout)
    where = (
        [f["signature"] for f in report["findings"]] if case == "all-nan" else report["warnings"]
    )
    assert any(expect in w for w in where), where
    assert not [s for s in report["skipped"] if "internal error" in s["reason"]]
    if case != "all-nan":
        assert report["summary"]["steps"] > 0  # the readable data is still analyzed


def _newer_schema(run: Path) -> str:
    meta = json.loads((run / fmt.RUN_JSON).read_text())
    meta["schema_version"] = fmt.SCHEMA_VERSION + 1
    (run / fmt.RUN_JSON).write_text(json.dumps(meta))
    return "upgrade runlens"


def _empty(run: Path) -> str:
    shutil.rmtree(run)
    run.mkdir()
    return "no runs found: looked for runlens run directories"


def _only_bad_run_json(run: Path) -> str:
    for table in (fmt.SCALARS_DIR, fmt.LAYERS_DIR):
        shutil.rmtree(run / table)
    (run / fmt.RUN_JSON).write_text("{{{")
    return "unreadable run.json and no segments"


ERROR_CASES = {
    "newer-schema": _newer_schema,
    "empty-dir": _empty,
    "only-corrupt-run-json": _only_bad_run_json,
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_unusable_input_is_one_line_error(base_run: Path, tmp_path: Path, case: str) -> None:
    run = copy_run(base_run, tmp_path / "run")
    expect = ERROR_CASES[case](run)
    for args in ((), ("--format", "json")):
        r = invoke("analyze", run, *args)
        no_traceback(r)
        assert r.exit_code == 2
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("runlens: error: "), r.stderr
        assert expect in lines[0]
        assert r.stdout == ""


def test_one_step_run(tmp_path: Path) -> None:
    run = record(tmp_path / "one", steps=1)
    r = invoke("analyze", run, "--format", "json")
    assert r.exit_code == 0
    report = json.loads(r.stdout)
    assert report["summary"]["steps"] == 1
    assert report["summary"]["ended_abnormally"] is False
    assert not [s for s in report["skipped"] if "internal error" in s["reason"]]
    assert invoke("analyze", run).exit_code == 0


# -- property-based: the series toolkit ---------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300)


@given(c=finite, n=st.integers(0, 300), w=st.floats(0.0, 0.999))
def test_ema_of_a_constant_is_the_constant(c: float, n: int, w: float) -> None:
    out = S.ema_debiased(np.full(n, c), w)
    assert out.shape == (n,)
    np.testing.assert_allclose(out, c, rtol=1e-9, atol=0)


@given(
    vals=st.lists(finite | st.sampled_from([math.nan, math.inf, -math.inf]), max_size=200),
    w=st.floats(0.0, 0.999),
)
def test_ema_passes_nonfinite_through_and_stays_in_range(vals: list[float], w: float) -> None:
    x = np.array(vals, dtype=np.float64)
    with np.errstate(all="ignore"):
        out = S.ema_debiased(x, w)
    assert out.shape == x.shape
    ok = np.isfinite(x)
    if ok.any() and np.isfinite(out[ok]).all():
        lo, hi = x[ok].min(), x[ok].max()
        span = max(abs(lo), abs(hi)) * 1e-9
        assert (out[ok] >= lo - span).all() and (out[ok] <= hi + span).all()


arrays = st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), max_size=120).map(
    lambda v: np.array(v, dtype=np.float64)
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(x=arrays, window=st.integers(1, 50))
def test_series_helpers_never_raise(x: np.ndarray, window: int) -> None:
    steps = np.arange(len(x), dtype=np.int64) * 3
    with np.errstate(all="ignore"):
        med = S.rolling_median(x, window)
        mad = S.rolling_mad(x, window)
        assert med.shape == mad.shape == x.shape
        noise = S.robust_noise(x)
        assert math.isnan(noise) or noise >= 0
        slope = S.robust_slope(steps, x)
        assert isinstance(slope, float)
        spikes = S.find_spikes(steps, x)
        assert all(int(s) in set(steps.tolist()) for s in _spike_steps(spikes))
        al = S.align(steps, x, steps)
        assert al.shape == x.shape
        for a, b in S.windows_where(np.isfinite(x)):
            assert 0 <= a <= b < len(x) and np.isfinite(x[a : b + 1]).all()
        ds = S.downsample_minmax(steps, x, 16)
        kept_steps = ds[0]
        assert set(np.asarray(kept_steps).tolist()) <= set(steps.tolist())
        fin = x[np.isfinite(x)]
        if fin.size:
            kept = np.asarray(ds[1])
            assert np.nanmax(np.where(np.isfinite(kept), kept, np.nan)) == fin.max()
            assert np.nanmin(np.where(np.isfinite(kept), kept, np.nan)) == fin.min()


def _spike_steps(spikes: Any) -> list[int]:
    out = []
    for s in spikes:
        step = getattr(s, "step", None)
        out.append(int(step if step is not None else s[0]))
    return out


@given(a=st.floats(-1e6, 1e6), b=finite.filter(lambda v: abs(v) < 1e6), n=st.integers(3, 300))
def test_robust_slope_of_a_line(a: float, b: float, n: int) -> None:
    steps = np.arange(n, dtype=np.int64) * 2
    assert S.robust_slope(steps, a * steps + b) == pytest.approx(a, rel=1e-6, abs=1e-6)


# -- property-based: every signature on random runs --------------------------------------

_MODES = ("normal", "constant", "nan", "inf", "mixed", "huge", "tiny", "zero")
_STATS = (*fmt.BASE_STATS, "update_ratio", "frac_dead_units", "frac_saturated", "min", "max")


def _values(rng: np.random.Generator, n: int, mode: str, scale: float) -> np.ndarray:
    if mode == "constant":
        return np.full(n, scale)
    if mode == "nan":
        return np.full(n, np.nan)
    if mode == "inf":
        return np.full(n, np.inf) * rng.choice([-1, 1], n)
    if mode == "zero":
        return np.zeros(n)
    if mode == "huge":
        return rng.lognormal(0, 3, n) * 1e30
    if mode == "tiny":
        return rng.lognormal(0, 3, n) * 1e-30
    v = np.abs(rng.normal(scale, abs(scale) + 1, n)) * rng.choice([1, 1, 1, -1], n)
    if mode == "mixed":
        k = rng.integers(0, n + 1)
        v[rng.choice(n, size=k, replace=False)] = rng.choice([np.nan, np.inf, -np.inf, 1e300], k)
    return v


# Every scalar some signature requires, so that every signature gets called.
_REQUIRED_SCALARS = sorted(
    {
        alt.strip()
        for sig in runlens.REGISTRY.values()
        for req in sig.requires
        for alt in req.split("|")
        if not alt.strip().startswith("layers:") and not alt.strip().endswith("*")
    }
)
_SCALAR_COLS = {"step": pl.Int64, "wall_time": pl.Float64, "name": pl.String, "value": pl.Float64}


def random_run(seed: int, n: int, n_layers: int, modes: list[str], scale: float) -> Run:
    rng = np.random.default_rng(seed)
    steps = np.sort(rng.choice(max(1, 3 * n), size=n, replace=False)).astype(np.int64)
    if n and rng.random() < 0.3:  # duplicated / out-of-order writes
        steps = rng.permutation(np.concatenate([steps, steps[: max(1, n // 3)]]))
    # new_sq: read by gradient-not-reset where present, no longer required (absent on
    # steps where every probed .grad was None).
    names = [*_REQUIRED_SCALARS, "time/step", "x", fmt.GRAD_NEW_SQ]
    rows = []
    for i, name in enumerate(names):
        if rng.random() < 0.15:
            continue  # this series is absent
        v = _values(rng, len(steps), modes[i % len(modes)], scale)
        if name == "val/accuracy":
            v = np.clip(v, 0, 1)
        rows.append(
            pl.DataFrame(
                {"step": steps, "wall_time": steps * 0.1 + 1e9, "name": name, "value": v},
                schema=_SCALAR_COLS,
            )
        )
    scalars = (pl.concat(rows) if rows else pl.DataFrame(schema=_SCALAR_COLS)).with_columns(
        pl.lit(0, pl.Int64).alias("rank")
    )
    layer_names = [f"l{j}.weight" for j in range(n_layers)] + ["act", fmt.OUTPUT_LAYER][
        : 2 if n_layers else 0
    ]
    lrows = []
    lsteps = np.unique(steps)[:: int(rng.integers(1, 4))] if len(steps) else steps
    for kind in fmt.KINDS:
        if rng.random() < 0.2:
            continue
        for j, layer in enumerate(layer_names):
            m = len(lsteps)
            cols: dict[str, Any] = {
                "step": lsteps,
                "layer": [layer] * m,
                "kind": [kind] * m,
                "numel": np.full(m, int(rng.integers(1, 10_000)), np.int64),
                "missing": rng.random(m) < 0.05,
            }
            for k, stat in enumerate(_STATS):
                v = _values(rng, m, modes[(j + k) % len(modes)], scale)
                if stat.startswith("frac_"):
                    v = np.clip(np.abs(v), 0, 1)
                with np.errstate(over="ignore"):  # huge values become inf: fine
                    cols[stat] = v.astype(np.float32)
            cols["row_sum_mean"] = np.ones(m, np.float32)
            hist = [list(rng.integers(0, 5, fmt.HIST_NUM_BINS)) if rng.random() < 0.3 else None
                    for _ in range(m)]  # fmt: skip
            cols["hist"] = hist
            lrows.append(pl.DataFrame(cols, schema_overrides={"hist": pl.List(pl.Int64)}))
    layers = (
        pl.concat(lrows, how="vertical_relaxed").with_columns(pl.lit(0, pl.Int64).alias("rank"))
        if lrows
        else None
    )
    num_classes = int(rng.choice([1, 2, 3, 10, 1000]))
    meta = {
        "schema_version": 1,
        "name": f"random-{seed}",
        "status": str(rng.choice(["running", "finished", "crashed"])),
        "config": {"num_classes": num_classes, "lr": scale},
        "model": {
            "modules": [{"path": f"l{j}", "type": "Linear", "params": []} for j in range(n_layers)]
            + [{"path": "act", "type": str(rng.choice(["ReLU", "Tanh", "Sigmoid"]))}],
            "output_shape": [8, num_classes],
        },
    }
    return Run(
        path=Path(f"/nonexistent/random-{seed}"),
        meta=meta,
        scalars=scalars.lazy(),
        layers=layers.lazy() if layers is not None else None,
        events=[{"kind": "close"}] if rng.random() < 0.5 else [],
    )


def _all_steps(run: Run) -> set[int]:
    s = set(run.scalars.select("step").collect()["step"].to_list())
    if run.layers is not None:
        s |= set(run.layers.select("step").collect()["step"].to_list())
    return s


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31),
    n=st.sampled_from([0, 1, 2, 3, 5, 12, 40, 150]),
    n_layers=st.integers(0, 3),
    modes=st.lists(st.sampled_from(_MODES), min_size=1, max_size=4),
    scale=st.sampled_from([0.0, 1e-30, 1e-6, 1.0, 2.3, 1e6, 1e30, -5.0]),
)
def test_every_signature_survives_random_runs(
    seed: int, n: int, n_layers: int, modes: list[str], scale: float
) -> None:
    run = random_run(seed, n, n_layers, modes, scale)
    with np.errstate(all="ignore"):
        report = runlens.analyze(run)
    broken = [s for s in report.skipped if "internal error" in s.reason]
    assert not broken, broken
    steps = _all_steps(run)
    for f in report.findings:
        assert 0.0 <= f.confidence <= 1.0
        if f.steps is not None:
            assert steps, f
            assert min(steps) <= f.steps[0] <= f.steps[1] <= max(steps), (f.signature, f.steps)
        for e in f.evidence:
            assert isinstance(e.value, (int, float)) and not isinstance(e.value, bool), e
            assert e.threshold is None or isinstance(e.threshold, (int, float)), e
    # and every reporter renders it (JSON strictly: no NaN literals)
    json.loads(json_report.render(report), parse_constant=_no_constants)
    markdown.render(report)
    terminal.render(report, width=100, color=False)


def _no_constants(name: str) -> None:
    raise AssertionError(f"JSON report holds {name}")


def test_property_runs_cover_every_signature() -> None:
    """The random runs are rich enough that every signature is actually called (and can
    look: loss-oscillation needs 40 finite points after the warm-up)."""
    called: set[str] = set()
    for seed in range(6):
        run = random_run(seed, 150, 3, ["normal", "mixed", "constant"], 2.3)
        with np.errstate(all="ignore"):
            report = runlens.analyze(run)
        skipped = {s.signature for s in report.skipped}
        called |= set(runlens.REGISTRY) - skipped
    # Sanity signatures need sanity runs; bf16-stagnation needs parameter dtypes in
    # run.json's model summary, which the random runs do not write.
    # Rank signatures need several ranks (tests/test_distributed.py).
    ranks = {s.name for s in RANK_SIGNATURES}
    applicable = {
        n
        for n, s in runlens.REGISTRY.items()
        if s.category != "sanity" and n != "bf16-stagnation" and n not in ranks
    }
    assert applicable <= called, applicable - called


# -- the collector under stress -----------------------------------------------------------


class ManyParams(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(torch.randn(8) * 0.1) for _ in range(n)])
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x * torch.stack(list(self.ps)).mean(0))


def test_slow_writer_drops_steps_instead_of_blocking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk stalls (write_segment blocks until released): training still runs all its
    steps while the writer is stuck, what is held in memory stays within the queue bound,
    and every dropped step is counted in events.jsonl."""
    import threading

    gate = threading.Event()
    real = fmt.write_segment
    writes = []

    def stalled(table: pa.Table, path: Any) -> None:
        writes.append(path)
        gate.wait(120)
        real(table, path)

    monkeypatch.setattr(fmt, "write_segment", stalled)
    torch.manual_seed(0)
    model = ManyParams(100)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    steps, max_queue = 200, 3
    with pytest.warns(RuntimeWarning, match="fell behind"):
        col = Collector(model, opt, run_dir=tmp_path, flush_steps=1, max_queue=max_queue)
        for _ in range(steps):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
        # Training finished while the writer is still stuck in its first write.
        assert not gate.is_set() and len(writes) == 1
        writer = col._writer
        assert writer.queue.qsize() <= writer.queue.maxsize == 2 * max_queue
        gate.set()
        col.close()
    layers = pa.concat_tables([pq.read_table(f) for f in segments(tmp_path, fmt.LAYERS_DIR)])
    recorded = set(layers.column("step").to_pylist())
    # Bounded: the step being written, the rest of the writer's copied-out batch (fewer
    # than max_queue) and what fits in the queue; the rest was dropped.
    assert len(recorded) <= 1 + (max_queue - 1) + 2 * max_queue
    skipped = [e for e in _events(tmp_path) if e["kind"] == "skipped"]
    dropped = {s for e in skipped for s in e["steps"]}
    assert dropped | recorded == set(range(steps))
    assert not dropped & recorded


# -- the collector on unusual models ------------------------------------------------------


def _layer_rows(run_dir: Path, **where: Any) -> list[dict[str, Any]]:
    t = pa.concat_tables([pq.read_table(f) for f in segments(run_dir, fmt.LAYERS_DIR)])
    rows = t.to_pylist()
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def test_tied_parameters_grad_is_the_sum_of_both_uses(tmp_path: Path) -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Collector(model, opt, run_dir=tmp_path) as col:
        loss = nn.functional.cross_entropy(model(torch.arange(10)), torch.arange(10))
        loss.backward()
        expected = emb.weight.grad.norm().item()  # accumulates both uses
        opt.step()
        col.step(loss=loss)
    assert col.warnings == []
    (g,) = _layer_rows(tmp_path, kind="grad")
    assert g["layer"] == "0.weight" and g["numel"] == 40
    assert g["norm"] == pytest.approx(expected, rel=1e-5)


def test_parameters_added_after_start_are_not_recorded_and_do_not_fail(tmp_path: Path) -> None:
    """Documented limitation (docs/collect-limitations.md): the parameter set is fixed at
    Collector(...); later ones are ignored, training is unaffected."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    with Collector(model, opt, run_dir=tmp_path) as col:
        for step in range(6):
            if step == 3:
                model.add_module("extra", nn.Linear(3, 3))
                opt.add_param_group({"params": model.extra.parameters(), "lr": 0.01})
            out = model[:3](x)
            if step >= 3:
                out = model.extra(out)
            loss = nn.functional.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
    assert col.warnings == []
    grads = _layer_rows(tmp_path, kind="grad")
    assert {r["layer"] for r in grads} == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert {r["step"] for r in grads} == set(range(6))
    scalars = pa.concat_tables([pq.read_table(f) for f in segments(tmp_path, fmt.SCALARS_DIR)])
    names = set(scalars.column("name").to_pylist())
    assert {"lr/0", "lr/1"} <= names  # the new param group's LR is recorded


def test_module_called_twice_per_step(tmp_path: Path) -> None:
    """A shared block applied twice: weights/grads are the parameter's (grad = both uses);
    the activation row is the last call's output (documented)."""
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    last_out: list[torch.Tensor] = []

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = shared

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.block(x)
            out = self.block(torch.tanh(h))
            last_out.append(out.detach())
            return out

    model = Twice()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Collector(model, opt, run_dir=tmp_path, activation_every=1) as col:
        loss = model(torch.randn(5, 6)).pow(2).mean()
        loss.backward()
        grad_norm = shared.weight.grad.norm().item()
        opt.step()
        col.step(loss=loss)
    assert col.warnings == []
    (act,) = _layer_rows(tmp_path, kind="activation", layer="block")
    assert act["mean"] == pytest.approx(last_out[-1].mean().item(), rel=1e-5, abs=1e-7)
    (g,) = _layer_rows(tmp_path, kind="grad", layer="block.weight")
    assert g["norm"] == pytest.approx(grad_norm, rel=1e-5)


def test_no_grad_and_inference_mode_evaluation_is_not_recorded(tmp_path: Path) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    with Collector(model, opt, run_dir=tmp_path, activation_every=1) as col:
        for _ in range(3):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
            # evaluation in train mode under no_grad, and in inference_mode: not training
            with torch.no_grad():
                v = nn.functional.cross_entropy(model(torch.randn(100, 8)), y.repeat(2)[:100])
            with torch.inference_mode():
                model.eval()
                model(torch.randn(7, 8))
                model.train()
            col.log({"val/loss": v})
    assert col.warnings == []
    out = _layer_rows(tmp_path, kind="output")
    assert len(out) == 3 and {r["numel"] for r in out} == {64 * 3}
    acts = _layer_rows(tmp_path, kind="activation", layer="1")
    assert {r["numel"] for r in acts} == {64 * 16}


@pytest.mark.slow
def test_torch_compile_aot_autograd(tmp_path: Path) -> None:
    """A model compiled with AOTAutograd (the compiled forward *and* backward graphs the
    collector has to read gradients from). The aot_eager backend skips C++ code generation,
    which takes ~50 s on a small CPU box and changes nothing the collector sees
    (test_collector.py covers the plain eager backend)."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    t0 = time.monotonic()
    try:
        compiled = torch.compile(model, backend="aot_eager")
        nn.functional.cross_entropy(compiled(x), y).backward()
    except Exception as exc:  # unsupported platform / build
        pytest.skip(f"torch.compile unavailable: {type(exc).__name__}: {exc}"[:200])
    if time.monotonic() - t0 > 60:
        pytest.skip("torch.compile took more than 60 s here")
    expected = []
    with Collector(compiled, opt, run_dir=tmp_path, activation_every=1) as col:
        for _ in range(3):
            loss = nn.functional.cross_entropy(compiled(x), y)
            opt.zero_grad()
            loss.backward()
            expected.append(model[0].weight.grad.norm().item())
            opt.step()
            col.step(loss=loss)
    assert col.warnings == []
    grads = sorted(_layer_rows(tmp_path, kind="grad", layer="0.weight"), key=lambda r: r["step"])
    assert [r["norm"] for r in grads] == pytest.approx(expected, rel=1e-5)
    assert not _layer_rows(tmp_path, kind="activation")  # documented: no hooks in graphs
    assert len(_layer_rows(tmp_path, kind="output")) == 3


# -- safety ------------------------------------------------------------------------------


def test_run_directory_content_is_never_executed(base_run: Path, tmp_path: Path) -> None:
    run = copy_run(base_run, tmp_path / "run")
    sentinel = tmp_path / "PWNED"
    touch = f"open({str(sentinel)!r}, 'w').write('x')"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (exec, (touch,))

    payload = pickle.dumps(Evil())
    for d in (run, run / fmt.SCALARS_DIR, run / fmt.SCALARS_DIR / "rank=0"):
        (d / "sitecustomize.py").write_text(touch)
        (d / "usercustomize.py").write_text(touch)
        (d / "__init__.py").write_text(touch)
        (d / "polars.py").write_text(touch)  # shadows a module if cwd were on sys.path
        (d / "evil.pth").write_text(f"import os; {touch}\n")
        (d / "model.pkl").write_bytes(payload)
        (d / "state.pt").write_bytes(payload)
    (run / fmt.SCALARS_DIR / "rank=0" / "part-000777.parquet").write_bytes(payload)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    for fmt_ in ("json", "html"):
        proc = subprocess.run(
            [str(RUNLENS_BIN), "analyze", ".", "--format", fmt_, "-o", str(tmp_path / "out")],
            cwd=run,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert not sentinel.exists()
    r = invoke("analyze", run, "--format", "json")  # in-process too
    assert "part-000777.parquet" in " ".join(json.loads(r.stdout)["warnings"])
    assert not sentinel.exists()


# Names that would run code on run data. importlib is allowed with literal arguments only
# (package resources, the collector's own module), never with names from a run.
_FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal",
                      "shelve", "joblib", "runpy", "torch"}  # fmt: skip
_FORBIDDEN_CALLS = {"eval", "exec", "__import__", "compile", "execfile"}  # builtins
_FORBIDDEN_METHODS = {"read_pickle", "exec_module", "load_module", "run_path", "run_module"}


def test_analyzer_source_has_no_code_execution_paths() -> None:
    problems = []
    for path in sorted((REPO / "runlens").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        rel = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in _FORBIDDEN_MODULES:
                        problems.append(f"{rel}:{node.lineno} import {a.name}")
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module.split(".")[0] in _FORBIDDEN_MODULES:
                    problems.append(f"{rel}:{node.lineno} from {node.module}")
            elif isinstance(node, ast.Call):
                f = node.func
                if (isinstance(f, ast.Name) and f.id in _FORBIDDEN_CALLS) or (
                    isinstance(f, ast.Attribute) and f.attr in _FORBIDDEN_METHODS
                ):
                    problems.append(f"{rel}:{node.lineno} call {ast.unparse(f)}()")
                if any(k.arg == "allow_pickle" for k in node.keywords):
                    problems.append(f"{rel}:{node.lineno} allow_pickle")
                text = ast.unparse(f)
                if text.startswith("importlib") and not all(
                    isinstance(a, ast.Constant) for a in node.args
                ):
                    problems.append(f"{rel}:{node.lineno} {text}() with a computed name")
    assert not problems, problems


def test_ast_scan_catches_what_it_claims(tmp_path: Path) -> None:
    """The scan above is not vacuous: it flags a planted offender."""
    bad = "import pickle\nx = eval('1')\nimport importlib\nimportlib.import_module(n)\n"
    tree = ast.parse(bad)
    names = {type(n).__name__ for n in ast.walk(tree)}
    assert {"Import", "Call"} <= names
    flagged = [
        n
        for n in ast.walk(tree)
        if (isinstance(n, ast.Import) and n.names[0].name in _FORBIDDEN_MODULES)
        or (isinstance(n, ast.Call) and getattr(n.func, "id", None) in _FORBIDDEN_CALLS)
        or (
            isinstance(n, ast.Call)
            and ast.unparse(n.func).startswith("importlib")
            and not all(isinstance(a, ast.Constant) for a in n.args)
        )
    ]
    assert len(flagged) == 3


HOSTILE_LAYER = "</script><img src=x onerror=alert(1)>|[red]x"
HOSTILE_METRIC = "val/<svg onload=alert(2)>|*[m](javascript:alert(3))"
HOSTILE_CONFIG = "<script>alert(4)</script> | [bold]cfg[/bold] `code`"


@pytest.fixture(scope="session")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record(
        tmp_path_factory.mktemp("hostile") / "run",
        steps=30,
        layer_name=HOSTILE_LAYER,
        metrics={HOSTILE_METRIC: 0.5},
        config={"note": HOSTILE_CONFIG, HOSTILE_CONFIG: 1},
    )


def _analyze_formats() -> list[str]:
    (opt,) = [p for p in cli.commands["analyze"].params if p.name == "fmt"]
    return list(opt.type.choices)


@pytest.mark.parametrize("out_format", _analyze_formats())
def test_hostile_names_are_escaped_in_every_format(hostile_run: Path, out_format: str) -> None:
    r = invoke("analyze", hostile_run, "--format", out_format, "-o", hostile_run.parent / "out")
    assert r.exit_code == 0, r.output
    text = (hostile_run.parent / "out").read_text(encoding="utf-8")
    hostile = (HOSTILE_LAYER, HOSTILE_METRIC, HOSTILE_CONFIG)
    if out_format == "json":
        report = json.loads(text)
        assert report["run"]["config"]["note"] == HOSTILE_CONFIG  # exact round trip
        assert any(HOSTILE_LAYER in json.dumps(row) for row in report["layers"])
        return
    if out_format == "terminal":
        # plain text, printed literally: rich markup in a name is not interpreted
        assert HOSTILE_LAYER.split(">", 1)[1] in text or "[red]x" in text
        return
    for h in hostile:  # html, markdown: no raw markup from the run anywhere
        assert h not in text, (out_format, h)
    for tag in ("<img src=x", "<svg onload", "<script>alert"):
        assert tag not in text, (out_format, tag)
    if out_format == "markdown":  # a name must not become a live link
        assert "[m](javascript:" not in text


def test_analyze_writes_only_the_requested_output(
    base_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = copy_run(base_run, tmp_path / "run")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cache = tmp_path / "cache"
    monkeypatch.setenv("RUNLENS_CACHE_DIR", str(cache))
    monkeypatch.chdir(cwd)
    csv_log = tmp_path / "logs" / "metrics.csv"
    csv_log.parent.mkdir()
    csv_log.write_text("step,train_loss,val_loss\n" + "".join(
        f"{i},{1 / (i + 1)},{1.1 / (i + 1)}\n" for i in range(30)))  # fmt: skip

    def snapshot() -> set[Path]:
        return {p for p in tmp_path.rglob("*")}

    for i, out_format in enumerate(_analyze_formats()):
        before = snapshot()
        out = f"report{i}.{out_format}"
        r = invoke("analyze", run, "--format", out_format, "-o", out)
        assert r.exit_code == 0, r.output
        assert snapshot() - before == {cwd / out}
    # An imported log: the output plus the documented import cache, nothing else.
    before = snapshot()
    r = invoke("analyze", csv_log, "--format", "json", "-o", "imported.json")
    assert r.exit_code == 0, r.output
    new = snapshot() - before
    assert cwd / "imported.json" in new
    assert all(p in (cwd / "imported.json", cache) or cache in p.parents for p in new), new
    assert not [p for p in csv_log.parent.iterdir() if p != csv_log]
