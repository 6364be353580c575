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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

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
    file; it is asked only for CSV files not named metrics.csv (None: take none)."""
    entries = [f for f in files if not _hidden(f.rel)]
    by_rel = {f.rel: f for f in entries}

    runlens_roots = set()
    for f in entries:
        p = PurePosixPath(f.rel)
        if p.name == fmt.RUN_JSON:
            runlens_roots.add(_parent(f.rel))
        parts = p.parts
        for i in range(len(parts) - 2):
            if _SEGMENT.match("/".join(parts[i:])):
                runlens_roots.add("/".join(parts[:i]))
    found: dict[str, FoundRun] = {}
    for root in runlens_roots:
        if _under_any(root, runlens_roots - {root}):
            continue  # a run's own sub-folder (a nested copy) is part of it
        inputs = [
            f
            for f in entries
            if _within(f.rel, root)
            and (
                _rel_to(f.rel, root) in (fmt.RUN_JSON, fmt.EVENTS_JSONL)
                or _SEGMENT.match(_rel_to(f.rel, root))
            )
        ]
        found[root] = FoundRun(root, importers.RUNLENS, tuple(inputs))
    taken = set(found)

    hf_states: dict[str, list[FileEntry]] = {}
    for f in entries:
        if PurePosixPath(f.rel).name != importers.HF_STATE_FILE or _under_any(f.rel, taken):
            continue
        parent = _parent(f.rel)
        root = _parent(parent) if _CHECKPOINT.match(PurePosixPath(parent).name or "") else parent
        hf_states.setdefault(root, []).append(f)
    for root, states in hf_states.items():
        top = by_rel.get(_join(root, importers.HF_STATE_FILE))
        chosen = top or max(states, key=lambda e: _checkpoint_number(e.rel))
        found[root] = FoundRun(root, importers.HF_TRAINER, (chosen,))
    taken |= set(hf_states)

    tb_roots: set[str] = set()
    for f in entries:
        if "tfevents" not in PurePosixPath(f.rel).name or _under_any(f.rel, taken):
            continue
        parent = _parent(f.rel)
        name = PurePosixPath(parent).name.lower()
        tb_roots.add(_parent(parent) if parent and name in SPLIT_DIRS else parent)
    for root in tb_roots:
        events = tuple(
            f for f in entries if _within(f.rel, root) and "tfevents" in PurePosixPath(f.rel).name
        )
        found[root] = FoundRun(root, importers.TENSORBOARD, events)
    taken |= tb_roots

    for f in entries:
        name = PurePosixPath(f.rel).name
        if not name.lower().endswith(_CSV_SUFFIXES) or _under_any(f.rel, taken):
            continue
        if name == importers.LIGHTNING_CSV:
            found.setdefault(_parent(f.rel), FoundRun(_parent(f.rel), importers.CSV, (f,)))
        elif head is not None and _names_step_column(head, f.rel):
            found[f.rel] = FoundRun(f.rel, importers.CSV, (f,))
    return sorted(found.values(), key=lambda r: r.rel)


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


def _parent(rel: str) -> str:
    return rel.rsplit("/", 1)[0] if "/" in rel else ""


def _join(root: str, name: str) -> str:
    return f"{root}/{name}" if root else name


def _within(rel: str, root: str) -> bool:
    return root == "" or rel == root or rel.startswith(root + "/")


def _rel_to(rel: str, root: str) -> str:
    return rel[len(root) + 1 :] if root else rel


def _under_any(rel: str, roots: Iterable[str]) -> bool:
    return any(_within(rel, r) for r in roots)


def _checkpoint_number(rel: str) -> int:
    m = _CHECKPOINT.match(PurePosixPath(_parent(rel)).name)
    return int(m.group(1)) if m else -1
