"""Reporters: pure functions that turn a :class:`~runlens.findings.Report` into text.

Each module exposes ``render(report, ...) -> str`` and never prints or writes files; the
CLI chooses one by name (:data:`FORMATS`) and decides where the text goes.
"""

from __future__ import annotations

from collections.abc import Callable

from runlens.findings import Report
from runlens.report import json_report, markdown, terminal

FORMATS: dict[str, Callable[[Report], str]] = {
    "terminal": terminal.render,
    "markdown": markdown.render,
    "json": json_report.render,
}

__all__ = ["FORMATS", "json_report", "markdown", "terminal"]
