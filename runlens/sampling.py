"""What the collector sampled, for the report's header: the ``layer sampling`` line.

Read from run.json's ``collector.sampling`` (the cadences in effect over the run, adapted
to the ``overhead`` budget) and ``collector.memory`` (the update's rotating subsets under
the ``memory_budget``, frozen parameters recorded on full steps); see
``runlens_collect.format.COLLECTOR_KEYS``. Runs written before these keys existed, and
imported logs, have no such line.
"""

from __future__ import annotations

from typing import Any

SAMPLING_FACT = "layer sampling"
"""The header fact's label (a key of RunSummary.extras)."""


def _span(v: Any) -> str | None:
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return str(v[0]) if v[0] == v[1] else f"{v[0]}–{v[1]}"
    return None


def _mib(n: Any) -> str:
    return f"{n / 2**20:.3g} MiB" if isinstance(n, int | float) else "?"


def sampling_text(meta: dict[str, Any]) -> str | None:
    """One line: the cadences used, why, and what the memory budget left out; None when
    run.json does not say."""
    col = meta.get("collector")
    if not isinstance(col, dict):
        return None
    samp, mem = col.get("sampling"), col.get("memory")
    out: list[str] = []
    if isinstance(samp, dict):
        every, act, hist = (_span(samp.get(k)) for k in ("every", "activation_every", "hist_every"))
        text = (
            f"layer statistics every {every} step(s), activations every {act}, "
            f"histograms every {hist}"
        )
        target = samp.get("overhead_target")
        if samp.get("adaptive") and isinstance(target, int | float):
            changes = samp.get("changes")
            text += f" (adapted {changes}× to keep the collector within {target:.0%} of the step"
            measured = samp.get("measured_overhead")
            if isinstance(measured, int | float):
                text += f" time; measured {measured:.1%})"
            else:
                text += " time)"
        else:
            text += " (fixed)"
        out.append(text)
    if isinstance(mem, dict):
        k = mem.get("update_subsets")
        if isinstance(k, int) and k > 1:
            text = (
                f"updates in {k} rotating subsets (each parameter every {k} stat steps; "
                f"{_mib(mem.get('budget_bytes'))} memory budget)"
            )
            cut = mem.get("update_cut_tensors")
            if isinstance(cut, list) and cut:
                text += f", {len(cut)} tensor(s) larger than the snapshot updated by row slices"
            out.append(text)
        frozen = mem.get("frozen_bytes")
        if isinstance(frozen, int) and frozen > 0 and isinstance(samp, dict):
            out.append(f"frozen parameters every {_span(samp.get('frozen_every'))} steps")
    return "; ".join(out) if out else None
