"""Score runlens against the labelled real-log corpus: precision, recall, per-log table.

    python tests/real_logs/score.py                    # dev split: per-log table + totals
    python tests/real_logs/score.py --split heldout    # held-out totals only (no table)
    python tests/real_logs/score.py --split all --table

Every log is analyzed through the public library, the path ``runlens analyze`` takes:
``runlens.discover.discover`` lists the runs a folder holds (a TensorBoard ``runs/`` parent,
runs appended in one CSV...), ``runlens.sources.open_found`` imports each one and
``runlens.analyze`` diagnoses it with default options (no task stated, no overrides).

Scoring (docs/real-logs.md shows the numbers):

* Only **warning and error** findings count; ``info`` findings are ignored.
* A finding's **class** is ``CLASS_OF[signature]`` (signatures with no class of their own
  map to ``other``).
* A finding **matches** a label of the same log when the classes are equal, the step ranges
  overlap once the label's range is widened by the tolerance ``max(1, TOLERANCE × the run's
  x span)`` on each side, and the series agree: when the finding names the curves it is
  about (``Finding.series``), one of them has the label's role (``train`` for ``train/*``
  names, ``val`` for ``val/*`` and ``eval/*``). Steps are compared in the label's unit; a
  run whose x axis differs from the label's is matched on class and series only.
* **Precision** = findings that match a label / findings. **Recall** = labels matched by
  at least one finding / labels.
* Several runs in one log (a TensorBoard parent folder, runs appended in one CSV): every
  run is analyzed and their findings are pooled; a label names its run(s) only in prose, so
  a finding is not checked to come from the run the label's note names.
* **Certain** scoring leaves out the logs whose label is marked ``uncertain``; **all**
  scoring keeps them.
* **Failures**: a log that cannot be read or analyzed (any exception), and a run that
  "read nothing" (no training and no validation loss recognised) are failures, counted
  apart; their labelled problems count as missed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).resolve().parent

CLASS_OF: dict[str, str] = {
    "overfitting": "overfitting",
    "loss-divergence": "loss-divergence",
    "lr-too-high-warmup": "lr-too-high-warmup",
    "loss-spike": "loss-spike",
    "val-spike": "loss-spike",
    "nan-inf": "nan-inf",
    "loss-flat": "not-learning",
    "not-learning": "not-learning",
    "loss-collapse-zero": "loss-collapse-zero",
    "loss-oscillation": "loss-oscillation",
    "noisy-loss": "noisy-loss",
    "underfitting": "underfitting",
    "val-below-train": "val-below-train",
}
"""Signature -> label class (tests/real_logs/README.md, *Problem classes*). Every other
signature (layer, sanity and bug signatures) maps to ``other``."""

TOLERANCE = 0.05
"""Step-overlap tolerance as a fraction of the run's x span (first to last step)."""

SERIOUS = ("warning", "error")


def load_labels() -> dict[str, dict[str, Any]]:
    return json.loads((CORPUS / "labels.json").read_text(encoding="utf-8"))["logs"]


def class_of(signature: str) -> str:
    return CLASS_OF.get(signature, "other")


def role(series: str) -> str:
    """``val`` for validation/evaluation curves, ``train`` for everything else."""
    head = series.split("/", 1)[0].lower()
    return "val" if head in ("val", "eval", "valid", "validation") else "train"


@dataclass(frozen=True)
class Hit:
    """One warning/error finding of one run of a log."""

    run: str
    signature: str
    severity: str
    steps: tuple[int, int] | None
    series: tuple[str, ...]
    span: tuple[int, int] | None
    """First and last step of the run (for the tolerance)."""
    x_axis: str
    summary: str

    @property
    def cls(self) -> str:
        return class_of(self.signature)


@dataclass
class LogResult:
    log_id: str
    hits: list[Hit] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    error: str | None = None
    read_nothing: list[str] = field(default_factory=list)
    """Runs with neither a training nor a validation loss recognised."""
    not_checked: list[str] = field(default_factory=list)
    """Runs on which no curve signature could run (the report says why)."""

    @property
    def failed(self) -> bool:
        return self.error is not None or bool(self.read_nothing)


def analyze_log(log_id: str) -> LogResult:
    """Analyze every run of one corpus log the way ``runlens analyze`` does."""
    import runlens
    from runlens.discover import discover
    from runlens.signatures import CURVE_SIGNATURES
    from runlens.sources import open_found

    curve_names = {s.name for s in CURVE_SIGNATURES}
    out = LogResult(log_id)
    try:
        found = discover(CORPUS / log_id)
        for item in found.runs:
            run = open_found(item)
            report = runlens.analyze(run)
            out.runs.append(item.label)
            names = set(run.scalar_names)
            if "train/loss" not in names and "val/loss" not in names:
                out.read_nothing.append(item.label)
            if not set(report.coverage.ran) & curve_names:
                out.not_checked.append(item.label)
            span = None
            s = report.summary
            if s.first_step is not None and s.last_step is not None:
                span = (s.first_step, s.last_step)
            for f in report.findings:
                if f.severity in SERIOUS:
                    hit = Hit(
                        item.label, f.signature, f.severity, f.steps, f.series, span,
                        run.x_axis, f.summary,
                    )  # fmt: skip
                    out.hits.append(hit)
    except Exception as exc:  # a refused log is a failure, not a crash of the scorer
        out.error = f"{type(exc).__name__}: {exc}"
    return out


def matches(hit: Hit, label: dict[str, Any], label_x_axis: str) -> bool:
    """Whether a finding matches a labelled problem (see the module docstring)."""
    if hit.cls != label["class"]:
        return False
    if hit.series and role(label["series"]) not in {role(s) for s in hit.series}:
        return False
    if hit.steps is None or hit.x_axis != label_x_axis:
        return True
    lo, hi = label["steps"]
    span = (hit.span[1] - hit.span[0]) if hit.span else 0
    tol = max(1.0, TOLERANCE * span)
    return hit.steps[0] <= hi + tol and hit.steps[1] >= lo - tol


@dataclass
class Score:
    """Totals over a set of logs."""

    logs: int = 0
    findings: int = 0
    true_findings: int = 0
    labels: int = 0
    found_labels: int = 0
    errors: int = 0
    read_nothing: int = 0
    not_checked_runs: int = 0
    by_signature: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(signature, 'tp'|'fp') -> count."""
    by_class: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(label class, 'found'|'missed') -> count."""

    @property
    def precision(self) -> float:
        return self.true_findings / self.findings if self.findings else 1.0

    @property
    def recall(self) -> float:
        return self.found_labels / self.labels if self.labels else 1.0

    def line(self) -> str:
        return (
            f"precision {self.precision:.2f} ({self.true_findings}/{self.findings} findings "
            f"match a label), recall {self.recall:.2f} ({self.found_labels}/{self.labels} "
            f"labels found); {self.logs} logs, {self.errors} refused/errored, "
            f"{self.read_nothing} read nothing, {self.not_checked_runs} runs with no curve "
            "check run"
        )


@dataclass
class LogScore:
    """One log's rows: which findings matched, which labels were found."""

    log_id: str
    hits: list[tuple[Hit, bool]]
    labels: list[tuple[dict[str, Any], bool]]


def score_log(entry: dict[str, Any], result: LogResult) -> LogScore:
    labels = entry["problems"]
    x_axis = entry["x_axis"]
    hits = [(h, any(matches(h, lab, x_axis) for lab in labels)) for h in result.hits]
    found = [(lab, any(matches(h, lab, x_axis) for h in result.hits)) for lab in labels]
    return LogScore(result.log_id, hits, found)


def score(
    entries: dict[str, dict[str, Any]], results: dict[str, LogResult], certain_only: bool
) -> Score:
    sc = Score()
    for log_id, entry in entries.items():
        if certain_only and entry.get("uncertain"):
            continue
        res = results[log_id]
        ls = score_log(entry, res)
        sc.logs += 1
        sc.errors += res.error is not None
        sc.read_nothing += bool(res.read_nothing)
        sc.not_checked_runs += len(res.not_checked)
        for hit, ok in ls.hits:
            sc.findings += 1
            sc.true_findings += ok
            sc.by_signature[(hit.signature, "tp" if ok else "fp")] += 1
        for lab, ok in ls.labels:
            sc.labels += 1
            sc.found_labels += ok
            sc.by_class[(lab["class"], "found" if ok else "missed")] += 1
    return sc


def analyze_all(
    entries: dict[str, dict[str, Any]], cache_dir: str | None = None
) -> dict[str, LogResult]:
    """Analyze every log of ``entries`` (imports go to ``cache_dir``, a fresh temporary
    folder when None, so the user's import cache is never touched)."""
    with tempfile.TemporaryDirectory(prefix="runlens-score-") as tmp:
        old = os.environ.get("RUNLENS_CACHE_DIR")
        os.environ["RUNLENS_CACHE_DIR"] = cache_dir or tmp
        try:
            return {log_id: analyze_log(log_id) for log_id in entries}
        finally:
            if old is None:
                os.environ.pop("RUNLENS_CACHE_DIR", None)
            else:
                os.environ["RUNLENS_CACHE_DIR"] = old


def _fmt_steps(steps: Any) -> str:
    return "-" if steps is None else f"{steps[0]}..{steps[1]}"


def table(entries: dict[str, dict[str, Any]], results: dict[str, LogResult]) -> str:
    """One block per log: its labels (found or missed) and its findings (match or not)."""
    lines = []
    for log_id, entry in entries.items():
        res = results[log_id]
        ls = score_log(entry, res)
        flag = " uncertain" if entry.get("uncertain") else ""
        head = f"{log_id} [{entry['split']}{flag}] {entry['verdict']}"
        if res.error:
            head += f" — ERROR {res.error}"
        if res.read_nothing:
            head += f" — READ NOTHING in {', '.join(res.read_nothing)}"
        if res.not_checked:
            head += f" — no curve check ran on {', '.join(res.not_checked)}"
        lines.append(head)
        for lab, ok in ls.labels:
            lines.append(
                f"    label   {'FOUND ' if ok else 'MISSED'} {lab['class']} {lab['series']} "
                f"{_fmt_steps(lab['steps'])}"
            )
        for hit, ok in ls.hits:
            run = "" if len(res.runs) < 2 else f" [{hit.run}]"
            lines.append(
                f"    finding {'TP    ' if ok else 'FP    '} {hit.signature} ({hit.cls}) "
                f"{'/'.join(hit.series) or '?'} {_fmt_steps(hit.steps)}{run}: {hit.summary[:110]}"
            )
    return "\n".join(lines)


def confusion(sc: Score) -> str:
    sigs = sorted({s for s, _ in sc.by_signature})
    classes = sorted({c for c, _ in sc.by_class})
    out = ["  findings by signature (match / no match):"]
    out += [
        f"    {s:<20} {sc.by_signature[(s, 'tp')]:>3} / {sc.by_signature[(s, 'fp')]:>3}"
        for s in sigs
    ]
    out.append("  labels by class (found / missed):")
    out += [
        f"    {c:<20} {sc.by_class[(c, 'found')]:>3} / {sc.by_class[(c, 'missed')]:>3}"
        for c in classes
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--split", choices=("dev", "heldout", "all"), default="dev")
    ap.add_argument(
        "--table",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="print the per-log table (default: on for dev, off otherwise: held-out logs "
        "are looked at only to measure)",
    )
    ap.add_argument("--confusion", action="store_true", help="per-signature counts")
    ap.add_argument("logs", nargs="*", help="only these log ids")
    args = ap.parse_args(argv)
    labels = load_labels()
    entries = {
        k: v
        for k, v in labels.items()
        if (args.split == "all" or v["split"] == args.split) and (not args.logs or k in args.logs)
    }
    results = analyze_all(entries)
    show_table = args.table if args.table is not None else args.split == "dev"
    if show_table:
        print(table(entries, results))
        print()
    for name, certain in (("certain labels", True), ("all labels", False)):
        sc = score(entries, results, certain_only=certain)
        print(f"{args.split}, {name}: {sc.line()}")
        if args.confusion:
            print(confusion(sc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
