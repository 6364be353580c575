"""The generated docs are current, and every signature is documented the same way."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runlens import docgen
from runlens.signatures import REGISTRY
from runlens.signatures.base import DOC_SECTIONS

KEBAB = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


def test_generated_docs_are_current() -> None:
    stale = docgen.stale_files()
    assert not stale, f"{stale} out of date: run `python -m runlens.docgen`"


@pytest.mark.parametrize("name", list(REGISTRY))
def test_signature_is_documented(name: str) -> None:
    sig = REGISTRY[name]
    assert KEBAB.match(sig.name), f"{sig.name!r} is not kebab-case"
    assert sig.name == name
    doc = docgen.parse_doc(sig)
    assert doc.intro, f"{name}: the docstring needs a first line"
    missing = [s for s in DOC_SECTIONS if not doc.sections.get(s)]
    assert not missing, f"{name}: docstring lacks section(s) {missing}"
    assert sig.summary and "\n" not in sig.summary
    assert sig.category in ("curve", "layer", "system", "sanity", "bug")
    assert sig.severity in ("error", "warning", "info")
    for p in sig.params:
        assert p.doc and p.source, f"{name}.{p.name} needs a meaning and a source"


def test_docs_cover_every_signature() -> None:
    table = docgen.signature_table()
    text = docgen.signatures_doc()
    for name in REGISTRY:
        assert f"[`{name}`](docs/signatures.md#{name})" in table
        assert f"\n## {name}\n" in text


def test_regeneration_fixes_stale_files(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# intro kept\n\n{docgen.README_START}\nold table\n{docgen.README_END}\n\nfooter kept\n"
    )
    assert set(docgen.stale_files(tmp_path)) == {"README.md", str(docgen.SIGNATURES_DOC)}
    assert set(docgen.write_all(tmp_path)) == {"README.md", str(docgen.SIGNATURES_DOC)}
    assert docgen.stale_files(tmp_path) == []
    text = readme.read_text()
    assert text.startswith("# intro kept\n") and text.endswith("\nfooter kept\n")
    assert "old table" not in text
    assert docgen.write_all(tmp_path) == []  # idempotent


def test_readme_without_markers_is_an_error() -> None:
    with pytest.raises(ValueError, match="signatures:start"):
        docgen.readme_with_table("# no markers here\n")
