"""Finding the runs in a tree of files, from a listing alone (local disk or object storage).

The rules (docs/triage.md) work on relative paths, sizes and versions, so the same code
serves a local folder (``os.walk`` + ``stat``) and a bucket prefix (one recursive listing):

* a folder with ``run.json`` or ``scalars/rank=*/part-*.parquet`` / ``layers/...`` is a
  runlens run; its inputs are ``run.json``, ``events.jsonl`` and the segments;
* a folder with ``trainer_state.json`` (or ``checkpoint-N/trainer_state.json``) is a
  Hugging Face run; its input is the file the importer reads (the top one, else the
  latest checkpoint's), never the weights;
* a folder holding TensorBoard event files (``*tfevents*``) is a TensorBoard run, or its
  parent when the folder is a split (``train``, ``validation``, ...); its inputs are the
  event files below it, as the importer reads them;
* ``metrics.csv`` (Lightning's CSVLogger) makes its folder a CSV run; another ``*.csv`` /
  ``*.tsv`` file is a CSV run when its header names a step or epoch column.

Files inside a run are never runs of their own; hidden folders and ``.tmp-`` files (a
segment being written) are ignored. This module is small on purpose: the lead may merge
it with the general run discovery (runlens/discover.py) later.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from runlens_collect import format as fmt

from runlens import importers

SPLIT_DIRS = frozenset({"train", "training", "val", "valid", "validation", "eval", "test"})
"""Sub-folders of one TensorBoard run (Keras and others write one per split)."""
_SEGMENT = re.compile(r"^(scalars|layers)/rank=[^/]+/part-[^/]+\.parquet$")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_CSV_SUFFIXES = (".csv", ".tsv")


@dataclass(frozen=True)
class FileEntry:
    """One file of a listing: path relative to the listed root (posix), size, and a
    version that changes when the content does (mtime_ns locally, the ETag on object
    storage), plus its modification time in UNIX seconds when known."""

    rel: str
    size: int
    version: str
    mtime: float | None = None


@dataclass(frozen=True)
class FoundRun:
    """A run found in a listing: its root relative to the listed root ('' = the root
    itself; for a single-file log, the file), its format and the files it is read from."""

    rel: str
    source_format: str
    inputs: tuple[FileEntry, ...]

    def fingerprint(self) -> str:
        """Hash of the inputs' relative paths, sizes and versions: unchanged files,
        unchanged fingerprint."""
        h = hashlib.sha256(self.source_format.encode())
        for f in sorted(self.inputs, key=lambda e: e.rel):
            h.update(f"\0{f.rel}\0{f.size}\0{f.version}".encode())
        return h.hexdigest()[:24]

    @property
    def mtime(self) -> float | None:
        """Latest modification time of the inputs (UNIX seconds), if known."""
        times = [f.mtime for f in self.inputs if f.mtime is not None]
        return max(times) if times else None


def list_local(root: Path, exclude: Iterable[Path] = ()) -> list[FileEntry]:
    """Every file under ``root`` (not following links), hidden folders skipped."""
    excluded = {os.path.realpath(p) for p in exclude}
    out: list[FileEntry] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and os.path.realpath(os.path.join(dirpath, d)) not in excluded
        )
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            if name.startswith(".tmp-"):
                continue
            try:
                st = os.stat(os.path.join(dirpath, name))
            except OSError:  # vanished between listing and stat
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")
            out.append(FileEntry(rel, st.st_size, str(st.st_mtime_ns), st.st_mtime))
    return out


def find_runs(
    files: Iterable[FileEntry], head: Callable[[str], bytes] | None = None
) -> list[FoundRun]:
    """The runs in a listing, sorted by path. ``head(rel)`` returns the first bytes of a
    file; it is asked only for CSV files not named metrics.csv (None: take none).
    Linear in the listing (times the folder depth)."""
    entries = [f for f in files if not _hidden(f.rel)]
    by_rel = {f.rel: f for f in entries}

    candidates: set[str] = set()
    for f in entries:
        if _name(f.rel) == fmt.RUN_JSON:
            candidates.add(_parent(f.rel))
        parts = f.rel.rsplit("/", 3)
        if len(parts) >= 3 and _SEGMENT.match("/".join(parts[-3:])):
            candidates.add(parts[0] if len(parts) == 4 else "")
    # A run's own sub-folder (a nested copy) is part of it: keep the outermost roots.
    runlens_roots = {r for r in candidates if _owner(r, candidates, strict=True) is None}
    inputs: dict[str, list[FileEntry]] = {r: [] for r in runlens_roots}
    rest = []
    for f in entries:
        root = _owner(f.rel, runlens_roots)
        if root is None:
            rest.append(f)
        elif _rel_to(f.rel, root) in (fmt.RUN_JSON, fmt.EVENTS_JSONL) or _SEGMENT.match(
            _rel_to(f.rel, root)
        ):
            inputs[root].append(f)
    found = {r: FoundRun(r, importers.RUNLENS, tuple(v)) for r, v in inputs.items()}

    hf_states: dict[str, list[FileEntry]] = {}
    for f in rest:
        if _name(f.rel) != importers.HF_STATE_FILE:
            continue
        parent = _parent(f.rel)
        root = _parent(parent) if _CHECKPOINT.match(_name(parent)) else parent
        hf_states.setdefault(root, []).append(f)
    for root, states in hf_states.items():
        top = by_rel.get(_join(root, importers.HF_STATE_FILE))
        chosen = top or max(states, key=lambda e: _checkpoint_number(e.rel))
        found[root] = FoundRun(root, importers.HF_TRAINER, (chosen,))
    rest = [f for f in rest if _owner(f.rel, hf_states.keys()) is None]

    tb: dict[str, list[FileEntry]] = {}
    events = [f for f in rest if "tfevents" in _name(f.rel)]
    for f in events:
        parent = _parent(f.rel)
        name = _name(parent).lower()
        tb.setdefault(_parent(parent) if parent and name in SPLIT_DIRS else parent, [])
    for f in events:  # every event file below a root, as the importer reads them
        root = _owner(f.rel, tb.keys(), outermost=False)
        if root is not None:
            tb[root].append(f)
    for root, files_ in tb.items():
        found[root] = FoundRun(root, importers.TENSORBOARD, tuple(files_))
    rest = [f for f in rest if _owner(f.rel, tb.keys()) is None]

    for f in rest:
        name = _name(f.rel)
        if not name.lower().endswith(_CSV_SUFFIXES):
            continue
        if name == importers.LIGHTNING_CSV:
            found.setdefault(_parent(f.rel), FoundRun(_parent(f.rel), importers.CSV, (f,)))
        elif head is not None and _names_step_column(head, f.rel):
            found[f.rel] = FoundRun(f.rel, importers.CSV, (f,))
    return sorted(found.values(), key=lambda r: r.rel)


def _ancestors(rel: str) -> list[str]:
    """Folders containing ``rel``, outermost first ('' = the listed root)."""
    parts = rel.split("/")
    return ["", *("/".join(parts[:i]) for i in range(1, len(parts)))]


def _owner(
    rel: str, roots: Collection[str], strict: bool = False, outermost: bool = True
) -> str | None:
    """The root in ``roots`` that ``rel`` lies in (``rel`` itself counts unless
    ``strict``): the outermost one, or the innermost."""
    chain = _ancestors(rel) if rel else []
    if not strict:
        chain.append(rel)
    for a in chain if outermost else reversed(chain):
        if a in roots:
            return a
    return None


def _names_step_column(head: Callable[[str], bytes], rel: str) -> bool:
    """True when the first line of a CSV names a column the CSV importer reads as the step."""
    from runlens.importers.csv import EPOCH_COLUMNS, STEP_COLUMNS

    try:
        first = head(rel).splitlines()[0].decode("utf-8", "replace")
    except (OSError, IndexError):
        return False
    sep = "\t" if rel.lower().endswith(".tsv") else ","
    return any(
        c.strip().strip('"').lower() in (*STEP_COLUMNS, *EPOCH_COLUMNS) for c in first.split(sep)
    )


def local_head(root: Path, n: int = 4096) -> Callable[[str], bytes]:
    def head(rel: str) -> bytes:
        with open(root / rel, "rb") as fh:
            return fh.read(n)

    return head


def _hidden(rel: str) -> bool:
    parts = rel.split("/")
    return any(p.startswith(".") for p in parts[:-1]) or parts[-1].startswith(".tmp-")


def _name(rel: str) -> str:
    return rel.rsplit("/", 1)[-1]


def _parent(rel: str) -> str:
    return rel.rsplit("/", 1)[0] if "/" in rel else ""


def _join(root: str, name: str) -> str:
    return f"{root}/{name}" if root else name


def _rel_to(rel: str, root: str) -> str:
    return rel[len(root) + 1 :] if root else rel


def _checkpoint_number(rel: str) -> int:
    m = _CHECKPOINT.match(_name(_parent(rel)))
    return int(m.group(1)) if m else -1
