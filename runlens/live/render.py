"""Rendering watch events: one terminal block or one JSON line each (pure functions)."""

from __future__ import annotations

import json
import time

from runlens.live.watcher import WatchEvent

_LABEL = {
    "finding": None,
    "stalled": "STALLED",
    "resumed": "resumed",
    "finished": "finished",
    "watching": "watching",
    "waiting": "waiting",
    "warning": "warning",
}


def jsonl(event: WatchEvent) -> str:
    """One line of JSON (``--format jsonl``; also what --exec and --webhook receive)."""
    return json.dumps(event.to_dict(), allow_nan=False) + "\n"


def terminal(event: WatchEvent) -> str:
    """A finding as a few lines (what, where, the evidence, the fix); other events as one."""
    clock = time.strftime("%H:%M:%S", time.localtime(event.time))
    step = f"step {event.step:,}" if event.step is not None else "step -"
    head = f"{clock}  {step:>12}  "
    f = event.finding
    if f is None:
        return f"{head}{_LABEL.get(event.kind) or event.kind:<8} {event.message}\n"
    where = []
    if f.steps is not None:
        where.append(f"steps {f.steps[0]:,}-{f.steps[1]:,}")
    if f.layers:
        more = f" +{len(f.layers) - 3}" if len(f.layers) > 3 else ""
        where.append("layers " + ", ".join(f.layers[:3]) + more)
    pad = " " * len(head)
    lines = [f"{head}{f.severity.upper():<8} {f.signature}: {f.summary}"]
    if where:
        lines.append(f"{pad}{'':<8} ({'; '.join(where)})")
    if f.evidence:
        lines.append(f"{pad}{'':<8} evidence: " + "; ".join(str(e) for e in f.evidence[:4]))
    if f.fix:
        lines.append(f"{pad}{'':<8} fix: {f.fix.splitlines()[0]}")
    return "\n".join(lines) + "\n"
