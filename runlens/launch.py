"""Run an unmodified training command with the zero-code collector attached.

The parent side of ``runlens collect``: it never imports torch. It puts the bootstrap
directory of ``runlens_collect`` (a ``sitecustomize``) first on the child's PYTHONPATH,
sets the environment variables ``runlens_collect.autocollect`` reads, runs the command
with the terminal's file descriptors, forwards SIGINT/SIGTERM sent to this process, and
reports the runs the child recorded. See docs/collect.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runlens.errors import RunlensError

# Names shared with runlens_collect.autocollect (kept literal: that module imports torch).
ENV_DIR = "RUNLENS_COLLECT_DIR"
ENV_SETTINGS = "RUNLENS_COLLECT_SETTINGS"
ENV_MANIFEST = "RUNLENS_COLLECT_MANIFEST"
ENV_OWNER = "RUNLENS_COLLECT_OWNER"

_SI_KERNEL = 0x80  # Linux si_code of signals the kernel sends, e.g. Ctrl-C from the tty
_FORWARDED = (signal.SIGINT, signal.SIGTERM)


class LaunchError(RunlensError):
    """The command could not be started."""


@dataclass(frozen=True)
class RecordedRun:
    """One run the child recorded (one per optimizer)."""

    run_dir: str
    model: str
    optimizer: str
    status: str | None  # run.json status; None when run.json is missing
    last_step: int | None
    ranks: tuple[int, ...] = ()  # the ranks that recorded into it (torchrun: every rank)


@dataclass(frozen=True)
class CollectResult:
    """What ``run_collect`` observed.

    ``returncode`` is the child's exit status, or 128 + N when signal N killed it (the
    shell's convention).
    """

    returncode: int
    runs: tuple[RecordedRun, ...] = ()
    notes: tuple[str, ...] = field(default=())


def bootstrap_dir() -> str:
    """Directory holding the bootstrap ``sitecustomize.py`` (found without importing it)."""
    spec = importlib.util.find_spec("runlens_collect")
    if spec is None or not spec.submodule_search_locations:
        raise LaunchError("runlens_collect is not installed: pip install 'runlens[collect]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "_bootstrap"
    if not (path / "sitecustomize.py").is_file():
        raise LaunchError(f"runlens_collect bootstrap missing: {path}/sitecustomize.py")
    return str(path)


def default_run_name(command: Sequence[str]) -> str:
    """``train-20260102-153000`` for ``python train.py``; the module for ``python -m``."""
    stem = Path(command[0]).name if command else "run"
    args = list(command[1:])
    if re.fullmatch(r"python[0-9.]*", stem):
        stem = "run"
        while args:
            a = args.pop(0)
            if a == "-m" and args:
                stem = args[0].rsplit(".", 1)[-1]
                break
            if a in ("-c",):
                break
            if not a.startswith("-"):
                stem = Path(a).stem
                break
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def child_env(run_dir: Path, settings: Mapping[str, Any], manifest: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(ENV_OWNER, None)  # a nested `runlens collect` starts a fresh claim
    paths = [bootstrap_dir()]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env[ENV_DIR] = str(run_dir.resolve())
    env[ENV_SETTINGS] = json.dumps(dict(settings))
    env[ENV_MANIFEST] = manifest
    return env


def run_collect(
    command: Sequence[str], run_dir: str | os.PathLike[str], settings: Mapping[str, Any]
) -> CollectResult:
    """Run ``command`` with collection into ``run_dir``; wait for it; report the runs."""
    if not command:
        raise LaunchError("no command given: runlens collect -- python train.py")
    run_path = Path(run_dir)
    if run_path.exists() and any(run_path.iterdir()):
        raise LaunchError(f"run directory {run_path} exists and is not empty: choose --name")
    run_path.parent.mkdir(parents=True, exist_ok=True)
    fd, manifest = tempfile.mkstemp(prefix="runlens-collect-", suffix=".jsonl")
    os.close(fd)
    try:
        env = child_env(run_path, settings, manifest)
        code = _spawn_and_wait(list(command), env)
        entries = _read_manifest(manifest)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(manifest)
    runs, notes = [], []
    seen: dict[str, list[int]] = {}  # run_dir -> ranks (every rank of torchrun reports)
    for e in entries:
        if e.get("stood_down"):
            note = f"zero-code collection stood down: {e.get('reason')}"
            if note not in notes:
                notes.append(note)
            continue
        rank, first = e.get("rank"), str(e["run_dir"]) not in seen
        ranks = seen.setdefault(str(e["run_dir"]), [])
        if isinstance(rank, int):
            ranks.append(rank)
        if not first:
            continue
        meta = _read_json(Path(e["run_dir"]) / "run.json")
        runs.append(
            RecordedRun(
                run_dir=e["run_dir"],
                model=str(e.get("model")),
                optimizer=str(e.get("optimizer")),
                status=meta.get("status") if meta else None,
                last_step=meta.get("last_step") if meta else None,
            )
        )
    runs = [dataclasses.replace(r, ranks=tuple(sorted(seen.get(r.run_dir, ())))) for r in runs]
    return CollectResult(code, tuple(runs), tuple(notes))


def _spawn_and_wait(command: list[str], env: dict[str, str]) -> int:
    if not hasattr(signal, "sigtimedwait"):  # macOS: no siginfo, forward everything
        return _spawn_portable(command, env)
    waited = {*_FORWARDED, signal.SIGCHLD}
    # Blocked before the spawn so no signal is lost; the child gets the old mask back.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    try:
        try:
            pid = os.posix_spawnp(command[0], command, env, setsigmask=old_mask)
        except OSError as exc:
            raise LaunchError(f"cannot run {command[0]!r}: {exc.strerror or exc}") from None
        while True:
            info = signal.sigtimedwait(waited, 0.5)
            if info is not None and info.si_signo in _FORWARDED:
                # A Ctrl-C at the terminal already reached the child (same process group):
                # forward only signals sent to us by a process (kill, a job scheduler).
                if info.si_code != _SI_KERNEL:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, info.si_signo)
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return _shell_code(os.waitstatus_to_exitcode(status))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _spawn_portable(command: list[str], env: dict[str, str]) -> int:
    try:
        proc = subprocess.Popen(command, env=env)
    except OSError as exc:
        raise LaunchError(f"cannot run {command[0]!r}: {exc.strerror or exc}") from None
    previous = {s: signal.signal(s, lambda n, f: proc.send_signal(n)) for s in _FORWARDED}
    try:
        return _shell_code(proc.wait())
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _shell_code(code: int) -> int:
    return 128 - code if code < 0 else code


def _read_manifest(path: str) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(OSError), open(path, encoding="utf-8") as fh:
        for line in fh:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def describe(result: CollectResult) -> list[str]:
    """Lines for stderr: where each run is and how to analyze it."""
    lines = list(result.notes)
    if not result.runs and not result.notes:
        lines.append(
            "no run recorded: the command never stepped a torch optimizer in a Python "
            "process started with the bootstrap (see docs/collect.md)"
        )
    for r in result.runs:
        steps = "no steps" if r.last_step is None else f"{r.last_step + 1} steps"
        ranks = f"; ranks {','.join(map(str, r.ranks))}" if len(r.ranks) > 1 else ""
        lines.append(
            f"run recorded in {r.run_dir} ({r.model}, {r.optimizer}; {steps}; "
            f"status {r.status or 'unknown'}{ranks})"
        )
        lines.append(f"analyze it: runlens analyze {_quote(r.run_dir)}")
    return lines


def _quote(path: str) -> str:
    import shlex

    rel = os.path.relpath(path)
    return shlex.quote(rel if not rel.startswith("..") else path)
