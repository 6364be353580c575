"""Per-layer differences between runs: tail levels apart by a factor, layer sets."""

from __future__ import annotations

import math
from collections.abc import Sequence

from runlens.compare.loading import LAYER_STATS, Loaded
from runlens.compare.model import CompareOptions, LayerDiff, LayerSetDiff


def layer_differences(
    base_label: str,
    base: Loaded,
    labels: Sequence[str],
    others: Sequence[Loaded],
    opts: CompareOptions,
) -> tuple[list[LayerDiff], list[LayerSetDiff]]:
    diffs: list[LayerDiff] = []
    sets: list[LayerSetDiff] = []
    base_layers = _recorded_layers(base)
    for label, x in zip(labels, others, strict=True):
        layers = _recorded_layers(x)
        only_run = tuple(n for n in layers if n not in base_layers)
        only_base = tuple(n for n in base_layers if n not in layers)
        if only_run or only_base:
            sets.append(LayerSetDiff(base_label, label, only_run, only_base))
        for stat in LAYER_STATS:
            bt, rt = base.layer_tails[stat], x.layer_tails[stat]
            for layer in bt:
                if layer not in rt:
                    continue
                d = _layer_diff(layer, stat, base_label, label, bt[layer], rt[layer], opts)
                if d is not None:
                    diffs.append(d)
    return diffs, sets


def _recorded_layers(x: Loaded) -> list[str]:
    out: list[str] = []
    for tails in x.layer_tails.values():
        out.extend(n for n in tails if n not in out)
    return out


def _layer_diff(
    layer: str, stat: str, bl: str, rl: str, bv: float, rv: float, opts: CompareOptions
) -> LayerDiff | None:
    fb, fr = math.isfinite(bv), math.isfinite(rv)
    if not fb and not fr:
        return None
    if fb != fr:
        return LayerDiff(layer, stat, bl, rl, bv if fb else None, rv if fr else None, None)
    if bv <= 0 and rv <= 0:
        return None
    ratio = rv / bv if bv > 0 else math.inf
    if ratio >= opts.layer_ratio or ratio <= 1.0 / opts.layer_ratio:
        return LayerDiff(layer, stat, bl, rl, bv, rv, ratio)
    return None
