"""Live runs: ``runlens watch`` and :func:`runlens.watch` (see docs/watch.md)."""

from __future__ import annotations

from runlens.live.watcher import Watcher, WatchEvent, WatchOptions, WatchStats, watch

__all__ = ["WatchEvent", "WatchOptions", "WatchStats", "Watcher", "watch"]
