"""runlens: post-hoc diagnosis of neural-network training runs.

Library API (the CLI is a thin layer over it)::

    import runlens
    run = runlens.load_run("runs/exp1")
    report = runlens.analyze(run)                 # -> runlens.Report
    for f in report.findings:                     # -> runlens.Finding
        print(f.signature, f.severity, f.summary)
    cmp = runlens.compare(["runs/lr_*"])          # -> runlens.Comparison
    for event in runlens.watch("runs/live"):      # -> runlens.WatchEvent, as they happen
        print(event.kind, event.message)
"""

from __future__ import annotations

# The function shadows the module name on purpose: ``runlens.compare(runs)``.
from runlens.compare import CompareOptions, Comparison, compare
from runlens.engine import AnalyzeOptions, analyze, parse_set
from runlens.errors import OptionError, RunlensError, RunLoadError
from runlens.findings import (
    Coverage,
    Evidence,
    Finding,
    LayerHealth,
    Report,
    RunSummary,
    Skipped,
    TaskSummary,
)
from runlens.live import WatchEvent, WatchOptions, watch
from runlens.run import Run, load_run
from runlens.signatures import REGISTRY

__version__ = "0.1.0"

__all__ = [
    "REGISTRY",
    "AnalyzeOptions",
    "CompareOptions",
    "Comparison",
    "Coverage",
    "Evidence",
    "Finding",
    "LayerHealth",
    "OptionError",
    "Report",
    "Run",
    "RunLoadError",
    "RunSummary",
    "RunlensError",
    "Skipped",
    "TaskSummary",
    "WatchEvent",
    "WatchOptions",
    "analyze",
    "compare",
    "load_run",
    "parse_set",
    "watch",
]
