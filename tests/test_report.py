"""Reporters on runs recorded with the real Collector: content, escaping of hostile names,
the JSON schema as documented, the layer-table cap and the skipped-signatures line."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from cli_runs import HOSTILE, NAN_STEP, WIDE_NAN_LAYER, recorded
from markdown_it import MarkdownIt

import runlens
from runlens.findings import SKIP_KINDS, Report
from runlens.report import _common, json_report, markdown, terminal

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def nan_report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    return runlens.analyze(recorded(tmp_path_factory, "nan"))


@pytest.fixture(scope="module")
def healthy_report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    return runlens.analyze(recorded(tmp_path_factory, "healthy"))


@pytest.fixture(scope="module")
def wide_report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    return runlens.analyze(recorded(tmp_path_factory, "wide"))


@pytest.fixture(scope="module")
def no_layers_report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    return runlens.analyze(recorded(tmp_path_factory, "no_layers"))


# -- terminal -----------------------------------------------------------------------------


def test_terminal_has_header_findings_curves_and_layers(nan_report: Report) -> None:
    text = terminal.render(nan_report, width=100)
    s = nan_report.summary
    assert f"{s.steps} recorded, steps {s.first_step}–{s.last_step}" in text
    assert nan_report.summary.end_reason in text
    assert "throughput" in text and "train loss" in text
    nan = next(f for f in nan_report.findings if f.signature == "nan-inf")
    assert f"ERROR  nan-inf  steps {NAN_STEP}–" in text
    assert "fix: " + nan.fix[:30] in text
    for e in nan.evidence:
        assert e.name.split()[0] in text
    assert "Curves" in text and "first/final/best: levels" in text and "Layer health" in text
    # The train/loss sparkline ends in NaN marks: the loss went NaN at NAN_STEP.
    curves = text[text.index("Curves") :]
    spark = next(ln for ln in curves.splitlines() if ln.strip().startswith("train/loss"))
    assert "×" in spark
    assert all(len(line) <= 100 for line in text.splitlines())


def test_findings_in_report_order(nan_report: Report) -> None:
    # A loose tiny-updates threshold adds a warning next to nan-inf's error.
    opts = runlens.AnalyzeOptions(overrides={"tiny-updates": {"max_ratio": 1.0}})
    report = runlens.analyze(nan_report.run.path, opts)
    assert [f.severity for f in report.findings][:1] == ["error"]
    assert "warning" in {f.severity for f in report.findings}
    text = terminal.render(report, width=120)
    positions = [text.index(f"  {f.signature}  steps") for f in report.findings]
    assert positions == sorted(positions)
    md = markdown.render(report)
    md_positions = [md.index(f": {markdown.escape(f.signature)}\n") for f in report.findings]
    assert md_positions == sorted(md_positions)


@pytest.mark.parametrize("color", [False, True])
def test_terminal_prints_hostile_names_literally(nan_report: Report, color: bool) -> None:
    text = terminal.render(nan_report, width=160, color=color)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert HOSTILE in plain  # `[red]` was not eaten as markup
    assert ("\x1b[" in text) == color
    assert f"note={HOSTILE}" in plain  # a config value from the run
    flagged = next(ln for ln in plain.splitlines() if HOSTILE in ln and "nan-inf" in ln)
    assert flagged.lstrip().startswith("!")  # the health-table mark


def test_clean_run_says_no_problems(healthy_report: Report) -> None:
    clean = runlens.analyze(healthy_report.run.path, runlens.AnalyzeOptions(only=("nan-inf",)))
    assert clean.findings == ()
    assert _common.NO_PROBLEMS in terminal.render(clean)
    assert _common.NO_PROBLEMS in markdown.render(clean)


def test_layer_table_is_capped_flagged_rows_first(wide_report: Report) -> None:
    rows = wide_report.layers
    assert len(rows) > _common.MAX_LAYER_ROWS  # 45 Linear + 45 Tanh modules
    flagged = {r.layer for r in rows if r.flagged_by}
    # nan-inf points at the layer whose weight was set to NaN, late in model order.
    assert str(2 * WIDE_NAN_LAYER) in flagged
    text = terminal.render(wide_report, width=140)
    hidden = len(rows) - _common.MAX_LAYER_ROWS
    assert f"… {hidden} more layers" in text
    table = text[text.index("Layer health") :].splitlines()[3:]
    body = [ln for ln in table[: next(i for i, ln in enumerate(table) if "…" in ln)] if ln]
    assert len(body) == _common.MAX_LAYER_ROWS
    marks = [ln.lstrip().startswith("!") for ln in body]
    assert marks == sorted(marks, reverse=True)  # every flagged row before every other
    assert sum(marks) == min(len(flagged), _common.MAX_LAYER_ROWS)
    assert any(ln.split()[1] == str(2 * WIDE_NAN_LAYER) for ln in body if ln.lstrip()[:1] == "!")
    assert f"… {hidden} more layers" in markdown.render(wide_report)


def test_skipped_line_without_layer_statistics(no_layers_report: Report) -> None:
    layerish = [s.signature for s in no_layers_report.skipped if "layers:" in s.reason]
    assert layerish, "the registry has layer signatures; they must be skipped here"
    line = f"{', '.join(layerish)}: {_common.LAYERS_MISSING}"
    text = terminal.render(no_layers_report, width=1000)
    assert re.search(rf"statistic not recorded +{re.escape(line)}", text)
    md = markdown.render(no_layers_report)
    assert f"- **statistic not recorded:** {line}" in md.replace("\\", "")
    assert "Layer health" not in text  # no layer rows at all


# -- markdown -----------------------------------------------------------------------------


def _html(md: str) -> str:
    return MarkdownIt("commonmark").enable("table").render(md)


def test_markdown_escapes_hostile_names(nan_report: Report) -> None:
    md = markdown.render(nan_report)
    html = _html(md)
    literal = "&lt;/script&gt;&lt;b&gt;[red]x|y"
    assert literal in html
    assert "<script" not in html and "</script>" not in html and "<b>" not in html
    # The `|` did not split a cell: the layer-health table has the whole name in one cell
    # (GFM silently drops cells beyond the header's count, so compare the cell text).
    cells = re.findall(r"<td[^>]*>(.*?)</td>", html, re.S)
    assert literal in cells
    assert sum(literal in c for c in cells) >= 2  # and nan-inf's evidence names it too
    assert any(c.endswith(f"note={literal}") for c in cells)  # the config value


def test_markdown_escape_function_round_trips() -> None:
    hostile = "a|b`c`<i>*x*_y_ [l](u) &amp; #h\nnext"
    html = _html(markdown.escape(hostile))
    text = re.sub(r"<[^>]+>", "", html).strip()
    import html as htmllib

    assert htmllib.unescape(text) == hostile.replace("\n", " ")


def test_markdown_sections(nan_report: Report) -> None:
    md = markdown.render(nan_report)
    assert md.startswith(f"## runlens report: {markdown.escape(nan_report.run.name)}")
    for heading in ("### Findings", "### Curves", "### Layer health"):
        assert heading in md
    assert "#### 1. 🔴 ERROR: nan\\-inf" in md or "#### 1. 🔴 ERROR: nan-inf" in md


# -- json ---------------------------------------------------------------------------------


def _documented_fields() -> dict[str, set[str]]:
    """Field names per section of docs/report-schema.md (first column of each table)."""
    doc = (ROOT / "docs" / "report-schema.md").read_text(encoding="utf-8")
    out: dict[str, set[str]] = {}
    section = None
    for line in doc.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif section and line.startswith("| `"):
            cell = line.split(" | ")[0]
            names = set(re.findall(r"`([a-z_]+)`", cell))
            key = "evidence" if section == "findings" and "`name`" in cell else section
            if section == "findings" and key == "findings" and out.get("evidence"):
                key = "evidence"
            out.setdefault(key, set()).update(names)
    return out


def test_json_matches_documented_schema(nan_report: Report) -> None:
    doc = _documented_fields()
    data = json.loads(
        json_report.render(nan_report),
        parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"),
    )
    assert data["schema_version"] == json_report.REPORT_SCHEMA_VERSION
    assert set(data) == doc["Top level"]
    assert set(data["run"]) == doc["run"]
    assert set(data["summary"]) == doc["summary"]
    assert data["findings"], "the NaN run has findings"
    for f in data["findings"]:
        assert set(f) == doc["findings"]
        assert f["severity"] in ("error", "warning", "info")
        assert 0 <= f["confidence"] <= 1
        for e in f["evidence"]:
            assert set(e) == doc["evidence"]
    for row in data["layers"]:
        assert set(row) == doc["layers"]
    for c in data["curves"]:
        assert set(c) == doc["curves"]
        assert len(c["steps"]) == len(c["values"]) == len(c["smoothed"])
    for s in data["skipped"]:
        assert set(s) == doc["skipped"]
        assert s["kind"] in SKIP_KINDS and s["part"] is None
    cov = data["coverage"]
    assert set(cov) == doc["coverage"]
    assert set(cov["task"]) == doc["coverage task"]
    for p in cov["partial"]:
        assert set(p) == doc["skipped"] and p["part"]
    # every signature analyzed is in exactly one of found / clean / skipped
    names = cov["found"] + cov["clean"] + [s["signature"] for s in data["skipped"]]
    assert sorted(names) == sorted(runlens.REGISTRY)
    assert all(isinstance(w, str) for w in data["warnings"])


def test_json_values_follow_the_report(nan_report: Report) -> None:
    data = json.loads(json_report.render(nan_report))
    assert [f["signature"] for f in data["findings"]] == [f.signature for f in nan_report.findings]
    nan = next(f for f in data["findings"] if f["signature"] == "nan-inf")
    assert nan["layers"] == [HOSTILE + ".weight"] or nan["layers"] == [HOSTILE]
    assert data["run"]["config"]["note"] == HOSTILE
    # Non-finite values (the NaN loss) are null, never NaN.
    loss = next(c for c in data["curves"] if c["name"] == "train/loss")
    assert None in loss["values"]
    raw = next(c for c in nan_report.curves if c.name == "train/loss").values
    assert [v is None for v in loss["values"]] == [not math.isfinite(v) for v in raw]


# -- helpers ------------------------------------------------------------------------------


def test_sparkline() -> None:
    assert _common.sparkline([]) == ""
    rising = _common.sparkline(list(range(100)))
    assert len(rising) == _common.SPARK_WIDTH
    assert list(rising) == sorted(rising) and rising[0] == "▁" and rising[-1] == "█"
    assert _common.sparkline([1.0, float("nan"), 3.0]) == "▁×█"
    assert set(_common.sparkline([2.0] * 5)) == {"▅"}
