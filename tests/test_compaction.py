"""Compaction (runlens_collect.compact): many small segments merged into few, crash-safely.

A run recorded with the real Collector, flushing every 3 steps, is the input. After
compaction every row is there exactly once, in order, in row groups with statistics, and
every report is byte-identical to the report of the uncompacted run. A compaction killed
at each point of its protocol leaves a run whose report is still identical; the next
compaction finishes the job. The collector compacts its own segments on close().
"""

from __future__ import annotations

import itertools
import os
import shutil
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

import runlens
from runlens.cli import cli
from runlens.report import json_report

STEPS = 45


def _train(run_dir: Path, steps: int = STEPS, **knobs: object) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    with Collector(model, opt, run_dir=run_dir, flush_steps=3, activation_every=2, **knobs) as col:
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
    return run_dir


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("compact") / "run", compact=False)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _files(run: Path, table: str) -> list[Path]:
    return sorted((run / table).glob(fmt.SEGMENT_GLOB))


class _Rows:
    """Every row of a table as a reader sees it (live segments, in order); equal when
    the same rows are in the same order (NaN equal to NaN)."""

    def __init__(self, run: Path, table: str) -> None:
        live = fmt.live_segments(_files(run, table))
        t = pa.concat_tables(pq.read_table(f) for f in live)
        self.df = pl.from_arrow(t.unify_dictionaries()).with_columns(
            pl.col(pl.Categorical).cast(pl.String)
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Rows) and self.df.equals(other.df)

    def __len__(self) -> int:
        return self.df.height

    def head(self, n: int) -> pl.DataFrame:
        return self.df.head(n)


def _rows(run: Path, table: str) -> _Rows:
    return _Rows(run, table)


def _report(run: Path) -> str:
    """The JSON report, with the run's own path taken out (copies are compared)."""
    return json_report.render(runlens.analyze(run)).replace(str(run), "RUN")


def test_compaction_keeps_every_row_and_every_report(many: Path, tmp_path: Path) -> None:
    run = _copy(many, tmp_path / "run")
    before = {t: _rows(run, t) for t in (fmt.SCALARS_DIR, fmt.LAYERS_DIR)}
    report = _report(run)
    assert len(_files(run, fmt.LAYERS_DIR)) == STEPS // 3
    done = C.compact_run(run, row_group_rows=100)
    assert done.before == 2 * STEPS // 3 and done.after == 2
    for table in (fmt.SCALARS_DIR, fmt.LAYERS_DIR):
        files = _files(run, table)
        assert [f.name for f in files] == [f"part-000000-{STEPS // 3 - 1:06d}.parquet"]
        assert _rows(run, table) == before[table]  # same rows, same order
        md = pq.read_metadata(files[0])
        assert md.num_row_groups == -(-md.num_rows // 100)
        step = md.schema.to_arrow_schema().get_field_index("step")
        stats = [md.row_group(i).column(step).statistics for i in range(md.num_row_groups)]
        assert all(s is not None and s.has_min_max for s in stats)
        # Row groups follow the steps, so a step filter skips most of them (the scalars
        # of one flush are written device values first: their ranges overlap a little).
        assert all(a.min <= b.min and a.max <= b.max for a, b in itertools.pairwise(stats))
        if table == fmt.LAYERS_DIR:
            assert all(a.max <= b.min for a, b in itertools.pairwise(stats))
    assert _report(run) == report
    assert C.compact_run(run).merged == []  # nothing left to do


def test_reader_sees_each_row_once_at_every_crash_point(
    many: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kill the compaction at each step of the protocol: before the rename (a temporary
    file is left), after the rename before any deletion, after some deletions."""
    report = _report(many)
    rows = {t: _rows(many, t) for t in (fmt.SCALARS_DIR, fmt.LAYERS_DIR)}
    real_replace, real_unlink = os.replace, Path.unlink

    def crash(*_: object, **__: object) -> None:
        raise KeyboardInterrupt("killed")

    cases = {
        "before the rename": lambda: monkeypatch.setattr(os, "replace", crash),
        "after the rename": lambda: monkeypatch.setattr(Path, "unlink", crash),
    }
    deletions = []

    def unlink_two(self: Path, missing_ok: bool = False) -> None:
        deletions.append(self)
        if len(deletions) > 2:
            raise KeyboardInterrupt("killed")
        real_unlink(self, missing_ok=missing_ok)

    cases["after two deletions"] = lambda: monkeypatch.setattr(Path, "unlink", unlink_two)
    for name, arm in cases.items():
        run = _copy(many, tmp_path / name.replace(" ", "-"))
        arm()
        with pytest.raises(KeyboardInterrupt):
            C.compact_run(run)
        monkeypatch.setattr(os, "replace", real_replace)
        monkeypatch.setattr(Path, "unlink", real_unlink)
        (run / fmt.SCALARS_DIR / "rank=0" / C.LOCK_NAME).unlink(missing_ok=True)
        for table in (fmt.SCALARS_DIR, fmt.LAYERS_DIR):
            assert _rows(run, table) == rows[table], name
        assert _report(run) == report, name
        C.compact_run(run)  # the next compaction completes it
        for table in (fmt.SCALARS_DIR, fmt.LAYERS_DIR):
            assert len(_files(run, table)) == 1, name
            assert _rows(run, table) == rows[table], name
        assert not list(run.rglob(".tmp-*")) or name == "before the rename"
        assert _report(run) == report, name


def test_a_writer_continues_after_a_compacted_segment(many: Path, tmp_path: Path) -> None:
    run = _copy(many, tmp_path / "run")
    C.compact_run(run)
    n = STEPS // 3
    assert fmt.next_segment_number(_files(run, fmt.LAYERS_DIR)) == n
    # A second run in the same directory (resumed) numbers its segments after it, and
    # the reader keeps both: the first run's rows, then the second's.
    with pytest.warns(RuntimeWarning, match="already holds a run"):
        _train(run, steps=6, compact=False)
    names = [f.name for f in _files(run, fmt.LAYERS_DIR)]
    assert names[0] == f"part-000000-{n - 1:06d}.parquet"
    assert names[1] == f"part-{n:06d}.parquet"
    assert len(_rows(run, fmt.LAYERS_DIR)) > len(_rows(many, fmt.LAYERS_DIR))


def test_collector_compacts_its_own_segments_on_close(many: Path, tmp_path: Path) -> None:
    run = _train(tmp_path / "run")  # compact=True is the default
    for table in (fmt.SCALARS_DIR, fmt.LAYERS_DIR):
        assert [f.name for f in _files(run, table)] == [f"part-000000-{STEPS // 3 - 1:06d}.parquet"]
        # The same training recorded again: the same rows (timings aside) in the same order.
        cols = ["step", "name"] if table == fmt.SCALARS_DIR else ["step", "layer", "kind", "norm"]
        mine, ref = _rows(run, table).df.select(cols), _rows(many, table).df.select(cols)
        assert mine.equals(ref)
    assert not list(run.rglob(C.LOCK_NAME))


def test_unreadable_segment_is_left_in_place(many: Path, tmp_path: Path) -> None:
    run = _copy(many, tmp_path / "run")
    bad = _files(run, fmt.LAYERS_DIR)[5]
    bad.write_bytes(b"not parquet")
    done = C.compact_run(run)
    assert any("unreadable" in s for s in done.skipped)
    names = [f.name for f in _files(run, fmt.LAYERS_DIR)]
    assert names == [
        "part-000000-000004.parquet",
        bad.name,
        f"part-000006-{STEPS // 3 - 1:06d}.parquet",
    ]
    report = runlens.analyze(run)
    assert any(bad.name in w for w in report.warnings)


def test_cli_compact(many: Path, tmp_path: Path) -> None:
    run = _copy(many, tmp_path / "run")
    dry = CliRunner().invoke(cli, ["compact", str(run), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would compact" in dry.output and "30 segments -> 2" in dry.output
    assert len(_files(run, fmt.LAYERS_DIR)) == STEPS // 3
    res = CliRunner().invoke(cli, ["compact", str(run)])
    assert res.exit_code == 0 and "compacted" in res.output
    assert len(_files(run, fmt.LAYERS_DIR)) == 1
    missing = CliRunner().invoke(cli, ["compact", str(tmp_path / "nope")])
    assert missing.exit_code == 2
    assert missing.output.startswith("runlens: error: no such run directory")


def test_segment_names() -> None:
    assert fmt.segment_range("a/part-000007.parquet") == (7, 7)
    assert fmt.segment_range("part-000002-000009.parquet") == (2, 9)
    for bad in ("part-9-2.parquet", "part-1-2-3.parquet", ".tmp-compact-x.parquet", "x.parquet"):
        assert fmt.segment_range(bad) is None
    live = fmt.live_segments(
        ["part-000003.parquet", "part-000000-000002.parquet", "part-000001.parquet", "x.txt"]
    )
    assert [p.name for p in live] == ["part-000000-000002.parquet", "part-000003.parquet"]
    assert fmt.next_segment_number(["part-000000-000041.parquet"]) == 42
