"""The JSON report: ``report.to_dict()`` plus a format version. Schema: docs/report-schema.md."""

from __future__ import annotations

import json
from typing import Any, Final

from runlens.findings import Report, _jsonable

REPORT_SCHEMA_VERSION: Final = 1
"""Bumped on any incompatible change to the JSON report (removed/renamed/retyped field)."""


def to_json_dict(report: Report) -> dict[str, Any]:
    from runlens import __version__

    body = report.to_dict()
    return {"schema_version": REPORT_SCHEMA_VERSION, "runlens_version": __version__, **body}


def render(report: Report) -> str:
    """Strict JSON (no NaN/Infinity: non-finite numbers are null), indented, one document."""
    return json.dumps(to_json_dict(report), indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def render_many(found: Any, reports: list[dict[str, Any]], errors: list[dict[str, str]]) -> str:
    """One JSON document for a folder of runs (``runlens analyze DIR`` when DIR holds
    several): ``{"kind": "runs", "path", "notes", "reports": [...], "errors": [...]}``,
    each report the single-run document plus ``label``, ``format`` and ``reason``.
    ``found`` is the :class:`runlens.discover.Discovery`."""
    from runlens import __version__

    doc = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "runlens_version": __version__,
        "kind": "runs",
        "path": str(found.root),
        "runs_found": len(found.runs),
        "notes": list(found.notes),
        "reports": reports,
        "errors": errors,
    }
    return json.dumps(_jsonable(doc), indent=2, allow_nan=False, ensure_ascii=False) + "\n"
