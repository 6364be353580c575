"""Linking findings that share a cause, so the report puts the root cause first.

``CAUSES`` lists, for a symptom, the signatures that explain it when both are present
(e.g. a NaN after exploding gradients: exploding-gradients is the root cause). The engine
marks the symptom ``explained_by`` its root cause and the root ``explains`` the symptom.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from runlens.findings import Finding

CAUSES: dict[str, tuple[str, ...]] = {
    # symptom: candidate root causes, most likely first
    "nan-inf": ("exploding-gradients", "activation-explosion", "large-updates", "loss-divergence"),
    "loss-divergence": ("exploding-gradients", "large-updates"),
    "loss-oscillation": ("large-updates",),
    "loss-spike": ("exploding-gradients",),
    "exploding-gradients": ("activation-explosion", "large-updates"),
    "vanishing-gradients": ("saturated-activations", "dead-relu"),
    "loss-flat": (
        "logits-as-probabilities",
        "frozen-layer",
        "vanishing-gradients",
        "dead-relu",
        "saturated-activations",
        "tiny-updates",
    ),
    "underfitting": ("logits-as-probabilities", "tiny-updates", "dead-relu", "frozen-layer"),
    "bad-initial-loss": ("logits-as-probabilities",),
    "activation-explosion": (),
}


def link_findings(findings: Sequence[Finding]) -> list[Finding]:
    present = {f.signature for f in findings}
    explained_by: dict[str, str] = {}
    for f in findings:
        for cause in CAUSES.get(f.signature, ()):
            if cause in present and cause != f.signature:
                explained_by[f.signature] = cause
                break

    # Follow chains to the deepest root (a -> b -> c gives a, b explained by c).
    def root(sig: str) -> str:
        seen = {sig}
        while sig in explained_by and explained_by[sig] not in seen:
            sig = explained_by[sig]
            seen.add(sig)
        return sig

    explains: dict[str, list[str]] = {}
    for sym in explained_by:
        explains.setdefault(root(sym), []).append(sym)
    out = []
    for f in findings:
        by = root(f.signature) if f.signature in explained_by else None
        out.append(
            replace(
                f,
                explained_by=by,
                explains=tuple(sorted(explains.get(f.signature, ()))) if by is None else (),
            )
        )
    return out
