"""Linking findings that share a cause, so the report puts the root cause first.

``CAUSES`` lists, for a symptom, the signatures that explain it when both are present
(e.g. a NaN after exploding gradients: exploding-gradients is the root cause). The engine
marks the symptom ``explained_by`` its root cause and the root ``explains`` the symptom;
:func:`rank_findings` then orders the report so each root cause comes right before the
findings it explains.

A cause only explains a symptom it does not start after: when both findings have step
ranges, the cause must begin no later than the symptom ends (a NaN at step 50 is not
explained by large updates first seen at step 300).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from runlens.findings import SEVERITY_ORDER, Finding
from runlens.signatures import REGISTRY

CAUSES: dict[str, tuple[str, ...]] = {
    # symptom: candidate root causes, most likely first. Bugs in the training code
    # (category "bug", docs/silent-bugs.md) come first: when one fires, the symptom is its
    # consequence, and the symptom's own fix (often "lower the LR") is the wrong one.
    "nan-inf": (
        "gradient-not-reset",
        "exploding-gradients",
        "activation-explosion",
        "large-updates",
        "loss-divergence",
    ),
    "loss-divergence": ("gradient-not-reset", "exploding-gradients", "large-updates"),
    # A diverged loss swings, jumps and is noisy: those are its symptoms, not extra faults.
    "loss-oscillation": ("gradient-not-reset", "large-updates", "loss-divergence"),
    "loss-spike": ("gradient-not-reset", "exploding-gradients", "large-updates", "loss-divergence"),
    # One example per step is as noisy as batch size 1.
    "noisy-loss": ("batch-collapse", "gradient-not-reset", "loss-divergence"),
    # Growing activations make growing gradients; a too-high LR makes both.
    "exploding-gradients": (
        "gradient-not-reset",
        "activation-explosion",
        "large-updates",
        "bad-initialization",
    ),
    # Saturated sigmoids and dead ReLUs have ~0 derivative: the backward pass dies there.
    "vanishing-gradients": ("saturated-activations", "dead-relu", "bad-initialization"),
    # Too-large steps push pre-activations out to the flat parts (Lu et al. 2019 for ReLU).
    "dead-relu": ("gradient-not-reset", "large-updates"),
    "saturated-activations": ("gradient-not-reset", "activation-explosion", "large-updates"),
    # Gradients of ~1e-9 make updates of ~1e-10: tiny (or below float precision, frozen).
    # Updates that round away in bf16, or an LR of 0, are tiny too.
    "tiny-updates": ("stalled-optimizer", "bf16-stagnation", "vanishing-gradients"),
    # A layer behind a fully dead ReLU layer gets exactly zero gradient.
    "frozen-layer": ("optimizer-mismatch", "dead-relu", "vanishing-gradients"),
    # A loss that never moves leaves the accuracy where it started.
    "not-learning": (
        "loss-flat",
        "optimizer-mismatch",
        "stalled-optimizer",
        "logits-as-probabilities",
        "frozen-layer",
        "vanishing-gradients",
        "dead-relu",
        "tiny-updates",
    ),
    "loss-flat": (
        "optimizer-mismatch",
        "stalled-optimizer",
        "bf16-stagnation",
        "logits-as-probabilities",
        "frozen-layer",
        "vanishing-gradients",
        "dead-relu",
        "saturated-activations",
        "tiny-updates",
    ),
    # An optimizer past its stability edge also keeps the loss high.
    "underfitting": (
        "optimizer-mismatch",
        "stalled-optimizer",
        "bf16-stagnation",
        "gradient-not-reset",
        "logits-as-probabilities",
        "tiny-updates",
        "dead-relu",
        "frozen-layer",
        "loss-oscillation",
        "large-updates",
    ),
    # Repeated batches are fewer distinct examples; dropout off in eval-mode training.
    "overfitting": ("duplicate-batches", "train-eval-mode"),
    # Logits of ~1e4 from activations growing layer by layer give a huge first loss.
    # A badly scaled init gives logits far from 0 at step 0: bad-initialization's layer
    # data explains bad-initial-loss's number. An evaluation before any training forward
    # (spectral norm never iterated) gives an absurd first validation loss.
    "bad-initial-loss": (
        "train-eval-mode",
        "bad-initialization",
        "activation-explosion",
        "logits-as-probabilities",
    ),
    "activation-explosion": ("gradient-not-reset", "bad-initialization"),
    "large-updates": ("gradient-not-reset",),
    # Parameters outside every optimizer are never zeroed either.
    "gradient-not-reset": ("optimizer-mismatch",),
}

BUG_CAUSES: frozenset[str] = frozenset(n for n, s in REGISTRY.items() if s.category == "bug")
"""Root causes that are bugs in the training code (the signatures of category ``bug``): a
symptom they explain gets a fix that points at the bug (see :func:`link_findings`)."""


def _compatible(cause: Finding, symptom: Finding) -> bool:
    if cause.steps is None or symptom.steps is None:
        return True
    return cause.steps[0] <= symptom.steps[1]


def link_findings(findings: Sequence[Finding]) -> list[Finding]:
    """Set ``explained_by`` / ``explains`` from :data:`CAUSES` (chains followed to the
    deepest root). Findings are returned in their input order."""
    by_sig = {f.signature: f for f in findings}
    explained_by: dict[str, str] = {}
    for f in findings:
        for cause in CAUSES.get(f.signature, ()):
            c = by_sig.get(cause)
            if c is not None and cause != f.signature and _compatible(c, f):
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
        r = root(sym)
        if r != sym:
            explains.setdefault(r, []).append(sym)
    out = []
    for f in findings:
        r = root(f.signature) if f.signature in explained_by else None
        by = r if r is not None and r != f.signature else None
        fix = f.fix
        if by in BUG_CAUSES:
            # "Lower the LR" would hide a bug: point at it instead.
            fix = (
                f"Probably a consequence of {by}: fix that first ({by_sig[by].fix.rstrip('.')})"
                ". Do not tune the learning rate or the model for this symptom until then."
            )
        out.append(
            replace(
                f,
                fix=fix,
                explained_by=by,
                explains=tuple(sorted(explains.get(f.signature, ()))) if by is None else (),
            )
        )
    return out


def rank_findings(findings: Sequence[Finding]) -> list[Finding]:
    """Report order: groups (a root cause and what it explains) by their worst severity,
    then confidence; inside a group the root first, then its symptoms by severity.

    So an ``error`` NaN explained by a ``warning`` exploding-gradients finding sorts as an
    error group whose first line is the exploding gradients."""
    groups: dict[str, list[Finding]] = {}
    for f in findings:
        groups.setdefault(f.explained_by or f.signature, []).append(f)

    def member_key(f: Finding) -> tuple[object, ...]:
        return (f.explained_by is not None, SEVERITY_ORDER[f.severity], -f.confidence, f.signature)

    def group_key(members: list[Finding]) -> tuple[object, ...]:
        head = members[0]
        return (
            min(SEVERITY_ORDER[m.severity] for m in members),
            -head.confidence,
            head.steps[0] if head.steps else 0,
            head.signature,
        )

    ordered = [sorted(ms, key=member_key) for ms in groups.values()]
    ordered.sort(key=group_key)
    return [f for ms in ordered for f in ms]
