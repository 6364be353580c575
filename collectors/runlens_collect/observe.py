"""What the training code does around the model, seen without changing it: loss-function
calls, ``backward`` calls, gradient clipping and the AMP ``GradScaler``.

A few process-wide wrappers, installed once (:func:`install`) and never removed, report to
the registered listeners (the live collectors, and zero-code collection):

* the functional losses of ``torch.nn.functional`` (which the ``nn.*Loss`` modules call):
  ``on_loss(name, args, kwargs, out)`` -- what the model is trained to do (classification
  and its class count from ``cross_entropy``'s logits, regression from ``mse_loss``...);
* ``torch.autograd.backward`` (which ``Tensor.backward`` calls): ``on_backward(tensor)``
  for a scalar backwarded -- the training loss of a micro-batch;
* ``torch.nn.utils.clip_grad_norm_`` (which accelerate and Lightning call):
  ``on_clip(params, total_norm, max_norm, norm_type)`` -- the gradient norm before
  clipping, and what the clip did with it;
* ``torch.amp.GradScaler.scale``: ``on_scale(scaler, loss, scaled)`` -- the loss before
  scaling and the scaler in use.

With no listener a wrapper costs one list check. Every wrapper is a plain pass-through
while ``torch.compile`` traces (no graph break, nothing recorded from inside compiled
code), is registered with TorchScript so that ``torch.jit.script`` compiles the original
function, and never lets a listener's failure reach the training code.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import torch

LOSS_FUNCTIONS = (
    "cross_entropy",
    "nll_loss",
    "mse_loss",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "kl_div",
    "poisson_nll_loss",
    "gaussian_nll_loss",
    "soft_margin_loss",
    "multilabel_soft_margin_loss",
    "margin_ranking_loss",
    "hinge_embedding_loss",
    "cosine_embedding_loss",
    "triplet_margin_loss",
    "ctc_loss",
)


class Listener(Protocol):
    """What a listener implements (every method optional: missing ones are skipped)."""

    def on_loss(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """A loss function returned ``out``."""

    def on_backward(self, tensor: torch.Tensor) -> None:
        """``backward`` was called on the scalar ``tensor``."""

    def on_clip(
        self, params: list[torch.Tensor], total_norm: Any, max_norm: Any, norm_type: Any
    ) -> None:
        """``clip_grad_norm_`` clipped ``params``; ``total_norm`` is its return value,
        ``max_norm`` and ``norm_type`` its arguments."""

    def on_scale(self, scaler: Any, loss: torch.Tensor, scaled: torch.Tensor) -> None:
        """``scaler.scale(loss)`` returned ``scaled``."""


_listeners: list[weakref.ref[Any] | Callable[[], Any]] = []
_installed = False
_depth = 0  # nesting of loss functions (a loss calling another is one loss)
_warned: set[str] = set()


def _compiling() -> bool:
    fn = getattr(torch.compiler, "is_compiling", None)
    return bool(fn()) if fn is not None else False


def add_listener(listener: Any, weak: bool = True) -> None:
    """Report to ``listener`` from now on (weakly referenced unless ``weak`` is False)."""
    install()
    ref = weakref.ref(listener) if weak else (lambda: listener)
    _listeners.append(ref)


def remove_listener(listener: Any) -> None:
    _listeners[:] = [r for r in _listeners if r() is not None and r() is not listener]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No listener hears anything within the block: for a bare model trained beside a
    collected one in the same process (the overhead benchmarks), whose losses and
    backward passes no collector should see or pay for."""
    saved = _listeners[:]
    _listeners.clear()
    try:
        yield
    finally:
        _listeners[:] = saved + _listeners  # keep any added within the block


def _each(method: str) -> list[Callable[..., Any]]:
    out = []
    dead = False
    for ref in _listeners:
        obj = ref()
        if obj is None:
            dead = True
            continue
        fn = getattr(obj, method, None)
        if fn is not None:
            out.append(fn)
    if dead:
        _listeners[:] = [r for r in _listeners if r() is not None]
    return out


def _notify(method: str, *args: Any) -> None:
    for fn in _each(method):
        try:
            fn(*args)
        except Exception as exc:  # a listener must never break training
            if method not in _warned:
                _warned.add(method)
                with contextlib.suppress(Exception):
                    print(
                        f"runlens_collect: observing {method} failed ({exc!r}); continuing",
                        file=sys.stderr,
                    )


# -- the wrappers ---------------------------------------------------------------------------


def _script_as_original(wrapper: Callable[..., Any], original: Callable[..., Any]) -> None:
    """Make ``torch.jit.script`` compile ``original`` where code calls ``wrapper``.

    TorchScript resolves a call by the function object; our wrapper's ``*args`` cannot be
    scripted. Its registry of boolean-dispatched functions maps a Python function to the
    function to compile (by a bool argument); with both branches the original and an
    argument name no call passes, it always compiles the original.
    """
    with contextlib.suppress(Exception):
        import torch._jit_internal as ji

        ji.boolean_dispatched[wrapper] = {
            "if_true": original,
            "if_false": original,
            "index": 1 << 20,
            "default": False,
            "arg_name": "_runlens_never_passed",
        }


def _wrap_loss(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def loss_wrapper(*args: Any, **kwargs: Any) -> Any:
        global _depth
        if _compiling() or not _listeners or _depth:
            return fn(*args, **kwargs)
        _depth += 1
        try:
            out = fn(*args, **kwargs)
        finally:
            _depth -= 1
        _notify("on_loss", name, args, kwargs, out)
        return out

    loss_wrapper.__runlens_wrapped__ = fn  # type: ignore[attr-defined]
    _script_as_original(loss_wrapper, fn)
    return loss_wrapper


def _wrap_backward(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def backward_wrapper(tensors: Any, *args: Any, **kwargs: Any) -> Any:
        if (
            _listeners
            and not _compiling()
            and isinstance(tensors, torch.Tensor)
            and tensors.numel() == 1
            and tensors.grad_fn is not None
        ):
            _notify("on_backward", tensors)
        return fn(tensors, *args, **kwargs)

    backward_wrapper.__runlens_wrapped__ = fn  # type: ignore[attr-defined]
    _script_as_original(backward_wrapper, fn)
    return backward_wrapper


def _wrap_clip(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def clip_wrapper(parameters: Any, *args: Any, **kwargs: Any) -> Any:
        if not _listeners or _compiling():
            return fn(parameters, *args, **kwargs)
        # A generator can be read once: materialize it for the clip and for us.
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        norm = fn(params, *args, **kwargs)
        max_norm = args[0] if args else kwargs.get("max_norm")
        norm_type = args[1] if len(args) > 1 else kwargs.get("norm_type", 2.0)
        _notify("on_clip", params, norm, max_norm, norm_type)
        return norm

    clip_wrapper.__runlens_wrapped__ = fn  # type: ignore[attr-defined]
    _script_as_original(clip_wrapper, fn)
    return clip_wrapper


def _wrap_scale(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def scale(self: Any, outputs: Any) -> Any:
        scaled = fn(self, outputs)
        if (
            _listeners
            and not _compiling()
            and isinstance(outputs, torch.Tensor)
            and isinstance(scaled, torch.Tensor)
            and outputs.numel() == 1
        ):
            _notify("on_scale", self, outputs, scaled)
        return scaled

    scale.__runlens_wrapped__ = fn  # type: ignore[attr-defined]
    return scale


def _scaler_classes() -> Iterable[type]:
    amp = getattr(torch, "amp", None)
    cls = getattr(amp, "GradScaler", None) if amp is not None else None
    return (cls,) if isinstance(cls, type) else ()


def install() -> None:
    """Install the wrappers (once per process; idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    functional = torch.nn.functional
    for name in LOSS_FUNCTIONS:
        fn = getattr(functional, name, None)
        if fn is not None and not hasattr(fn, "__runlens_wrapped__"):
            setattr(functional, name, _wrap_loss(name, fn))
    backward = torch.autograd.backward
    if not hasattr(backward, "__runlens_wrapped__"):
        torch.autograd.backward = _wrap_backward(backward)  # Tensor.backward calls it
    clip = torch.nn.utils.clip_grad_norm_
    if not hasattr(clip, "__runlens_wrapped__"):
        wrapped = _wrap_clip(clip)
        torch.nn.utils.clip_grad_norm_ = wrapped
        clip_mod = sys.modules.get("torch.nn.utils.clip_grad")
        if clip_mod is not None and getattr(clip_mod, "clip_grad_norm_", None) is clip:
            clip_mod.clip_grad_norm_ = wrapped
    for cls in _scaler_classes():
        scale = cls.__dict__.get("scale")
        if scale is not None and not hasattr(scale, "__runlens_wrapped__"):
            cls.scale = _wrap_scale(scale)  # subclasses (torch.cuda.amp) inherit it


def original(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The function a wrapper wraps (``fn`` itself when it is not one of ours)."""
    return getattr(fn, "__runlens_wrapped__", fn)
