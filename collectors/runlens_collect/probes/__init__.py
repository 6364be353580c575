"""Probes: small extra per-step statistics that let the analyzer see bugs in the training
code, not only their symptoms (docs/silent-bugs.md).

Each probe plugs into the collector through ``step.Probe`` (hooks at ``attach``, values
recorded at ``end_step``) and writes scalars under ``format.PROBE_PREFIX`` plus a small
``run.json`` entry under ``probes``:

* ``InputProbe`` (``inputs``): a fingerprint of each training batch (sum, sum of squares,
  an order-free projection) computed on the device in the root module's forward pre-hook,
  and batch sizes from the input's shape (host-known): duplicate batches, collapsed
  batches, outlier batches behind loss spikes;
* ``ModeProbe`` (``modes``): counts of root forwards by (grad enabled, training flag),
  modules whose training flag disagrees with the root's, evaluation before any training
  forward: evaluation in training mode and the reverse;
* ``GradCarryProbe`` (``grad``): tensor hooks on a few parameters that see the gradient
  already present when the first gradient of an optimizer step arrives: gradients never
  reset (a missing or misplaced ``zero_grad``), told apart from accumulation;
* ``OptimizerProbe`` (``optimizer``): at setup and when the param groups change, which
  parameters the optimizer holds against those the model trains.

``default_probes()`` is what ``Collector`` uses unless given ``probes=``; ``probes=()``
turns them off.
"""

from __future__ import annotations

from runlens_collect.probes.grad_carry import GradCarryProbe
from runlens_collect.probes.inputs import InputProbe
from runlens_collect.probes.modes import ModeProbe
from runlens_collect.probes.optimizer import OptimizerProbe
from runlens_collect.step import Probe

__all__ = ["GradCarryProbe", "InputProbe", "ModeProbe", "OptimizerProbe", "default_probes"]


def default_probes() -> list[Probe]:
    """A fresh instance of every probe (probes hold per-run state: never share them)."""
    return [InputProbe(), ModeProbe(), GradCarryProbe(), OptimizerProbe()]
