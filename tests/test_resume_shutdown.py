"""Resuming a run (the step axis continues; the analyzer reads one run), SIGTERM/SIGINT
(flushed, closed as preempted, the previous handler still runs), durable writes, the
events of every rank, and time/data only where it measures the wait for data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from contract_helpers import MLP, batches, blobs, healthy, steps_of
from runlens_collect import Collector
from runlens_collect import format as fmt
from torch import nn

import runlens
from runlens.report import terminal
from runlens.run import load_run


def _steps(col: Collector, model: nn.Module, opt, start: int, stop: int) -> list[float]:
    x, y = blobs()
    losses = []
    for step in range(start, stop):
        xb, yb = batches(x, y, step)
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        col.step(loss=loss)
    return losses


def test_resume_from_a_checkpoint_continues_the_step_axis(tmp_path: Path) -> None:
    """Checkpoint at step 20, crash at step 35, resume from the checkpoint to step 60:
    one run of steps 0..59 whose steps 20..34 are the resumed attempt's."""
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    col = Collector(model, opt, run_dir=tmp_path, flush_steps=7)
    first = _steps(col, model, opt, 0, 20)
    ckpt = {k: v.clone() for k, v in model.state_dict().items()}
    _steps(col, model, opt, 20, 35)  # lost: the resume starts from the checkpoint
    col.close(fmt.STATUS_CRASHED)
    model.load_state_dict(ckpt)
    with Collector(model, opt, run_dir=tmp_path, flush_steps=7, start_step=20) as col2:
        assert col2.global_step == 20
        second = _steps(col2, model, opt, 20, 60)
    assert col2.warnings == []
    run = load_run(tmp_path)
    loss = run.scalar(fmt.TRAIN_LOSS)
    assert loss.steps.tolist() == list(range(60))
    np.testing.assert_allclose(loss.values, first + second, rtol=1e-6)
    w = run.layer_matrix(fmt.KIND_WEIGHT, "norm")
    assert w.steps.tolist() == list(range(60))  # the crashed attempt's 20..34 are gone
    assert run.resumes == (20,)
    meta = run.meta
    assert meta["status"] == "finished" and meta["last_step"] == 59
    (rec,) = meta["resumed"]
    assert rec["step"] == 20 and rec["previous_last_step"] == 34
    assert rec["previous_status"] == "crashed"
    assert len({e["run_id"] for e in run.events if e["kind"] == "start"}) == 1  # one run
    report = healthy(tmp_path)
    assert report.summary.resumed_at == (20,) and report.summary.first_step == 0
    assert "resumed" in terminal.render(report, width=200)


def test_resume_true_continues_after_the_last_step(tmp_path: Path) -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Collector(model, opt, run_dir=tmp_path) as col:
        _steps(col, model, opt, 0, 15)
    with Collector(model, opt, run_dir=tmp_path, resume=True) as col2:
        assert col2.global_step == 15
        _steps(col2, model, opt, 15, 30)
        col2.log({"val/loss": 1.0})
    assert col2.warnings == []
    run = load_run(tmp_path)
    assert steps_of(run, fmt.TRAIN_LOSS) == list(range(30))
    assert steps_of(run, "val/loss") == [29]
    assert run.resumes == (15,)
    assert [e["step"] for e in run.events if e["kind"] == "resume"] == [15]


_SIGTERM_SCRIPT = """
import os, signal, sys, torch
from torch import nn
from runlens_collect import Collector
mode, run_dir = sys.argv[1], sys.argv[2]
if mode == "chained":
    def mine(signum, frame):
        open(os.path.join(run_dir, "..", "mine-ran"), "w").write(str(signum))
        sys.exit(3)
    signal.signal(signal.SIGTERM, mine)
torch.manual_seed(0)
model = nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
# flush_steps/seconds far away: only the signal handler can have written the steps;
# fixed cadences (overhead=None): layer rows on every step, whatever the machine's load
col = Collector(
    model, opt, run_dir=run_dir, flush_steps=100000, flush_seconds=3600, overhead=None
)
step = 0
while True:
    loss = model(torch.randn(8, 4)).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    col.step(loss=loss)
    step += 1
    if step == 25:
        print("ready", flush=True)
"""


@pytest.mark.parametrize("mode", ["default", "chained"])
def test_sigterm_flushes_every_step_and_marks_the_run_preempted(tmp_path: Path, mode) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_SIGTERM_SCRIPT), mode, str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if mode == "default":
        assert proc.returncode == -signal.SIGTERM, err  # died of it, as without runlens
    else:  # the script's own handler ran after ours
        assert proc.returncode == 3, err
        assert (tmp_path / "mine-ran").read_text() == str(int(signal.SIGTERM))
    meta = json.loads((run_dir / fmt.RUN_JSON).read_text())
    assert meta["status"] == fmt.STATUS_PREEMPTED
    last = meta["last_step"]
    assert last >= 24
    run = load_run(run_dir)
    assert steps_of(run, fmt.TRAIN_LOSS) == list(range(last + 1))  # every step, flushed
    assert run.layer_matrix(fmt.KIND_WEIGHT, "norm").steps.tolist() == list(range(last + 1))
    kinds = [e["kind"] for e in run.events]
    assert "signal" in kinds and kinds[-1] == "close"
    report = runlens.analyze(run)
    assert report.summary.ended_abnormally and "preempted" in report.summary.end_reason


_SIGINT_SCRIPT = """
import sys, torch
from torch import nn
from runlens_collect import Collector
model = nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
col = Collector(model, opt, run_dir=sys.argv[1], flush_steps=100000, flush_seconds=3600)
step = 0
try:
    while True:
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        col.step(loss=loss)
        step += 1
        if step == 25:
            print("ready", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    raise
"""


def test_sigint_closes_as_preempted_and_raises_keyboard_interrupt(tmp_path: Path) -> None:
    script = _SIGINT_SCRIPT
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "interrupted" in out and "KeyboardInterrupt" in err
    meta = json.loads((tmp_path / fmt.RUN_JSON).read_text())
    assert meta["status"] == fmt.STATUS_PREEMPTED
    assert steps_of(load_run(tmp_path), fmt.TRAIN_LOSS) == list(range(meta["last_step"] + 1))


def test_segments_run_json_and_events_are_fsynced_before_rename(
    tmp_path: Path, monkeypatch
) -> None:
    """The order of the durable-write syscalls: data fsynced, renamed, directory fsynced."""
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        calls.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Collector(model, opt, run_dir=tmp_path) as col:
        _steps(col, model, opt, 0, 3)
    monkeypatch.undo()
    segment = next(i for i, c in enumerate(calls) if c[0] == "rename" and "part-" in c[1])
    assert calls[segment - 1][0] == "fsync" and ".tmp-" in calls[segment - 1][1]
    assert calls[segment + 1] == ("fsync", str(Path(calls[segment][1]).parent))
    runjson = [i for i, c in enumerate(calls) if c == ("rename", str(tmp_path / fmt.RUN_JSON))]
    assert runjson and all(calls[i - 1][0] == "fsync" for i in runjson)
    assert ("fsync", str(tmp_path / fmt.EVENTS_JSONL)) in calls


def test_every_rank_keeps_its_events(tmp_path: Path) -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for rank in (0, 1):
        with Collector(model, opt, run_dir=tmp_path, rank=rank) as col:
            _steps(col, model, opt, 0, 3)
    assert (tmp_path / "events-rank1.jsonl").is_file()
    run = load_run(tmp_path)
    by_rank = {(e["kind"], e["rank"]) for e in run.events}
    assert {("start", 0), ("close", 0), ("start", 1), ("close", 1)} <= by_rank
    assert not any("holds" in w for w in run.warnings)  # one run with two ranks


def test_time_data_on_an_asynchronous_device_is_not_judged(tmp_path: Path) -> None:
    """A run recorded on CUDA by host clock (the old collector, or a device without
    timing events): time/data may be queued device work, so input-bound does not run."""
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Collector(model, opt, run_dir=tmp_path) as col:
        _steps(col, model, opt, 0, 30)

    def input_bound_skip() -> str | None:
        report = runlens.analyze(tmp_path)
        assert "input-bound" not in {f.signature for f in report.findings}
        why = [s.reason for s in report.skipped if s.signature == "input-bound"]
        return why[0] if why else None

    meta = json.loads((tmp_path / fmt.RUN_JSON).read_text())
    assert meta["collector"]["data_time"] == fmt.DATA_TIME_HOST  # CPU: exact, judged
    assert input_bound_skip() is None
    meta["device"] = "cuda:0"
    meta["collector"]["data_time"] = fmt.DATA_TIME_DEVICE_EVENTS  # CUDA events: judged
    fmt.write_json_atomic(meta, tmp_path / fmt.RUN_JSON)
    assert input_bound_skip() is None
    meta["collector"]["data_time"] = fmt.DATA_TIME_UNRELIABLE
    fmt.write_json_atomic(meta, tmp_path / fmt.RUN_JSON)
    why = input_bound_skip()
    assert why is not None and "host clock" in why and "cuda:0" in why
    del meta["collector"]["data_time"]  # recorded before the key existed: host clock
    fmt.write_json_atomic(meta, tmp_path / fmt.RUN_JSON)
    assert input_bound_skip() is not None


def test_device_event_data_time_is_the_idle_gap() -> None:
    """The writer's derivation from two device events: the device's idle time between
    the previous step's end and this step's forward, the rest of the step is compute."""
    from runlens_collect.writer import _device_times

    class Event:  # a completed CUDA event: elapsed_time in milliseconds
        def __init__(self, t_ms: float) -> None:
            self.t = t_ms

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, other: Event) -> float:
            return other.t - self.t

    got = dict((n, v) for _, n, v in _device_times(7, Event(100.0), Event(112.5), 0.05))
    assert got[fmt.TIME_DATA] == pytest.approx(0.0125)
    assert got[fmt.TIME_COMPUTE] == pytest.approx(0.0375)

    class Broken(Event):
        def elapsed_time(self, other: Event) -> float:
            raise RuntimeError("event not recorded")

    got = dict((n, v) for _, n, v in _device_times(7, Broken(0.0), Event(1.0), 0.05))
    assert np.isnan(got[fmt.TIME_DATA])


def test_compaction_of_a_resumed_run_keeps_the_superseded_rows_out(tmp_path: Path) -> None:
    """`runlens compact` after a crash and a resume (both attempts left uncompacted): the
    merged segments never span the resume, so the crashed attempt's steps 20..34 stay
    superseded exactly as before compaction."""
    from runlens_collect.compact import compact_run

    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    col = Collector(model, opt, run_dir=tmp_path, flush_steps=7, compact=False)
    first = _steps(col, model, opt, 0, 20)
    ckpt = {k: v.clone() for k, v in model.state_dict().items()}
    _steps(col, model, opt, 20, 35)
    col.close(fmt.STATUS_CRASHED)
    model.load_state_dict(ckpt)
    with Collector(
        model, opt, run_dir=tmp_path, flush_steps=7, start_step=20, compact=False
    ) as col2:
        second = _steps(col2, model, opt, 20, 60)
    before = load_run(tmp_path).layer_matrix(fmt.KIND_WEIGHT, "norm")
    done = compact_run(tmp_path)
    assert done.merged  # small segments were merged
    run = load_run(tmp_path)
    segments = {p.name for p in run.segment_files(fmt.SCALARS_DIR)}
    start = (rec := run.meta["resumed"][0])["segments"][fmt.SCALARS_DIR]
    for name in segments:  # none spans the continuation's first segment
        a, b = fmt.segment_range(name)
        assert b < start or a >= start, (name, rec)
    loss = run.scalar(fmt.TRAIN_LOSS)
    assert loss.steps.tolist() == list(range(60))
    np.testing.assert_allclose(loss.values, first + second, rtol=1e-6)
    assert run.layer_matrix(fmt.KIND_WEIGHT, "norm").steps.tolist() == list(range(60))
    np.testing.assert_array_equal(run.layer_matrix(fmt.KIND_WEIGHT, "norm").values, before.values)
