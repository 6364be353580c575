"""Ending a run: ``Shutdown`` (a mixin of ``Collector``: flush, stop the writer, write the
final run.json; at exit, and on a signal), and the signal handler.

The process may be told to stop: SIGTERM (a scheduler's preemption,
``kill``) and SIGINT (Ctrl-C) flush every live collector and close its run as
``preempted``, then the signal goes on to the handler that was installed before
(Python's KeyboardInterrupt, a framework's handler), or kills the process as it would
have without us.

One process-wide handler per signal serves every collector. It is installed from the main
thread only (Python delivers signals there), never over a handler that ignores the signal,
and removed when the last collector closes, unless something else was installed over it
since (that handler chains to ours, which then just passes the signal on).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runlens_collect import _active, compact, observe
from runlens_collect import format as fmt

if TYPE_CHECKING:
    from runlens_collect.step import StepParts
    from runlens_collect.writer import Writer

SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)

_collectors: weakref.WeakSet[Any] = weakref.WeakSet()
_previous: dict[int, Any] = {}
_handling: set[int] = set()  # signals being handled (a chain that leads back here stops)


def _handler(signum: int, frame: Any) -> None:
    if signum in _handling:
        return
    _handling.add(signum)
    # Read first: closing the last collector restores (and forgets) the previous handler.
    prev = _previous.get(signum, signal.SIG_DFL)
    try:
        _close_all(signum)
        if callable(prev):
            prev(signum, frame)  # e.g. signal.default_int_handler raises KeyboardInterrupt
        elif prev == signal.SIG_DFL:
            # Die of the signal as the script would have (status 128 + N for the parent).
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
    finally:
        _handling.discard(signum)


def _close_all(signum: int) -> None:
    for col in list(_collectors):
        with contextlib.suppress(Exception):
            col._on_signal(signum)


def register(collector: Any) -> bool:
    """Close ``collector`` as preempted on SIGTERM/SIGINT. False when handlers cannot be
    installed (not the main thread); the collector then relies on atexit."""
    if threading.current_thread() is not threading.main_thread():
        return False
    _collectors.add(collector)
    for sig in SIGNALS:
        try:
            if sig in _previous:
                continue  # ours is installed (perhaps under a handler that chains to it)
            current = signal.getsignal(sig)
            if current is signal.SIG_IGN or current is None:
                continue  # ignored, or installed outside Python: leave it alone
            _previous[sig] = current
            signal.signal(sig, _handler)
        except (ValueError, OSError):
            continue
    return True


def unregister(collector: Any) -> None:
    """Forget ``collector``; restore the previous handlers after the last one."""
    _collectors.discard(collector)
    if _collectors or threading.current_thread() is not threading.main_thread():
        return
    for sig, prev in list(_previous.items()):
        with contextlib.suppress(ValueError, OSError, TypeError):
            if signal.getsignal(sig) is _handler:
                signal.signal(sig, prev)
                del _previous[sig]


class Shutdown:
    """Closing a ``Collector`` (which sets every attribute annotated here)."""

    run_dir: Path
    meta: dict[str, Any]
    settings: Any  # config.CollectorConfig
    rank: int
    _closed: bool
    _enabled: bool
    _step: int
    _first_step: int
    _handles: list[Any]
    _parts: StepParts
    _writer: Writer | None
    _is_meta_writer: bool

    def _report(
        self, site: str, message: str, exc: BaseException | None, event: bool = True
    ) -> None: ...

    def _emit(self, step: int, wall: float, timing: Any = None) -> None: ...

    def _on_signal(self, signum: int) -> None:
        """SIGTERM/SIGINT (lifecycle): flush, close as preempted."""
        if self._closed:
            return
        if self._writer is not None:
            self._writer.event("signal", signal=int(signum), step=self._step)
        self._closed = True
        try:
            self._shutdown(fmt.STATUS_PREEMPTED, timeout=20.0, pending=False)
        except Exception as exc:
            self._report("close", "closing after a signal failed", exc, event=False)

    # -- shutdown -----------------------------------------------------------------------

    def _on_flush(self, last_step: int) -> None:
        # Runs on the writer thread, before the writer's rolling compaction of this flush.
        if self._is_meta_writer:
            self.meta["last_step"] = last_step
            fmt.write_json_atomic(self.meta, self.run_dir / fmt.RUN_JSON)

    def _remove_hooks(self) -> None:
        arm = getattr(self, "_arm", None)
        if arm is not None:
            with contextlib.suppress(Exception):
                arm(None)  # the forward hooks armed for this step
        # Last registered first: stacked call wrappers (compiled.CompiledCallHook) unwind.
        for h in reversed([*self._handles, *getattr(self, "_opt_handles", ())]):
            with contextlib.suppress(Exception):
                h.remove()
        self._handles = []
        self._opt_handles = []

    def _shutdown(self, status: str | None, timeout: float = 60.0, pending: bool = True) -> None:
        self._remove_hooks()
        unregister(self)
        observer = getattr(self, "_observer", None)
        if observer is not None:
            observe.remove_listener(observer)
        if _active.get_active() is self:
            _active.set_active(None)
        writer = self._writer
        if writer is None:
            return
        if pending and self._parts.has_scalars():
            # log() after the last step: ship it in a final package (scalars only).
            self._parts.sections.clear()
            self._parts.latest.clear()
            self._emit(max(self._first_step, self._step - 1), time.time())
        if status is not None:
            writer.event("close", last_step=self._step - 1 if self._step else None, status=status)
        with contextlib.suppress(queue.Full):
            writer.queue.put(None, timeout=timeout)
        writer.join(timeout)
        if writer.is_alive():
            self._report("writer", "writer did not finish in time; the last rows may be lost", None)
        if status is not None and self._is_meta_writer:
            control = getattr(self, "_control", None)
            if control is not None:
                self.meta["collector"]["sampling"] = control.summary()
            self.meta["status"] = status
            self.meta["end_time"] = time.time()
            if writer.last_step is not None:
                self.meta["last_step"] = writer.last_step
            try:
                fmt.write_json_atomic(self.meta, self.run_dir / fmt.RUN_JSON)
            except Exception as exc:
                self._report("close", "writing run.json failed", exc, event=False)
        if status is not None and self.settings.compact and not writer.is_alive():
            try:  # complete on disk: merging this writer's own segments is safe at any point
                compact.compact_run(self.run_dir, ranks=[self.rank], first=writer.first_seq)
            except Exception as exc:
                self._report("close", "compacting segments failed", exc, event=False)
        self._enabled = False


def flush_at_exit(ref: weakref.ref[Any]) -> None:
    # A collector never closed: write what is buffered, leave the status 'running'.
    col = ref()
    if col is not None and not col._closed:
        col._closed = True
        with contextlib.suppress(Exception):
            col._shutdown(None, timeout=10.0)
