"""`runlens analyze / signatures / explain` on runs recorded with the real Collector:
exit codes, --fail-on, --set/--config, outputs, and one-line errors on bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runs import HOSTILE, NAN_STEP, recorded
from click.testing import CliRunner

from runlens.cli import cli
from runlens.signatures import REGISTRY
from runlens.signatures.base import DOC_SECTIONS

ANSI = re.compile(r"\x1b\[")


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return recorded(tmp_path_factory, "healthy")


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return recorded(tmp_path_factory, "nan")


def invoke(*args: object) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result: object, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("runlens: error: ")
    assert "Traceback" not in result.output
    for frag in fragments:
        assert frag in lines[0]
    assert result.stdout == ""


# -- exit codes and --fail-on -------------------------------------------------------------


def test_clean_run_says_so_and_exits_0(healthy: Path) -> None:
    r = invoke("analyze", healthy, "--only", "nan-inf", "--fail-on", "warning")
    assert r.exit_code == 0
    assert "No problems found" in r.stdout
    assert "train/loss" in r.stdout  # the curves table
    assert not ANSI.search(r.stdout)  # not a TTY: no colour codes


def test_nan_run_reports_error_and_fail_on_gates(nan_run: Path) -> None:
    plain = invoke("analyze", nan_run, "--format", "json")
    assert plain.exit_code == 0
    findings = json.loads(plain.stdout)["findings"]
    nan = [f for f in findings if f["signature"] == "nan-inf"]
    assert nan and nan[0]["severity"] == "error"
    assert nan[0]["steps"][0] == NAN_STEP
    assert nan[0]["layers"] == [HOSTILE]
    for level in ("error", "warning"):
        r = invoke("analyze", nan_run, "--fail-on", level)
        assert r.exit_code == 1
        assert "nan-inf" in r.stdout  # the report is still printed


def test_fail_on_error_ignores_warnings(healthy: Path) -> None:
    # tiny-updates.max_ratio=1 makes every update "tiny": a warning, not an error.
    args = ("analyze", healthy, "--only", "tiny-updates", "--set", "tiny-updates.max_ratio=1")
    assert invoke(*args, "--fail-on", "warning").exit_code == 1
    assert invoke(*args, "--fail-on", "error").exit_code == 0


def test_set_changes_the_verdict(healthy: Path) -> None:
    base = ("analyze", healthy, "--only", "tiny-updates", "--format", "json")
    default = json.loads(invoke(*base).stdout)
    assert default["findings"] == []
    loose = json.loads(invoke(*base, "--set", "tiny-updates.max_ratio=1").stdout)
    assert [f["signature"] for f in loose["findings"]] == ["tiny-updates"]
    # The evidence shows the threshold that was used.
    thresholds = [e["threshold"] for e in loose["findings"][0]["evidence"]]
    assert 1.0 in thresholds


def test_config_file_overrides_and_set_wins(healthy: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "runlens.toml"
    cfg.write_text("[tiny-updates]\nmax_ratio = 1\n")
    base = ("analyze", healthy, "--only", "tiny-updates", "--fail-on", "warning")
    assert invoke(*base, "--config", cfg).exit_code == 1
    assert invoke(*base, "--config", cfg, "--set", "tiny-updates.max_ratio=1e-9").exit_code == 0


def test_output_file_gets_the_report_and_stdout_stays_empty(nan_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    r = invoke("analyze", nan_run, "--format", "markdown", "-o", out, "--fail-on", "error")
    assert r.exit_code == 1
    assert r.stdout == ""
    text = out.read_text(encoding="utf-8")
    assert text.startswith("## runlens report")
    assert "nan-inf" in text


def test_only_and_smoothing(nan_run: Path) -> None:
    r = invoke("analyze", nan_run, "--only", "nan-inf,tiny-updates", "--format", "json")
    report = json.loads(r.stdout)
    assert {f["signature"] for f in report["findings"]} <= {"nan-inf", "tiny-updates"}
    smooth0 = json.loads(invoke("analyze", nan_run, "--format", "json", "--smoothing", "0").stdout)
    curve = next(c for c in smooth0["curves"] if c["name"] == "train/loss")
    assert curve["smoothed"] == curve["values"]  # weight 0: no smoothing at all


# -- bad input: one line on stderr, exit 2 -----------------------------------------------


def test_missing_dir(tmp_path: Path) -> None:
    assert_one_line_error(invoke("analyze", tmp_path / "nope"), "no such run directory")


def test_a_file_is_not_a_run(tmp_path: Path) -> None:
    f = tmp_path / "log.txt"
    f.write_text("hello")
    # A file is either an importable log (see `runlens import`) or an error naming it.
    assert_one_line_error(invoke("analyze", f), str(f))


def test_empty_dir(tmp_path: Path) -> None:
    # Nothing readable: one line saying what was looked for.
    assert_one_line_error(
        invoke("analyze", tmp_path), "no runs found", "TensorBoard event files", "training.log"
    )


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


def test_schema_version_from_the_future(healthy: Path, tmp_path: Path) -> None:
    run = _copy(healthy, tmp_path)
    meta = json.loads((run / "run.json").read_text())
    meta["schema_version"] = 99
    (run / "run.json").write_text(json.dumps(meta))
    assert_one_line_error(invoke("analyze", run), "schema version 99", "upgrade runlens")


def test_corrupted_run_json_is_a_warning(healthy: Path, tmp_path: Path) -> None:
    run = _copy(healthy, tmp_path)
    (run / "run.json").write_text('{"schema_version": 1, "name": ')
    r = invoke("analyze", run, "--format", "json")
    assert r.exit_code == 0
    report = json.loads(r.stdout)
    assert any("run.json" in w for w in report["warnings"])
    assert report["summary"]["steps"] > 0  # the data is still analyzed


def test_truncated_segment_is_skipped_with_a_warning(healthy: Path, tmp_path: Path) -> None:
    run = _copy(healthy, tmp_path)
    seg = sorted((run / "layers").rglob("part-*.parquet"))[0]
    seg.write_bytes(seg.read_bytes()[: seg.stat().st_size // 2])
    r = invoke("analyze", run)
    assert r.exit_code == 0
    rel = seg.relative_to(run).as_posix()
    assert f"skipped unreadable segment {rel}" in r.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "no-such-sig.x=1"], "unknown signature 'no-such-sig'"),
        (["--set", "tiny-updates.nope=1"], "has no parameter 'nope'"),
        (["--set", "tiny-updates.max_ratio"], "NAME.PARAM=VALUE"),
        (["--set", "tiny-updates.max_ratio=abc"], "is not a number"),
        (["--only", "no-such-sig"], "no-such-sig"),
        (["--smoothing", "1.5"], "smoothing"),
        (["--format", "xml"], "--format"),
        (["--fail-on", "info"], "--fail-on"),
        (["--no-such-option"], "--no-such-option"),
        (["--config", "/nonexistent/runlens.toml"], "cannot read config"),
    ],
)
def test_bad_options(healthy: Path, args: list[str], fragment: str) -> None:
    assert_one_line_error(invoke("analyze", healthy, *args), fragment)


def test_bad_toml(healthy: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[tiny-updates\nmax_ratio = ")
    assert_one_line_error(invoke("analyze", healthy, "--config", cfg), "not valid TOML")


def test_unwritable_output(healthy: Path, tmp_path: Path) -> None:
    r = invoke("analyze", healthy, "-o", tmp_path / "no" / "such" / "dir" / "r.txt")
    assert_one_line_error(r)


def test_unknown_command() -> None:
    assert_one_line_error(invoke("analyse"), "No such command")


# -- signatures / explain / help -----------------------------------------------------------


def test_signatures_lists_every_signature() -> None:
    text = invoke("signatures").stdout
    for name, sig in REGISTRY.items():
        line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
        assert sig.category in line and sig.severity in line and sig.summary in line
    listed = json.loads(invoke("signatures", "--format", "json").stdout)
    assert [s["name"] for s in listed] == list(REGISTRY)
    assert all({"category", "severity", "summary", "params", "requires"} <= set(s) for s in listed)
    md = invoke("signatures", "--format", "markdown").stdout
    assert md.count("\n| [`") == len(REGISTRY)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_explain_every_signature(name: str) -> None:
    r = invoke("explain", name)
    assert r.exit_code == 0
    for section in DOC_SECTIONS:
        assert f"{section}:" in r.stdout
    for p in REGISTRY[name].params:
        assert f"{p.name} = {p.default:g}" in r.stdout
        assert p.doc.split()[0] in r.stdout
    assert "Requires: " + (", ".join(REGISTRY[name].requires) or "nothing") in r.stdout


def test_explain_unknown_suggests() -> None:
    assert_one_line_error(invoke("explain", "nan-in"), "did you mean nan-inf")


def test_every_command_has_an_example_in_its_help() -> None:
    assert {"analyze", "signatures", "explain"} <= set(cli.commands)
    for name in cli.commands:
        r = invoke(name, "--help")
        assert r.exit_code == 0
        assert "Example" in r.stdout, f"`runlens {name} --help` has no example"
        assert re.search(rf"^\s+runlens {name}\b", r.stdout, re.M), name


# -- the installed console script ---------------------------------------------------------


def _console_script() -> str:
    found = shutil.which("runlens")
    if found:
        return found
    return str(Path(sys.executable).with_name("runlens"))


def test_console_script_subprocess(nan_run: Path, tmp_path: Path) -> None:
    exe = _console_script()
    done = subprocess.run(
        [exe, "analyze", str(nan_run), "--format", "json", "--fail-on", "error"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr == ""
    assert json.loads(done.stdout)["findings"][0]["signature"] == "nan-inf"
