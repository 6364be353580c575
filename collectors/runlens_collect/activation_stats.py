"""Activation statistics: which modules are recorded, and the statistics of their outputs
and of the model's output, as sections (one tensor each, SINGLE values).

Temporaries (signs, histogram codes, saturation masks) go through the workspace's spare
buffer, in blocks of rows when a tensor is larger than it (``stream.single_stats``), so
the memory they take is bounded by the collector's budget, not by the largest tensor."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from runlens_collect import format as fmt
from runlens_collect.budget import Workspace
from runlens_collect.config import CollectorConfig
from runlens_collect.layout import MAX_CACHED, Section
from runlens_collect.step import StepFlags, StepParts
from runlens_collect.stream import dead_fraction, saturated_fraction, single_stats

__all__ = ["ActivationStats", "dead_fraction", "first_tensor"]

# Activations whose output is zero for "dead" units, and bounded activations with bounds.
_RELU_FAMILY: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.Threshold)
_BOUNDED: dict[type[nn.Module], tuple[float, float] | None] = {
    nn.Tanh: (-1.0, 1.0),
    nn.Sigmoid: (0.0, 1.0),
    nn.Softsign: (-1.0, 1.0),
    nn.Hardsigmoid: (0.0, 1.0),
    nn.Hardtanh: None,  # bounds from the instance (min_val, max_val); ReLU6 is a Hardtanh
}
_CHANNEL_FIRST: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
)
_SATURATION_MARGIN = 0.01  # within 1% of the range of a bound
_OUTPUT_DERIVED = ("min", "max", "row_sum_mean")
OUTPUT_SECTION = "output"


@dataclass
class _ActSpec:
    path: str
    layer_id: int
    dead: bool
    bounds: tuple[float, float] | None
    extra: tuple[str, ...] = field(default=())
    site: str = ""  # section name and failure site: "activation:<path>"


class ActivationStats:
    """Statistics of the selected modules' outputs and of the model's output.

    Args:
        settings: module selection (``modules``, ``exclude_modules``).
        model: the (uncompiled) model whose modules are selected.
        kinds: the kinds in effect (activation and/or output).
        layer_id: the collector's layer-id allocator (ids are assigned here, in order).
        workspace: the collector's budgeted device buffers (its spare buffer holds the
            temporaries).
        guard: called with (site, exception) when a statistic fails (the site is then in
            ``disabled`` and no longer recorded).
        disabled: the collector's set of switched-off sites (shared).
    """

    def __init__(
        self,
        settings: CollectorConfig,
        model: nn.Module,
        kinds: set[str],
        layer_id: Callable[[str], int],
        workspace: Workspace,
        guard: Callable[[str, BaseException], None],
        disabled: set[str],
    ) -> None:
        self.settings = settings
        self._ws = workspace
        self._guard = guard
        self._disabled = disabled
        self.specs: dict[nn.Module, _ActSpec] = {}
        if fmt.KIND_ACTIVATION in kinds:
            for path, mod in model.named_modules():
                if mod is not model and self._wants_module(path, mod):
                    self.specs[mod] = self._act_spec(path, mod, layer_id)
        self._output_layer = layer_id(fmt.OUTPUT_LAYER) if fmt.KIND_OUTPUT in kinds else None
        self._last_conv = False
        # Sections by (site, tensor shape, hist): built once per shape.
        self._sections: dict[tuple[str, tuple[int, ...], bool], Section] = {}

    def _wants_module(self, path: str, mod: nn.Module) -> bool:
        def match(items: Sequence[type[nn.Module] | str]) -> bool:
            for it in items:
                if isinstance(it, type) and isinstance(mod, it):
                    return True
                if isinstance(it, str) and re.search(it, path):
                    return True
            return False

        if match(self.settings.exclude_modules):
            return False
        if self.settings.modules is None:
            return next(iter(mod.children()), None) is None
        return match(self.settings.modules)

    @staticmethod
    def _act_spec(path: str, mod: nn.Module, layer_id: Callable[[str], int]) -> _ActSpec:
        dead = isinstance(mod, _RELU_FAMILY)
        bounds = None
        for cls, b in _BOUNDED.items():
            if isinstance(mod, cls):
                bounds = b if b is not None else (float(mod.min_val), float(mod.max_val))
                break
        extra = (("frac_dead_units",) if dead else ()) + (("frac_saturated",) if bounds else ())
        return _ActSpec(path, layer_id(path), dead, bounds, extra, "activation:" + path)

    def _section(
        self,
        site: str,
        kind: str,
        layer: int,
        x: torch.Tensor,
        hist: bool,
        shape: tuple[int, int, int],
        extra: tuple[str, ...] = (),
        derived: tuple[str, ...] = (),
    ) -> Section:
        """The section of one tensor's statistics, built once per (site, shape, hist)."""
        key = (site, tuple(x.shape), hist)
        section = self._sections.get(key)
        if section is None or section.single != shape:
            if len(self._sections) >= MAX_CACHED:
                self._sections.clear()
            section = self._sections[key] = Section(
                site,
                kind,
                np.array([layer], np.int32),
                np.array([x.numel()], np.int64),
                extra=extra,
                hist=hist,
                single=shape,
                derived=derived,
            )
        return section

    # -- recording (training thread) ----------------------------------------------------

    @torch.no_grad()
    def record_output(self, out: torch.Tensor, flags: StepFlags, parts: StepParts) -> None:
        """The model output's statistics (rows along the last dimension)."""
        assert self._output_layer is not None
        x = out.detach()
        if x.is_complex():
            x = torch.view_as_real(x)
        xf = x if x.is_floating_point() else x.float()
        # Rows along the last dimension, so the row sums give row_sum_mean.
        row_len = xf.shape[-1] if xf.dim() and xf.shape[-1] else None
        spare = self._ws.spare(2 * xf.numel())
        raw, shape, h = single_stats(xf, spare, row_len, flags.hist, self._ws.max_chunk)
        data = [raw] if h is None else [raw, h]
        section = self._section(
            OUTPUT_SECTION,
            fmt.KIND_OUTPUT,
            self._output_layer,
            x,
            flags.hist,
            shape,
            derived=_OUTPUT_DERIVED,
        )
        parts.put(section, torch.cat(data))

    def record(self, module: nn.Module, output: Any, flags: StepFlags, parts: StepParts) -> None:
        """A module's output (from its forward hook, on activation steps)."""
        spec = self.specs.get(module)
        if spec is not None:
            self._record(module, spec, output, flags, parts)

    @torch.no_grad()
    def _record(
        self, module: nn.Module, spec: _ActSpec, output: Any, flags: StepFlags, parts: StepParts
    ) -> None:
        site = spec.site
        try:
            if isinstance(module, _CHANNEL_FIRST):
                self._last_conv = True
            elif isinstance(module, nn.Linear | nn.LayerNorm | nn.Embedding):
                self._last_conv = False
            if site in self._disabled:
                return
            out = first_tensor(output)
            if out is None:
                return
            x = out.detach()
            if x.is_complex():
                x = torch.view_as_real(x)
            xf = x if x.is_floating_point() else x.float()
            spare = self._ws.spare(2 * xf.numel())
            raw, shape, h = single_stats(xf, spare, hist=flags.hist, max_width=self._ws.max_chunk)
            data = [raw]
            extras = []
            if spec.dead:
                extras.append(dead_fraction(xf, channel_first=self._last_conv))
            if spec.bounds is not None:
                lo, hi = spec.bounds
                m = (hi - lo) * _SATURATION_MARGIN
                extras.append(saturated_fraction(xf, lo + m, hi - m, spare))
            if extras:
                data.append(torch.stack(extras).to(raw.dtype))
            if h is not None:
                data.append(h)
            section = self._section(
                site, fmt.KIND_ACTIVATION, spec.layer_id, x, flags.hist, shape, extra=spec.extra
            )
            parts.put(section, torch.cat(data))  # last call of the step wins
        except Exception as exc:
            self._guard(site, exc)


def model_output(output: Any) -> torch.Tensor | None:
    """The tensor that stands for a model's output: ``logits`` when the output has them (a
    Hugging Face ``ModelOutput``, a dict), else the first tensor that is not a scalar (a
    scalar is a loss: ``(loss, logits, ...)`` tuples put it first), else the first tensor."""
    logits = output.get("logits") if isinstance(output, Mapping) else None
    if logits is None and not isinstance(output, torch.Tensor | list | tuple | Mapping):
        logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, torch.Tensor):
        return output
    first = None
    values = output.values() if isinstance(output, Mapping) else output
    if isinstance(values, list | tuple) or isinstance(output, Mapping):
        for o in values:
            t = model_output(o) if not isinstance(o, torch.Tensor) else o
            if t is None:
                continue
            if t.dim() > 0:
                return t
            first = first if first is not None else t
    return first


def first_tensor(output: Any) -> torch.Tensor | None:
    """The first tensor in a module's output (nested tuples, lists, mappings)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, list | tuple):
        for o in output:
            t = first_tensor(o)
            if t is not None:
                return t
    return None
