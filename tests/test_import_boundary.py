"""What each half of runlens may import.

The run-format module is shared with the analyzer, which has no torch; the collector runs
inside training jobs, where every extra dependency is a liability. Add a row to each table
below to extend the checks (e.g. for the analyzer package).
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

STDLIB = set(sys.stdlib_module_names)

# module to import in a fresh interpreter -> top-level packages it must not load
MUST_NOT_LOAD = {
    "runlens_collect.format": {"torch", "polars", "scipy"},
    "runlens_collect.compact": {"torch", "polars", "scipy"},  # runlens compact imports it
    "runlens_collect": {"torch", "polars", "scipy"},  # torch parts load lazily
}

# package -> third-party top-level modules its source may import (besides the stdlib)
ALLOWED_IMPORTS = {
    "runlens_collect": {"numpy", "pyarrow", "torch"},
}


@pytest.mark.parametrize("module", sorted(MUST_NOT_LOAD))
def test_import_does_not_load(module):
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {m.split(".")[0] for m in json.loads(out.stdout)}
    assert not (loaded & MUST_NOT_LOAD[module])


def _source_files(package: str) -> list[Path]:
    pkg = __import__(package)
    files = [Path(pkg.__file__)]
    for info in pkgutil.walk_packages(pkg.__path__, prefix=package + "."):
        spec = info.module_finder.find_spec(info.name)
        assert spec is not None and spec.origin
        files.append(Path(spec.origin))
    return files


def _imported_top_levels(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED_IMPORTS))
def test_package_imports_only_allowed(package):
    allowed = STDLIB | ALLOWED_IMPORTS[package] | {package}
    bad = {}
    for path in _source_files(package):
        extra = _imported_top_levels(path) - allowed
        if extra:
            bad[path.name] = sorted(extra)
    assert not bad, f"{package} imports outside its allowed set: {bad}"
