"""A listing of files, local or on object storage, seen through the bit of pathlib's API
the discovery rules use.

:mod:`runlens.discover` decides what is a run with ``importers.dir_format`` /
``file_format`` / ``inputs`` and its own walk, all written against ``pathlib.Path``. On
object storage there is no directory to ``iterdir``: one recursive listing is taken
(:func:`runlens.storage.listing`) and :class:`ListedPath` answers ``is_dir``, ``iterdir``,
``glob``, ``open`` ... from it, so the very same rules find the same runs in a bucket as
in a folder. ``open`` reads the object (only CSV headers are read while deciding).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any


@dataclass(frozen=True)
class FileEntry:
    """One file of a listing: path relative to the listed root (posix), size, and a
    version that changes when the content does (mtime_ns locally, the ETag on object
    storage), plus its modification time in UNIX seconds when known."""

    rel: str
    size: int
    version: str
    mtime: float | None = None


def local_entry(path: Path, rel: str) -> FileEntry | None:
    """The :class:`FileEntry` of a local file (None when it vanished)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileEntry(rel, st.st_size, str(st.st_mtime_ns), st.st_mtime)


class Tree:
    """The files under one root (a URL), indexed by folder."""

    def __init__(
        self,
        url: str,
        entries: list[FileEntry],
        opener: Callable[[str], IO[bytes]],
        root_is_file: bool = False,
        fetch: Callable[[FileEntry], Path] | None = None,
    ) -> None:
        """``opener(rel)`` opens a file for reading; ``fetch(entry)`` brings it to a local
        path (a file read whole, such as a CSV split into its appended runs)."""
        self.url = url.rstrip("/")
        self.fetch = fetch
        self.files = {e.rel: e for e in entries if not _hidden(e.rel)}
        self.opener = opener
        self.root_is_file = root_is_file
        self.children: dict[str, set[str]] = {"": set()}
        for rel in self.files:
            parts = rel.split("/")
            for i in range(len(parts)):
                parent = "/".join(parts[:i])
                self.children.setdefault(parent, set()).add(parts[i])
                if i < len(parts) - 1:
                    self.children.setdefault("/".join(parts[: i + 1]), set())

    def root(self) -> ListedPath:
        if self.root_is_file:
            (rel,) = self.files
            return ListedPath(self, rel)
        return ListedPath(self, "")


def _hidden(rel: str) -> bool:
    """Hidden folders and ``.tmp-`` files (a segment being written) are never looked at."""
    parts = rel.split("/")
    return any(p.startswith(".") for p in parts[:-1]) or parts[-1].startswith(".tmp-")


class ListedPath:
    """A path in a :class:`Tree`: the subset of ``pathlib.Path`` that the discovery rules
    and the importers' ``inputs`` use. ``rel`` is relative to the tree's root."""

    def __init__(self, tree: Tree, rel: str) -> None:
        self.tree = tree
        self.rel = rel

    # -- names --------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.rel.rsplit("/", 1)[-1] if self.rel else self.tree.url.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def parent(self) -> ListedPath:
        return ListedPath(self.tree, self.rel.rsplit("/", 1)[0] if "/" in self.rel else "")

    def __truediv__(self, other: str) -> ListedPath:
        return ListedPath(self.tree, f"{self.rel}/{other}" if self.rel else other)

    def relative_to(self, other: ListedPath) -> PurePosixPath:
        if other.rel and not self.rel.startswith(other.rel + "/") and self.rel != other.rel:
            raise ValueError(f"{self} is not under {other}")
        return PurePosixPath(self.rel[len(other.rel) :].lstrip("/") if other.rel else self.rel)

    def as_posix(self) -> str:
        return self.rel or "."

    @property
    def url(self) -> str:
        """The object's URL."""
        if self.tree.root_is_file:
            return self.tree.url
        return f"{self.tree.url}/{self.rel}" if self.rel else self.tree.url

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ListedPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ListedPath) and (self.tree, self.rel) == (other.tree, other.rel)

    def __lt__(self, other: ListedPath) -> bool:  # sorted(), as for Path
        return self.rel < other.rel

    def __hash__(self) -> int:
        return hash((id(self.tree), self.rel))

    # -- what is there ------------------------------------------------------------------
    def is_file(self) -> bool:
        return self.rel in self.tree.files

    def is_dir(self) -> bool:
        return self.rel in self.tree.children

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    @property
    def entry(self) -> FileEntry:
        return self.tree.files[self.rel]

    def iterdir(self) -> Iterator[ListedPath]:
        for name in sorted(self.tree.children.get(self.rel, ())):
            yield self / name

    def glob(self, pattern: str) -> Iterator[ListedPath]:
        """Paths below matching ``pattern`` component by component (``*``, ``?``, ``[]``)."""
        depth = pattern.count("/") + 1
        parts = pattern.split("/")
        for p in self._below():
            rest = p.rel[len(self.rel) :].lstrip("/") if self.rel else p.rel
            names = rest.split("/")
            if len(names) == depth and all(
                fnmatch.fnmatchcase(n, q) for n, q in zip(names, parts, strict=True)
            ):
                yield p

    def rglob(self, pattern: str) -> Iterator[ListedPath]:
        """Paths anywhere below whose name matches ``pattern``."""
        for p in self._below():
            if fnmatch.fnmatchcase(p.name, pattern):
                yield p

    def _below(self) -> Iterator[ListedPath]:
        prefix = f"{self.rel}/" if self.rel else ""
        names = set(self.tree.files) | set(self.tree.children)
        for rel in sorted(names):
            if rel and rel.startswith(prefix) and rel != self.rel:
                yield ListedPath(self.tree, rel)

    def open(self, mode: str = "rb") -> IO[bytes]:
        if mode != "rb":
            raise ValueError("a listed object is opened for binary reading only")
        return self.tree.opener(self.rel)

    def local(self) -> Path:
        """A local copy of the file (fetched by the tree)."""
        if self.tree.fetch is None:
            raise OSError(f"{self}: no local copy available")
        return self.tree.fetch(self.entry)

    def read_bytes(self) -> bytes:
        with self.open() as fh:
            data: Any = fh.read()
        return bytes(data)
