"""Find the runs under a path: one run, or a folder of several.

``discover(path) -> Discovery`` lists every run a path holds, in a stable order, each as
a :class:`FoundRun` (where it is, its format, why it counts as a run). A path may be:

* one run: a runlens run directory, a TensorBoard log directory (event files in it, or in
  its ``train/`` / ``validation/`` sub-directories as Keras writes them), a Lightning
  ``version_N`` folder (``metrics.csv``), a Hugging Face Trainer output or checkpoint
  folder (``trainer_state.json``), or one log file;
* one CSV file holding several runs appended to each other (``csv.parts``): one
  :class:`FoundRun` per part, and a note saying where each starts;
* a folder of runs: TensorBoard's ``runs/`` (one sub-directory per run, as the HF
  Trainer writes ``runs/<date>_<host>/``), Lightning's ``lightning_logs/`` (``version_N``),
  a folder of runlens run directories, a folder of CSV logs... Sub-directories are
  searched up to ``MAX_DEPTH`` levels down; a directory that is a run is not searched
  further (its sub-directories belong to it).

Nothing is read beyond what deciding needs (directory listings, a CSV's lines). The CLI
analyzes each found run; ``runlens compare`` compares them; a caller that wants exactly
one run uses :func:`single`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

from runlens import importers, storage
from runlens.errors import RunLoadError

MAX_DEPTH: Final = 4
"""Directory levels searched below the given folder."""
MAX_DIRS: Final = 20000
"""Directories visited at most (a home directory given by mistake stays quick)."""
_SKIP_DIRS: Final = frozenset({"__pycache__", "node_modules", ".git", ".venv", "venv",
                               "site-packages", ".ipynb_checkpoints", "wandb"})  # fmt: skip

LOOKED_FOR: Final = (
    "runlens run directories (run.json), TensorBoard event files (*tfevents*), "
    "trainer_state.json, Lightning metrics.csv and CSV logs (*.csv, *.tsv, training.log)"
)

REASONS: Final = {
    importers.RUNLENS: "runlens run directory",
    importers.TENSORBOARD: "TensorBoard event files",
    importers.CSV: "CSV metrics",
    importers.HF_TRAINER: "Hugging Face trainer_state.json",
}


@dataclass(frozen=True)
class FoundRun:
    """One run found under a path."""

    path: Path
    """The file or directory to open (as given, or below the given folder)."""
    format: str
    """``runlens``, ``tensorboard``, ``csv`` or ``hf-trainer``."""
    reason: str
    """Why it counts as a run, for people: ``TensorBoard event files``, ``metrics.csv``..."""
    label: str
    """Short unique name: the path relative to the searched folder (``.`` for the folder
    itself), with ``#k`` for the k-th run appended in one CSV file."""
    part: int | None = None
    """Index of the run among those appended in one CSV file; None: the whole file."""
    lines: tuple[int, int] | None = None
    """First and last data line of that part (1-based, inclusive)."""
    origin: str | None = None
    """The URL the run was read from when it lives on object storage (``path`` is then
    its local mirror, see :mod:`runlens.storage`)."""


@dataclass(frozen=True)
class Discovery:
    """What :func:`discover` found under ``root``."""

    root: Path | str
    """The path given (a URL string for object storage)."""
    runs: tuple[FoundRun, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)
    """Things a person should know: ``history.csv: 3 runs appended in one file: lines
    2–41, 43–82, 84–120 (header repeated at line 42; ...)``, search limits hit."""

    @property
    def single(self) -> bool:
        return len(self.runs) == 1

    def describe(self, limit: int = 8) -> str:
        """``a, b, c (and 4 more)``: the labels, for one-line messages."""
        labels = [r.label for r in self.runs]
        more = f" (and {len(labels) - limit} more)" if len(labels) > limit else ""
        return ", ".join(labels[:limit]) + more


def discover(path: str | os.PathLike[str], input_format: str | None = None) -> Discovery:
    """Every run under ``path`` (see the module docstring). ``input_format`` (one of
    ``importers.FORMATS``; None detects) keeps only runs of that format, and forces it
    for a path that is a single file. Raises :class:`RunLoadError` (one line) when the
    path does not exist or holds nothing readable, saying what was looked for. A URL
    (``s3://bucket/runs/``) is listed remotely, each run mirrored locally and found there."""
    if storage.is_url(path):
        return _discover_url(os.fspath(path), input_format)
    root = Path(path)
    forced = importers.check_format(input_format)
    if not root.exists():
        raise RunLoadError(f"no such run directory or log: {root}")
    notes: list[str] = []
    if root.is_file():
        fmt_name = forced or importers.detect_format(root)
        runs = list(_file_runs(root, fmt_name, root.name, notes, given=True))
        return Discovery(root, tuple(runs), tuple(notes))
    own = importers.dir_format(root)
    if own is not None and forced in (None, own):
        return Discovery(root, tuple(_dir_runs(root, own, ".", notes)), tuple(notes))
    runs = list(_walk(root, forced, notes))
    if not runs and forced is not None and _could_be(root, forced):
        # A forced format on a folder whose files lie deeper than a run's (TensorBoard
        # event files in arbitrary sub-directories): the importer reads it as one log.
        runs = [FoundRun(root, forced, REASONS[forced], ".")]
    if not runs:
        what = f"{forced} logs" if forced else LOOKED_FOR
        raise RunLoadError(f"{root}: no runs found: looked for {what} up to {MAX_DEPTH} "
                           "levels down")  # fmt: skip
    return Discovery(root, tuple(runs), tuple(notes))


def single(path: str | os.PathLike[str], input_format: str | None = None) -> FoundRun:
    """The one run at ``path``; a one-line RunLoadError naming the runs when it holds
    several (analyze them one at a time: ``runlens analyze`` on the folder does)."""
    d = discover(path, input_format)
    if d.single:
        return d.runs[0]
    raise RunLoadError(several_message(d))


def several_message(d: Discovery) -> str:
    return (
        f"{d.root} holds {len(d.runs)} runs ({d.describe()}): analyze them one at a time "
        f"(`runlens analyze {d.root}` reports each, `runlens compare {d.root}` compares them)"
    )


# -- internals -------------------------------------------------------------------------------


def _discover_url(url: str, input_format: str | None) -> Discovery:
    runs: list[FoundRun] = []
    notes: list[str] = []
    for run_url in storage.expand_url(url):
        d = discover(storage.localize(run_url), input_format)
        notes += d.notes
        for fr in d.runs:
            origin = run_url if fr.label == "." else storage.join(run_url, fr.label)
            runs.append(replace(fr, label=origin, origin=origin))
    if not runs:
        raise RunLoadError(f"{url}: no runs found: looked for {LOOKED_FOR}")
    return Discovery(url, tuple(runs), tuple(notes))


def _could_be(p: Path, fmt_name: str) -> bool:
    """Whether a directory holds files of ``fmt_name`` anywhere below (for forced formats)."""
    if fmt_name == importers.TENSORBOARD:
        return any(p.rglob("*tfevents*"))
    if fmt_name == importers.HF_TRAINER:
        return any(p.rglob(importers.HF_STATE_FILE))
    if fmt_name == importers.CSV:
        return (p / importers.LIGHTNING_CSV).is_file()
    return importers.is_runlens_dir(p)


def _dir_runs(p: Path, fmt_name: str, label: str, notes: list[str]) -> Iterator[FoundRun]:
    if fmt_name == importers.CSV and (p / importers.LIGHTNING_CSV).is_file():
        yield from _csv_parts(p, p / importers.LIGHTNING_CSV, label, notes, "Lightning metrics.csv")
        return
    yield FoundRun(p, fmt_name, REASONS[fmt_name], label)


def _file_runs(
    f: Path, fmt_name: str, label: str, notes: list[str], given: bool = False
) -> Iterator[FoundRun]:
    if fmt_name == importers.CSV:
        yield from _csv_parts(f, f, label, notes, "CSV metrics", given)
        return
    yield FoundRun(f, fmt_name, REASONS[fmt_name], label)


def _csv_parts(
    p: Path, f: Path, label: str, notes: list[str], reason: str, given: bool = True
) -> Iterator[FoundRun]:
    from runlens.importers import csv as csv_importer

    try:
        found = csv_importer.parts(f)
    except RunLoadError:
        if given:  # the user named this log: let the import say what is wrong with it
            yield FoundRun(p, importers.CSV, reason, label)
        else:
            notes.append(f"{label}: skipped, not a metrics CSV")
        return
    if len(found) == 1:
        yield FoundRun(p, importers.CSV, reason, label)
        return
    notes.append(
        f"{label}: {len(found)} runs appended in one file: {csv_importer.describe_parts(found)}"
    )
    for part in found:
        yield FoundRun(
            p,
            importers.CSV,
            f"{reason}, run {part.index + 1} of {len(found)} appended in one file",
            f"{label}#{part.index + 1}",
            part=part.index,
            lines=(part.first_line, part.last_line),
        )


def _walk(root: Path, forced: str | None, notes: list[str]) -> Iterator[FoundRun]:
    """Runs below ``root`` (not ``root`` itself), breadth of each folder in sorted order:
    the folder's own log files first, then its sub-directories (depth first)."""
    budget = [MAX_DIRS]

    def visit(d: Path, depth: int) -> Iterator[FoundRun]:
        budget[0] -= 1
        if budget[0] < 0:
            return
        try:
            entries = sorted(d.iterdir(), key=lambda e: e.name)
        except OSError:
            return
        for f in entries:
            if not f.is_file() or f.name.startswith("."):
                continue
            kind = importers.file_format(f)
            if kind is None or kind == importers.TENSORBOARD:
                continue  # event files make their directory a run (dir_format)
            if forced is not None and kind != forced:
                continue
            yield from _file_runs(f, kind, _label(root, f), notes)
        for sub in entries:
            if not sub.is_dir() or sub.name.startswith(".") or sub.name in _SKIP_DIRS:
                continue
            kind = importers.dir_format(sub)
            if kind is not None:
                if forced is None or kind == forced:
                    yield from _dir_runs(sub, kind, _label(root, sub), notes)
                continue
            if depth < MAX_DEPTH:
                yield from visit(sub, depth + 1)

    yield from visit(root, 1)
    if budget[0] < 0:
        notes.append(f"stopped searching after {MAX_DIRS} directories under {root}")


def _label(root: Path, p: Path) -> str:
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return str(p)
