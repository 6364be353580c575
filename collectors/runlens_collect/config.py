"""What the Collector records and how often: its knobs, validated, and their JSON form."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from runlens_collect import format as fmt

DEFAULT_EXCLUDE: tuple[type[nn.Module], ...] = (
    nn.modules.dropout._DropoutNd,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
)
"""Modules never recorded by default: their output equals their input."""


MIN_MEMORY_BUDGET = 4 << 10
"""Smallest memory_budget accepted (tests force the update rotation on tiny models)."""


@dataclass(frozen=True)
class CollectorConfig:
    """What the Collector records and how often. The cadences below are the densest it
    records; the ``overhead`` budget (3% of the step time by default) thins them when the
    collector's measured time does not fit, and ``memory_budget`` bounds its device memory
    whatever the model's size. Measured whole-run costs and memory: docs/benchmarks.md
    (``benchmarks/collector_overhead.py``, ``benchmarks/collector_memory.py --models``).

    Attributes:
        kinds: which layer statistics to record, a subset of format.KINDS. ``update`` needs
            an optimizer (it is measured across ``optimizer.step()``).
        every: weight/grad/update statistics every N steps (1 = every step). Scalars
            (loss, lr, grad_norm, timings) are recorded every step regardless.
        activation_every: activation and model-output statistics every N steps (forward
            hooks return at once on other steps). The output is an activation (the root
            module's), often the largest tensor of a step (logits), and the analyzer uses
            it for level checks only: every step would cost ~1% here for nothing.
        hist_every: fixed-bin histograms every N steps (on steps that record the kind).
        frozen_every: frozen parameters (``requires_grad=False``) get their weight rows, and
            missing gradient/update rows, every N stat steps (and at step 0): they do not
            change, and a frozen base can be most of a model (LoRA).
        memory_budget: bytes of device memory the collector may hold (buffers and
            temporaries; the host ring is ``max_queue_bytes``). None: the larger of 64 MiB
            and 1/64 of the trainable parameters' bytes (budget.default_budget). When the
            update snapshot of all trainable parameters does not fit half of it, updates
            are recorded for a rotating subset per stat step (run.json
            ``collector.memory.update_subsets``).
        overhead: the share of the step time the collector may spend on the training
            thread (default 0.03): it measures its own time and thins what it records (the
            stat, activation, histogram and frozen cadences, each at most
            ``overhead.MAX_SCALE`` times its knob) to stay within it; loss, learning rates,
            grad_norm and timings are recorded every step regardless. None: the cadences
            above, fixed. Changes are ``cadence`` events; run.json ``collector.sampling``
            sums them up.
        modules: which modules get activation rows: None = every leaf module; else a
            sequence of module types and/or regular expressions matched (re.search) against
            the module path; a module matching any entry is included, leaf or not.
        exclude_modules: module types / path regexes never recorded (default: dropout,
            Identity, Flatten, Unflatten: their output equals their input).
        flush_steps: write a Parquet segment at least every N steps ...
        flush_seconds: ... and at least every N seconds (what a crash can lose).
        max_queue: steps in flight between training thread and writer (host buffers in the
            ring), at most; the writer decodes everything queued at each wake-up, so a
            writer briefly slower than training catches up instead of dropping.
        max_queue_bytes: ... and at most this many bytes of host buffers in the ring
            (whichever bound is hit first). When no buffer is free and another would exceed
            the budget, the step's statistics are dropped (training never blocks and memory
            never grows without limit); the drop is counted, warned once and written as a
            ``skipped`` event.
        name: run name (default: the run directory's name).
        rank: override the rank (default: torch.distributed rank, else 0).
        compact: on ``close()``, merge this rank's small segments into few large ones
            (runlens_collect.compact: crash-safe, the old segments stay readable until the
            merged one is in place), so the run reads fast however often it flushed.
        rolling: with ``compact``, the writer thread also merges this rank's segments
            while the run records (after each flush, ``ROLL_FANOUT`` = 4 consecutive
            segments of one tier into one of the tier above: each row is rewritten
            O(log n) times), so a live or crashed run of n flushes has at most about
            3 x log4(n) segments per table (15 for 300 flushes). False: one segment per
            flush until ``close()``.
    """

    kinds: tuple[str, ...] = fmt.KINDS
    every: int = 1
    activation_every: int = 10
    hist_every: int = 50
    frozen_every: int = 100
    memory_budget: int | None = None
    overhead: float | None = 0.03
    modules: Sequence[type[nn.Module] | str] | None = None
    exclude_modules: Sequence[type[nn.Module] | str] = DEFAULT_EXCLUDE
    flush_steps: int = 500
    flush_seconds: float = 30.0
    max_queue: int = 64
    max_queue_bytes: int = 64 * 2**20
    name: str | None = None
    rank: int | None = None
    compact: bool = True
    rolling: bool = True

    def validate(self) -> None:
        unknown = set(self.kinds) - set(fmt.KINDS)
        if unknown:
            raise ValueError(f"unknown kinds {sorted(unknown)}; choose from {fmt.KINDS}")
        for knob in (
            "every",
            "activation_every",
            "hist_every",
            "frozen_every",
            "flush_steps",
            "max_queue",
            "max_queue_bytes",
        ):
            if int(getattr(self, knob)) < 1:
                raise ValueError(f"{knob} must be >= 1")
        if self.flush_seconds <= 0:
            raise ValueError("flush_seconds must be > 0")
        if self.memory_budget is not None and int(self.memory_budget) < MIN_MEMORY_BUDGET:
            raise ValueError(f"memory_budget must be >= {MIN_MEMORY_BUDGET} bytes (or None)")
        if self.overhead is not None and not 0 < float(self.overhead) < 1:
            raise ValueError("overhead must be a fraction of the step time in (0, 1), or None")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)

        def spec(items: Iterable[Any] | None) -> list[str] | None:
            if items is None:
                return None
            return [i.__name__ if isinstance(i, type) else str(i) for i in items]

        d["modules"] = spec(self.modules)
        d["exclude_modules"] = spec(self.exclude_modules)
        d["kinds"] = list(self.kinds)
        return d
