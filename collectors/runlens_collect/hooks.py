"""Where a step is: the collector's hooks on the model and the optimizer, what ``observe``
reports to it, and keeping up with ``torch.compile`` (a mixin of ``Collector``).

Every hook is cheap, never syncs with the device, never raises into training (failures go
through ``_guard``) and returns at once while dynamo traces (``compiled.compiling``): the
collector is never part of a compiled graph.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from runlens_collect import format as fmt
from runlens_collect.activation_stats import model_output
from runlens_collect.compiled import (
    CompiledCallHook,
    compiled_in_place,
    compiling,
    dynamo_loaded,
    eager,
)

if TYPE_CHECKING:
    from runlens_collect.activation_stats import ActivationStats
    from runlens_collect.contract import StepContract
    from runlens_collect.overhead import OverheadController
    from runlens_collect.param_stats import ParamStats
    from runlens_collect.step import StepFlags, StepParts
    from runlens_collect.taskinfer import TaskTracker
    from runlens_collect.timing import StepTimer


class Hooks:
    """The hooks of ``Collector`` (which sets every attribute annotated here)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    meta: dict[str, Any]
    kinds: set[str]
    _enabled: bool
    _closed: bool
    _disabled: set[str]
    _handles: list[Any]
    _act_handles: list[Any]
    _out_handle: Any
    _control: OverheadController
    _clock: Any
    _flags: StepFlags
    _parts: StepParts
    _groups: list[ParamStats]
    _acts: ActivationStats
    _contract: StepContract
    _timer: StepTimer
    _task: TaskTracker
    _param_ids: set[int]
    _clip_cache: tuple[tuple[int, ...], bool] | None
    _watch_backward: bool
    _opt_fired: bool
    _opt_traced: bool
    _grads_read: bool

    def _guard(self, site: str, exc: BaseException) -> None: ...

    def step(self, loss: Any = None, **metrics: Any) -> None: ...

    def _hook_model(self) -> None:
        root = self.model
        if compiled_in_place(root):
            # model.compile(): around the compiled call, outside the compiled region.
            self._handles.append(CompiledCallHook(root, self._on_forward_pre, self._on_forward))
            self._root_hooked = "compiled"
        else:
            # The forward hook is armed only on steps that use it (``_arm``).
            self._handles.append(root.register_forward_pre_hook(self._on_forward_pre))
            self._root_hooked = "hooks"

    def _arm(self, flags: StepFlags | None) -> None:
        """Forward hooks only for steps that use them (None: none): the activation hooks on
        activation steps, the model's forward hook on output steps (and until the output's
        shape is known). A module with a forward hook takes nn.Module's slow call path
        (~5 us a call on CPU: 2% of a 6 ms step for a 25-module MLP); arming and disarming
        costs that once per activation step. A compiled model's call hook always runs."""
        act = flags is not None and flags.act
        out = (
            flags is not None
            and self._root_hooked == "hooks"
            and (flags.out or self.meta["model"].get("output_shape") is None)
        )
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
                with contextlib.suppress(Exception):
                    self._out_handle.remove()
                self._out_handle = None

    def _hook_optimizer(self, eagerly: bool) -> None:
        """The optimizer's step hooks; ``eagerly``: wrapped so that compiled code calls
        them (and ``step``) eagerly instead of tracing them (dynamo loaded)."""
        self._opt_eager = eagerly
        if eagerly:
            self._step_eager = eager(self.step)
        opt = self.optimizer
        if opt is None:
            return
        for h in getattr(self, "_opt_handles", ()):
            with contextlib.suppress(Exception):
                h.remove()
        pre, post = self._on_opt_pre, self._on_opt_post
        if eagerly:
            pre, post = eager(pre), eager(post)
        self._opt_handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]

    def _training_forward(self) -> bool:
        return torch.is_grad_enabled() and self.model.training

    def _on_forward_pre(self, module: nn.Module, args: Any) -> None:
        if compiling():
            return  # inside compiled code: never traced into
        if self._enabled and self._training_forward():
            self._timer.forward_start()

    def _on_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if compiling() or not self._enabled or not self._training_forward():
            return
        try:
            out = model_output(output)
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
        if compiling() or not self._flags.act or not self._enabled:
            return
        if self._training_forward():
            t0 = self._clock()
            self._acts.record(module, output, self._flags, self._parts)
            self._control.charge("act", self._clock() - t0)

    def _read_grads(self) -> None:
        contract = self._contract
        scale = contract.grad_scale(self.optimizer)
        clip = contract.clipped_norm() if scale is None else None
        for g in self._groups:
            g.read_grads(self._flags, self._parts, scale, clip)
        self._contract.grads_read = True
        self._contract.reread = False

    def _on_opt_pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if compiling():
            self._opt_traced = True  # a side effect dynamo replays: the step happened
            return
        if not self._enabled:
            return
        t0 = self._clock()
        self._opt_fired = True
        found_inf = getattr(optimizer, "found_inf", None)  # fused optimizer + GradScaler
        if isinstance(found_inf, torch.Tensor):
            self._contract.device_skip = found_inf
        if len(optimizer.param_groups) != self._groups[0].n_groups:
            for g in self._groups:
                g.refresh_membership(self.optimizer)
        if not self._grads_read:
            self._read_grads()
        for g in self._groups:
            g.read_weights(self._flags, self._parts)
        self._control.charge("param", self._clock() - t0)

    def _on_opt_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if compiling() or not self._enabled:
            return
        t0 = self._clock()
        if self._contract.reread:
            self._read_grads()  # clipped after the last read (Lightning's closure)
        for g in self._groups:
            g.read_update(self._flags, self._parts)
        self._control.charge("param", self._clock() - t0)

    def _maintain(self) -> None:
        """Once per step: catch up with compilation that happened since setup."""
        if not self._opt_eager and dynamo_loaded() and not self._closed:
            with contextlib.suppress(Exception):
                self._hook_optimizer(eagerly=True)
        if self._root_hooked == "hooks" and compiled_in_place(self.model):
            # model.compile() after setup: its hooks now run inside the compiled call
            # (returning at once there); record around the compiled call instead.
            self._root_hooked = "compiled"
            if self._out_handle is not None:
                with contextlib.suppress(Exception):
                    self._out_handle.remove()
                self._out_handle = None
            self._handles.append(
                CompiledCallHook(self.model, self._on_forward_pre, self._on_forward)
            )

    # -- observed (observe.Listener, through _Observer) ---------------------------------

    def _observed_loss(self, name: str, args: Any, kwargs: Any, out: Any) -> None:
        if self._enabled and not self._closed and not self._task.final:
            t0 = self._clock()
            self._task.loss(name, args, kwargs, out)
            self._control.charge("base", self._clock() - t0)

    def _observed_backward(self, t: torch.Tensor) -> None:
        if self._enabled and not self._closed and self._watch_backward:
            t0 = self._clock()
            self._contract.on_backward(t)
            self._control.charge("base", self._clock() - t0)

    def _observed_clip(
        self, params: list[torch.Tensor], norm: Any, max_norm: Any = None, norm_type: Any = 2.0
    ) -> None:
        if self._enabled and not self._closed and params and id(params[0]) in self._param_ids:
            whole = len(self._groups) == 1 and self._clip_covers(params)
            self._contract.on_clip(norm, max_norm if whole else None, norm_type)

    def _clip_covers(self, params: list[torch.Tensor]) -> bool:
        """Whether ``params`` are this model's parameters and include every trainable
        one: then the clip's total norm is the collector's grad_norm before clipping.
        Cached by the list's ends and length (a loop clips the same list every step) and
        the trainable count (unfreezing changes the answer)."""
        g = self._groups[0]
        key = (len(params), id(params[0]), id(params[-1]), len(g.trainable_params))
        hit = self._clip_cache
        if hit is not None and hit[0] == key:
            return hit[1]
        ids = {id(p) for p in params}
        covers = ids <= self._param_ids and {id(p) for p in g.trainable_params} <= ids
        self._clip_cache = (key, covers)
        return covers

    def _observed_scale(self, scaler: Any, loss: torch.Tensor, scaled: torch.Tensor) -> None:
        if self._enabled and not self._closed:
            self._contract.on_scale(scaler, loss, scaled)


class Observer:
    """The collector's ``observe`` listener (weakly held there; the collector holds it)."""

    def __init__(self, col: Hooks) -> None:
        self._col = weakref.ref(col)
        if col._watch_backward:
            self.on_backward = self._backward

    def on_loss(self, name: str, args: Any, kwargs: Any, out: Any) -> None:
        col = self._col()
        if col is not None:
            col._observed_loss(name, args, kwargs, out)

    def _backward(self, t: torch.Tensor) -> None:
        col = self._col()
        if col is not None:
            col._observed_backward(t)

    def on_clip(self, params: list[torch.Tensor], norm: Any, max_norm: Any, norm_type: Any) -> None:
        col = self._col()
        if col is not None:
            col._observed_clip(params, norm, max_norm, norm_type)

    def on_scale(self, scaler: Any, loss: torch.Tensor, scaled: torch.Tensor) -> None:
        col = self._col()
        if col is not None:
            col._observed_scale(scaler, loss, scaled)
