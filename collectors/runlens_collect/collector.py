"""The Collector: records per-layer statistics of a training run without host syncs.

This module is the public API and the orchestration: setup, the hooks that tell it where a
training step is, the end of a step, failure reporting and shutdown. The work is done by

* ``config.CollectorConfig`` — the knobs;
* ``param_stats.ParamStats`` — weight, gradient and update statistics;
* ``activation_stats.ActivationStats`` — activation and model-output statistics;
* ``budget.Workspace`` — the device buffers, within ``memory_budget``;
* ``overhead.OverheadController`` — each step's flags, within the ``overhead`` budget;
* ``step`` — the step's flags and parts, and the ``Probe`` seam for extra statistics;
* ``layout`` — the typed layout of a step's packed buffer (shared with the writer);
* ``transfer.Transfer`` — host ring buffers and the non_blocking copy;
* ``writer.Writer`` — the background thread that decodes and writes Parquet.
"""

from __future__ import annotations

import atexit
import contextlib
import math
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

from runlens_collect import _active, repro, runinfo, stats
from runlens_collect import format as fmt
from runlens_collect.activation_stats import ActivationStats, first_tensor
from runlens_collect.budget import Workspace, default_budget
from runlens_collect.config import CollectorConfig
from runlens_collect.overhead import OverheadController
from runlens_collect.param_stats import ParamStats
from runlens_collect.step import Probe, StepFlags, StepParts
from runlens_collect.transfer import Transfer
from runlens_collect.writer import Package, Writer

__all__ = ["Collector", "CollectorConfig"]


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
    ``settings=CollectorConfig(...)``. ``probes`` add extra per-step statistics
    (:class:`runlens_collect.step.Probe`). ``clock`` (default ``time.perf_counter``) times
    the collector against the step for the ``overhead`` budget (tests inject a fake one).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        run_dir: str | os.PathLike[str] = "runs/run",
        config: Mapping[str, Any] | None = None,
        *,
        settings: CollectorConfig | None = None,
        probes: Sequence[Probe] = (),
        clock: Callable[[], float] | None = None,
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
        self.probes = list(probes)
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

        # Layer ids: parameters first, then activations, then the output (writer's order).
        self.layer_names: list[str] = []
        self._layer_ids: dict[str, int] = {}
        budget = s.memory_budget
        if budget is None:
            trainable = sum(p.numel() * p.element_size() for _, p in params if p.requires_grad)
            budget = default_budget(trainable)
        self._workspace = Workspace(self.device, budget)
        self._params = ParamStats(
            params,
            self.device,
            kinds,
            self.optimizer,
            self._layer_id,
            self._workspace,
            self._guard,
            self._disabled,
        )
        self._control = OverheadController(s, kinds, self._clock)
        self._transfer = Transfer(self.device, s.max_queue, s.max_queue_bytes)

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
                "skipped_params": self._params.skipped,
                "memory": self._params.memory_info(),
                "sampling": self._control.summary(),
            },
            model=runinfo.model_summary(inner),
            repro=repro.repro_record(self.device),
        )

        # hooks
        root = self.model
        self._handles.append(root.register_forward_pre_hook(self._on_forward_pre))
        self._acts = ActivationStats(
            s, inner, kinds, self._layer_id, self._workspace, self._guard, self._disabled
        )
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._on_opt_pre))
            self._handles.append(self.optimizer.register_step_post_hook(self._on_opt_post))
        for probe in self.probes:
            try:
                self._handles.extend(probe.attach(inner, self.optimizer))
            except Exception as exc:
                self._guard(_probe_site(probe), exc)

        # per-step state
        self._t_prev_entry: float | None = None
        self._t_prev_exit = self._clock()
        self._t_fwd: float | None = None
        self._parts = StepParts()
        self._opt_fired = False
        self._grads_read = False  # read_gradients() called this step
        self._param_in_step = 0.0  # parameter reads made by step() itself (no optimizer hook)
        self._host_device = self.device.type == "cpu"
        self._flags = self._control.flags_for(0)
        self._arm(self._flags)
        # Moved to the device now: a host-to-device copy at the first histogram step would
        # wait for the device.
        stats.code_map_on(self.device)
        stats.bin_lut_on(self.device)

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
            self._t_fwd = self._clock()

    def _on_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._enabled or not self._training_forward():
            return
        try:
            out = first_tensor(output)
            if out is None:
                return
            model = self.meta["model"]
            if model.get("output_shape") is None:
                model["output_shape"] = list(out.shape)
            flags = self._flags
            if flags.out and fmt.KIND_OUTPUT in self.kinds and "output" not in self._disabled:
                t0 = self._clock()
                self._acts.record_output(out, flags, self._parts)
                self._control.charge("act", self._clock() - t0)
        except Exception as exc:
            self._guard("output", exc)

    def _on_activation(self, module: nn.Module, args: Any, output: Any) -> None:
        # Off-steps, evaluation and no_grad forwards return here, before any work.
        if not self._flags.act or not self._enabled or not self._training_forward():
            return
        t0 = self._clock()
        self._acts.record(module, output, self._flags, self._parts)
        self._control.charge("act", self._clock() - t0)

    def _on_opt_pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._enabled:
            return
        t0 = self._clock()
        self._opt_fired = True
        if len(optimizer.param_groups) != self._params.n_groups:
            self._params.refresh_membership(self.optimizer)
        if not self._grads_read:
            self._params.read_grads(self._flags, self._parts)
        self._params.read_weights(self._flags, self._parts)
        self._control.charge("param", self._clock() - t0)

    def _on_opt_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._enabled:
            t0 = self._clock()
            self._params.read_update(self._flags, self._parts)
            self._control.charge("param", self._clock() - t0)

    # -- public API ---------------------------------------------------------------------

    @property
    def global_step(self) -> int:
        """Number of completed steps (the index the next ``step()`` call will record)."""
        return self._step

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
        t0 = self._clock()
        self._grads_read = True
        self._params.read_grads(self._flags, self._parts)
        self._control.charge("param", self._clock() - t0)

    def step(self, loss: Any = None, **metrics: Any) -> None:
        """End the current training step and record it.

        ``loss`` (float or tensor) becomes ``train/loss``; each extra keyword becomes
        ``train/<name>``. Call it after ``optimizer.step()``. Never blocks on the device.
        """
        t_entry = self._clock()
        if not self._enabled or self._closed:
            self._step += 1
            return
        wall = time.time()
        step = self._step
        flags = self._flags
        t_prev = self._t_prev_entry
        try:
            self._end_step(step, t_entry, wall, loss, metrics)
        except Exception as exc:
            self._report("step", "recording a step failed; the step is dropped", exc)
        finally:
            self._parts.clear()
            self._opt_fired = False
            self._grads_read = False
            self._t_fwd = None
            self._t_prev_entry = t_entry
            self._step = step + 1
            self._next_flags(step, flags, t_entry, t_prev)
            self._t_prev_exit = self._clock()

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
                self._add_scalar(step, str(name), v)
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

    # -- the end of a step --------------------------------------------------------------

    def _add_scalar(self, step: int, name: str, v: Any, own: bool = False) -> None:
        """A scalar into the step's parts: tensors stay on the device (or, on another
        device, are read by the writer thread); numbers are host values. ``own``: the
        loss passed to step(), a fresh tensor nobody changes afterwards: on a CPU run the
        writer thread reads it as is (no copy on the training thread)."""
        parts = self._parts
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                self._report("log", f"{name}: only scalar tensors can be logged", None)
                return
            t = v.detach().reshape(1)
            if own and self._host_device and t.device == self.device:
                parts.extern.append((step, name, t))
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
        timings, the loss and metrics, learning rates, the parameter reads the optimizer
        hooks did not make (no optimizer, or its step skipped), the probes, then the
        device scalars that later reads replace (``grad_norm`` off ``every`` steps)."""
        parts, flags = self._parts, self._flags
        if self._t_prev_entry is not None:
            t_step = t_entry - self._t_prev_entry
            t_data = self._t_fwd - self._t_prev_exit if self._t_fwd is not None else math.nan
            parts.host += [
                (step, fmt.TIME_STEP, t_step),
                (step, fmt.TIME_DATA, t_data),
                (step, fmt.TIME_COMPUTE, t_step - t_data),
            ]
        if loss is not None:
            self._add_scalar(step, fmt.TRAIN_LOSS, loss, own=True)
        for k, v in metrics.items():
            self._add_scalar(step, f"train/{k}", v)
        if self.optimizer is not None:
            for i, g in enumerate(self.optimizer.param_groups):
                if "lr" in g:
                    self._add_scalar(step, fmt.lr_name(i), g["lr"])
        if not self._opt_fired:
            # No optimizer, or the optimizer step was skipped (e.g. AMP found infs).
            t0 = self._clock()
            if not self._grads_read:
                self._params.read_grads(flags, parts)
            self._params.read_weights(flags, parts)
            self._param_in_step = self._clock() - t0
        self._params.finish(parts)
        for probe in self.probes:
            site = _probe_site(probe)
            if site not in self._disabled:
                try:
                    probe.end_step(step, flags, parts)
                except Exception as exc:
                    self._guard(site, exc)
        for name, value in parts.latest.items():
            if self._host_device:
                parts.extern.append((step, name, value))  # see _add_scalar
            else:
                parts.device_scalar(step, name, value)
        self._emit(step, wall)

    @torch.no_grad()
    def _emit(self, step: int, wall: float) -> None:
        """Pack the parts into one package (its typed layout, one host copy) and queue it."""
        host, dev, extern = self._parts.take_scalars()
        pkg = Package(step, wall, host_scalars=host, extern=extern)
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

    # -- shutdown -----------------------------------------------------------------------

    def _on_flush(self, last_step: int) -> None:
        # Runs on the writer thread.
        if self._is_meta_writer:
            self.meta["last_step"] = last_step
            fmt.write_json_atomic(self.meta, self.run_dir / fmt.RUN_JSON)

    def _remove_hooks(self) -> None:
        self._arm(None)
        for h in self._handles:
            with contextlib.suppress(Exception):
                h.remove()
        self._handles = []

    def _arm(self, flags: StepFlags | None) -> None:
        """Forward hooks only for steps that use them (None: none): the activation hooks on
        activation steps, the model's forward hook on output steps (and until the output's
        shape is known). A module with a forward hook takes nn.Module's slow call path
        (~5 us a call on CPU: 2% of a 6 ms step for a 25-module MLP); arming and disarming
        costs that once per activation step."""
        act = flags is not None and flags.act
        out = flags is not None and (flags.out or self.meta["model"].get("output_shape") is None)
        if act != bool(self._act_handles):
            if act:
                self._act_handles = [
                    mod.register_forward_hook(self._on_activation) for mod in self._acts.specs
                ]
            else:
                for h in self._act_handles:
                    with contextlib.suppress(Exception):
                        h.remove()
                self._act_handles = []
        if out != (self._out_handle is not None):
            if out:
                self._out_handle = self.model.register_forward_hook(self._on_forward)
            else:
                assert self._out_handle is not None
                with contextlib.suppress(Exception):
                    self._out_handle.remove()
                self._out_handle = None

    def _shutdown(self, status: str | None, timeout: float = 60.0) -> None:
        self._remove_hooks()
        if _active.get_active() is self:
            _active.set_active(None)
        writer = self._writer
        if writer is None:
            return
        if self._parts.has_scalars():
            # log() after the last step: ship it in a final package (scalars only).
            self._parts.sections.clear()
            self._parts.latest.clear()
            self._emit(max(0, self._step - 1), time.time())
        if status is not None:
            writer.event("close", last_step=self._step - 1 if self._step else None, status=status)
        with contextlib.suppress(queue.Full):
            writer.queue.put(None, timeout=timeout)
        writer.join(timeout)
        if writer.is_alive():
            self._report("writer", "writer did not finish in time; the last rows may be lost", None)
        if status is not None and self._is_meta_writer:
            self.meta["collector"]["sampling"] = self._control.summary()
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


def _probe_site(probe: Probe) -> str:
    return "probe:" + str(getattr(probe, "name", type(probe).__name__))
