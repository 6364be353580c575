"""One step on the training thread: what it records (``StepFlags``), what it has recorded so
far (``StepParts``), and the seam for extra per-step statistics (``Probe``).

Everything a step contributes goes into one ``StepParts``: layer sections (device tensors
with their ``layout.Section``), device scalars, host scalars and scalars on another device.
``Collector._end_step`` closes the step (the step contract: timings, loss, metrics,
learning rates, the final parameter reads, probes) and hands the parts to the transfer as
one package. The object is reused from step to step; only the scalar lists handed to the
writer are new each step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from runlens_collect import format as fmt
from runlens_collect.layout import Section

if TYPE_CHECKING:
    import torch
    from torch import nn

    from runlens_collect.config import CollectorConfig


@dataclass(frozen=True, slots=True)
class StepFlags:
    """What a step records, from its index and the config's cadences."""

    stat: bool  # weight/grad/update statistics (``every``)
    out: bool  # model-output statistics (``activation_every``)
    act: bool  # activation statistics (``activation_every``, when the kind is on)
    hist: bool  # histograms on the kinds recorded (``hist_every``)
    full: bool = False  # a stat step that also records frozen parameters (``frozen_every``)

    @classmethod
    def for_step(cls, step: int, s: CollectorConfig, kinds: set[str]) -> StepFlags:
        """The flags of ``step`` at the config's fixed cadences."""
        stat = step % s.every == 0
        out = step % s.activation_every == 0
        full = stat and step % (s.every * s.frozen_every) == 0
        return cls.make(
            stat, out, out and fmt.KIND_ACTIVATION in kinds, step % s.hist_every == 0, full
        )

    @classmethod
    def make(cls, stat: bool, out: bool, act: bool, hist: bool, full: bool) -> StepFlags:
        key = (stat, out, act, hist, full)
        flags = _FLAGS.get(key)
        if flags is None:
            flags = _FLAGS[key] = cls(*key)  # 32 at most: none built per step
        return flags


_FLAGS: dict[tuple[bool, ...], StepFlags] = {}


Part = tuple[Section, "torch.Tensor", "np.ndarray | None"]
"""A section, its float64 device data (``section.size`` values) and its missing mask."""
HostScalars = list[tuple[int, str, float]]
DevScalars = list[tuple[int, str, "torch.Tensor"]]
ExternScalars = list[tuple[int, Any, Any]]
"""(step, name, tensor) read by the writer thread; (step, names, tensor) for a tensor of
one value per name (``StepParts.own_scalars``)."""


class NormOf:
    """The 2-norm of several one-value tensors (per-tensor 2-norms of the gradients): on a
    CPU run the writer thread combines them (``float()``), so the training thread runs
    one multi-tensor kernel for ``grad_norm``, not three; elsewhere
    ``StepParts.own_scalar`` combines them on the device (``tensor()``)."""

    __slots__ = ("parts",)

    def __init__(self, parts: Sequence[torch.Tensor]) -> None:
        self.parts = parts

    def tensor(self) -> torch.Tensor:
        """The norm as a 0-d float32 tensor (the ops of the device path)."""
        import torch

        return torch.linalg.vector_norm(torch.stack(list(self.parts)).float())

    def __float__(self) -> float:
        return float(self.tensor())


class StepParts:
    """What the current step has recorded so far (training thread only)."""

    def __init__(self) -> None:
        self.sections: dict[str, Part] = {}  # by section name; insertion order is packing order
        # Device scalars a later read replaces (on a CPU run grad_norm may be a NormOf).
        self.latest: dict[str, torch.Tensor | NormOf] = {}
        self.host: HostScalars = []
        self.dev: DevScalars = []
        self.extern: ExternScalars = []  # tensors on another device, or read as they are
        # Set by the collector when its device is the host (CPU): see own_scalar.
        self.host_device = False

    def put(self, section: Section, data: torch.Tensor, missing: np.ndarray | None = None) -> None:
        """Add (or replace: the last read of a step wins) a section's data."""
        self.sections[section.name] = (section, data, missing)

    def put_latest(self, name: str, value: torch.Tensor | NormOf) -> None:
        """A device scalar recorded once at the step's end, whatever replaced it before."""
        self.latest[name] = value

    def device_scalar(self, step: int, name: str, value: torch.Tensor) -> None:
        """A one-element float tensor on the collector's device (read by the writer)."""
        self.dev.append((step, name, value.reshape(1)))

    def own_scalar(self, step: int, name: str, value: torch.Tensor | NormOf) -> None:
        """A one-element tensor computed for this step that nothing changes afterwards
        (a probe's fresh reduction). On a CPU run the writer thread reads it as it is:
        no packing and no copy on the training thread. Elsewhere a ``device_scalar``.
        A ``NormOf`` (CPU runs only) is combined by the writer thread."""
        if type(value) is NormOf:
            if self.host_device:
                self.extern.append((step, name, value))
                return
            value = value.tensor()
        if self.host_device and value.device.type == "cpu":
            self.extern.append((step, name, value))
        else:
            self.dev.append((step, name, value.reshape(1)))

    def own_scalars(self, step: int, names: tuple[str, ...], values: torch.Tensor) -> None:
        """``own_scalar`` for a tensor of ``len(names)`` values, one per name (on a CPU run
        one entry the writer splits: no indexing on the training thread)."""
        if self.host_device and values.device.type == "cpu":
            self.extern.append((step, names, values))
        else:
            flat = values.reshape(-1)
            for i, name in enumerate(names):
                self.dev.append((step, name, flat[i : i + 1]))

    def host_scalar(self, step: int, name: str, value: float) -> None:
        self.host.append((step, name, float(value)))

    def has_scalars(self) -> bool:
        return bool(self.host or self.dev or self.extern)

    def clear(self) -> None:
        """Forget everything recorded (the step ended, or was dropped)."""
        self.sections.clear()
        self.latest.clear()
        self.host.clear()
        self.dev.clear()
        self.extern.clear()

    def take_scalars(self) -> tuple[HostScalars, DevScalars, ExternScalars]:
        """The scalar lists, handed over (the parts start new ones)."""
        out = self.host, self.dev, self.extern
        self.host, self.dev, self.extern = [], [], []
        return out


class Probe(Protocol):
    """A pluggable source of extra per-step statistics (the seam for issue 16's input
    fingerprints, train/eval mode flags, pre-accumulation gradient norms).

    Given to ``Collector(..., probes=[...])``. ``attach`` runs once at setup and returns
    the hook handles it registered (removed at close); hooks must be cheap, must not raise
    and must not sync with the device: keep tensors (or device reductions of them) and
    record them in ``end_step``, which the collector calls on every step after its own
    reads, under its failure guard (a probe that raises is switched off with the one
    warning). Record through ``parts``: ``device_scalar``/``put_latest`` (kept on the
    device, read by the writer), ``own_scalar`` (a fresh reduction of the probe's own:
    not even packed on a CPU run), ``host_scalar``, or ``put`` for a small section of an
    existing kind (``layout.Section``, built once).

    Optionally a probe has ``run_json() -> dict`` (its entry of run.json ``probes``) and a
    ``changed`` flag it sets when that entry has news; the collector then copies it at the
    end of the step. The built-in probes are in ``runlens_collect.probes``.
    """

    name: str

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Sequence[Any]:
        """Register hooks; return their handles."""
        ...

    def end_step(self, step: int, flags: StepFlags, parts: StepParts) -> None:
        """Record this step's values into ``parts``."""
        ...
