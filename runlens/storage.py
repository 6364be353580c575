"""Object storage (``s3://``, ``gs://``, ... any fsspec URL): list runs, mirror them locally.

A run on object storage is read by mirroring the files it is read from (never model
weights or other files next to it: :func:`runlens.discover.discover` decides which, by the
same rules as for a local folder, from one listing) into a local cache
folder, then loading that folder with the ordinary local code. So the readers (run.py,
the importers) keep their local fast path unchanged, every format works the same from a
bucket, and re-reading a run downloads only what changed: the mirror keeps each file's
size and ETag (or generation / mtime) and fetches a file again only when those differ.
Segments never change once written, so ``runlens watch`` polling a bucket downloads each
new segment once and a second ``runlens triage`` of an unchanged bucket downloads nothing.

Credentials come from the standard environment of each backend (for S3: ``AWS_*``
variables, ``~/.aws``, instance roles; ``AWS_ENDPOINT_URL`` for S3-compatible servers).
The backends are optional: ``pip install 'runlens[s3]'`` (s3fs), ``gcsfs`` for ``gs://``.

The mirror lives in ``$RUNLENS_CACHE_DIR/remote`` (default ``~/.cache/runlens/remote``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from runlens.errors import RunLoadError
from runlens.listing import FileEntry, Tree

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")
_STATE = ".runlens-mirror.json"
_HEAD_BYTES = 4096


def is_url(path: str | os.PathLike[str]) -> bool:
    """True for a URL of a remote filesystem (``s3://b/k``); local paths and ``file://``
    are not."""
    m = _SCHEME.match(os.fspath(path))
    return m is not None and m.group(1).lower() != "file"


def join(url: str, rel: str) -> str:
    return url.rstrip("/") + "/" + rel if rel else url.rstrip("/")


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for ``url``; a one-line error when the backend
    is not installed."""
    scheme = url.split("://", 1)[0]
    try:
        import fsspec
    except ImportError:
        raise RunLoadError(_missing(scheme, "fsspec")) from None
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise RunLoadError(_missing(scheme, exc.name or "its fsspec backend")) from None
    except ValueError as exc:  # unknown protocol
        raise RunLoadError(f"cannot read {url}: {exc}") from None
    return fs, path.rstrip("/")


def _missing(scheme: str, package: str) -> str:
    extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(scheme)
    how = f"pip install 'runlens[{extra}]'" if extra else f"install the fsspec backend for {scheme}"
    return f"reading {scheme}:// URLs needs {package}: {how}"


def list_files(url: str) -> list[FileEntry]:
    """Every file under ``url`` (relative paths, sizes, versions), listed afresh (no
    cached listing: a poller must see new files). A URL naming one file lists that file
    under its own name. Raises RunLoadError when nothing is there."""
    fs, root = filesystem(url)
    with contextlib.suppress(Exception):
        fs.invalidate_cache()
    try:
        infos = fs.find(root, detail=True, withdirs=False)
    except FileNotFoundError:
        infos = {}
    except OSError as exc:
        raise RunLoadError(f"cannot list {url}: {exc}") from None
    out = []
    for path, info in infos.items():
        path = path.rstrip("/")
        if info.get("type") == "directory":
            continue
        if path == root:  # the URL is a file
            rel = root.rsplit("/", 1)[-1]
        elif path.startswith(root + "/"):
            rel = path[len(root) + 1 :]
        else:
            continue
        out.append(FileEntry(rel, int(info.get("size") or 0), _version(info), _mtime(info)))
    if not out:
        raise RunLoadError(f"no such run directory or log: {url}")
    return out


def _version(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "updated"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return ""


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("LastModified", "mtime", "updated", "last_modified"):
        v = info.get(key)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
        if isinstance(v, (int, float)):
            return float(v)
        with contextlib.suppress(ValueError):
            from datetime import datetime

            return datetime.fromisoformat(str(v).replace("Z", "+00:00")).timestamp()
    return None


def listing(url: str) -> Tree:
    """The files under ``url`` as a :class:`runlens.listing.Tree` (one recursive listing;
    ``open`` reads an object): what :mod:`runlens.discover` walks on object storage."""
    fs, root = filesystem(url)
    files = list_files(url)
    is_file = len(files) == 1 and _is_file(fs, root)

    def opener(rel: str) -> Any:
        return fs.open(root if is_file else f"{root}/{rel}", "rb")

    def fetch(entry: FileEntry) -> Path:
        return mirror(url, [entry], prune=False) / entry.rel

    return Tree(url, files, opener, is_file, fetch)


def _is_file(fs: Any, root: str) -> bool:
    try:
        return bool(fs.isfile(root))
    except OSError:
        return False


def mirror_root() -> Path:
    from runlens.sources import cache_root

    return cache_root().parent / "remote"


def mirror_dir(url: str) -> Path:
    """Local folder mirroring ``url`` (stable: the same URL, the same folder)."""
    key = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url.rstrip("/").rsplit("/", 1)[-1]) or "root"
    return mirror_root() / key / name


def mirror(url: str, files: list[FileEntry], prune: bool = True) -> Path:
    """Bring ``files`` (relative to ``url``) into the local mirror of ``url``; download
    only those whose size or version changed; delete mirrored files no longer listed
    (unless not ``prune``: a file fetched on its own, such as a CSV read while deciding).
    Returns the mirror folder. Each file is written under a temporary name and renamed,
    so a reader of the mirror never sees half a file."""
    dest = mirror_dir(url)
    dest.mkdir(parents=True, exist_ok=True)
    state_path = dest / _STATE
    try:
        state: dict[str, list[Any]] = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    fs, root = filesystem(url)
    single = len(files) == 1 and files[0].rel == root.rsplit("/", 1)[-1] and _is_file(fs, root)
    wanted = {f.rel for f in files}
    for rel in list(state) if prune else ():
        if rel not in wanted:
            with contextlib.suppress(OSError):
                (dest / rel).unlink()
            state.pop(rel)
    for f in files:
        local = dest / f.rel
        if state.get(f.rel) == [f.size, f.version] and local.is_file():
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=local.parent)
        try:
            with os.fdopen(fd, "wb") as out, fs.open(root if single else f"{root}/{f.rel}") as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            if f.mtime is not None:  # keep the object's time (imports date runs by it)
                os.utime(tmp, (f.mtime, f.mtime))
            os.replace(tmp, local)
        except FileNotFoundError:  # deleted since the listing: drop it
            _unlink(tmp)
            state.pop(f.rel, None)
            continue
        except BaseException:
            _unlink(tmp)
            raise
        state[f.rel] = [f.size, f.version]
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(state, fh)
    os.replace(tmp, state_path)
    return dest


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
