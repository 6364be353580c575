"""Staying out of ``torch.compile``'s way: compiled code must never trace into the
collector (a traced hook breaks the graph at ``time.perf_counter`` or ``bincount``, and
its Python side effects can make dynamo drop or repeat work).

* ``model.compile()`` in place compiles the module's ``_call_impl``, hooks included:
  :class:`CompiledCallHook` runs the collector's root-module code around the compiled
  call instead, outside the compiled region, and no hooks go inside the model (no
  activation rows, as for ``torch.compile(model)``, whose wrapper's own hooks already run
  outside).
* Hooks that compiled code may still reach (a script that compiles its whole training
  step, forward and ``optimizer.step()`` included) return at once while dynamo traces
  (:func:`compiling`); the optimizer hooks, whose reads a step needs, are wrapped with
  ``torch._dynamo.disable`` once dynamo is loaded (:func:`eager`): they run eagerly, at
  the price of a graph break in the script's compiled step.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def compiling() -> bool:
    """True while ``torch.compile`` traces (constant-folded by dynamo: no graph break)."""
    fn = getattr(torch.compiler, "is_compiling", None)
    return bool(fn()) if fn is not None else False


def dynamo_loaded() -> bool:
    """torch._dynamo imported (anything compiled since). Importing it costs ~1.5 s, so the
    collector never does it itself."""
    return "torch._dynamo" in sys.modules


def eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run eagerly when compiled code calls it (dynamo must be loaded)."""
    import torch._dynamo

    return torch._dynamo.disable(fn)


def compiled_in_place(module: nn.Module) -> bool:
    """``module.compile()`` was called (its call goes through a compiled ``_call_impl``)."""
    return getattr(module, "_compiled_call_impl", None) is not None


class CompiledCallHook:
    """``pre(module, args, kwargs)`` and ``post(module, args, output)`` around the compiled
    call of a module compiled in place, outside the compiled region. Several stack (each
    wraps the call before it); ``remove()`` switches one off, and restores the call when
    it is the outermost."""

    def __init__(
        self,
        module: nn.Module,
        pre: Callable[..., None],
        post: Callable[[nn.Module, Any, Any], None] | None,
        pre_kwargs: bool = False,
    ) -> None:
        self.module = module
        self.original = module._compiled_call_impl
        self.active = True

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                if pre_kwargs:
                    pre(module, args, kwargs)
                else:
                    pre(module, args)
            out = self.original(*args, **kwargs)
            if self.active and post is not None:
                post(module, args, out)
            return out

        self.call = call
        module._compiled_call_impl = call

    def remove(self) -> None:
        self.active = False
        if getattr(self.module, "_compiled_call_impl", None) is self.call:
            self.module._compiled_call_impl = self.original


class OutsideCompiled:
    """A module compiled in place, as the probes see it: the forward pre-hooks they
    register run around the compiled call (``CompiledCallHook``), never inside the
    compiled region (where they would be traced, guarded on and recompiled); every other
    attribute is the module's."""

    def __init__(self, module: nn.Module) -> None:
        self._module = module

    @property
    def _orig_mod(self) -> nn.Module:
        return self._module  # the module the parameter names belong to (probes.unwrap)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def register_forward_pre_hook(
        self, hook: Callable[..., Any], *, with_kwargs: bool = False, **_: Any
    ) -> CompiledCallHook:
        return CompiledCallHook(self._module, hook, None, pre_kwargs=with_kwargs)
