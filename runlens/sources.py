"""Open anything runlens can analyze: a run directory, or a log it imports on the fly.

:func:`open_run` loads runlens run directories directly. Other logs (TensorBoard, CSV,
Hugging Face ``trainer_state.json``; see :mod:`runlens.importers`) are converted once
into a run directory in the import cache and loaded from there; the next analysis of the
same unchanged log reuses it. Nothing is written next to the user's logs.

The cache lives in ``$RUNLENS_CACHE_DIR/imports`` (default ``~/.cache/runlens/imports``,
or ``$XDG_CACHE_HOME/runlens/imports``). An entry's name is a hash of the log's absolute
path, the size and mtime of every input file, the format, the ``--map`` overrides and
the importer version, so editing or appending to a log imports it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from runlens import discover, importers
from runlens.errors import RunLoadError
from runlens.run import Run, load_run


def cache_root() -> Path:
    """Directory holding converted imports."""
    base = os.environ.get("RUNLENS_CACHE_DIR")
    if base:
        return Path(base).expanduser() / "imports"
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return root / "runlens" / "imports"


def cache_key(
    path: Path, source_format: str, mapping: Mapping[str, str] | None, part: int | None = None
) -> str:
    """Hash identifying one import of one version of a log (``part``: which of the runs
    appended in one CSV file)."""
    h = hashlib.sha256()
    h.update(f"v{importers.IMPORTER_VERSION}\0{source_format}\0{path.resolve()}\0".encode())
    if part is not None:
        h.update(f"part{part}\0".encode())
    h.update(json.dumps(sorted((mapping or {}).items())).encode())
    for f in importers.inputs(path, source_format):
        st = f.stat()
        h.update(f"\0{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def open_run(
    path: str | os.PathLike[str],
    input_format: str | None = None,
    mapping: Mapping[str, str] | None = None,
) -> Run:
    """Open ``path`` for analysis: ONE run.

    ``input_format`` is one of ``auto`` (None), ``runlens``, ``tensorboard``, ``csv``,
    ``hf-trainer``; ``mapping`` overrides source-name → runlens-name mapping of imports
    (``{"eval/loss": "val/loss"}``). A path holding several runs (a folder of runs, a CSV
    with runs appended) raises a one-line :class:`RunLoadError` naming them: list them
    with :func:`runlens.discover.discover` and open each with :func:`open_found`.
    """
    return open_found(discover.single(path, input_format), mapping)


def open_found(
    found: discover.FoundRun, mapping: Mapping[str, str] | None = None, rank: int | None = None
) -> Run:
    """Open one run that :func:`runlens.discover.discover` found (``rank``: that rank's
    view of a distributed run instead of the merged one)."""
    if found.origin is not None:
        try:
            return _open_found(found, mapping, rank)
        except RunLoadError as exc:  # name the URL, not its local mirror
            raise RunLoadError(str(exc).replace(str(found.path), found.origin)) from None
    return _open_found(found, mapping, rank)


def _open_found(
    found: discover.FoundRun, mapping: Mapping[str, str] | None, rank: int | None = None
) -> Run:
    p, source_format = found.path, found.format
    if source_format == importers.RUNLENS:
        if mapping:
            raise RunLoadError("--map applies to imported logs, not to runlens run directories")
        run = load_run(p, rank=rank)
    else:
        if rank is not None:
            raise RunLoadError("--rank applies to runlens runs recorded by several ranks")
        run = load_run(imported_dir(p, source_format, mapping, found.part))
        run.source_format = source_format
    if found.origin is not None:
        run.origin = found.origin
    return run


def imported_dir(
    path: Path,
    source_format: str,
    mapping: Mapping[str, str] | None = None,
    part: int | None = None,
) -> Path:
    """The cache directory holding ``path`` converted; converts it if not cached yet."""
    root = cache_root()
    dest = root / cache_key(path, source_format, mapping, part)
    if (dest / "run.json").is_file():
        return dest
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    except OSError as exc:
        raise RunLoadError(f"cannot create the import cache in {root}: {exc.strerror}") from None
    try:
        log = importers.read(path, source_format, part)
        importers.write_run(log, path, tmp, mapping)
        try:
            tmp.rename(dest)  # atomic: readers see a complete import or none
        except OSError:
            if not (dest / "run.json").is_file():  # not a concurrent import of the same log
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
