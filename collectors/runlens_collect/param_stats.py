"""Parameter statistics: weights, gradients and updates, as sections, within a memory budget.

``ParamStats`` is the collector's strategy for parameters, reached only through

* ``read_grads(flags, parts)`` — gradients as they are now (final: right before the
  update); off stat steps only the total ``grad_norm``, as a device scalar;
* ``read_weights(flags, parts)`` — the weights before the update (and the update
  snapshot);
* ``read_update(flags, parts)`` — the update just applied (before - after);
* ``finish(parts)`` — the strategy's last word on a step before it is packed;
* ``refresh_membership(optimizer)`` — which parameters the optimizer holds.

No full copy of the model (issue 17). Gradient and weight statistics stream the tensors
through the workspace's bounded buffer (``stream.StreamPlan``: one ``_foreach_copy_``
per group of tensors that fits, the chunked row reductions, partial sums combined), so a
model that fits is one group: the same few ops as before. Who is recorded when:

* *trainable* parameters (``requires_grad``): weights and gradients on every stat step;
* *frozen* parameters (``requires_grad=False``): weights, and their gradient and update
  rows (marked missing), only on *full* steps (``StepFlags.full``: step 0 and then every
  ``frozen_every`` stat steps); the gap between is "not sampled", never "missing";
* updates: only for trainable parameters the optimizer holds. The update needs the
  weights from before ``optimizer.step()``: a float32 snapshot, which must fit half the
  budget. When the snapshot of all of them does not fit, they are cut into K subsets
  (``stream.Region``, tensors in model order, a tensor larger than the share cut into row
  runs) and each stat step snapshots the next subset: every trainable tensor has an
  update row at least every K stat steps (``memory_info()['update_subsets']``, in
  run.json). Update rows of a cut tensor describe the rows of that step's piece
  (``numel`` says how many elements); ``update_ratio`` divides by the same piece's
  weight norm (the ``update_ref`` section, not written). Parameters outside the
  optimizer get missing update rows on full steps.

Each read puts its ``layout.Section`` (built once here) and its device data into the
step's parts, and never syncs with the device. A failure switches that statistic off
through ``guard``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter

import numpy as np
import torch
from torch import nn

from runlens_collect import format as fmt
from runlens_collect.budget import Workspace
from runlens_collect.dist import is_dtensor, local
from runlens_collect.layout import Section
from runlens_collect.stats import NRAW
from runlens_collect.step import NormOf, StepFlags, StepParts
from runlens_collect.stream import Region, StreamPlan, piece_of, region_raw

Guard = Callable[[str, BaseException], None]


_GRAD = attrgetter("grad")


@dataclass
class _Param:
    name: str
    param: nn.Parameter
    source_shape: tuple[int, ...]  # the view_as_real shape of a complex parameter
    layer: int
    in_optimizer: bool = False
    numel: int = 0  # of this rank's shard (the whole tensor unless a DTensor)


def _source(p: torch.Tensor) -> torch.Tensor:
    # A DTensor (FSDP2, tensor parallel) is read through this rank's shard: a view, no
    # all-gather (dist.local).
    p = local(p)
    return torch.view_as_real(p) if p.is_complex() else p


class ParamStats:
    """Weight, gradient and update statistics of a model's parameters, within a budget.

    Args:
        params: (name, parameter) pairs, de-duplicated (``named_parameters()``).
        device: the collector's device; parameters elsewhere are skipped.
        kinds: the kinds in effect.
        optimizer: for optimizer membership (updates only of parameters it holds).
        layer_id: the collector's layer-id allocator (ids are assigned here, in order).
        workspace: the collector's budgeted device buffers.
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
        workspace: Workspace,
        guard: Guard,
        disabled: set[str],
        tag: str = "",
    ) -> None:
        self.device = device
        # Section names and failure sites of this instance (see ``tag``).
        self.names = {
            k: k + tag for k in ("weight", "grad", "update", "update_ref", "update:outside")
        }
        self.grad_norm_name = fmt.GRAD_NORM + tag
        self.kinds = kinds
        self._ws = workspace
        self._guard = guard
        self._disabled = disabled
        self._has_optimizer = optimizer is not None
        self.skipped: list[str] = []  # not recorded (sparse, bool, on another device)
        self._params: list[_Param] = []
        for name, p in params:
            if p.is_sparse or p.device != device or p.dtype == torch.bool:
                self.skipped.append(name)
                continue
            numel = local(p).numel()
            if numel == 0:
                continue  # no statistics; an empty shard: the other ranks hold it all
            shape = tuple(_source(p).shape)
            self._params.append(_Param(name, p, shape, layer_id(name), numel=numel))
        self._plain = not any(p.param.is_complex() for p in self._params)
        self.n_groups = 0
        self._round = 0  # update snapshots taken: the rotation's position
        self._snap: tuple[int, str] | None = None  # (subset, ratio section) taken this step
        self._membership: tuple[bool, ...] | None = None
        self._trainable_flags: tuple[bool, ...] = ()
        self.refresh_membership(optimizer)

    # -- plans and sections (setup, membership changes) ----------------------------------

    def refresh_membership(self, optimizer: torch.optim.Optimizer | None) -> None:
        ids: set[int] = set()
        if optimizer is not None:
            for g in optimizer.param_groups:
                ids.update(id(p) for p in g["params"])
            self.n_groups = len(optimizer.param_groups)
        member = tuple(id(p.param) in ids for p in self._params)
        for p, m in zip(self._params, member, strict=True):
            p.in_optimizer = m
        if member != self._membership:
            self._membership = member
            self._build()

    def _check_trainable(self) -> None:
        """Rebuild when ``requires_grad`` changed (unfreezing); checked on full steps."""
        if tuple(p.param.requires_grad for p in self._params) != self._trainable_flags:
            self._build()

    def _build(self) -> None:
        ws, kinds = self._ws, self.kinds
        ps = self._params
        self._trainable_flags = tuple(p.param.requires_grad for p in ps)
        every = list(range(len(ps)))
        trainable = [i for i in every if self._trainable_flags[i]]
        self._items = {False: trainable, True: every}
        # The off-step grad_norm reads these every step: built here, not per step.
        self._norm_params = [ps[i].param for i in trainable]
        self._norm_local = any(is_dtensor(p) for p in self._norm_params)
        self._norm_plain = False  # set once every gradient was seen dense on this device
        want_update = fmt.KIND_UPDATE in kinds and self._has_optimizer
        snap_items = [i for i in trainable if ps[i].in_optimizer] if want_update else []
        # Outside the update: trainable parameters the optimizer does not hold first (their
        # missing update rows go out every stat step: optimizer-mismatch's evidence), then
        # frozen ones (full steps only, like the rest of their rows).
        held = set(snap_items)
        outside = (
            [i for i in trainable if i not in held]
            + [i for i in every if i not in held and not self._trainable_flags[i]]
            if want_update
            else []
        )
        for name in ("stream", "snapshot", "outside"):
            ws.free(name)
        ws.owners.clear()

        def shapes(items: list[int]) -> list[tuple[int, ...]]:
            return [ps[i].source_shape for i in items]

        cap = ws.stream_cap
        self._gplan: dict[bool, StreamPlan | None] = {False: None, True: None}
        self._wplan: dict[bool, StreamPlan | None] = {False: None, True: None}
        if ps and fmt.KIND_GRAD in kinds:
            self._gplan[True] = StreamPlan(shapes(every), cap, self.device, max_chunk=ws.max_chunk)
            self._gplan[False] = self._gplan[True]
            if trainable != every:
                self._gplan[False] = StreamPlan(
                    shapes(trainable), cap, self.device, max_chunk=ws.max_chunk
                )
        if ps and fmt.KIND_WEIGHT in kinds:
            self._wplan[True] = StreamPlan(shapes(every), cap, self.device, max_chunk=ws.max_chunk)
            self._wplan[False] = self._wplan[True]
            if trainable != every:
                self._wplan[False] = StreamPlan(
                    shapes(trainable), cap, self.device, max_chunk=ws.max_chunk
                )
        plans = [p for p in (*self._gplan.values(), *self._wplan.values()) if p is not None]
        stream_numel = max((p.numel for p in plans), default=0)
        if stream_numel:
            buf = ws.alloc("stream", stream_numel)
            for p in plans:
                p.bind(buf)

        # The update snapshot: K subsets (regions) of the trainable parameters it holds.
        self._splan: StreamPlan | None = None
        self._snap_items = snap_items
        snap_numel = 0
        if snap_items:
            self._splan = StreamPlan(
                shapes(snap_items), ws.snapshot_cap, self.device, max_chunk=ws.max_chunk
            )
            snap_numel = self._splan.numel
            self._splan.bind(ws.alloc("snapshot", snap_numel))
        self.subsets = len(self._splan.regions) if self._splan is not None else 0
        # Room for histogram codes of a whole group and the snapshot's sign (blocks beyond).
        ws.spare(max(stream_numel, snap_numel))

        # Weights from the snapshot itself when it holds every trainable weight whole.
        self._snap_is_weight = (
            self.subsets == 1 and snap_items == trainable and fmt.KIND_WEIGHT in kinds
        )
        self._build_sections(trainable, every, outside)

    def _build_sections(self, trainable: list[int], every: list[int], outside: list[int]) -> None:
        ps = self._params

        def rows(items: list[int]) -> tuple[np.ndarray, np.ndarray]:
            return (
                np.array([ps[i].layer for i in items], np.int32),
                np.array([ps[i].numel for i in items], np.int64),
            )

        hists = (False, True)
        self._grad: dict[tuple[bool, bool], Section] = {}
        self._weight: dict[tuple[bool, bool], Section] = {}
        for full in (False, True):
            layers, numels = rows(self._items[full])
            gp, wp = self._gplan[full], self._wplan[full]
            for h in hists:
                if gp is not None:
                    self._grad[full, h] = Section(
                        self.names["grad"], fmt.KIND_GRAD, layers, numels, hist=h, pads=gp.pads,
                        grad_norm=True, has_missing=True,
                    )  # fmt: skip
                if wp is not None:
                    self._weight[full, h] = Section(
                        self.names["weight"], fmt.KIND_WEIGHT, layers, numels, hist=h, pads=wp.pads
                    )
        self._wsnap: dict[bool, Section] = {}
        self._ref: list[Section] = []
        self._update: dict[tuple[int, bool, str | None], Section] = {}
        self._subset_of: dict[int, int] = {}  # id(update section) -> its subset
        if self._splan is not None:
            for k, region in enumerate(self._splan.regions):
                items = [self._snap_items[p.item] for p in region.pieces]
                layers = np.array([ps[i].layer for i in items], np.int32)
                numels = np.array(
                    [ps[i].numel if p.whole else p.numel
                     for i, p in zip(items, region.pieces, strict=True)],
                    np.int64,
                )  # fmt: skip
                self._ref.append(
                    Section(self.names["update_ref"], fmt.KIND_WEIGHT, layers, numels, write=False)
                )
                for h in hists:
                    for ratio in (None, self.names["weight"], self.names["update_ref"]):
                        sec = Section(
                            self.names["update"], fmt.KIND_UPDATE, layers, numels, hist=h,
                            pads=region.pads, negate=True, ratio_ref=ratio,
                        )  # fmt: skip
                        self._update[k, h, ratio] = sec
                        self._subset_of[id(sec)] = k
                if k == 0 and self._snap_is_weight:
                    for h in hists:
                        self._wsnap[h] = Section(
                            self.names["weight"],
                            fmt.KIND_WEIGHT,
                            layers,
                            numels,
                            hist=h,
                            pads=region.pads,
                        )
        self._outside: dict[bool, Section | None] = {False: None, True: None}
        if outside:
            n_trainable = sum(1 for i in outside if self._trainable_flags[i])
            for full, items in ((True, outside), (False, outside[:n_trainable])):
                if items:
                    layers, numels = rows(items)
                    self._outside[full] = Section(
                        self.names["update:outside"], fmt.KIND_UPDATE, layers, numels,
                        has_missing=True,
                    )  # fmt: skip
            self._outside_data = self._ws.alloc("outside", len(outside) * NRAW, torch.float64)
            self._outside_missing = np.ones(len(outside), bool)

    def memory_info(self) -> dict[str, object]:
        """What run.json's ``collector.memory`` records (see format.COLLECTOR_MEMORY_KEYS)."""
        ps = self._params
        trainable = [p for p in ps if p.param.requires_grad]
        cut = []
        if self._splan is not None:
            cut = sorted(
                {ps[self._snap_items[p.item]].name for p in self._splan.pieces if not p.whole}
            )
        return {
            "budget_bytes": self._ws.budget,
            "held_bytes": self._ws.held_bytes,
            "trainable_bytes": sum(p.numel * p.param.element_size() for p in trainable),
            "frozen_bytes": sum(
                p.numel * p.param.element_size() for p in ps if not p.param.requires_grad
            ),
            "update_subsets": self.subsets,
            "update_cut_tensors": cut,
        }

    # -- reads (training thread) ---------------------------------------------------------

    def _srcs(self, items: list[int], grads: bool) -> list[torch.Tensor | None]:
        ps = self._params
        if not grads:
            if self._plain:
                return [local(ps[i].param) for i in items]
            return [_source(ps[i].param) for i in items]
        out: list[torch.Tensor | None] = []
        for i in items:
            g = ps[i].param.grad
            if g is not None:
                g = local(g)
            if g is None or g.device != self.device:
                out.append(None)
                continue
            if g.is_sparse:
                g = g.to_dense()
            out.append(_source(g))
        return out

    @property
    def trainable_params(self) -> list[nn.Parameter]:
        """The parameters whose gradients make grad_norm (requires_grad ones)."""
        return self._norm_params

    @torch.no_grad()
    def read_grads(
        self,
        flags: StepFlags,
        parts: StepParts,
        scale: torch.Tensor | None = None,
        clipped: torch.Tensor | None = None,
    ) -> None:
        """Statistics of the gradients as they are now (final: right before the update).
        ``scale``: the AMP loss scale the gradients are still multiplied by (a fused
        optimizer unscales inside its step): the statistics are of the unscaled values.
        ``clipped``: their 2-norm as this step's ``clip_grad_norm_`` of all of them left
        it (``StepContract.clipped_norm``): off stat steps, grad_norm without reading them."""
        site = self.names["grad"]
        plan = self._gplan[flags.full] if fmt.KIND_GRAD in self.kinds else None
        if plan is None or site in self._disabled:
            return
        if scale is not None and scale.device != self.device:
            scale = scale.to(self.device, non_blocking=True)
        try:
            if not flags.stat:
                if clipped is not None and not self._norm_local:
                    # The clip already read every gradient: its norm, times its factor.
                    parts.put_latest(self.grad_norm_name, clipped.to(self.device))
                    return
                # Off-steps still get grad_norm: one batched norm, kept on device.
                norms = self._grad_norms()
                if norms:
                    # Combined where it is read (StepParts.own_scalar: on a CPU run by the
                    # writer thread, a stack and a norm fewer on the training thread).
                    norm = NormOf(norms) if scale is None else NormOf(norms).tensor() / scale
                    parts.put_latest(self.grad_norm_name, norm)
                return
            items = self._items[flags.full]
            srcs = self._srcs(items, grads=True)
            missing = np.fromiter((s is None for s in srcs), bool, len(srcs))
            raw, h = plan.reduce(srcs, flags.hist, self._spare(), self._ws.owners, scale)
            parts.put(self._grad[flags.full, flags.hist], _data(raw, h), missing)
        except Exception as exc:
            parts.sections.pop(site, None)
            self._guard(site, exc)

    def _grad_norms(self) -> Sequence[torch.Tensor]:
        """The 2-norm of each trainable parameter's gradient (absent ones left out), in
        one multi-tensor kernel."""
        grads = list(map(_GRAD, self._norm_params))  # attribute reads in C: cheaper
        if self._norm_plain:
            try:  # every gradient there, dense and here (the usual case)
                return torch._foreach_norm(grads, 2)
            except TypeError:  # one is None this step
                pass
        grads = [g for g in grads if g is not None]
        if self._norm_local:
            grads = [local(g) for g in grads]
        dev = self.device
        kept = [g for g in grads if not g.is_sparse and g.device == dev]
        # All of them dense and here: a gradient's device and layout follow its
        # parameter's, so later steps try the list as it is first.
        self._norm_plain = len(kept) == len(self._norm_params) and not self._norm_local
        return torch._foreach_norm(kept, 2) if kept else []

    def _spare(self) -> torch.Tensor | None:
        return self._ws.spare(0)

    @torch.no_grad()
    def read_weights(self, flags: StepFlags, parts: StepParts) -> None:
        """Take the update snapshot (this step's subset) and the weights' statistics."""
        if not flags.stat:
            return
        if flags.full:
            self._check_trainable()
        n = self.names
        from_snapshot = False
        if self._splan is not None and n["update"] not in self._disabled:
            try:
                from_snapshot = self._take_snapshot(flags, parts)
            except Exception as exc:
                self._snap = None
                parts.sections.pop(n["update_ref"], None)
                parts.sections.pop(n["weight"], None)
                self._guard(n["update"], exc)
        plan = self._wplan[flags.full]
        if from_snapshot or plan is None or n["weight"] in self._disabled:
            return
        try:
            srcs = self._srcs(self._items[flags.full], grads=False)
            raw, h = plan.reduce(srcs, flags.hist, self._spare(), self._ws.owners)
            parts.put(self._weight[flags.full, flags.hist], _data(raw, h))
        except Exception as exc:
            parts.sections.pop(n["weight"], None)
            self._guard(n["weight"], exc)

    def _take_snapshot(self, flags: StepFlags, parts: StepParts) -> bool:
        """Copy this step's subset of the trainable weights; its weight statistics become
        the weight section when the snapshot holds every trainable weight (True), else
        the ``update_ref`` section (update_ratio's denominator)."""
        assert self._splan is not None
        k = self._round % self.subsets
        region = self._splan.regions[k]
        region.claim(self._ws.owners)
        torch._foreach_copy_(region.views, self._region_srcs(region))
        wname = self.names["weight"]
        as_weight = self._snap_is_weight and not flags.full and wname not in self._disabled
        hist = flags.hist and as_weight
        # The snapshot must survive until the update: its sign goes to the spare.
        raw, h = region_raw(region, hist, self._spare(), consumable=False)
        if as_weight:
            parts.put(self._wsnap[hist], _data(raw, h))
            self._snap = (k, wname)
        else:
            parts.put(self._ref[k], raw.reshape(-1))
            self._snap = (k, self.names["update_ref"])
        return as_weight

    def _region_srcs(self, region: Region) -> list[torch.Tensor]:
        ps = self._params
        items = self._snap_items
        return [piece_of(_source(ps[items[p.item]].param), p) for p in region.pieces]

    @torch.no_grad()
    def read_update(self, flags: StepFlags, parts: StepParts) -> None:
        """The update just applied, from the snapshot ``read_weights`` took before it."""
        site = self.names["update"]
        if not flags.stat or site in self._disabled:
            return
        outside = self._outside[flags.full]
        if outside is not None:
            n = len(outside.layers)
            parts.put(outside, self._outside_data[: n * NRAW], self._outside_missing[:n])
        if self._snap is None:
            return
        assert self._splan is not None
        k, ratio = self._snap
        self._snap = None
        try:
            region = self._splan.regions[k]
            # before - after, in place: the update negated (the writer flips it back).
            torch._foreach_sub_(region.views, self._region_srcs(region))
            raw, h = region_raw(region, flags.hist, self._spare(), consumable=True)
            parts.put(self._update[k, flags.hist, ratio], _data(raw, h))
            self._round += 1
        except Exception as exc:
            parts.sections.pop(site, None)
            self._guard(site, exc)

    def finish(self, parts: StepParts) -> None:
        """Before packing: ``update_ref`` goes when there is no update (its only use); an
        update whose ratio section went (a failed later read) loses its ratio."""
        self._snap = None  # an optimizer step that never came: that subset comes next
        sections = parts.sections
        uname = self.names["update"]
        update = sections.get(uname)
        if update is None:
            sections.pop(self.names["update_ref"], None)
            return
        sec = update[0]
        if sec.ratio_ref is not None and sec.ratio_ref not in sections:
            k = self._subset_of[id(sec)]
            sections[uname] = (self._update[k, sec.hist, None], update[1], update[2])


def _data(raw: torch.Tensor, hist: torch.Tensor | None) -> torch.Tensor:
    """A section's device data: RAW rows, then histogram rows."""
    if hist is None:
        return raw.reshape(-1)
    return torch.cat([raw.reshape(-1), hist.reshape(-1)])
