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
analyzes each found run; ``runlens compare`` compares them; ``runlens triage`` analyzes
and fingerprints them (``inputs=True``: the files each is read from); a caller that wants
exactly one run uses :func:`single`.

On object storage (``s3://bucket/runs/``) the same rules run on one recursive listing
(:mod:`runlens.listing`), then only the files each run is read from are mirrored locally
(never weights next to them, see :mod:`runlens.storage`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from runlens import importers, storage
from runlens.errors import RunLoadError
from runlens.listing import FileEntry, ListedPath, local_entry

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
    inputs: tuple[FileEntry, ...] = ()
    """The files the run is read from (paths relative to the searched folder or URL,
    sizes, versions): always for runs on object storage, locally with ``inputs=True``.
    Empty otherwise."""

    @property
    def location(self) -> str:
        """Where the run is, for people and tables: its URL or path, ``#k`` for the k-th
        run appended in one CSV file."""
        where = self.origin if self.origin is not None else str(self.path)
        return where if self.part is None else f"{where}#{self.part + 1}"


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


def discover(
    path: str | os.PathLike[str],
    input_format: str | None = None,
    inputs: bool = False,
    fetch: bool = True,
) -> Discovery:
    """Every run under ``path`` (see the module docstring). ``input_format`` (one of
    ``importers.FORMATS``; None detects) keeps only runs of that format, and forces it
    for a path that is a single file. Raises :class:`RunLoadError` (one line) when the
    path does not exist or holds nothing readable, saying what was looked for.
    ``inputs``: fill each run's :attr:`FoundRun.inputs` (always done for a URL). A URL
    (``s3://bucket/runs/``) is listed remotely and each run mirrored locally, unless
    ``fetch`` is False (then ``path`` is where the mirror would be; open the run through
    ``discover(run.origin)``)."""
    if storage.is_url(path):
        return _discover_url(os.fspath(path), input_format, fetch)
    root = Path(path)
    forced = importers.check_format(input_format)
    if not root.exists():
        raise RunLoadError(f"no such run directory or log: {root}")
    runs, notes = _find(root, forced)
    if inputs:
        runs = [replace(r, inputs=run_inputs(r, root)) for r in runs]
    return Discovery(root, tuple(runs), tuple(notes))


def _find(root: Path | ListedPath, forced: str | None) -> tuple[list[FoundRun], list[str]]:
    """The runs at ``root``: a local path, or a path in an object-storage listing (the
    same rules on both)."""
    notes: list[str] = []
    if root.is_file():
        fmt_name = forced or _file_format(root)
        return list(_file_runs(root, fmt_name, root.name, notes, given=True)), notes
    own = importers.dir_format(root)
    if own is not None and forced in (None, own):
        return list(_dir_runs(root, own, ".", notes)), notes
    runs = list(_walk(root, forced, notes))
    if not runs and forced is not None and _could_be(root, forced):
        # A forced format on a folder whose files lie deeper than a run's (TensorBoard
        # event files in arbitrary sub-directories): the importer reads it as one log.
        runs = [FoundRun(root, forced, REASONS[forced], ".")]
    if not runs:
        what = f"{forced} logs" if forced else LOOKED_FOR
        raise RunLoadError(f"{root}: no runs found: looked for {what} up to {MAX_DEPTH} "
                           "levels down")  # fmt: skip
    return runs, notes


def _file_format(f: Path | ListedPath) -> str:
    """The format of a file given as the path to analyze (a one-line error if none)."""
    if isinstance(f, Path):
        return importers.detect_format(f)
    found = importers.file_format(f)
    if found is None and f.suffix.lower() == ".json":
        return importers.HF_TRAINER  # as detect_format: the importer says if it is one
    if found is None:
        raise RunLoadError(f"cannot tell the format of {f} (use --input-format)")
    return found


def run_inputs(run: FoundRun, root: Path | None = None) -> tuple[FileEntry, ...]:
    """The files ``run`` is read from, as :class:`FileEntry` values relative to ``root``
    (the searched folder; the run's own path when None). A run found on object storage
    carries them already."""
    if run.inputs or run.origin is not None:
        return run.inputs
    base = root if root is not None else run.path
    out = []
    for f in _input_paths(run.path, run.format):
        assert isinstance(f, Path)
        try:
            rel = f.relative_to(base).as_posix()
        except ValueError:
            rel = f.as_posix()
        entry = local_entry(f, f.name if rel == "." else rel)
        if entry is not None:
            out.append(entry)
    return tuple(out)


def _input_paths(p: Path | ListedPath, fmt_name: str) -> list[Any]:
    """The files a run of ``fmt_name`` at ``p`` is read from: run.json, events.jsonl and
    the segments of a runlens run; what the importer reads otherwise (never weights)."""
    if fmt_name == importers.RUNLENS:
        from runlens_collect import format as fmt

        own = [p / fmt.RUN_JSON, p / fmt.EVENTS_JSONL]
        segments = [
            f
            for table in (fmt.SCALARS_DIR, fmt.LAYERS_DIR)
            for f in p.glob(f"{table}/rank=*/part-*.parquet")
        ]
        return [f for f in own if f.is_file()] + sorted(segments, key=str)
    try:
        return list(importers.inputs(p, fmt_name))
    except RunLoadError:  # nothing readable: the import will say so
        return []


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


def _discover_url(url: str, input_format: str | None, fetch: bool) -> Discovery:
    forced = importers.check_format(input_format)
    if any(c in url.split("://", 1)[1] for c in "*?["):  # a glob: s3://b/sweep/lr_*
        fs, _ = storage.filesystem(url)
        scheme = url.split("://", 1)[0]
        found = [discover(f"{scheme}://{m}", input_format, fetch=fetch) for m in fs.glob(url)]
        if not found:
            raise RunLoadError(f"{url}: no runs found: nothing matches")
        runs = tuple(r for d in found for r in d.runs)
        return Discovery(url, runs, tuple(n for d in found for n in d.notes))
    tree = storage.listing(url)
    listed, notes = _find(tree.root(), forced)
    inputs = {r.path: _listed_inputs(r) for r in listed}
    dest = storage.mirror_dir(url)
    if fetch:  # one mirror of every run's inputs (pruning what is no longer listed)
        wanted = {e.rel: e for files in inputs.values() for e in files}
        dest = storage.mirror(url, list(wanted.values()))
    runs = []
    for fr in listed:
        where = fr.path
        assert isinstance(where, ListedPath)
        local = dest / where.rel if where.rel else dest
        origin = where.url
        found = replace(fr, path=local, origin=origin, inputs=inputs[where])
        runs.append(replace(found, label=found.location))  # the URL, #k for a CSV's k-th run
    return Discovery(url, tuple(runs), tuple(notes))


def _listed_inputs(run: FoundRun) -> tuple[FileEntry, ...]:
    files = _input_paths(run.path, run.format)
    return tuple(f.entry for f in files if isinstance(f, ListedPath) and f.is_file())


def _local(f: Path | ListedPath) -> Path:
    """A local copy of ``f``: a listed object is fetched (into its mirror) first."""
    if isinstance(f, Path):
        return f
    try:
        return f.local()
    except OSError as exc:
        raise RunLoadError(f"cannot read {f}: {exc}") from None


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
        found = csv_importer.parts(_local(f))
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
