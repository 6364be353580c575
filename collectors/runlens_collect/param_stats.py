"""Parameter statistics: weights, gradients and updates of every parameter, as sections.

``ParamStats`` is the one strategy the collector uses for parameters. Its interface is
narrow so that another strategy (per-tensor ``_foreach`` statistics without flat copies,
update snapshots of a rotating subset under a memory budget: issue 17) can replace it:

* ``read_grads(flags, parts)`` — gradients as they are now (final: right before the
  update); off ``every`` steps only the total ``grad_norm``, as a device scalar;
* ``read_weights(flags, parts)`` — the weights before the update (kept for the update);
* ``read_update(flags, parts)`` — the update just applied (before - after);
* ``finish(parts)`` — the strategy's last word on a step before it is packed;
* ``refresh_membership(optimizer)`` — which parameters the optimizer holds.

Each read puts its ``layout.Section`` (built once here) and its device data into the
step's parts, and never syncs with the device. A failure switches that statistic off
through ``guard``.

This strategy copies every tensor of a kind into one chunked flat float32 buffer
(``stats.FlatLayout``) and reduces it with a few ops; the weight snapshot stays in its
buffer across ``optimizer.step()`` and becomes the update in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from runlens_collect import format as fmt
from runlens_collect import stats
from runlens_collect.layout import Section
from runlens_collect.scratch import Scratch
from runlens_collect.step import StepFlags, StepParts

Guard = Callable[[str, BaseException], None]


@dataclass
class _Param:
    name: str
    param: nn.Parameter
    source_shape: tuple[int, ...]
    in_optimizer: bool = False


class ParamStats:
    """Weight, gradient and update statistics of a model's parameters (flat-copy strategy).

    Args:
        params: (name, parameter) pairs, de-duplicated (``named_parameters()``).
        device: the collector's device; parameters elsewhere are skipped.
        kinds: the kinds in effect.
        optimizer: for optimizer membership (updates of parameters it does not hold are
            missing rows).
        layer_id: the collector's layer-id allocator (ids are assigned here, in order).
        scratch: shared device scratch for histogram codes.
        guard: called with (site, exception) when a read fails; the site is then listed in
            ``disabled`` and no longer read.
        disabled: the collector's set of switched-off sites (shared).
        tag: appended to this instance's section names, failure sites and off-step
            ``grad_norm`` (``grad@cuda:1``): one instance per device of a model split
            across devices, each reading the parameters on its own device.
    """

    def __init__(
        self,
        params: Sequence[tuple[str, nn.Parameter]],
        device: torch.device,
        kinds: set[str],
        optimizer: torch.optim.Optimizer | None,
        layer_id: Callable[[str], int],
        scratch: Scratch,
        guard: Guard,
        disabled: set[str],
        tag: str = "",
    ) -> None:
        self.device = device
        # Section names and failure sites of this instance (see ``tag``).
        self.names = {k: k + tag for k in (fmt.KIND_WEIGHT, fmt.KIND_GRAD, fmt.KIND_UPDATE)}
        self.grad_norm_name = fmt.GRAD_NORM + tag
        self.kinds = kinds
        self._scratch = scratch
        self._guard = guard
        self._disabled = disabled
        self.skipped: list[str] = []  # not recorded (sparse, bool, on another device)
        self._params: list[_Param] = []
        for name, p in params:
            if p.is_sparse or p.device != device or p.dtype == torch.bool:
                self.skipped.append(name)
                continue
            src = torch.view_as_real(p) if p.is_complex() else p
            self._params.append(_Param(name, p, tuple(src.shape)))
            layer_id(name)
        layers = np.array([layer_id(p.name) for p in self._params], np.int32)
        numels = np.array([p.param.numel() for p in self._params], np.int64)
        # Real parameters: gradients copy straight into the flat views (complex ones go
        # through view_as_real, one by one).
        self._plain_grads = not any(p.param.is_complex() for p in self._params)
        self.n_groups = 0
        self.refresh_membership(optimizer)

        sizes = [math.prod(p.source_shape) for p in self._params]
        self._wlayout = self._glayout = None
        if self._params and kinds & {fmt.KIND_WEIGHT, fmt.KIND_UPDATE}:
            self._wlayout = stats.FlatLayout(sizes, device)
            self._wviews = [
                v.view(p.source_shape)
                for v, p in zip(self._wlayout.views, self._params, strict=True)
            ]
            self._wsrc = [
                torch.view_as_real(p.param) if p.param.is_complex() else p.param
                for p in self._params
            ]
        if self._params and fmt.KIND_GRAD in kinds:
            chunk = self._wlayout.chunk if self._wlayout else None
            self._glayout = stats.FlatLayout(sizes, device, chunk=chunk)
            self._gviews = [
                v.view(p.source_shape)
                for v, p in zip(self._glayout.views, self._params, strict=True)
            ]

        # The sections, built once: by histogram or not (and, for the update, with or
        # without the weight section that gives update_ratio its denominator).
        layout = self._wlayout or self._glayout
        pads = layout.pads_array if layout is not None else None

        def section(kind: str, hist: bool, **kw) -> Section:
            return Section(self.names[kind], kind, layers, numels, hist=hist, pads=pads, **kw)

        write_weight = fmt.KIND_WEIGHT in kinds
        hists = (False, True)
        self._weight = {
            h: section(fmt.KIND_WEIGHT, h and write_weight, write=write_weight) for h in hists
        }
        self._grad = {h: section(fmt.KIND_GRAD, h, grad_norm=True, has_missing=True) for h in hists}
        self._update = {
            (h, r): section(
                fmt.KIND_UPDATE,
                h,
                negate=True,
                has_missing=True,
                ratio_ref=self.names[fmt.KIND_WEIGHT] if r else None,
            )
            for h in hists
            for r in (False, True)
        }

    def refresh_membership(self, optimizer: torch.optim.Optimizer | None) -> None:
        ids: set[int] = set()
        if optimizer is not None:
            for g in optimizer.param_groups:
                ids.update(id(p) for p in g["params"])
            self.n_groups = len(optimizer.param_groups)
        for p in self._params:
            p.in_optimizer = id(p.param) in ids
        self._not_in_opt = np.array([not p.in_optimizer for p in self._params], bool)

    # -- reads (training thread) ---------------------------------------------------------

    @torch.no_grad()
    def read_grads(
        self, flags: StepFlags, parts: StepParts, scale: torch.Tensor | None = None
    ) -> None:
        """Statistics of the gradients as they are now (final: right before the update).
        ``scale``: the AMP loss scale the gradients are still multiplied by (a fused
        optimizer unscales inside its step): the statistics are of the unscaled values."""
        site = self.names[fmt.KIND_GRAD]
        if fmt.KIND_GRAD not in self.kinds or site in self._disabled or self._glayout is None:
            return
        if scale is not None and scale.device != self.device:
            scale = scale.to(self.device, non_blocking=True)
        try:
            if not flags.stat:
                # Off-steps still get grad_norm: one batched norm, kept on device.
                grads = [p.param.grad for p in self._params if p.param.grad is not None]
                grads = [g for g in grads if not g.is_sparse and g.device == self.device]
                if grads:
                    norms = torch._foreach_norm(grads, 2)
                    norm = torch.linalg.vector_norm(torch.stack(norms).float())
                    if scale is not None:
                        norm = norm / scale
                    parts.put_latest(self.grad_norm_name, norm)
                return
            grads = [p.param.grad for p in self._params]
            if self._plain_grads and all(g is not None for g in grads):
                # The usual case, without a Python loop over the parameters (~0.2 ms here):
                # a sparse or odd gradient raises and takes the careful path below.
                try:
                    torch._foreach_copy_(self._gviews, grads)
                    self._grad_section(flags, parts, np.zeros(len(self._params), bool), scale)
                    return
                except Exception:
                    pass
            srcs, dsts = [], []
            missing = np.ones(len(self._params), bool)
            for i, p in enumerate(self._params):
                g = p.param.grad
                if g is None or g.device != self.device:
                    continue
                if g.is_sparse:
                    g = g.to_dense()
                if g.is_complex():
                    g = torch.view_as_real(g)
                srcs.append(g)
                dsts.append(self._gviews[i])
                missing[i] = False
            if srcs:
                torch._foreach_copy_(dsts, srcs)
            self._grad_section(flags, parts, missing, scale)
        except Exception as exc:
            parts.sections.pop(site, None)
            self._guard(site, exc)

    def _grad_section(
        self,
        flags: StepFlags,
        parts: StepParts,
        missing: np.ndarray,
        scale: torch.Tensor | None = None,
    ) -> None:
        assert self._glayout is not None
        if scale is not None:
            self._glayout.buf.div_(scale)  # zero padding stays zero
        # The flat copy is scratch once read: its sign goes over it.
        data = self._flat_data(self._glayout, flags.hist, sign_out=self._glayout.matrix)
        parts.put(self._grad[flags.hist], data, missing)

    @torch.no_grad()
    def read_weights(self, flags: StepFlags, parts: StepParts) -> None:
        """Snapshot the weights (kept for the update) and take their statistics."""
        site = self.names[fmt.KIND_WEIGHT]
        if not flags.stat or self._wlayout is None or site in self._disabled:
            return
        try:
            torch._foreach_copy_(self._wviews, self._wsrc)
            section = self._weight[flags.hist]
            # The snapshot must survive until the update: the sign goes to the gradient
            # buffer instead (built with the same layout), read by now and rewritten at
            # the next read.
            spare = self._glayout.matrix if self._glayout is not None else None
            parts.put(section, self._flat_data(self._wlayout, section.hist, sign_out=spare))
        except Exception as exc:
            parts.sections.pop(site, None)
            self._guard(site, exc)

    @torch.no_grad()
    def read_update(self, flags: StepFlags, parts: StepParts) -> None:
        """The update just applied, from the snapshot ``read_weights`` took before it."""
        if not flags.stat or fmt.KIND_UPDATE not in self.kinds:
            return
        site = self.names[fmt.KIND_UPDATE]
        if site in self._disabled or self.names[fmt.KIND_WEIGHT] not in parts.sections:
            return
        assert self._wlayout is not None
        try:
            # before - after, in place: the update negated (the writer flips it back).
            torch._foreach_sub_(self._wviews, self._wsrc)
            # The snapshot is scratch once the update is read (the next step copies anew).
            data = self._flat_data(self._wlayout, flags.hist, sign_out=self._wlayout.matrix)
            parts.put(self._update[flags.hist, True], data, self._not_in_opt.copy())
        except Exception as exc:
            parts.sections.pop(site, None)
            self._guard(site, exc)

    def finish(self, parts: StepParts) -> None:
        """Before packing: the weight section goes when it only fed an update that is not
        there; an update whose weight section went (a failed later read) loses its ratio."""
        sections = parts.sections
        wname, uname = self.names[fmt.KIND_WEIGHT], self.names[fmt.KIND_UPDATE]
        weight = sections.get(wname)
        update = sections.get(uname)
        if update is not None and weight is None and update[0].ratio_ref is not None:
            sec = update[0]
            sections[uname] = (self._update[sec.hist, False], update[1], update[2])
        elif update is None and weight is not None and not weight[0].write:
            del sections[wname]  # only there to give update_ratio its denominator

    def _flat_data(
        self, layout: stats.FlatLayout, hist: bool, sign_out: torch.Tensor | None
    ) -> torch.Tensor:
        """RAW rows of every tensor in the layout (then their histograms when ``hist``)."""
        # The histogram first: sign_out may be the layout's own buffer.
        counts = None
        if hist:
            scratch = self._scratch.int32_like(layout.matrix)
            counts = stats.flat_hist(layout, scratch).reshape(-1)
        raw = stats.flat_raw(layout, sign_out).reshape(-1)
        return torch.cat([raw, counts]) if counts is not None else raw
