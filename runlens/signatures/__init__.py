"""The signature registry: every signature runlens knows, in report order.

One module per signature; each is imported and listed here explicitly, so the set of
signatures is visible in one place and a name cannot silently disappear.
"""

from __future__ import annotations

from runlens.signatures.activation_explosion import ActivationExplosion
from runlens.signatures.bad_initial_loss import BadInitialLoss
from runlens.signatures.bad_initialization import BadInitialization
from runlens.signatures.base import Signature
from runlens.signatures.batch_collapse import BatchCollapse
from runlens.signatures.bf16_stagnation import Bf16Stagnation
from runlens.signatures.cannot_overfit_batch import CannotOverfitBatch
from runlens.signatures.dead_relu import DeadRelu
from runlens.signatures.duplicate_batches import DuplicateBatches
from runlens.signatures.exploding_gradients import ExplodingGradients
from runlens.signatures.frozen_layer import FrozenLayer
from runlens.signatures.gradient_not_reset import GradientNotReset
from runlens.signatures.input_bound import InputBound
from runlens.signatures.large_updates import LargeUpdates
from runlens.signatures.logits_as_probabilities import LogitsAsProbabilities
from runlens.signatures.loss_collapse_zero import LossCollapseZero
from runlens.signatures.loss_divergence import LossDivergence
from runlens.signatures.loss_flat import LossFlat
from runlens.signatures.loss_oscillation import LossOscillation
from runlens.signatures.loss_spike import LossSpike
from runlens.signatures.lr_range_test import LRRangeTest
from runlens.signatures.lr_too_high_warmup import LrTooHighWarmup
from runlens.signatures.nan_inf import NanInf
from runlens.signatures.noisy_loss import NoisyLoss
from runlens.signatures.not_learning import NotLearning
from runlens.signatures.optimizer_mismatch import OptimizerMismatch
from runlens.signatures.overfitting import Overfitting
from runlens.signatures.rank_imbalance import RankImbalance
from runlens.signatures.replica_desync import ReplicaDesync
from runlens.signatures.saturated_activations import SaturatedActivations
from runlens.signatures.stalled_optimizer import StalledOptimizer
from runlens.signatures.straggler_rank import StragglerRank
from runlens.signatures.tiny_updates import TinyUpdates
from runlens.signatures.train_eval_mode import TrainEvalMode
from runlens.signatures.underfitting import Underfitting
from runlens.signatures.val_below_train import ValBelowTrain
from runlens.signatures.val_spike import ValSpike
from runlens.signatures.vanishing_gradients import VanishingGradients

# Signatures read from loss and metric curves.
CURVE_SIGNATURES: tuple[type[Signature], ...] = (
    NanInf,
    LossDivergence,
    LrTooHighWarmup,
    LossOscillation,
    LossFlat,
    NotLearning,
    LossCollapseZero,
    LossSpike,
    ValSpike,
    NoisyLoss,
    BadInitialLoss,
    Overfitting,
    Underfitting,
    ValBelowTrain,
)

# Signatures read from per-layer statistics and timing.
LAYER_SIGNATURES: tuple[type[Signature], ...] = (
    ExplodingGradients,
    VanishingGradients,
    FrozenLayer,
    DeadRelu,
    SaturatedActivations,
    ActivationExplosion,
    TinyUpdates,
    LargeUpdates,
    LogitsAsProbabilities,
    InputBound,
)

# Mistakes in the training code itself, seen through the collector's probes and layer
# statistics (docs/silent-bugs.md): the root causes symptoms above are linked to.
BUG_SIGNATURES: tuple[type[Signature], ...] = (
    GradientNotReset,
    OptimizerMismatch,
    StalledOptimizer,
    DuplicateBatches,
    TrainEvalMode,
    BatchCollapse,
    Bf16Stagnation,
)

# Signatures that compare the ranks of a distributed run (docs/distributed.md): not
# applicable to one process; each is shown on a real torchrun job in
# tests/test_distributed.py (sample_runs/ holds single-process runs).
RANK_SIGNATURES: tuple[type[Signature], ...] = (
    ReplicaDesync,
    StragglerRank,
    RankImbalance,
)

# Signatures of sanity runs and initialization.
SANITY_SIGNATURES: tuple[type[Signature], ...] = (
    BadInitialization,
    CannotOverfitBatch,
    LRRangeTest,
)

REGISTRY: dict[str, type[Signature]] = {
    s.name: s
    for s in (
        *CURVE_SIGNATURES,
        *LAYER_SIGNATURES,
        *BUG_SIGNATURES,
        *RANK_SIGNATURES,
        *SANITY_SIGNATURES,
    )
}


def get(name: str) -> type[Signature]:
    from runlens.errors import OptionError

    try:
        return REGISTRY[name]
    except KeyError:
        raise OptionError(f"unknown signature {name!r} (see `runlens signatures`)") from None
