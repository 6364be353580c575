"""The comparison as JSON: ``comparison.to_dict()`` plus a format version.
Fields: docs/compare.md."""

from __future__ import annotations

import json
from typing import Any, Final

from runlens.compare import Comparison

COMPARE_SCHEMA_VERSION: Final = 1
"""Bumped on any incompatible change to the JSON comparison (removed/renamed/retyped field)."""


def to_json_dict(comparison: Comparison) -> dict[str, Any]:
    from runlens import __version__

    body = comparison.to_dict()
    return {"schema_version": COMPARE_SCHEMA_VERSION, "runlens_version": __version__, **body}


def render(comparison: Comparison) -> str:
    """Strict JSON (no NaN/Infinity: non-finite numbers are null), indented, one document."""
    doc = to_json_dict(comparison)
    return json.dumps(doc, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
