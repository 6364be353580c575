"""The Collector: records per-layer statistics of a training run without host syncs."""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import queue
import re
import time
import uuid
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from runlens_collect import _active, repro, runinfo, stats
from runlens_collect import format as fmt
from runlens_collect.writer import Block, FreeSlots, Package, Writer

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
_DEFAULT_EXCLUDE: tuple[type[nn.Module], ...] = (
    nn.modules.dropout._DropoutNd,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
)
_SATURATION_MARGIN = 0.01  # within 1% of the range of a bound
SCRATCH_MAX_BYTES = 64 << 20
"""Largest activation/output whose statistics use the collector's reusable scratch."""


@dataclass(frozen=True)
class CollectorConfig:
    """What the Collector records and how often. Defaults were chosen by measurement
    (``benchmarks/collector_overhead.py``): at these settings a small CPU transformer
    trains at about 1.03x the bare step time (1.04x over a whole run, activation and
    histogram steps included), 1.02-1.03x with ``every=10`` (docs/benchmarks.md).

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
    """

    kinds: tuple[str, ...] = fmt.KINDS
    every: int = 1
    activation_every: int = 10
    hist_every: int = 50
    modules: Sequence[type[nn.Module] | str] | None = None
    exclude_modules: Sequence[type[nn.Module] | str] = _DEFAULT_EXCLUDE
    flush_steps: int = 500
    flush_seconds: float = 30.0
    max_queue: int = 64
    max_queue_bytes: int = 64 * 2**20
    name: str | None = None
    rank: int | None = None

    def validate(self) -> None:
        unknown = set(self.kinds) - set(fmt.KINDS)
        if unknown:
            raise ValueError(f"unknown kinds {sorted(unknown)}; choose from {fmt.KINDS}")
        for knob in (
            "every",
            "activation_every",
            "hist_every",
            "flush_steps",
            "max_queue",
            "max_queue_bytes",
        ):
            if int(getattr(self, knob)) < 1:
                raise ValueError(f"{knob} must be >= 1")
        if self.flush_seconds <= 0:
            raise ValueError("flush_seconds must be > 0")

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


class _NoEvent:
    """CPU stand-in for torch.cuda.Event: the copy was synchronous, nothing to wait for."""

    def synchronize(self) -> None:
        pass


@dataclass
class _Param:
    name: str
    param: nn.Parameter
    source_shape: tuple[int, ...]
    in_optimizer: bool = False


@dataclass
class _ActSpec:
    path: str
    layer_id: int
    dead: bool
    bounds: tuple[float, float] | None
    extra: tuple[str, ...] = field(default=())


class Collector:
    """Record a training run into ``run_dir`` in the runlens run format.

    Use as a context manager (``with Collector(...) as col:``) or call :meth:`close`.
    Call :meth:`step` once per training step, after ``optimizer.step()``; :meth:`log`
    records any other scalars (e.g. validation metrics) at the last completed step.

    Nothing here synchronises the training thread with the device: statistics are computed
    by batched device ops into one tensor per step, copied without blocking into a reused
    host buffer, and decoded and written by a background thread. Any failure inside the
    collector is caught, warned once and written to events.jsonl; training continues.

    Knobs are the fields of :class:`CollectorConfig`, given as keyword arguments or as
    ``settings=CollectorConfig(...)``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        run_dir: str | os.PathLike[str] = "runs/run",
        config: Mapping[str, Any] | None = None,
        *,
        settings: CollectorConfig | None = None,
        **knobs: Any,
    ) -> None:
        self.settings = replace(settings or CollectorConfig(), **knobs)
        if isinstance(self.settings.kinds, str):
            self.settings = replace(self.settings, kinds=(self.settings.kinds,))
        self.settings = replace(self.settings, kinds=tuple(self.settings.kinds))
        self.settings.validate()
        self.run_dir = Path(run_dir)
        self.model = model
        self.optimizer = optimizer
        self.warnings: list[str] = []  # every message warned (also in events.jsonl)
        self._warned_sites: set[str] = set()
        self._warned_categories: set[str] = set()
        self._disabled: set[str] = set()
        self._handles: list[Any] = []
        self._closed = False
        self._writer: Writer | None = None
        self._step = 0
        self._enabled = False
        try:
            self._setup(dict(config or {}))
            self._enabled = True
        except Exception as exc:
            self._report("setup", "collector setup failed; nothing will be recorded", exc)
            self._remove_hooks()
        if self._enabled:
            _active.set_active(self)
            ref = weakref.ref(self)
            atexit.register(_flush_at_exit, ref)

    # -- setup --------------------------------------------------------------------------

    def _setup(self, config: dict[str, Any]) -> None:
        s = self.settings
        self.world_size, rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.world_size = torch.distributed.get_world_size()
            rank = torch.distributed.get_rank()
        self.rank = int(s.rank) if s.rank is not None else rank
        self._is_meta_writer = self.rank == 0

        # torch.compile wraps the model; names and activation hooks belong to the original.
        inner = getattr(self.model, "_orig_mod", self.model)
        self._compiled = inner is not self.model
        params = [(n, p) for n, p in inner.named_parameters()]  # de-duplicates tied params
        self.device = params[0][1].device if params else torch.device("cpu")
        kinds = set(s.kinds)
        if self.optimizer is None:
            kinds.discard(fmt.KIND_UPDATE)  # measured across optimizer.step()
        if self._compiled:
            kinds.discard(fmt.KIND_ACTIVATION)  # hooks inside compiled graphs: not supported
        self.kinds = kinds

        self.layer_names: list[str] = []
        self._layer_ids: dict[str, int] = {}
        self._params: list[_Param] = []
        self._skipped_params: list[str] = []
        for name, p in params:
            if p.is_sparse or p.device != self.device or p.dtype == torch.bool:
                self._skipped_params.append(name)  # reported as missing rows below
                continue
            src = torch.view_as_real(p) if p.is_complex() else p
            self._params.append(_Param(name, p, tuple(src.shape)))
            self._layer_id(name)
        self._param_layers = np.array([self._layer_id(p.name) for p in self._params], np.int32)
        # Real parameters: gradients copy straight into the flat views (complex ones go
        # through view_as_real, one by one).
        self._plain_grads = not any(p.param.is_complex() for p in self._params)
        self._param_numels = np.array([p.param.numel() for p in self._params], np.int64)
        self._refresh_optimizer_membership()

        want_params = kinds & {fmt.KIND_WEIGHT, fmt.KIND_GRAD, fmt.KIND_UPDATE}
        self._wlayout = self._glayout = None
        if self._params and kinds & {fmt.KIND_WEIGHT, fmt.KIND_UPDATE}:
            self._wlayout = stats.FlatLayout(
                [math.prod(p.source_shape) for p in self._params], self.device
            )
            self._wviews = [
                v.view(p.source_shape)
                for v, p in zip(self._wlayout.views, self._params, strict=True)
            ]
            self._wsrc = [
                torch.view_as_real(p.param) if p.param.is_complex() else p.param
                for p in self._params
            ]
        if self._params and fmt.KIND_GRAD in kinds:
            self._glayout = stats.FlatLayout(
                [math.prod(p.source_shape) for p in self._params],
                self.device,
                chunk=self._wlayout.chunk if self._wlayout else None,
            )
            self._gviews = [
                v.view(p.source_shape)
                for v, p in zip(self._glayout.views, self._params, strict=True)
            ]
        del want_params

        # Host ring of buffers for the device->host copies (pinned only when CUDA exists).
        self._pin = torch.cuda.is_available() and self.device.type == "cuda"
        self._ring: list[torch.Tensor | None] = [None] * s.max_queue
        self._ring_bytes = 0  # allocated host buffer bytes (bounded by max_queue_bytes)
        self._free = FreeSlots(s.max_queue)

        # run.json
        self.run_dir.mkdir(parents=True, exist_ok=True)
        held = sorted(self.run_dir.glob(f"*/{fmt.SEGMENT_GLOB}"))
        if held:
            # Segments of this run continue the numbering after them (writer._next_seq).
            warnings.warn(
                f"runlens_collect: {self.run_dir} already holds a run ({len(held)} segments); "
                "they are kept and this run's segments are added after them (the analyzer "
                "will see both)",
                RuntimeWarning,
                stacklevel=3,
            )
        self.run_id = uuid.uuid4().hex
        self.start_time = time.time()
        self.meta = fmt.new_run_json(
            self.run_id, s.name or self.run_dir.resolve().name, self.start_time
        )
        self.meta.update(
            world_size=self.world_size,
            versions=runinfo.versions(),
            device=str(self.device),
            config=config,
            collector={
                **s.to_json(),
                "kinds_in_effect": [k for k in fmt.KINDS if k in kinds],
                "rank": self.rank,
                "compiled": self._compiled,
                "skipped_params": self._skipped_params,
            },
            model=runinfo.model_summary(inner),
            repro=repro.repro_record(self.device),
        )

        # hooks
        root = self.model
        self._handles.append(root.register_forward_pre_hook(self._on_forward_pre))
        self._handles.append(root.register_forward_hook(self._on_forward))
        self._acts: dict[nn.Module, _ActSpec] = {}
        if fmt.KIND_ACTIVATION in kinds:
            for path, mod in inner.named_modules():
                if mod is inner or not self._wants_module(path, mod):
                    continue
                spec = self._act_spec(path, mod)
                self._acts[mod] = spec
                self._handles.append(mod.register_forward_hook(self._on_activation))
        if fmt.KIND_OUTPUT in kinds:
            self._layer_id(fmt.OUTPUT_LAYER)
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._on_opt_pre))
            self._handles.append(self.optimizer.register_step_post_hook(self._on_opt_post))

        # per-step state
        self._t_prev_entry: float | None = None
        self._t_prev_exit = time.perf_counter()
        self._t_fwd: float | None = None
        self._blocks: dict[str, tuple[Block, torch.Tensor]] = {}
        self._pending_host: list[tuple[int, str, float]] = []
        self._pending_dev: list[tuple[int, str, torch.Tensor]] = []
        self._pending_extern: list[tuple[int, str, Any]] = []
        self._opt_fired = False
        self._grads_read = False  # read_gradients() called this step
        self._grad_norm_dev: torch.Tensor | None = None
        self._set_flags(0)
        self._last_conv = False
        self._scratch: torch.Tensor | None = None
        # Moved to the device now: a host-to-device copy at the first histogram step would
        # wait for the device.
        stats.code_map_on(self.device)

        self._writer = Writer(
            self.run_dir,
            self.rank,
            self.layer_names,
            flush_steps=s.flush_steps,
            flush_seconds=s.flush_seconds,
            max_queue=s.max_queue,
            free_slots=self._free,
            on_flush=self._on_flush,
            report=self._report,
            write_events=self._is_meta_writer,
        )
        if self._is_meta_writer:
            fmt.write_json_atomic(self.meta, self.run_dir / fmt.RUN_JSON)
        self._writer.event("start", run_id=self.run_id, world_size=self.world_size)
        self._writer.start()

    def _layer_id(self, name: str) -> int:
        i = self._layer_ids.get(name)
        if i is None:
            i = self._layer_ids[name] = len(self.layer_names)
            self.layer_names.append(name)
        return i

    def _refresh_optimizer_membership(self) -> None:
        ids: set[int] = set()
        if self.optimizer is not None:
            for g in self.optimizer.param_groups:
                ids.update(id(p) for p in g["params"])
            self._n_groups = len(self.optimizer.param_groups)
        for p in self._params:
            p.in_optimizer = id(p.param) in ids
        self._not_in_opt = np.array([not p.in_optimizer for p in self._params], bool)

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

    def _act_spec(self, path: str, mod: nn.Module) -> _ActSpec:
        dead = isinstance(mod, _RELU_FAMILY)
        bounds = None
        for cls, b in _BOUNDED.items():
            if isinstance(mod, cls):
                bounds = b if b is not None else (float(mod.min_val), float(mod.max_val))
                break
        extra = (("frac_dead_units",) if dead else ()) + (("frac_saturated",) if bounds else ())
        return _ActSpec(path, self._layer_id(path), dead, bounds, extra)

    def _set_flags(self, step: int) -> None:
        s = self.settings
        self._stat_step = step % s.every == 0
        self._out_step = step % s.activation_every == 0
        self._act_step = fmt.KIND_ACTIVATION in self.kinds and self._out_step
        self._hist_step = step % s.hist_every == 0

    # -- failure handling ---------------------------------------------------------------

    def _report(
        self, site: str, message: str, exc: BaseException | None, event: bool = True
    ) -> None:
        """Warn once for the whole collector, log each site once to events.jsonl."""
        detail = f"{type(exc).__name__}: {exc}" if exc is not None else ""
        msg = f"runlens_collect: {site}: {message}" + (f" ({detail})" if detail else "")
        key = f"{site}|{message}"
        if key in self._warned_sites:
            return
        self._warned_sites.add(key)
        self.warnings.append(msg)
        if not self._warned_categories:
            # One warning overall: a bad disk fails the writer and the close-time run.json
            # write alike; the rest go to events.jsonl (and self.warnings).
            self._warned_categories.add(site)
            warnings.warn(
                msg + "; training continues, further collector problems go to events.jsonl",
                RuntimeWarning,
                stacklevel=3,
            )
        if event and self._writer is not None:
            self._writer.event("warning", message=msg, site=site, step=self._step)
        elif event and site == "setup":
            with contextlib.suppress(Exception):
                fmt.append_event(
                    self.run_dir, {"kind": "warning", "message": msg, "time": time.time()}
                )

    def _guard(self, site: str, exc: BaseException) -> None:
        self._disabled.add(site)
        self._report(site, "failed; this statistic is no longer recorded", exc)

    # -- hooks (training thread) --------------------------------------------------------

    def _training_forward(self) -> bool:
        return torch.is_grad_enabled() and self.model.training

    def _on_forward_pre(self, module: nn.Module, args: Any) -> None:
        if self._t_fwd is None and self._enabled and self._training_forward():
            self._t_fwd = time.perf_counter()

    def _on_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._enabled or not self._training_forward():
            return
        try:
            out = _first_tensor(output)
            if out is None:
                return
            model = self.meta["model"]
            if model.get("output_shape") is None:
                model["output_shape"] = list(out.shape)
            if self._out_step and fmt.KIND_OUTPUT in self.kinds and "output" not in self._disabled:
                self._record_output(out)
        except Exception as exc:
            self._guard("output", exc)

    @torch.no_grad()
    def _record_output(self, out: torch.Tensor) -> None:
        x = out.detach()
        if x.is_complex():
            x = torch.view_as_real(x)
        xf = x if x.is_floating_point() else x.float()
        # Rows along the last dimension, so the row sums give row_sum_mean.
        rows = xf.reshape(-1, xf.shape[-1]) if xf.dim() and xf.shape[-1] else xf.reshape(1, -1)
        raw, shape = stats.tensor_raw(xf, rows, self._scratch_for(rows))
        parts = [raw]
        if self._hist_step:
            parts.append(stats.tensor_hist(xf, self._int_scratch(xf)))
        block = Block(
            fmt.KIND_OUTPUT,
            np.array([self._layer_ids[fmt.OUTPUT_LAYER]], np.int32),
            np.array([x.numel()], np.int64),
            hist=self._hist_step,
            single=shape,
            derived=("min", "max", "row_sum_mean"),
        )
        self._blocks["output"] = (block, torch.cat(parts))

    def _on_activation(self, module: nn.Module, args: Any, output: Any) -> None:
        # Off-steps, evaluation and no_grad forwards return here, before any work.
        if not self._act_step or not self._enabled or not self._training_forward():
            return
        spec = self._acts.get(module)
        if spec is not None:
            self._record_activation(module, spec, output)

    @torch.no_grad()
    def _record_activation(self, module: nn.Module, spec: _ActSpec, output: Any) -> None:
        site = "activation:" + spec.path
        try:
            if isinstance(module, _CHANNEL_FIRST):
                self._last_conv = True
            elif isinstance(module, nn.Linear | nn.LayerNorm | nn.Embedding):
                self._last_conv = False
            if site in self._disabled:
                return
            out = _first_tensor(output)
            if out is None:
                return
            x = out.detach()
            if x.is_complex():
                x = torch.view_as_real(x)
            xf = x if x.is_floating_point() else x.float()
            rows = stats.as_rows(xf)
            raw, shape = stats.tensor_raw(xf, rows, self._scratch_for(rows))
            parts = [raw]
            extras = []
            if spec.dead:
                extras.append(_dead_fraction(xf, channel_first=self._last_conv))
            if spec.bounds is not None:
                lo, hi = spec.bounds
                m = (hi - lo) * _SATURATION_MARGIN
                sat = (xf <= lo + m) | (xf >= hi - m)
                extras.append(sat.sum(dtype=torch.float32) / max(1, xf.numel()))
            if extras:
                parts.append(torch.stack(extras).double())
            if self._hist_step:
                parts.append(stats.tensor_hist(xf, self._int_scratch(xf)))
            block = Block(
                fmt.KIND_ACTIVATION,
                np.array([spec.layer_id], np.int32),
                np.array([x.numel()], np.int64),
                extra=spec.extra,
                hist=self._hist_step,
                single=shape,
            )
            self._blocks[site] = (block, torch.cat(parts))  # last call of the step wins
        except Exception as exc:
            self._guard(site, exc)

    @torch.no_grad()
    def _on_opt_pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._enabled:
            return
        self._opt_fired = True
        if len(optimizer.param_groups) != self._n_groups:
            self._refresh_optimizer_membership()
        if not self._grads_read:
            self._read_grads()
        self._read_weights()

    def read_gradients(self) -> None:
        """Take this step's gradient statistics now (and grad_norm), replacing any read so
        far this step.

        The collector reads gradients in the optimizer's step pre-hook, which is right for
        ``optimizer.step()`` but too early for closure-based steps (``LBFGS``,
        ``optimizer.step(closure)``, Lightning), where the closure computes the gradients
        after the hook ran. Call this where the gradients are final: at the end of the
        closure, after ``backward()`` (the last call of a step wins; Lightning's
        ``on_before_optimizer_step``). Never syncs with the device; never raises.
        """
        if not self._enabled or self._closed:
            return
        self._grads_read = True
        self._read_grads()

    @torch.no_grad()
    def _read_weights(self) -> None:
        """Snapshot the weights (kept for the update) and take their statistics."""
        if not self._stat_step or self._wlayout is None or "weight" in self._disabled:
            return
        try:
            torch._foreach_copy_(self._wviews, self._wsrc)
            write = fmt.KIND_WEIGHT in self.kinds
            # The snapshot must survive until the update: the sign goes to the gradient
            # buffer instead (built with the same layout), read by now and rewritten at
            # the next read.
            spare = self._glayout.matrix if self._glayout is not None else None
            self._blocks["weight"] = self._flat_block(
                fmt.KIND_WEIGHT, self._wlayout, write=write, sign_out=spare
            )
        except Exception as exc:
            self._blocks.pop("weight", None)
            self._guard("weight", exc)

    @torch.no_grad()
    def _on_opt_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not (self._enabled and self._stat_step) or fmt.KIND_UPDATE not in self.kinds:
            return
        if "update" in self._disabled or "weight" not in self._blocks:
            return
        try:
            # before - after, in place: the update negated (the writer flips it back).
            torch._foreach_sub_(self._wviews, self._wsrc)
            # The snapshot is scratch once the update is read (the next step copies anew).
            block, data = self._flat_block(
                fmt.KIND_UPDATE, self._wlayout, write=True, sign_out=self._wlayout.matrix
            )
            block.negate = True
            block.missing = self._not_in_opt.copy()
            self._blocks["update"] = (block, data)
        except Exception as exc:
            self._blocks.pop("update", None)
            self._guard("update", exc)

    @torch.no_grad()
    def _read_grads(self) -> None:
        """Statistics of the gradients as they are now (final: right before the update)."""
        if fmt.KIND_GRAD not in self.kinds or "grad" in self._disabled or self._glayout is None:
            return
        try:
            if not self._stat_step:
                # Off-steps still get grad_norm: one batched norm, kept on device.
                grads = [p.param.grad for p in self._params if p.param.grad is not None]
                grads = [g for g in grads if not g.is_sparse and g.device == self.device]
                if grads:
                    norms = torch._foreach_norm(grads, 2)
                    self._grad_norm_dev = torch.linalg.vector_norm(torch.stack(norms).float())
                return
            grads = [p.param.grad for p in self._params]
            if self._plain_grads and all(g is not None for g in grads):
                # The usual case, without a Python loop over the parameters (~0.2 ms here):
                # a sparse or odd gradient raises and takes the careful path below.
                try:
                    torch._foreach_copy_(self._gviews, grads)
                    self._grad_block(np.zeros(len(self._params), bool))
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
            self._grad_block(missing)
        except Exception as exc:
            self._blocks.pop("grad", None)
            self._guard("grad", exc)

    def _grad_block(self, missing: np.ndarray) -> None:
        assert self._glayout is not None
        # The flat copy is scratch once read: its sign goes over it.
        block, data = self._flat_block(
            fmt.KIND_GRAD, self._glayout, write=True, sign_out=self._glayout.matrix
        )
        block.missing = missing
        block.grad_norm = True
        self._blocks["grad"] = (block, data)

    def _scratch_for(self, like: torch.Tensor) -> torch.Tensor | None:
        """A reusable buffer shaped like ``like`` (None beyond SCRATCH_MAX_BYTES: then the
        stats allocate their own temporary). On CPU a fresh multi-MB temporary per
        activation costs page faults; a caching GPU allocator would not, but the same
        buffer serves both."""
        nbytes = like.numel() * like.element_size()
        if nbytes > SCRATCH_MAX_BYTES or like.device != self.device:
            return None
        buf = self._scratch
        if buf is None or buf.numel() < nbytes:
            buf = self._scratch = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return buf[:nbytes].view(like.dtype).view(like.shape)

    def _int_scratch(self, like: torch.Tensor) -> torch.Tensor | None:
        """The scratch as int32 shaped like ``like`` (histogram codes), when it fits."""
        if like.dtype != torch.float32:
            return None  # converted first: a temporary anyway
        buf = self._scratch_for(like)
        return buf.view(torch.int32) if buf is not None else None

    def _flat_block(
        self,
        kind: str,
        layout: stats.FlatLayout,
        write: bool,
        sign_out: torch.Tensor | None = None,
    ) -> tuple[Block, torch.Tensor]:
        hist = self._hist_step and write
        # The histogram first: sign_out may be the layout's own buffer.
        counts = None
        if hist:
            counts = stats.flat_hist(layout, self._int_scratch(layout.matrix)).reshape(-1)
        raw = stats.flat_raw(layout, sign_out)
        parts = [raw.reshape(-1)]
        if counts is not None:
            parts.append(counts)
        block = Block(
            kind,
            self._param_layers,
            self._param_numels,
            hist=hist,
            pads=layout.pads_array,
            write=write,
        )
        return block, torch.cat(parts) if len(parts) > 1 else parts[0]

    # -- public API ---------------------------------------------------------------------

    @property
    def global_step(self) -> int:
        """Number of completed steps (the index the next ``step()`` call will record)."""
        return self._step

    def step(self, loss: Any = None, **metrics: Any) -> None:
        """End the current training step and record it.

        ``loss`` (float or tensor) becomes ``train/loss``; each extra keyword becomes
        ``train/<name>``. Call it after ``optimizer.step()``. Never blocks on the device.
        """
        t_entry = time.perf_counter()
        if not self._enabled or self._closed:
            self._step += 1
            return
        wall = time.time()
        step = self._step
        try:
            self._end_step(step, t_entry, wall, loss, metrics)
        except Exception as exc:
            self._report("step", "recording a step failed; the step is dropped", exc)
        finally:
            self._blocks = {}
            self._opt_fired = False
            self._grads_read = False
            self._grad_norm_dev = None
            self._t_fwd = None
            self._t_prev_entry = t_entry
            self._step = step + 1
            self._set_flags(self._step)
            self._t_prev_exit = time.perf_counter()

    def log(self, values: Mapping[str, Any]) -> None:
        """Record scalars under their given names at the last completed step.

        Values may be Python/numpy numbers or scalar tensors (kept on device; read by the
        writer thread). Call it between steps, e.g. after a validation pass; before the
        first ``step()`` values are recorded at step 0.
        """
        if not self._enabled or self._closed:
            return
        step = max(0, self._step - 1)
        try:
            for name, v in values.items():
                self._add_scalar(step, str(name), v, self._pending_host, self._pending_dev)
        except Exception as exc:
            self._report("log", "recording a logged value failed", exc)

    def flush(self) -> None:
        """Ask the writer to write what it has at its next wake-up (does not wait)."""
        if self._writer is not None:
            self._writer.request_flush()

    def close(self, status: str = fmt.STATUS_FINISHED) -> None:
        """Flush everything, stop the writer, and mark the run finished (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._shutdown(status)
        except Exception as exc:
            self._report("close", "closing failed", exc, event=False)

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(fmt.STATUS_CRASHED if exc_type is not None else fmt.STATUS_FINISHED)

    # -- internals ----------------------------------------------------------------------

    def _add_scalar(
        self,
        step: int,
        name: str,
        v: Any,
        host: list[tuple[int, str, float]],
        dev: list[tuple[int, str, torch.Tensor]],
    ) -> None:
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                self._report("log", f"{name}: only scalar tensors can be logged", None)
                return
            t = v.detach().reshape(1)
            if t.device == self.device:
                dev.append((step, name, t))
            elif t.device.type == "cpu":
                dev.append((step, name, t.to(self.device, non_blocking=True)))
            else:
                self._pending_extern.append((step, name, t))  # read on the writer thread
            return
        try:
            host.append((step, name, float(v)))
        except (TypeError, ValueError) as exc:
            self._report("log", f"{name}: not a number", exc)

    def _end_step(
        self, step: int, t_entry: float, wall: float, loss: Any, metrics: Mapping[str, Any]
    ) -> None:
        host, dev = self._pending_host, self._pending_dev
        self._pending_host, self._pending_dev = [], []
        extern, self._pending_extern = self._pending_extern, []
        if self._t_prev_entry is not None:
            t_step = t_entry - self._t_prev_entry
            t_data = self._t_fwd - self._t_prev_exit if self._t_fwd is not None else math.nan
            host += [
                (step, fmt.TIME_STEP, t_step),
                (step, fmt.TIME_DATA, t_data),
                (step, fmt.TIME_COMPUTE, t_step - t_data),
            ]
        if loss is not None:
            self._add_scalar(step, fmt.TRAIN_LOSS, loss, host, dev)
        for k, v in metrics.items():
            self._add_scalar(step, f"train/{k}", v, host, dev)
        if self.optimizer is not None:
            for i, g in enumerate(self.optimizer.param_groups):
                if "lr" in g:
                    self._add_scalar(step, fmt.lr_name(i), g["lr"], host, dev)
        if not self._opt_fired:
            # No optimizer, or the optimizer step was skipped (e.g. AMP found infs).
            if not self._grads_read:
                self._read_grads()
            self._read_weights()
        if self._grad_norm_dev is not None:
            dev.append((step, fmt.GRAD_NORM, self._grad_norm_dev.reshape(1)))
        self._emit(step, wall, host, dev, extern)

    @torch.no_grad()
    def _emit(self, step, wall, host, dev, extern) -> None:
        blocks = self._blocks
        if "update" in blocks and "weight" in blocks:
            blocks["update"][0].ratio_ref = list(blocks).index("weight")
        elif "weight" in blocks and not blocks["weight"][0].write:
            del blocks["weight"]  # only there to give update_ratio its denominator
        items = list(blocks.values())
        pkg = Package(step, wall, host_scalars=host, extern=extern)
        parts = [data for _, data in items]
        parts += [t.to(torch.float64) for _, _, t in dev]
        writer = self._writer
        skipped = False
        if parts:
            try:
                slot = self._free.get_nowait()
            except queue.Empty:
                slot = None
            if slot is not None:
                n = sum(int(p.numel()) for p in parts)
                buf = self._ring[slot]
                if buf is None or buf.numel() < n:
                    old = 0 if buf is None else buf.numel() * 8
                    new = (int(n * 1.25) + 16) * 8
                    others = self._ring_bytes - old
                    if others > 0 and others + new > self.settings.max_queue_bytes:
                        # Over the memory budget (one buffer is always allowed).
                        self._free.put(slot)
                        slot = None
            if slot is None:
                # Writer behind: drop this step's device statistics rather than block.
                self._skip(step)
                skipped = True
                parts = []
            else:
                try:
                    flat = torch.cat(parts) if len(parts) > 1 else parts[0]
                    buf = self._ring[slot]
                    if buf is None or buf.numel() < n:
                        old = 0 if buf is None else buf.numel() * 8
                        buf = torch.empty(
                            int(n * 1.25) + 16, dtype=torch.float64, pin_memory=self._pin
                        )
                        self._ring[slot] = buf
                        self._ring_bytes += buf.numel() * 8 - old
                    buf[:n].copy_(flat, non_blocking=True)
                    if self.device.type == "cuda":
                        event = torch.cuda.Event()
                        event.record()
                    else:
                        event = _NoEvent()
                except BaseException:
                    self._free.put(slot)
                    raise
                pkg.blocks = [b for b, _ in items]
                pkg.dev_scalars = [(s, name) for s, name, _ in dev]
                pkg.host, pkg.size, pkg.event, pkg.slot = buf, n, event, slot
        try:
            writer.queue.put_nowait(pkg)
        except queue.Full:
            if pkg.slot is not None:
                self._free.put(pkg.slot)
            if not skipped:  # a step is counted once, however it was dropped
                self._skip(step)

    def _skip(self, step: int) -> None:
        writer = self._writer
        assert writer is not None
        writer.skipped.append(step)
        writer.skipped_total += 1
        self._report(
            "writer", "writer fell behind; statistics of some steps dropped", None, event=False
        )

    def _on_flush(self, last_step: int) -> None:
        # Runs on the writer thread.
        if self._is_meta_writer:
            self.meta["last_step"] = last_step
            fmt.write_json_atomic(self.meta, self.run_dir / fmt.RUN_JSON)

    def _remove_hooks(self) -> None:
        for h in self._handles:
            with contextlib.suppress(Exception):
                h.remove()
        self._handles = []

    def _shutdown(self, status: str | None, timeout: float = 60.0) -> None:
        self._remove_hooks()
        if _active.get_active() is self:
            _active.set_active(None)
        writer = self._writer
        if writer is None:
            return
        if self._pending_host or self._pending_dev or self._pending_extern:
            # log() after the last step: ship it in a final package.
            self._blocks = {}
            host, dev = self._pending_host, self._pending_dev
            extern = self._pending_extern
            self._pending_host, self._pending_dev, self._pending_extern = [], [], []
            self._emit(max(0, self._step - 1), time.time(), host, dev, extern)
        if status is not None:
            writer.event("close", last_step=self._step - 1 if self._step else None, status=status)
        with contextlib.suppress(queue.Full):
            writer.queue.put(None, timeout=timeout)
        writer.join(timeout)
        if writer.is_alive():
            self._report("writer", "writer did not finish in time; the last rows may be lost", None)
        if status is not None and self._is_meta_writer:
            self.meta["status"] = status
            self.meta["end_time"] = time.time()
            if writer.last_step is not None:
                self.meta["last_step"] = writer.last_step
            try:
                fmt.write_json_atomic(self.meta, self.run_dir / fmt.RUN_JSON)
            except Exception as exc:
                self._report("close", "writing run.json failed", exc, event=False)
        self._enabled = False


def _flush_at_exit(ref: weakref.ref[Collector]) -> None:
    # A collector never closed: write what is buffered, leave the status 'running'.
    col = ref()
    if col is not None and not col._closed:
        col._closed = True
        with contextlib.suppress(Exception):
            col._shutdown(None, timeout=10.0)


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, list | tuple):
        for o in output:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _dead_fraction(x: torch.Tensor, channel_first: bool) -> torch.Tensor:
    """Fraction of units that are zero for every example (units: dim 1 after a conv,
    else the last dim)."""
    if x.dim() < 2:
        return (x == 0).float().mean().reshape(())
    if channel_first:
        x = x.movedim(1, -1)
    alive = x.reshape(-1, x.shape[-1]).abs().amax(0)
    return (alive == 0).sum(dtype=torch.float32) / max(1, alive.numel())
