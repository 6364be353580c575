"""The Collector: records per-layer statistics of a training run without host syncs.

This module is the public API and the orchestration: setup, the hooks that tell it where a
training step is, the end of a step (the step contract), failure reporting and shutdown.
The work is done by

* ``config.CollectorConfig`` — the knobs;
* ``param_stats.ParamStats`` — weight, gradient and update statistics (one per device of
  a model split across devices);
* ``activation_stats.ActivationStats`` — activation and model-output statistics;
* ``budget.Workspace`` — the device buffers, within ``memory_budget`` (one per device);
* ``overhead.OverheadController`` — each step's flags, within the ``overhead`` budget;
* ``contract.StepContract`` — the step's loss, AMP scaler and clipping, as observed;
* ``observe`` — the process-wide wrappers that report losses, backward, clipping, scaling;
* ``taskinfer.TaskTracker`` — run.json ``task`` from the losses and the model class;
* ``timing.StepTimer`` — time/step, time/data, time/compute;
* ``hooks.Hooks`` — the hooks on the model and optimizer, and what ``observe`` reports;
* ``lifecycle.Shutdown`` — closing, at exit and on SIGTERM/SIGINT (``lifecycle``);
* ``resume`` — continuing a run's step axis; ``compiled`` — staying out of
  ``torch.compile``'s graphs;
* ``step`` — the step's flags and parts, and the ``Probe`` seam for extra statistics;
* ``layout`` — the typed layout of a step's packed buffer (shared with the writer);
* ``transfer.Transfer`` — host ring buffers and the non_blocking copy;
* ``writer.Writer`` — the background thread that decodes and writes Parquet.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runlens_collect import _active, dist, lifecycle, observe, repro, runinfo, stats
from runlens_collect import format as fmt
from runlens_collect import resume as resume_mod
from runlens_collect.activation_stats import ActivationStats
from runlens_collect.budget import Workspace, default_budget
from runlens_collect.compiled import (
    OutsideCompiled,
    compiled_in_place,
    compiling,
    dynamo_loaded,
)
from runlens_collect.config import CollectorConfig
from runlens_collect.contract import MEAN, StepContract
from runlens_collect.dist import local
from runlens_collect.hooks import Hooks, Observer
from runlens_collect.lifecycle import Shutdown, flush_at_exit
from runlens_collect.overhead import OverheadController
from runlens_collect.param_stats import ParamStats
from runlens_collect.probes import default_probes
from runlens_collect.probes._base import ProbeBase
from runlens_collect.step import NormOf, Probe, StepParts
from runlens_collect.taskinfer import TaskTracker
from runlens_collect.timing import StepTimer
from runlens_collect.transfer import Transfer
from runlens_collect.writer import Package, Writer

__all__ = ["Collector", "CollectorConfig"]

# At import, not at the first Collector: a script that binds ``loss_fn = F.cross_entropy``
# after ``from runlens_collect import Collector`` calls the observed function. Without a
# collector the wrappers are pass-through.
observe.install()


class Collector(Hooks, Shutdown):
    """Record a training run into ``run_dir`` in the runlens run format.

    Use as a context manager (``with Collector(...) as col:``) or call :meth:`close`.
    Call :meth:`step` once per optimizer step, after ``optimizer.step()``; :meth:`log`
    records any other scalars (e.g. validation metrics) at the last completed step.

    Nothing here synchronises the training thread with the device: statistics are computed
    by batched device ops into one tensor per step, copied without blocking into a reused
    host buffer, and decoded and written by a background thread. Any failure inside the
    collector is caught, warned once and written to events.jsonl; training continues.

    Knobs are the fields of :class:`CollectorConfig`, given as keyword arguments or as
    ``settings=CollectorConfig(...)``. ``probes`` record extra per-step statistics
    (:class:`runlens_collect.step.Probe`); by default the silent-bug probes of
    :func:`runlens_collect.probes.default_probes` (``probes=()`` turns them off).
    ``clock`` (default ``time.perf_counter``) times the collector against the step for the
    ``overhead`` budget (tests inject a fake one).

    Resuming: ``start_step=N`` numbers the first step N (a framework's global step after
    loading a checkpoint); ``resume=True`` continues after the last step the run directory
    holds, which is also the default (``resume=None``) when it holds one (with a warning);
    ``resume=False`` records from step 0 beside it. See ``runlens_collect.resume``.

    SIGTERM and SIGINT flush the run and close it as ``preempted`` before the handlers
    installed earlier run (``runlens_collect.lifecycle``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        run_dir: str | os.PathLike[str] = "runs/run",
        config: Mapping[str, Any] | None = None,
        *,
        settings: CollectorConfig | None = None,
        probes: Sequence[Probe] | None = None,
        start_step: int | None = None,
        resume: bool | None = None,
        clock: Callable[[], float] | None = None,
        _loss_reduction: str = MEAN,
        _watch_backward: bool = True,
        **knobs: Any,
    ) -> None:
        self.settings = replace(settings or CollectorConfig(), **knobs)
        if isinstance(self.settings.kinds, str):
            self.settings = replace(self.settings, kinds=(self.settings.kinds,))
        self.settings = replace(self.settings, kinds=tuple(self.settings.kinds))
        self.settings.validate()
        if start_step is not None and (isinstance(start_step, bool) or int(start_step) < 0):
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        self.run_dir = Path(run_dir)
        self.model = model
        self.optimizer = optimizer
        self.probes = list(default_probes() if probes is None else probes)
        self._clock = clock or time.perf_counter
        self.warnings: list[str] = []  # every message warned (also in events.jsonl)
        self._warned_sites: set[str] = set()
        self._warned_categories: set[str] = set()
        self._disabled: set[str] = set()
        self._handles: list[Any] = []
        self._act_handles: list[Any] = []
        self._out_handle: Any = None
        self._closed = False
        self._writer: Writer | None = None
        self._step = int(start_step or 0)
        self._enabled = False
        self._contract = StepContract(_loss_reduction)
        self._watch_backward = _watch_backward
        self.recorded: set[str] = set()  # step-contract scalars recorded at least once
        try:
            self._setup(dict(config or {}), start_step, resume)
            self._enabled = True
        except Exception as exc:
            self._report("setup", "collector setup failed; nothing will be recorded", exc)
            self._remove_hooks()
        if self._enabled:
            _active.set_active(self)
            ref = weakref.ref(self)
            atexit.register(flush_at_exit, ref)
            lifecycle.register(self)

    # -- setup --------------------------------------------------------------------------

    def _setup(self, config: dict[str, Any], start_step: int | None, resume: bool | None) -> None:
        s = self.settings
        self.world_size, rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.world_size = torch.distributed.get_world_size()
            rank = torch.distributed.get_rank()
        self.rank = int(s.rank) if s.rank is not None else rank
        self._is_meta_writer = self.rank == 0

        # torch.compile wraps the model; names and activation hooks belong to the original.
        # model.compile() compiles in place, hooks included: no hooks inside it either.
        inner = getattr(self.model, "_orig_mod", self.model)
        self._compiled = inner is not self.model or compiled_in_place(self.model)
        params = [(n, p) for n, p in inner.named_parameters()]  # de-duplicates tied params
        self.device = params[0][1].device if params else torch.device("cpu")
        self._param_ids = {id(p) for _, p in params}
        kinds = set(s.kinds)
        if self.optimizer is None:
            kinds.discard(fmt.KIND_UPDATE)  # measured across optimizer.step()
        if self._compiled:
            kinds.discard(fmt.KIND_ACTIVATION)  # hooks inside compiled graphs: not supported
        self._deepspeed = dist.wrapper_of(inner) == "DeepSpeed"
        if self._deepspeed:
            # ZeRO moves gradients into its partitioned buffers (param.grad is None) and
            # its optimizer holds flat fp32 partitions, not the model's parameters: no
            # gradient or update rows (they would read as frozen layers); weights are
            # whole on every rank under ZeRO 1-2. See docs/distributed.md.
            kinds -= {fmt.KIND_GRAD, fmt.KIND_UPDATE}
            self.probes = [p for p in self.probes if getattr(p, "name", "") != "optimizer"]
        self.kinds = kinds

        # Layer ids: parameters first, then activations, then the output (writer's order).
        self.layer_names: list[str] = []
        self._layer_ids: dict[str, int] = {}
        budget = s.memory_budget
        if budget is None:
            trainable = sum(
                local(p).numel() * p.element_size() for _, p in params if p.requires_grad
            )
            budget = default_budget(trainable)
        # One parameter strategy per device, each reading its own device's tensors (a
        # model split across devices) through its own budgeted workspace; the collector's
        # device (the first parameter's) first.
        self._workspace = Workspace(self.device, budget)
        by_device: dict[torch.device, list[tuple[str, nn.Parameter]]] = {self.device: []}
        for n, p in params:
            by_device.setdefault(_device_of(p), []).append((n, p))
        self._groups: list[ParamStats] = []
        for key, group in by_device.items():
            dev = group[0][1].device if group else key
            tag = "" if key == self.device else f"@{key}"
            ws = self._workspace if dev == self.device else Workspace(dev, budget)
            self._groups.append(
                ParamStats(
                    group,
                    dev,
                    kinds,
                    self.optimizer,
                    self._layer_id,
                    ws,
                    self._guard,
                    self._disabled,
                    tag=tag,
                )
            )
        self._control = OverheadController(s, kinds, self._clock)
        self._transfer = Transfer(self.device, s.max_queue, s.max_queue_bytes)
        self._timer = StepTimer(self.device, self._clock)
        self._task = TaskTracker(inner)

        # run.json: a new run, or the continuation of the one the directory holds
        self.run_dir.mkdir(parents=True, exist_ok=True)
        prev = resume_mod.find_previous(self.run_dir, self.rank) if resume is not False else None
        first, continuing = resume_mod.resume_point(
            self.run_dir, self.rank, prev, start_step, resume
        )
        if first is not None:
            self._step = first
        self.start_time = time.time()
        self.run_id = uuid.uuid4().hex
        prev_meta = prev.meta if (continuing and prev is not None and prev.meta) else {}
        if prev_meta.get("run_id"):
            self.run_id = str(prev_meta["run_id"])  # one run, continued
        self.meta = fmt.new_run_json(
            self.run_id,
            s.name or str(prev_meta.get("name") or self.run_dir.resolve().name),
            float(prev_meta.get("start_time") or self.start_time),
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
                "skipped_params": [n for g in self._groups for n in g.skipped],
                "memory": _memory_info(self._groups),
                "sampling": self._control.summary(),
                "devices": {str(d): len(g) for d, g in by_device.items() if g},
                "data_time": self._timer.mode,
                "wire_dtype": str(self._transfer.dtype).replace("torch.", ""),
                "probes": [_probe_site(p).removeprefix("probe:") for p in self.probes],
            },
            model=runinfo.model_summary(inner),
            repro=repro.repro_record(self.device),
            task=self._task.record(),
            resumed=list(fmt.read_resumed(prev_meta)),
        )
        # What this rank holds (sharded parameters with their offsets): run.json for rank
        # 0, the start event for every rank. Local facts only, no collective.
        try:
            self.layout = dist.layout(inner, params, self.rank, self.world_size)
        except Exception as exc:  # a wrapper's internals changed: record without it
            self._report("layout", "could not read the distributed layout", exc)
            self.layout = {"rank": self.rank, "world_size": self.world_size, "n_sharded": 0}
        if self.world_size > 1 or self.layout["n_sharded"]:
            self.meta["distributed"] = self.layout
        self._task.changed = False

        self._acts = ActivationStats(
            s, inner, kinds, self._layer_id, self._workspace, self._guard, self._disabled
        )
        self._hook_model()
        self._hook_optimizer(eagerly=dynamo_loaded())
        probe_view: Any = self.model
        if compiled_in_place(self.model):
            probe_view = OutsideCompiled(self.model)
        for probe in self.probes:
            try:
                if isinstance(probe, ProbeBase):
                    # Their hooks' time counts against the overhead budget like the rest.
                    probe.timed(self._clock, self._control.charge)
                # The model the user calls (a compiled one's wrapper runs hooks eagerly);
                # probes unwrap it for parameter names.
                self._handles.extend(probe.attach(probe_view, self.optimizer))
            except Exception as exc:
                self._guard(_probe_site(probe), exc)
        self._clip_cache: tuple[tuple[int, ...], bool] | None = None
        self._observer = Observer(self)
        observe.add_listener(self._observer)
        self._probe_meta()

        # per-step state
        self._parts = StepParts()
        self._opt_fired = False
        self._opt_traced = False  # the optimizer step ran inside compiled code
        self._grads_read = False  # read_gradients() called this step
        self._param_in_step = 0.0  # parameter reads made by step() itself (no optimizer hook)
        self._parts.host_device = self.device.type == "cpu"  # see StepParts.own_scalar
        self._flags = self._control.flags_for(self._step)
        self._arm(self._flags)
        # Moved to the device now: a host-to-device copy at the first histogram step would
        # wait for the device.
        for g in self._groups:
            stats.code_map_on(g.device)
            stats.bin_lut_on(g.device)

        self._writer = Writer(
            self.run_dir,
            self.rank,
            self.layer_names,
            flush_steps=s.flush_steps,
            flush_seconds=s.flush_seconds,
            max_queue=s.max_queue,
            free_slots=self._transfer.free,
            on_flush=self._on_flush,
            report=self._report,
            write_events=True,
            rolling=s.compact and s.rolling,
        )
        start: dict[str, Any] = {"run_id": self.run_id, "world_size": self.world_size}
        if "distributed" in self.meta:
            start["layout"] = self.layout
        self._writer.event("start", **start)
        if continuing:
            record = resume_mod.resume_record(
                self._step, prev, time.time(), self._writer.first_segments(), self.run_id
            )
            self.meta["resumed"].append(record)
            self._writer.event("resume", **record)
        self._first = self._step
        if self._is_meta_writer:
            fmt.write_json_atomic(self.meta, self.run_dir / fmt.RUN_JSON)
        self._writer.start()

    def _layer_id(self, name: str) -> int:
        i = self._layer_ids.get(name)
        if i is None:
            i = self._layer_ids[name] = len(self.layer_names)
            self.layer_names.append(name)
        return i

    @property
    def _params(self) -> ParamStats:
        """The parameter statistics of the collector's device (tests, benchmarks)."""
        return self._groups[0]

    @property
    def _ring(self) -> list[torch.Tensor | None]:
        """The host buffers (for tests and benchmarks)."""
        return self._transfer.ring

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
                    self.run_dir,
                    {"kind": "warning", "message": msg, "time": time.time()},
                    getattr(self, "rank", 0),
                )

    def _guard(self, site: str, exc: BaseException) -> None:
        self._disabled.add(site)
        self._report(site, "failed; this statistic is no longer recorded", exc)

    # -- public API ---------------------------------------------------------------------

    @property
    def global_step(self) -> int:
        """The index the next ``step()`` call will record (``start_step`` + steps done)."""
        return self._step

    def read_gradients(self) -> None:
        """Take this step's gradient statistics now (and grad_norm), replacing any read so
        far this step.

        The collector reads gradients in the optimizer's step pre-hook, which is right for
        ``optimizer.step()`` but too early for closure-based steps (``LBFGS``,
        ``optimizer.step(closure)``, Lightning), where the closure computes the gradients
        after the hook ran. Call this where the gradients are final: at the end of the
        closure, after ``backward()`` (the last call of a step wins; Lightning's
        ``on_before_optimizer_step``). A ``clip_grad_norm_`` after this call makes the
        collector read them again after ``optimizer.step()``. Never syncs with the device;
        never raises.
        """
        if not self._enabled or self._closed:
            return
        t0 = self._clock()
        self._grads_read = True
        self._read_grads()
        self._control.charge("param", self._clock() - t0)

    def step(self, loss: Any = None, **metrics: Any) -> None:
        """End the current optimizer step and record it.

        ``loss`` (float or tensor) becomes ``train/loss``; without it, the loss is the
        mean of what was backwarded since the last step (see ``contract``). Each extra
        keyword becomes ``train/<name>``. Call it after ``optimizer.step()``. Never blocks
        on the device.
        """
        if compiling():
            # Called from compiled code: run eagerly (a graph break), never traced.
            step_eagerly = self.__dict__.get("_step_eager")
            if step_eagerly is not None:
                step_eagerly(loss, **metrics)
            return
        t_entry = self._clock()
        if not self._enabled or self._closed:
            self._step += 1
            return
        wall = time.time()
        step = self._step
        flags = self._flags
        t_prev = self._timer.prev_entry
        try:
            self._end_step(step, t_entry, wall, loss, metrics)
        except Exception as exc:
            self._report("step", "recording a step failed; the step is dropped", exc)
        finally:
            self._parts.clear()
            self._contract.reset()
            self._opt_fired = False
            self._opt_traced = False
            self._grads_read = False
            self._step = step + 1
            self._next_flags(step, flags, t_entry, t_prev)
            self._maintain()
            self._timer.next_step(t_entry)

    def log(self, values: Mapping[str, Any]) -> None:
        """Record scalars under their given names at the last completed step.

        Values may be Python/numpy numbers or scalar tensors (kept on device; read by the
        writer thread). Call it between steps, e.g. after a validation pass; before the
        first ``step()`` values are recorded at the first step.
        """
        if not self._enabled or self._closed or compiling():
            return
        step = max(self._first_step, self._step - 1)
        try:
            for name, v in values.items():
                self._add_scalar(step, str(name), v)
        except Exception as exc:
            self._report("log", "recording a logged value failed", exc)

    @property
    def _first_step(self) -> int:
        """The first step this collector records (``start_step``, a resume point, or 0)."""
        return getattr(self, "_first", 0)

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
        if exc_type is None:
            self.close(fmt.STATUS_FINISHED)
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close(fmt.STATUS_PREEMPTED)
        else:
            self.close(fmt.STATUS_CRASHED)

    # -- the end of a step --------------------------------------------------------------

    def _add_scalar(self, step: int, name: str, v: Any, own: bool = False) -> None:
        """A scalar into the step's parts: tensors stay on the device (or, on another
        device, are read by the writer thread); numbers are host values. ``own``: a fresh
        tensor of the step's own (the loss) nobody changes afterwards
        (``StepParts.own_scalar``)."""
        parts = self._parts
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                self._report("log", f"{name}: only scalar tensors can be logged", None)
                return
            t = v.detach().reshape(1)
            if own and t.device == self.device:
                parts.own_scalar(step, name, t)
            elif t.device == self.device:
                parts.dev.append((step, name, t))
            elif t.device.type == "cpu":
                parts.dev.append((step, name, t.to(self.device, non_blocking=True)))
            else:
                parts.extern.append((step, name, t))  # read on the writer thread
            return
        try:
            parts.host.append((step, name, float(v)))
        except (TypeError, ValueError) as exc:
            self._report("log", f"{name}: not a number", exc)

    def _end_step(
        self, step: int, t_entry: float, wall: float, loss: Any, metrics: Mapping[str, Any]
    ) -> None:
        """The step contract: everything recorded once per step is decided here, in this
        order (values logged since the last step were already added to the parts):
        timings, the loss (unscaled, over the step's micro-batches) and metrics, learning
        rates, whether the optimizer step was skipped, the parameter reads the optimizer
        hooks did not make, the clip norm, loss scale and skip flag, the probes, then the
        device scalars that later reads replace (``grad_norm`` off ``every`` steps)."""
        parts, flags, contract = self._parts, self._flags, self._contract
        timing = self._timer.end(step, t_entry, parts)
        if isinstance(loss, torch.Tensor):
            loss = contract.unscaled(loss)  # given scaler.scale(loss): the loss itself
        elif loss is None:
            loss = contract.loss()
        if loss is not None:
            self._add_scalar(step, fmt.TRAIN_LOSS, loss, own=True)
            self.recorded.add(fmt.TRAIN_LOSS)
        for k, v in metrics.items():
            self._add_scalar(step, f"train/{k}", v)
        if self.optimizer is not None:
            for i, g in enumerate(self.optimizer.param_groups):
                if "lr" in g:
                    self._add_scalar(step, fmt.lr_name(i), g["lr"])
        # An optimizer whose step() was not called did not update the parameters (AMP's
        # GradScaler found inf/NaN gradients): its gradients were never applied.
        skipped = self.optimizer is not None and not self._opt_fired and not self._opt_traced
        t0 = self._clock()
        if skipped:
            for g in self._groups:
                parts.sections.pop(g.names[fmt.KIND_GRAD], None)
                parts.latest.pop(g.grad_norm_name, None)
                g.read_weights(flags, parts)
        elif not self._opt_fired:
            # No optimizer, or its step ran inside compiled code: read what is left.
            if not self._grads_read:
                self._read_grads()
            for g in self._groups:
                g.read_weights(flags, parts)
        elif contract.reread:
            self._read_grads()  # clipped after the last read, without a post hook
        self._param_in_step = self._clock() - t0
        for g in self._groups:
            g.finish(parts)
        if contract.preclip is not None and not skipped:
            self._add_scalar(step, fmt.GRAD_NORM_PRECLIP, contract.preclip)
            self.recorded.add(fmt.GRAD_NORM_PRECLIP)
        if contract.scale is not None:
            self._add_scalar(step, fmt.LOSS_SCALE, contract.scale)
        if skipped:
            parts.host_scalar(step, fmt.STEP_SKIPPED, 1.0)
        elif contract.device_skip is not None:
            self._add_scalar(step, fmt.STEP_SKIPPED, (contract.device_skip > 0).to(torch.float32))
        elif contract.scaler is not None:
            parts.host_scalar(step, fmt.STEP_SKIPPED, 0.0)
        for probe in self.probes:
            site = _probe_site(probe)
            if site not in self._disabled:
                try:
                    probe.end_step(step, flags, parts)
                except Exception as exc:
                    self._guard(site, exc)
        self._probe_meta()
        self._ship_latest(step)
        if self._task.changed:
            self._task.changed = False
            self.meta["task"] = self._task.record()  # the writer's next flush writes it
        self._emit(step, wall, timing)

    def _ship_latest(self, step: int) -> None:
        """The replaceable device scalars; off-step grad norms of several devices become
        one total."""
        latest = self._parts.latest
        norms = [k for k in latest if k == fmt.GRAD_NORM or k.startswith(fmt.GRAD_NORM + "@")]
        if len(norms) > 1:
            vals = [
                _tensor(latest.pop(k)).reshape(()).to(self.device, non_blocking=True) for k in norms
            ]
            latest[fmt.GRAD_NORM] = torch.linalg.vector_norm(torch.stack(vals))
        elif norms and norms[0] != fmt.GRAD_NORM:
            latest[fmt.GRAD_NORM] = _tensor(latest.pop(norms[0])).to(self.device, non_blocking=True)
        for name, value in latest.items():
            self._parts.own_scalar(step, name, value)  # fresh reductions of this step

    def _probe_meta(self) -> None:
        """run.json ``probes``: rebuilt when a probe has news, and replaced whole (the writer
        thread may be serializing the old one)."""
        if not any(getattr(p, "changed", False) for p in self.probes):
            return
        out = {}
        for probe in self.probes:
            site = _probe_site(probe)
            if site in self._disabled or not hasattr(probe, "run_json"):
                continue
            try:
                out[site.removeprefix("probe:")] = probe.run_json()
                probe.changed = False
            except Exception as exc:
                self._guard(site, exc)
        self.meta["probes"] = out

    @torch.no_grad()
    def _emit(self, step: int, wall: float, timing: Any = None) -> None:
        """Pack the parts into one package (its typed layout, one host copy) and queue it."""
        host, dev, extern = self._parts.take_scalars()
        pkg = Package(step, wall, host_scalars=host, extern=extern, timing=timing)
        writer = self._writer
        assert writer is not None
        skipped = not self._transfer.send_step(pkg, list(self._parts.sections.values()), dev)
        if skipped:
            # Writer behind: drop this step's device statistics rather than block.
            self._skip(step)
        try:
            writer.queue.put_nowait(pkg)
        except queue.Full:
            if pkg.slot is not None:
                self._transfer.release(pkg.slot)
            if not skipped:  # a step is counted once, however it was dropped
                self._skip(step)

    def _next_flags(self, step: int, flags: Any, t_entry: float, t_prev: float | None) -> None:
        """Charge this ``step()`` to the overhead budget; decide the next step's flags (a
        cadence change is a ``cadence`` event and updates run.json's sampling record)."""
        control = self._control
        try:
            param, self._param_in_step = self._param_in_step, 0.0
            control.charge("param", param)
            control.charge("base", self._clock() - t_entry - param)
            step_s = t_entry - t_prev if t_prev is not None else None
            changed = control.end_step(step, flags, step_s)
            if changed is not None:
                self.meta["collector"]["sampling"] = control.summary()
                if self._writer is not None:
                    self._writer.event("cadence", step=step + 1, **changed.as_json())
            self._flags = control.flags_for(self._step)
            t0 = self._clock()
            self._arm(self._flags)
            control.charge("act", self._clock() - t0)
        except Exception as exc:
            control.target = None  # fixed cadences from now on
            self._flags = control.flags_for(self._step)
            self._arm(self._flags)
            self._report("overhead", "adapting the cadence failed; the knobs' cadences hold", exc)

    def _skip(self, step: int) -> None:
        writer = self._writer
        assert writer is not None
        writer.skipped.append(step)
        writer.skipped_total += 1
        self._report(
            "writer", "writer fell behind; statistics of some steps dropped", None, event=False
        )


def _tensor(v: torch.Tensor | NormOf) -> torch.Tensor:
    return v.tensor() if isinstance(v, NormOf) else v


def _memory_info(groups: Sequence[ParamStats]) -> dict[str, object]:
    """run.json ``collector.memory``: one device's record, or the devices' records summed
    (budget per device; the most update subsets of any device)."""
    infos = [g.memory_info() for g in groups if g._params] or [groups[0].memory_info()]
    if len(infos) == 1:
        return infos[0]
    out: dict[str, Any] = dict(infos[0])
    for key in ("held_bytes", "trainable_bytes", "frozen_bytes"):
        out[key] = sum(int(i[key]) for i in infos)  # type: ignore[call-overload]
    out["update_subsets"] = max(int(i["update_subsets"]) for i in infos)  # type: ignore[call-overload]
    out["update_cut_tensors"] = sorted({t for i in infos for t in i["update_cut_tensors"]})  # type: ignore[union-attr]
    return out


def _device_of(p: torch.Tensor) -> torch.device:
    """The device a parameter's statistics are computed on (one ParamStats per device)."""
    return p.device


def _probe_site(probe: Probe) -> str:
    return "probe:" + str(getattr(probe, "name", type(probe).__name__))
