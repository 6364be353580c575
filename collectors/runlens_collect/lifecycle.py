"""Ending a run when the process is told to stop: SIGTERM (a scheduler's preemption,
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
import signal
import threading
import weakref
from typing import Any

SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)

_collectors: weakref.WeakSet[Any] = weakref.WeakSet()
_previous: dict[int, Any] = {}
_active: set[int] = set()  # signals being handled (a chain that leads back here stops)


def _handler(signum: int, frame: Any) -> None:
    if signum in _active:
        return
    _active.add(signum)
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
        _active.discard(signum)


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
