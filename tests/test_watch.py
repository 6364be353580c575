"""`runlens watch` / runlens.watch on live runs: real trainers in subprocesses, real
segments landing one flush at a time, a real HTTP server for --webhook.

Timeouts here are liveness limits only (a hung watch fails instead of blocking CI); no
assertion depends on how fast anything ran.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from live_replay import SAMPLES, Replay, replay_events
from runlens_collect import format as fmt

import runlens
from runlens.live import Watcher, WatchOptions
from runlens.live.actions import ExecAction, WebhookAction
from runlens.run import load_run

ROOT = Path(__file__).resolve().parent.parent
TRAINER = Path(__file__).with_name("live_trainer.py")
RUNLENS = [sys.executable, "-c", "from runlens.cli import main; main()"]
LIVENESS_S = 240


@pytest.mark.parametrize("name", sorted(p.name for p in SAMPLES.glob("healthy-*")))
def test_watch_reports_nothing_on_healthy_runs_replayed_flush_by_flush(tmp_path, name):
    events = replay_events(name, tmp_path / name)
    assert [e.finding for e in events if e.kind == "finding"] == []
    assert events[-1].kind == "finished"
    assert events[-1].status == "finished"


def test_watch_reports_each_problem_once_and_everything_analyze_finds(tmp_path):
    events = replay_events("loss-divergence", tmp_path / "run")
    found = [e.finding for e in events if e.kind == "finding"]
    full = runlens.analyze(tmp_path / "run")
    # The final pass is `runlens analyze` on the whole run: nothing it finds is missed.
    assert {f.signature for f in full.findings} <= {f.signature for f in found}
    # The divergence is reported live (before the run ended), with its numbers.
    live = [e for e in events if e.kind == "finding" and e.status == "running"]
    div = next(e for e in live if e.finding.signature == "loss-divergence")
    assert div.step < 299
    rise = next(ev for ev in div.finding.evidence if ev.name == "rise / loss scale")
    assert rise.value > rise.threshold
    # Once per problem: no two reported findings of a signature overlap in steps.
    for a in found:
        for b in found:
            if a is not b and a.signature == b.signature and a.steps and b.steps:
                assert a.steps[1] < b.steps[0] or b.steps[1] < a.steps[0], (a, b)


def test_live_data_equals_what_the_loader_reads(tmp_path):
    """The incremental state (scalars appended per segment, layers with no window) holds
    exactly what load_run reads from the finished run."""
    rp = Replay("loss-divergence", tmp_path / "run", chunk=7)
    w = Watcher(tmp_path / "run", WatchOptions(interval=0.01, window_steps=None, min_steps=10**9))
    while rp.flush():
        w.poll()
    assert w._data is not None
    snap = w._data.snapshot()
    full = load_run(tmp_path / "run")
    assert snap.scalar_names == full.scalar_names
    for name in full.scalar_names:
        a, b = snap.scalar(name), full.scalar(name)
        assert a.steps.tolist() == b.steps.tolist()
        assert a.values.tobytes() == b.values.tobytes()
    for stat in ("norm", "std"):
        a, b = snap.layer_matrix("weight", stat), full.layer_matrix("weight", stat)
        assert a.layers == b.layers and a.steps.tolist() == b.steps.tolist()
        assert a.values.tobytes() == b.values.tobytes()
    assert w.stats.segments_read == 2 * rp.seq  # every segment read exactly once
    assert w.stats.rows_read == sum(t.num_rows for t in rp.tables.values())


def test_layer_window_keeps_head_and_tail_only(tmp_path):
    rp = Replay("loss-divergence", tmp_path / "run", chunk=10)
    w = Watcher(tmp_path / "run", WatchOptions(interval=0.01, head_steps=5, window_steps=40))
    while rp.flush():
        w.poll()
    snap = w._data.snapshot()
    steps = snap.layer_matrix("weight", "norm").steps
    full = load_run(tmp_path / "run").layer_matrix("weight", "norm").steps
    assert steps.tolist() == full[:5].tolist() + full[-40:].tolist()
    assert snap.layer_steps_dropped == len(full) - 45


def test_temp_and_broken_segments_are_never_fatal(tmp_path):
    rp = Replay("loss-divergence", tmp_path / "run")
    rp.flush()
    seg_dir = tmp_path / "run" / fmt.SCALARS_DIR / "rank=0"
    # A segment being written (hidden temp name) and a corrupt one in place.
    (seg_dir / ".tmp-abc.parquet").write_bytes(b"PAR1 half written")
    (seg_dir / "part-000500.parquet").write_bytes(b"not parquet at all")
    w = Watcher(tmp_path / "run", WatchOptions(interval=0.01))
    events = []
    for _ in range(4):
        events += w.poll()
    warnings = [e.message for e in events if e.kind == "warning"]
    assert len(warnings) == 1 and "part-000500.parquet" in warnings[0]
    assert w.stats.segments_read == 2  # the good scalars and layers segments
    assert w._data.last_step == 24


def test_watch_refuses_logs_it_cannot_follow(tmp_path):
    csv = tmp_path / "logs"
    csv.mkdir()
    (csv / "metrics.csv").write_text("step,train_loss\n0,1.0\n1,0.9\n")
    proc = subprocess.run([*RUNLENS, "watch", str(csv)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("runlens: error: ") and "csv log" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# -- a real trainer in a subprocess -----------------------------------------------------------

DIVERGE_AT = 120
FLUSH_STEPS = 20


def _trainer(run_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(TRAINER), str(run_dir), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_watch_catches_injected_divergence_live_and_fails_on_error(tmp_path):
    run_dir = tmp_path / "live"
    out = tmp_path / "exec.jsonl"
    trainer = _trainer(
        run_dir,
        "--steps",
        "2000",
        "--diverge-at",
        str(DIVERGE_AT),
        "--flush-steps",
        str(FLUSH_STEPS),
        "--step-sleep",
        "0.08",
    )
    try:
        watch = subprocess.run(
            [
                *RUNLENS,
                "watch",
                str(run_dir),
                "--interval",
                "0.1",
                "--format",
                "jsonl",
                "--fail-on",
                "error",
                "--exec",
                f"cat >> {out}",
            ],
            capture_output=True,
            text=True,
            timeout=LIVENESS_S,
        )
    finally:
        _stop(trainer)
    assert watch.returncode == 1, watch.stderr
    events = [json.loads(line) for line in watch.stdout.splitlines()]
    findings = [e for e in events if e["kind"] == "finding"]
    last = findings[-1]  # --fail-on error stops at the first error
    assert last["finding"]["severity"] == "error"
    assert last["finding"]["signature"] == "loss-divergence"
    assert last["status"] == "running"
    # Reported within two flush intervals of the injection (segments end at 139, 159, ...).
    assert DIVERGE_AT <= last["step"] < DIVERGE_AT + 2 * FLUSH_STEPS
    # About the divergence, not the healthy part before it: no finding ends before it.
    assert all(e["finding"]["steps"][1] >= DIVERGE_AT for e in findings)
    # --exec got each finding as one valid JSON line, the same objects as printed.
    sent = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["finding"] for s in sent] == [e["finding"] for e in findings]


@pytest.mark.slow
def test_watch_reports_a_killed_trainer_as_stalled(tmp_path):
    run_dir = tmp_path / "live"
    trainer = _trainer(run_dir, "--steps", "100000", "--flush-steps", "10", "--step-sleep", "0.01")
    try:
        deadline = time.monotonic() + LIVENESS_S
        while not _last_step_at_least(run_dir, 60):
            assert time.monotonic() < deadline and trainer.poll() is None, trainer.stderr
            time.sleep(0.2)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=30)
        watch = subprocess.run(
            [
                *RUNLENS,
                "watch",
                str(run_dir),
                "--interval",
                "0.2",
                "--format",
                "jsonl",
                "--stall-floor",
                "1",
                "--fail-on-stall",
            ],
            capture_output=True,
            text=True,
            timeout=LIVENESS_S,
        )
    finally:
        _stop(trainer)
    assert watch.returncode == 1, watch.stderr
    events = [json.loads(line) for line in watch.stdout.splitlines()]
    stalled = events[-1]
    assert stalled["kind"] == "stalled"
    assert stalled["status"] == "running"  # killed: run.json never said it ended
    on_disk = load_run(run_dir).scalar("train/loss")
    assert stalled["step"] == int(on_disk.steps[-1])
    assert stalled["details"]["idle_s"] > stalled["details"]["limit_s"] >= 1.0


def _last_step_at_least(run_dir: Path, n: int) -> bool:
    try:
        meta = json.loads((run_dir / fmt.RUN_JSON).read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("last_step") or 0) >= n


# -- actions: --exec and --webhook never block the watch --------------------------------------


class _Hooks(BaseHTTPRequestHandler):
    bodies: ClassVar[list] = []
    fail_first = 0
    release: threading.Event | None = None

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).bodies.append(json.loads(body))
        if type(self).release is not None:
            type(self).release.wait(LIVENESS_S)
        code = 500 if len(type(self).bodies) <= type(self).fail_first else 200
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hook_server():
    class Handler(_Hooks):
        bodies: ClassVar[list] = []

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, Handler, f"http://127.0.0.1:{server.server_address[1]}/hook"
    if Handler.release is not None:
        Handler.release.set()
    server.shutdown()
    server.server_close()


def test_webhook_retries_a_failing_server(hook_server):
    _, handler, url = hook_server
    handler.fail_first = 2
    warnings: list[str] = []
    hook = WebhookAction(url, timeout=10, retries=3, backoff=0.01, on_warning=warnings.append)
    hook.submit({"kind": "finding", "n": 1})
    assert hook.close(LIVENESS_S)
    assert handler.bodies == [{"kind": "finding", "n": 1}] * 3  # two 500s, then 200
    assert (hook.delivered, hook.failed, warnings) == (1, 0, [])


def test_webhook_gives_up_with_one_warning_and_submit_never_waits(hook_server):
    _, handler, url = hook_server
    handler.release = threading.Event()  # the server hangs until released
    warnings: list[str] = []
    hook = WebhookAction(url, timeout=0.5, retries=1, backoff=0.01, on_warning=warnings.append)
    for i in range(3):
        hook.submit({"n": i})  # returns at once although the server answers nothing
    assert hook.delivered == 0
    handler.release.set()
    assert hook.close(LIVENESS_S)
    assert hook.failed + hook.delivered == 3
    assert all("failed after" in w for w in warnings) and len(warnings) == hook.failed


def test_webhook_refused_connection_is_a_warning(tmp_path):
    warnings: list[str] = []
    hook = WebhookAction(
        "http://127.0.0.1:9/x", timeout=1, retries=1, backoff=0.01, on_warning=warnings.append
    )
    hook.submit({"n": 1})
    assert hook.close(LIVENESS_S)
    assert hook.failed == 1 and "after 2 attempt(s)" in warnings[0]


def test_exec_timeout_and_failure_are_warnings(tmp_path):
    warnings: list[str] = []
    slow = ExecAction("sleep 30", timeout=0.3, on_warning=warnings.append)
    bad = ExecAction("echo boom >&2; exit 3", on_warning=warnings.append)
    slow.submit({"n": 1})
    bad.submit({"n": 1})
    assert slow.close(LIVENESS_S) and bad.close(LIVENESS_S)
    assert sorted(warnings) == [
        "--exec command exited with status 3: boom",
        "--exec command timed out after 0.3 s (killed)",
    ]


def test_cli_watch_posts_findings_to_webhook_and_prints_them(tmp_path, hook_server):
    _, handler, url = hook_server
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "nan-inf", run)  # finished: the final pass reports at once
    proc = subprocess.run(
        [*RUNLENS, "watch", str(run), "--format", "jsonl", "--webhook", url],
        capture_output=True,
        text=True,
        timeout=LIVENESS_S,
    )
    assert proc.returncode == 0, proc.stderr
    printed = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [e["kind"] for e in printed] == ["watching", "finding", "finished"]
    assert printed[1]["finding"]["signature"] == "nan-inf"
    assert handler.bodies == [printed[1]]


def test_terminal_format_shows_the_finding_evidence_and_fix(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "nan-inf", run)
    proc = subprocess.run(
        [*RUNLENS, "watch", str(run)], capture_output=True, text=True, timeout=LIVENESS_S
    )
    assert proc.returncode == 0
    assert "ERROR    nan-inf:" in proc.stdout
    assert "evidence:" in proc.stdout and "fix:" in proc.stdout
    assert "finished run ended with status finished; 1 finding(s) reported" in proc.stdout


def test_library_watch_generator(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "loss-spike", run)
    events = list(runlens.watch(run, runlens.WatchOptions(interval=0.01)))
    assert [e.kind for e in events] == ["watching", "finding", "finished"]
    assert events[1].finding.signature == "loss-spike"
    assert json.loads(json.dumps(events[1].to_dict()))["finding"]["signature"] == "loss-spike"


def test_watch_waits_for_a_run_that_does_not_exist_yet(tmp_path):
    w = Watcher(tmp_path / "later", WatchOptions(interval=0.01))
    assert [e.kind for e in w.poll()] == ["waiting"]
    assert w.poll() == []  # said once
    shutil.copytree(SAMPLES / "loss-spike", tmp_path / "later")
    assert [e.kind for e in w.poll()] == ["watching", "finding", "finished"]


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_ctrl_c_stops_watch_with_130(tmp_path):
    rp = Replay("loss-spike", tmp_path / "run")
    rp.flush()
    proc = subprocess.Popen(
        [*RUNLENS, "watch", str(tmp_path / "run"), "--interval", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert "watching" in proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=LIVENESS_S)
    assert proc.returncode == 130 and "interrupted" in err
