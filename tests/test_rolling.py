"""Rolling compaction (the collector's writer merges its segments while the run records).

Runs recorded with the real Collector on a tiny real model, flushing every step, are the
input. A rolled run keeps a bounded number of segments and holds exactly the rows of the
same run recorded with rolling off, in the same order; so does a run whose process dies in
the middle of a merge; a resumed run and a second rank are never merged across; a watcher
following a run while it is rolled reads each row once; and an analysis whose segments are
merged between listing and reading lists again and reports exactly as on the unmerged run.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from runlens_collect import Collector
from runlens_collect import compact as C
from runlens_collect import format as fmt
from runlens_collect import rolling as R

import runlens
from runlens.cli import cli
from runlens.live import WatchOptions
from runlens.live.watcher import Watcher
from runlens.report import json_report

STEPS = 90
TABLES = (fmt.SCALARS_DIR, fmt.LAYERS_DIR)
KNOBS = {"flush_steps": 1, "activation_every": 2, "overhead": None}


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, torch.randn(64, 8), torch.randint(0, 3, (64,))


def _train(
    run_dir: Path,
    steps: int = STEPS,
    each=None,
    close: bool = True,
    settle: bool = True,
    **knobs,
) -> Collector:
    """Train and record; ``each(col, step)`` after every step; the collector, closed
    when ``close``. With ``settle``, every 8 steps it waits for the writer (and its
    merges), so that no step is dropped for want of a free host buffer and two
    recordings hold the same rows."""
    model, opt, x, y = _model()
    col = Collector(model, opt, run_dir=run_dir, **{**KNOBS, **knobs})
    for i in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        col.step(loss=loss)
        if settle and i % 8 == 7:
            _wait_written(col)
        if each is not None:
            each(col, i)
    if close:
        col.close()
    return col


def _wait_written(col: Collector) -> None:
    """Until the writer has written (and rolled) every step recorded so far."""
    w = col._writer
    assert w is not None
    for _ in range(3000):
        if w.done_step == col._step - 1:
            return
        col.flush()
        time.sleep(0.005)
    raise AssertionError(f"writer stuck at {w.done_step}, recorded {col._step - 1}")


def _files(run: Path, table: str, rank: int = 0) -> list[Path]:
    return sorted((run / table / f"rank={rank}").glob("part-*.parquet"))


def _rows(run: Path, table: str, rank: int = 0) -> pl.DataFrame:
    """Every row a reader reads (live segments, in order); wall times and time/* left
    out (they differ between two recordings of the same training)."""
    live = fmt.live_segments(_files(run, table, rank))
    t = pa.concat_tables(pq.read_table(f) for f in live).unify_dictionaries()
    df = pl.from_arrow(t).with_columns(pl.col(pl.Categorical).cast(pl.String))
    if table == fmt.SCALARS_DIR:
        df = df.filter(~pl.col("name").str.starts_with("time/")).drop("wall_time")
    return df


def _bound(flushes: int, fanout: int = R.ROLL_FANOUT) -> int:
    """(fanout - 1) segments per tier at most."""
    return (fanout - 1) * max(1, math.ceil(math.log(flushes + 1, fanout)))


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same training recorded with one segment per flush."""
    return _train(tmp_path_factory.mktemp("plain") / "run", compact=False).run_dir


def test_policy_keeps_few_segments_and_rewrites_rows_log_times() -> None:
    segs: list[tuple[int, int, int]] = []
    rewritten = most = 0
    for seq in range(300):
        segs.append((seq, seq, 4000))
        while (pick := R.roll_plan(segs, fanout=4)) is not None:
            a, b = segs[pick[0]][0], segs[pick[-1]][1]
            rows = sum(segs[i][2] for i in pick)
            rewritten += rows
            segs[pick[0] : pick[-1] + 1] = [(a, b, rows)]
        most = max(most, len(segs))
    assert most <= _bound(300, fanout=4) == 15
    assert [R.roll_level(a, b, 4) for a, b, _ in segs] == [4, 2, 2, 1, 1, 1]  # 300 = 10230 base 4
    # Each row rewritten once per tier it climbed: at most log4(300) < 5 times, here 3.35.
    assert rewritten / (300 * 4000) < math.log(300, 4)
    # Segments already large are never merged again; a merge never crosses one.
    assert R.roll_plan([(0, 0, C.SMALL_ROWS)] * 1 + [(i, i, 10) for i in range(1, 4)]) is None


def test_rolled_run_has_few_segments_and_the_same_rows(plain: Path, tmp_path: Path) -> None:
    counts: list[int] = []

    def look(col: Collector, step: int) -> None:
        if step % 10 == 9:
            _wait_written(col)
            counts.append(max(len(fmt.live_segments(_files(col.run_dir, t))) for t in TABLES))

    col = _train(tmp_path / "run", each=look, close=False)
    _wait_written(col)
    run = col.run_dir
    stats = col._writer.roll_stats
    assert stats.merges > 0 and stats.rows_rewritten > 0
    for table in TABLES:  # still recording: few segments, every row once, in order
        live = fmt.live_segments(_files(run, table))
        assert len(live) <= _bound(STEPS), [f.name for f in live]
        assert _files(run, table) == live  # the merged segments are gone
        assert _rows(run, table).equals(_rows(plain, table))
    assert max(counts) <= _bound(STEPS) and len(counts) == STEPS // 10
    col.close()
    for table in TABLES:
        assert len(_files(run, table)) == 1
        assert _rows(run, table).equals(_rows(plain, table))
    assert not col.warnings


def test_the_writer_keeps_writing_while_a_merge_runs(
    plain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Merges run on their own thread: while one is held (a merge of a high tier rewrites
    the rows of hundreds of flushes at once), the writer keeps taking steps off the queue
    and writing them, so a fast loop's queue never fills because of a merge. On the
    writer thread the held merge would stop every later step from being written."""
    import threading

    real, gate, entered = C._merge, threading.Event(), threading.Event()

    def held(*args, **kwargs):
        entered.set()
        assert gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(R, "_merge", held)
    written_during_merge = 0

    def written(col: Collector, i: int) -> None:  # before the next step (a flush per step)
        nonlocal written_during_merge
        merging = entered.is_set()
        w = col._writer
        assert w is not None
        for _ in range(2000):
            if w.last_step == i:
                break
            col.flush()
            time.sleep(0.005)
        assert w.last_step == i, f"step {i} not written (a merge held: {merging})"
        written_during_merge += merging

    # No settling: it waits for the merges, and this one is held.
    col = _train(tmp_path / "run", each=written, close=False, settle=False)
    assert written_during_merge > 40  # steps written while the first merge was held
    gate.set()
    col.close()
    assert col._writer.roll_stats.merges > 0 and not col.warnings
    for table in TABLES:  # nothing lost or doubled: the reference run's rows
        assert _rows(col.run_dir, table).equals(_rows(plain, table))


def test_rolling_off_leaves_a_segment_per_flush(tmp_path: Path) -> None:
    col = _train(tmp_path / "run", steps=20, close=False, rolling=False)
    _wait_written(col)
    assert len(_files(col.run_dir, fmt.LAYERS_DIR)) == 20
    assert col._writer.roll_stats.merges == 0
    col.close()
    assert len(_files(col.run_dir, fmt.LAYERS_DIR)) == 1  # close() still compacts


_CRASH = """
import os, sys, torch
from pathlib import Path
from runlens_collect import Collector, compact
sys.path.insert(0, {tests!r})
from test_rolling import _train

where, after = sys.argv[2], int(sys.argv[3])
merges = []
real_replace, real_unlink = os.replace, Path.unlink

def replace(src, dst):
    if "-" in Path(dst).name[5:]:  # a merged segment's name: part-A-B.parquet
        merges.append(dst)
        if where == "rename" and len(merges) > after:
            os._exit(9)  # the temporary file is complete, not renamed
    real_replace(src, dst)
    if where == "delete" and len(merges) > after:
        os._exit(9)  # renamed, the covered segments not deleted

compact.os.replace = replace
_train(Path(sys.argv[1]), close=False)
os._exit(3)  # never reached in the test: it dies inside a merge first
"""


@pytest.mark.parametrize("where", ["rename", "delete"])
def test_a_process_killed_inside_a_merge_leaves_every_row_once(
    plain: Path, tmp_path: Path, where: str
) -> None:
    run = tmp_path / "run"
    code = textwrap.dedent(_CRASH.format(tests=str(Path(__file__).parent)))
    done = subprocess.run(
        [sys.executable, "-c", code, str(run), where, "5"], capture_output=True, text=True
    )
    assert done.returncode == 9, done.stderr[-2000:]
    names = [f.name for t in TABLES for f in _files(run, t)]
    if where == "delete":  # covered leftovers: readers ignore them
        assert any(
            f not in fmt.live_segments(_files(run, t)) for t in TABLES for f in _files(run, t)
        )
    else:
        assert list(run.glob("*/rank=0/.tmp-compact-*"))  # the orphan temporary file
    for table in TABLES:
        got, want = _rows(run, table), _rows(plain, table)
        assert 0 < got.height < want.height, names
        assert got.equals(want.head(got.height))  # a prefix: every row once, in order
    report = runlens.analyze(run)  # the crashed run reads, nothing skipped
    assert not [w for w in report.warnings if "segment" in w]
    # `runlens compact` finishes the job; the rows stay the same.
    before = {t: _rows(run, t) for t in TABLES}
    assert CliRunner().invoke(cli, ["compact", str(run)]).exit_code == 0
    for table in TABLES:
        assert len(fmt.live_segments(_files(run, table))) == len(_files(run, table)) == 1
        assert _rows(run, table).equals(before[table])


def test_a_failed_merge_is_one_warning_and_loses_nothing(
    plain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.replace

    def replace(src, dst):  # a merge's rename fails (e.g. a full or read-only disk)
        if "-" in Path(dst).name[5:]:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(C.os, "replace", replace)
    with pytest.warns(RuntimeWarning, match="rolling compaction failed"):
        col = _train(tmp_path / "run", steps=30, close=False)
        _wait_written(col)
    assert not col._writer.rolling  # off for the rest of the run
    assert [w for w in col.warnings if "rolling compaction failed" in w]
    assert not list(col.run_dir.glob("*/rank=0/.tmp-*"))
    for table in TABLES:
        assert len(_files(col.run_dir, table)) == 30
        got = _rows(col.run_dir, table)
        assert got.equals(_rows(plain, table).head(got.height))
    monkeypatch.undo()
    col.close()


def test_runlens_compact_while_the_writer_rolls(plain: Path, tmp_path: Path) -> None:
    compactions: list[int] = []

    def compact(col: Collector, step: int) -> None:
        if step % 5 == 2:  # while the writer thread writes and rolls
            compactions.append(len(C.compact_run(col.run_dir).merged))

    col = _train(tmp_path / "run", each=compact, close=False)
    _wait_written(col)
    assert sum(compactions) > 0 and col._writer.roll_stats.merges > 0
    assert col._writer.rolling and not col.warnings
    for table in TABLES:
        assert _rows(col.run_dir, table).equals(_rows(plain, table))
    col.close()
    for table in TABLES:
        assert _rows(col.run_dir, table).equals(_rows(plain, table))


def test_resume_and_a_second_rank_are_never_merged_across(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train(run, steps=10, compact=False)  # an earlier attempt: 10 segments per table
    earlier = {t: [f.name for f in _files(run, t)] for t in TABLES}
    model, opt, x, y = _model()
    second = Collector(model, opt, run_dir=run, rank=1, **KNOBS)  # another rank, same dir
    col = _train(run, steps=40, close=False, resume=True)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        second.step(loss=loss)
    _wait_written(col)
    _wait_written(second)
    first = col._writer.first_seq
    for table in TABLES:
        names = [f.name for f in _files(run, table)]
        assert names[:10] == earlier[table]  # the earlier attempt's segments untouched
        for f in _files(run, table)[10:]:
            a, _ = fmt.segment_range(f)
            assert a >= first[table]  # the continuation's merges start at its first segment
        assert len(names) <= 10 + _bound(40)
        ones = _files(run, table, rank=1)
        assert len(ones) <= _bound(40)
        assert _rows(run, table, rank=1)["step"].to_list() == sorted(
            _rows(run, table, rank=1)["step"].to_list()
        )
    assert col._writer.roll_stats.merges > 0 and second._writer.roll_stats.merges > 0
    col.close()
    second.close()
    steps = runlens.load_run(run, rank=0).scalar(fmt.TRAIN_LOSS).steps
    assert list(steps) == list(range(50))  # the attempt and its continuation, each once


def test_a_watcher_following_a_rolled_run_reads_each_row_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    watcher = Watcher(run, WatchOptions(min_steps=10**6, head_steps=0, window_steps=None))

    def poll(col: Collector, step: int) -> None:
        if step % 3 == 0:
            watcher.poll()

    _train(run, each=poll)
    for _ in range(10):
        if watcher.done:
            break
        watcher.poll()
    data = watcher._data
    assert data is not None and watcher.stats.segments_read > len(_files(run, fmt.LAYERS_DIR))
    scalars = pl.concat(data._scalar_chunks).drop("rank")
    (final,) = _files(run, fmt.SCALARS_DIR)
    want = pl.from_arrow(pq.read_table(final).unify_dictionaries())
    cat = pl.col(pl.Categorical).cast(pl.String)
    assert scalars.equals(want.with_columns(cat).select(scalars.columns))
    layers = pl.concat([*data._head, *data._tail]).drop("rank")
    final = _rows(run, fmt.LAYERS_DIR)
    assert layers.height == data.layer_rows == final.height
    keys = ["step", "layer", "kind"]
    assert layers.select(keys).is_duplicated().sum() == 0
    assert layers.select(keys).sort(keys).equals(final.select(keys).sort(keys))


def test_a_watcher_reads_in_order_past_a_segment_it_failed_to_read(
    plain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A segment the watcher cannot read on one poll (a mirror not complete yet, a
    transient I/O error) holds back the ones after it, so that what it has read stays a
    prefix of any merge that later covers them: reading past it and then a merge of all
    of them would skip its rows and read the next ones twice. A run that has ended is not
    made final while such a segment waits to be read again (it was: its rows were lost
    from the final report without a word)."""
    import runlens.live.watcher as W

    run = shutil.copytree(plain, tmp_path / "run")  # one segment per flush, not merged
    real, failed = W.read_segment, []

    def flaky(seg, table):
        if table == fmt.LAYERS_DIR and fmt.segment_range(seg) == (10, 10) and not failed:
            failed.append(seg)
            raise OSError("transient")
        return real(seg, table)

    monkeypatch.setattr(W, "read_segment", flaky)
    watcher = Watcher(run, WatchOptions(min_steps=10**6, head_steps=0, window_steps=None))
    watcher.poll()  # reads layers segments 0-9, fails on 10
    assert failed
    C.compact_run(run)  # every segment merged into one, 10 and those after it included
    for _ in range(3):
        watcher.poll()
    data = watcher._data
    assert data is not None
    layers = pl.concat([*data._head, *data._tail]).drop("rank")
    keys = ["step", "layer", "kind"]
    final = _rows(run, fmt.LAYERS_DIR)
    assert layers.height == final.height
    assert layers.select(keys).sort(keys).equals(final.select(keys).sort(keys))


def _report(run: Path) -> str:
    return json_report.render(runlens.analyze(run)).replace(str(run), "RUN")


def test_analysis_lists_again_when_segments_merge_under_it(
    plain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = _report(shutil.copytree(plain, tmp_path / "want"))
    # Merged after the Run listed them, before the analysis' pass reads the layers.
    run = shutil.copytree(plain, tmp_path / "run")
    loaded = runlens.load_run(run)
    assert len(loaded.segment_files(fmt.LAYERS_DIR)) == STEPS
    C.compact_run(run)
    got = json_report.render(runlens.analyze(loaded)).replace(str(run), "RUN")
    assert got == want
    # Merged between the listing and the load's reading of the scalars (load_run).
    import runlens.segments as S

    run2 = shutil.copytree(plain, tmp_path / "run2")
    real = S._stable_listing
    calls: list[Path] = []

    def listing(folder: Path) -> list[Path]:
        out = real(folder)
        if not calls:
            C.compact_run(run2)  # the folder changes right after it was listed
        calls.append(folder)
        return out

    monkeypatch.setattr(S, "_stable_listing", listing)
    assert _report(run2).replace("run2", "run") == want.replace("want", "run")
    assert len(calls) > 2  # listed again
    # The CLI (one Context for the analysis and the reports) does the same.
    args = ["analyze", "--format", "json"]
    want_cli = CliRunner().invoke(cli, [*args, str(shutil.copytree(plain, tmp_path / "w3"))])
    run3 = shutil.copytree(plain, tmp_path / "run3")
    monkeypatch.setattr(S, "_stable_listing", real)
    calls.clear()
    import runlens.engine as E

    real_ctx = E.make_context

    def make_context(*a, **k):
        ctx = real_ctx(*a, **k)
        if not calls:
            calls.append(Path())
            C.compact_run(run3)
        return ctx

    monkeypatch.setattr(E, "make_context", make_context)
    res = CliRunner().invoke(cli, [*args, str(run3)])
    assert res.exit_code == 0, res.output
    assert res.output.replace("run3", "w3") == want_cli.output
    assert not list(run3.glob("layers/rank=0/part-??????.parquet"))  # it read the merged one


def test_a_held_lock_defers_the_merge_and_a_dead_holders_is_taken_over(
    plain: Path, tmp_path: Path
) -> None:
    run = shutil.copytree(plain, tmp_path / "run")
    folder = run / fmt.LAYERS_DIR / "rank=0"
    lock = folder / C.LOCK_NAME
    # Held by a live process of this host (`runlens compact`, say): nothing is merged.
    lock.write_text(f"{os.getpid()} {socket.gethostname()}\n")
    assert R.roll(run, fmt.LAYERS_DIR, 0, 0) == []
    assert len(_files(run, fmt.LAYERS_DIR)) == STEPS
    # Its holder died (a collector killed inside a merge): taken over at once.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    lock.write_text(f"{dead.stdout.strip()} {socket.gethostname()}\n")
    (folder / ".tmp-compact-orphan.parquet").write_bytes(b"half a file")
    merged = R.roll(run, fmt.LAYERS_DIR, 0, 0)
    assert merged and not lock.exists() and not list(folder.glob(".tmp-*"))
    assert len(_files(run, fmt.LAYERS_DIR)) <= _bound(STEPS)
    assert _rows(run, fmt.LAYERS_DIR).equals(_rows(plain, fmt.LAYERS_DIR))


def test_an_unreadable_segment_is_never_merged(plain: Path, tmp_path: Path) -> None:
    run = shutil.copytree(plain, tmp_path / "run")
    bad = _files(run, fmt.LAYERS_DIR)[3]
    bad.write_bytes(b"not parquet")
    merged = R.roll(run, fmt.LAYERS_DIR, 0, 0)
    assert merged and all(bad not in m.replaced for m in merged)
    assert bad in fmt.live_segments(_files(run, fmt.LAYERS_DIR))  # left as it was
    keep = [f for f in fmt.live_segments(_files(run, fmt.LAYERS_DIR)) if f != bad]
    rows = pl.concat(pl.read_parquet(f) for f in keep).height
    want = (
        _rows(plain, fmt.LAYERS_DIR).height
        - pq.read_metadata(_files(plain, fmt.LAYERS_DIR)[3]).num_rows
    )
    assert rows == want
