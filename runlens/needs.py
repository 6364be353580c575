"""What an analysis reads from a run's layers table, declared before reading it.

A signature lists its ``needs`` (see signatures.base): the step × layer matrices it reads
(:class:`LayerStat`) and, for nan-inf, the first non-finite rows (:data:`NONFINITE_ROWS`).
The engine takes the union over the signatures it runs (plus what the layer health table
and the graphical reports read, :data:`REPORT_NEEDS`) and the
:class:`~runlens.context.Context` reads all of it in one pass over the layers table
(runlens.layerscan). A signature that reads something it did not declare still gets it:
one more pass for that statistic, cached like the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from runlens_collect import format as fmt

Reduce = Literal["median", "max", "mean"]
REDUCTIONS: tuple[Reduce, ...] = ("median", "max", "mean")


@dataclass(frozen=True)
class LayerStat:
    """A step × layer matrix of one statistic of one kind of layers rows.

    ``reduce`` says how a window of steps becomes one row when the run has more recorded
    steps than the analysis keeps (runlens.layerscan): ``median`` (a robust level, the
    default: the median of the finite values, non-finite when most are), ``max`` (the
    largest finite value: one step with a gradient, a spike, survives; non-finite only
    when every value is) or ``mean`` (of the finite values: the share of steps a 0/1
    flag such as ``missing`` was set). Runs within the resolution are read exactly, every
    recorded step one row, whatever ``reduce`` says."""

    kind: str
    stat: str
    reduce: Reduce = "median"

    def __post_init__(self) -> None:
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {self.reduce!r}")


@dataclass(frozen=True)
class NonFiniteRows:
    """The first ``limit`` layers rows (by step, then as written) of a tensor that was
    present and had a non-finite statistic: ``frac_nonfinite > 0`` or a non-finite norm."""

    limit: int = 10_000


NONFINITE_ROWS = NonFiniteRows()

Need = LayerStat | NonFiniteRows


REPORT_NEEDS: tuple[Need, ...] = (
    # the layer health table (runlens.health) and compare's per-layer differences
    LayerStat(fmt.KIND_GRAD, "norm"),
    LayerStat(fmt.KIND_UPDATE, "update_ratio"),
    LayerStat(fmt.KIND_ACTIVATION, "frac_dead_units"),
    LayerStat(fmt.KIND_ACTIVATION, "frac_saturated"),
    # the parameter names in model order (Run.layer_names)
    LayerStat(fmt.KIND_WEIGHT, "norm"),
)
"""Read by every analysis whatever signatures run: the layer health table, the
parameter order and the heatmaps of the graphical reports."""
