"""Render every report of the sample runs with two versions of runlens and diff them.

A change meant to be invisible (speed, memory, refactoring) must leave every report byte
for byte as it was. This renders, through the CLI, for each run under ``sample_runs/``
(and any ``--extra`` runs or logs):

* ``analyze`` in the terminal, markdown, json and html formats,

and ``compare`` in the same four formats over all sample runs, over a pair with the
first as baseline, and over the pair aligned by time. Once with the code of ``--ref`` (a
git ref of this repository, extracted with ``git archive`` into a temporary folder) and
once with the working tree, each in a fresh process, on the same input files; then it
lists the files that differ.

    python benchmarks/report_identity.py                  # main vs the working tree
    python benchmarks/report_identity.py --ref HEAD~3 --keep out/
    python benchmarks/report_identity.py --extra tests/real_logs/hf-edge-1epoch/...

Exit status 1 when anything differs (the diffs are printed, first lines of each).
"""

from __future__ import annotations

import argparse
import difflib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs inside the child: import the CLI of the code under test and invoke it in-process
# (import time paid once), each output written to a file.
_CHILD = r"""
import json, os, sys
from click.testing import CliRunner
from runlens.cli import cli
out, jobs = sys.argv[1], json.loads(sys.argv[2])
runner = CliRunner()
for name, argv in jobs:
    path = os.path.join(out, name)
    args = [a.replace("{OUT}", path) for a in argv]
    res = runner.invoke(cli, args, catch_exceptions=True)
    if "{OUT}" not in " ".join(argv):
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(res.output)
    with open(path + ".exit", "w") as fh:
        fh.write(f"{res.exit_code}\n")
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            fh.write(f"{type(res.exception).__name__}: {res.exception}\n")
"""


def sample_runs() -> list[Path]:
    base = ROOT / "sample_runs"
    return sorted(p for p in base.iterdir() if (p / "run.json").is_file())


def jobs(runs: list[Path], extra: list[str]) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    inputs = [(p.name, str(p)) for p in runs]
    inputs += [(f"extra{i}-{Path(e).name}", str(Path(e).resolve())) for i, e in enumerate(extra)]
    for name, path in inputs:
        for f in ("terminal", "markdown", "json"):
            out.append((f"analyze-{name}.{f}", ["analyze", path, "--format", f]))
        out.append((f"analyze-{name}.html", ["analyze", path, "--format", "html", "-o", "{OUT}"]))
    all_runs = [str(p) for p in runs]
    pair = [str(runs[0]), str(runs[1])] if len(runs) > 1 else all_runs
    for label, paths, more in (
        ("all", all_runs, []),
        ("pair", pair, []),
        ("pair-by-time", pair, ["--by", "time"]),
    ):
        for f in ("terminal", "markdown", "json"):
            out.append((f"compare-{label}.{f}", ["compare", *paths, "--format", f, *more]))
        html = ["compare", *paths, "--format", "html", "-o", "{OUT}", *more]
        out.append((f"compare-{label}.html", html))
    return out


def extract(ref: str, into: Path) -> Path:
    """The tree of ``ref`` as plain files under ``into`` (no git worktree bookkeeping)."""
    tar = into / "src.tar"
    with open(tar, "wb") as fh:
        subprocess.run(["git", "archive", ref], cwd=ROOT, stdout=fh, check=True)
    src = into / "src"
    src.mkdir()
    with tarfile.open(tar) as tf:
        tf.extractall(src, filter="data")
    return src


def render(code: Path, out: Path, todo: list[tuple[str, list[str]]], cache: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(code), str(code / "collectors")])
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "100"
    env["RUNLENS_CACHE_DIR"] = str(cache)  # imported logs: same conversion on both sides
    subprocess.run(
        [sys.executable, "-c", _CHILD, str(out), __import__("json").dumps(todo)],
        env=env,
        check=True,
        cwd=code,
    )


def diff(a: Path, b: Path, context_lines: int = 6) -> list[str]:
    """Names of the outputs that differ between the two folders, printing the diffs."""
    differing = []
    for fa in sorted(a.iterdir()):
        fb = b / fa.name
        da, db = fa.read_bytes(), fb.read_bytes() if fb.exists() else b""
        if da == db:
            continue
        differing.append(fa.name)
        print(f"--- {fa.name} differs ({len(da)} vs {len(db)} bytes)")
        lines = difflib.unified_diff(
            da.decode("utf-8", "replace").splitlines(),
            db.decode("utf-8", "replace").splitlines(),
            "ref",
            "tree",
            n=1,
            lineterm="",
        )
        for i, line in enumerate(lines):
            if i >= 40:
                print("    ...")
                break
            print("    " + line[:300])
    return differing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", default="main", help="git ref whose code renders the reference")
    ap.add_argument("--keep", type=Path, default=None, help="write the outputs here")
    ap.add_argument("--extra", nargs="*", default=[], help="more runs or logs to analyze")
    args = ap.parse_args()
    todo = jobs(sample_runs(), args.extra)
    with tempfile.TemporaryDirectory(prefix="runlens-identity-") as tmp:
        work = Path(tmp)
        keep = args.keep or work / "out"
        src = extract(args.ref, work)
        render(src, keep / "ref", todo, work / "cache-ref")
        render(ROOT, keep / "tree", todo, work / "cache-tree")
        differing = diff(keep / "ref", keep / "tree")
    n = len(todo)
    if differing:
        print(f"{len(differing)} of {n} outputs differ from {args.ref}")
        sys.exit(1)
    print(f"all {n} outputs (and exit statuses) byte-identical to {args.ref}")


if __name__ == "__main__":
    main()
