"""docs/run-format.md is generated from runlens_collect.format where it can be."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_format_doc_is_current():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "gen_run_format.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr + "\nrun: python docs/gen_run_format.py"


def test_every_schema_column_is_explained():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import gen_run_format as gen
    finally:
        sys.path.pop(0)
    from runlens_collect import format as fmt

    assert set(fmt.LAYERS_SCHEMA.names) == set(gen.LAYER_COLUMNS)
    assert set(fmt.SCALARS_SCHEMA.names) == set(gen.SCALAR_COLUMNS)
