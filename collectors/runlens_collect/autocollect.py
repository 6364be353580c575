"""Zero-code collection: attach Collectors to an unmodified training script.

``runlens collect -- python train.py`` puts ``runlens_collect/_bootstrap`` first on the
child's PYTHONPATH and sets ``RUNLENS_COLLECT_DIR``. Its ``sitecustomize`` calls
:func:`activate` once ``torch`` has been imported, which installs PyTorch's global hooks:

* optimizer construction (a wrapper of ``torch.optim.Optimizer.__init__``) -> the
  optimizers of the script, weakly referenced;
* ``register_module_forward_pre_hook`` / ``register_module_forward_hook`` -> the *root*
  modules (those called while no other module's forward is running); a Collector starts at
  the first training forward (grad enabled, ``module.training``) of the root(s) holding all
  of an optimizer's parameters, so step 0 already gets activation and output rows. If no
  root covers them, it starts at the optimizer's first ``step()`` instead;
* ``register_optimizer_step_pre_hook`` / ``..._post_hook`` -> one training step ends at
  each ``optimizer.step()`` (the post hook calls ``Collector.step``);
* ``torch.autograd.backward`` (which ``Tensor.backward`` calls) is observed
  (``runlens_collect.observe``): the scalar tensors backward is called on since the last
  optimizer step are the step's training loss: their mean, kept on device (no host sync),
  each unscaled when it is a ``GradScaler`` output and, when the step backwarded several
  each divided by a constant (gradient accumulation), with the division undone
  (``contract.StepContract``);
* the functional losses of ``torch.nn.functional`` (which the ``nn.*Loss`` modules call)
  are observed, and ``_Loss`` modules get a forward hook: a scalar loss that does not
  require grad, computed under ``no_grad`` or while the last root module ran in eval mode,
  is an evaluation loss. The evaluation losses between two training steps are averaged and
  logged as ``val/loss`` at the last completed step when training resumes (or at exit).
* ``nn.Module.compile`` is wrapped: a module compiled in place runs its forward hooks
  inside the compiled code (where these hooks return at once), so it is remembered as a
  root when compiled.

One Collector per optimizer: the first optimizer's run is ``RUNLENS_COLLECT_DIR``, the
k-th one's (k >= 2) ``RUNLENS_COLLECT_DIR-k`` (a GAN gives two runs: generator and
discriminator). ``val/loss`` and ``runlens_collect.log`` go to the first one.

Only the process that first imports torch collects: it claims the collection through an
environment variable its children inherit (spawned DataLoader workers, subprocesses), and
forked children are switched off by an ``os.register_at_fork`` hook. An explicit
``Collector`` made by the script itself takes precedence: zero-code collection then stays
out of the way. Nothing here may break the user's program: every hook swallows its own
errors (reported once on stderr).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.optim.optimizer as optimizer_mod  # torch.optim deletes this attribute
import torch.utils.data
from torch import nn

from runlens_collect import _active, observe
from runlens_collect import format as fmt
from runlens_collect.compiled import compiling
from runlens_collect.contract import MEAN, StepContract

ENV_DIR = "RUNLENS_COLLECT_DIR"
"""Run directory of the first optimizer; setting it is what turns collection on."""
ENV_SETTINGS = "RUNLENS_COLLECT_SETTINGS"
"""JSON object of CollectorConfig knobs (every, activation_every, hist_every, kinds)."""
ENV_MANIFEST = "RUNLENS_COLLECT_MANIFEST"
"""File the child appends one JSON line to per run it starts (read by the CLI)."""
ENV_OWNER = "RUNLENS_COLLECT_OWNER"
"""PID of the process that collects; inherited, so other processes stay inactive."""


class _State:
    """Everything the hooks share. One instance per process (``_STATE``)."""

    def __init__(self) -> None:
        self.enabled = False
        self.pid = 0
        self.run_dir = Path()
        self.settings: dict[str, Any] = {}
        self.manifest: str | None = None
        self.optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        # id(optimizer) -> Collector; the optimizer object is kept alive by the training
        # script, and we never need it after its collector closes.
        self.collectors: dict[int, Any] = {}
        self.order: list[Any] = []  # collectors in start order; [0] is the primary
        self.roots: list[weakref.ref[nn.Module]] = []
        self.root_ids: set[int] = set()
        self.root_params: weakref.WeakKeyDictionary[nn.Module, frozenset[int]] = (
            weakref.WeakKeyDictionary()
        )
        self.depth = 0  # nesting of module forwards in progress
        self.loss_depth = 0  # nesting of loss computations (module -> functional)
        self.last_root_training = True
        # backwarded since the last step: unscaled, accumulation undone (contract)
        self.losses = StepContract(MEAN)
        self.stepped = False  # an optimizer stepped since the last backward
        self.eval_sum: torch.Tensor | None = None
        self.eval_count = 0
        self.pending_val: list[torch.Tensor] = []  # passes ended before any collector
        self.crashed = False
        self.preempted = False  # SIGTERM
        self.stood_down = False
        self.warned: set[str] = set()
        self.handles: list[Any] = []


_STATE = _State()


def is_active() -> bool:
    """True in the process that collects (hooks installed, not a worker/child)."""
    return _STATE.enabled and _STATE.pid == os.getpid()


def _warn(key: str, message: str) -> None:
    # stderr, once per key: the user's program must keep running whatever happens here.
    if key in _STATE.warned:
        return
    _STATE.warned.add(key)
    with contextlib.suppress(Exception):
        print(f"runlens_collect: {message}", file=sys.stderr, flush=True)


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a hook only in the collecting process; never let it raise into training."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not _STATE.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            _warn(fn.__name__, f"zero-code hook {fn.__name__} failed ({exc!r}); continuing")
            return None

    return wrapper


# -- activation -------------------------------------------------------------------------


def activate() -> bool:
    """Install the hooks if ``RUNLENS_COLLECT_DIR`` is set and no other process collects.

    Called by the bootstrap once torch is imported; idempotent. Returns whether this
    process collects.
    """
    if _STATE.enabled:
        return True
    run_dir = os.environ.get(ENV_DIR)
    if not run_dir or not _claim():
        return False
    if torch.utils.data.get_worker_info() is not None:
        return False
    os.environ[ENV_OWNER] = _owner_tag()  # children (spawned workers) inherit the claim
    s = _STATE
    s.pid = os.getpid()
    s.run_dir = Path(run_dir)
    s.manifest = os.environ.get(ENV_MANIFEST)
    try:
        s.settings = json.loads(os.environ.get(ENV_SETTINGS) or "{}")
    except ValueError:
        _warn("settings", f"ignoring {ENV_SETTINGS}: not JSON")
        s.settings = {}
    _install()
    s.enabled = True
    return True


def _owner_tag() -> str:
    """``pid`` or, in a process a launcher gave a rank (torchrun sets RANK), ``pid@rank``."""
    rank = os.environ.get("RANK")
    return f"{os.getpid()}@{rank}" if rank is not None else str(os.getpid())


def _claim() -> bool:
    """Whether this process may collect. A claim is inherited by every child; only a rank
    of a distributed launcher (``torchrun``: the launcher itself imports torch, then
    starts one worker per rank with RANK set) overrides a claim made without a rank, so
    each rank records its own partition of the one run directory, and its DataLoader
    workers (same rank, inherited claim) stay out."""
    owner = os.environ.get(ENV_OWNER)
    if not owner or owner == _owner_tag():
        return True
    return "@" not in owner and os.environ.get("RANK") is not None


def _install() -> None:
    s = _STATE
    s.handles += [
        optimizer_mod.register_optimizer_step_pre_hook(_on_step_pre),
        optimizer_mod.register_optimizer_step_post_hook(_on_step_post),
        nn.modules.module.register_module_forward_pre_hook(_on_forward_pre),
        nn.modules.module.register_module_forward_hook(_on_forward, always_call=True),
    ]
    init = torch.optim.Optimizer.__init__

    @functools.wraps(init)
    def optimizer_init(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if s.enabled:
            s.optimizers.add(self)

    torch.optim.Optimizer.__init__ = optimizer_init  # type: ignore[method-assign]

    compile_module = nn.Module.compile

    @functools.wraps(compile_module)
    def module_compile(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        out = compile_module(self, *args, **kwargs)
        if s.enabled:
            _remember_root(self)
        return out

    nn.Module.compile = module_compile  # type: ignore[method-assign]

    # Losses, backward and the GradScaler are observed (shared with explicit Collectors).
    observe.add_listener(_LISTENER, weak=False)

    prev_hook = sys.excepthook

    def excepthook(*args: Any) -> None:
        s.crashed = True
        prev_hook(*args)

    sys.excepthook = excepthook
    os.register_at_fork(after_in_child=_after_fork_in_child)
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, _on_sigterm)


def _after_fork_in_child() -> None:
    # A forked child (DataLoader worker, user fork) must neither record nor close the
    # parent's runs: its copies of the collectors are switched off.
    _STATE.enabled = False
    for col in _STATE.order:
        col._enabled = False
        col._closed = True


def _on_sigterm(signum: int, frame: Any) -> None:
    # Close the runs (preempted), then die of SIGTERM as the script would have.
    _STATE.preempted = True
    _close_all()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


# -- losses -----------------------------------------------------------------------------


class _Listener:
    """Zero-code's ``observe`` listener (one per process)."""

    def on_loss(self, name: str, args: Any, kwargs: Any, out: Any) -> None:
        s = _STATE
        if s.enabled and not s.loss_depth:  # inside an nn.*Loss: its forward hook counts it
            _maybe_eval_loss(out)

    def on_backward(self, tensor: torch.Tensor) -> None:
        if _STATE.enabled:
            _on_backward(tensor)

    def on_scale(self, scaler: Any, loss: torch.Tensor, scaled: torch.Tensor) -> None:
        if _STATE.enabled:
            _STATE.losses.on_scale(scaler, loss, scaled)


_LISTENER = _Listener()


@_guarded
def _maybe_eval_loss(out: Any) -> None:
    """Count ``out`` as an evaluation loss if it is one (see the module docstring)."""
    s = _STATE
    if not isinstance(out, torch.Tensor) or out.numel() != 1 or out.requires_grad:
        return
    if not out.is_floating_point():
        return
    if torch.is_grad_enabled() and s.last_root_training:
        return  # a detached loss during training (a metric), not an evaluation
    v = out.detach().reshape(()).double()
    s.eval_sum = v if s.eval_sum is None else s.eval_sum + v
    s.eval_count += 1


def _end_eval_pass() -> None:
    """Log the mean of the evaluation losses seen since training last ran."""
    s = _STATE
    if not s.eval_count or s.eval_sum is None:
        return
    mean = s.eval_sum / s.eval_count
    s.eval_sum, s.eval_count = None, 0
    primary = s.order[0] if s.order else None
    if primary is None:
        s.pending_val.append(mean)  # evaluation before training: logged at step 0
    else:
        primary.log({fmt.VAL_LOSS: mean})


@_guarded
def _on_backward(tensors: Any) -> None:
    s = _STATE
    _end_eval_pass()
    if s.stepped:
        s.losses.micro, s.stepped = [], False
    if isinstance(tensors, torch.Tensor) and tensors.numel() == 1:
        s.losses.on_backward(tensors)


# -- modules ----------------------------------------------------------------------------


def _on_forward_pre(module: nn.Module, args: Any) -> None:
    if compiling():
        return  # inside compiled code (a module compiled in place runs its hooks there)
    s = _STATE
    if not s.enabled:
        return
    s.depth += 1
    if s.depth != 1:
        return
    if isinstance(module, nn.modules.loss._Loss):
        s.loss_depth += 1  # its functional call inside is the same loss: count it once
        return
    _on_root(module)


def _remember_root(module: nn.Module) -> None:
    s = _STATE
    if id(module) not in s.root_ids:
        s.root_ids.add(id(module))
        s.roots.append(weakref.ref(module))


@_guarded
def _on_root(module: nn.Module) -> None:
    s = _STATE
    _remember_root(module)
    s.last_root_training = module.training
    if not (module.training and torch.is_grad_enabled()):
        return
    _end_eval_pass()
    if s.stood_down:
        return
    waiting = [o for o in list(s.optimizers) if id(o) not in s.collectors]
    if not waiting:
        return
    mine = _params_of(module)
    for opt in waiting:
        wanted = _optimizer_params(opt)
        if not (wanted & mine):
            continue
        model, covered = _model_for(wanted)
        if model is not None and covered >= wanted:
            _start(opt, model)


def _on_forward(module: nn.Module, args: Any, output: Any) -> None:
    if compiling():
        return
    s = _STATE
    if not s.enabled:
        return
    s.depth = max(0, s.depth - 1)
    if s.depth == 0 and isinstance(module, nn.modules.loss._Loss):
        s.loss_depth = max(0, s.loss_depth - 1)
        _maybe_eval_loss(output)


def _params_of(module: nn.Module) -> frozenset[int]:
    ids = _STATE.root_params.get(module)
    if ids is None:
        ids = frozenset(id(p) for p in module.parameters())
        _STATE.root_params[module] = ids
    return ids


def _optimizer_params(opt: torch.optim.Optimizer) -> frozenset[int]:
    """The optimizer's trainable parameters; all of them when none is trainable (an
    optimizer of frozen parameters still names the model they belong to)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    trainable = frozenset(id(p) for p in params if p.requires_grad)
    return trainable or frozenset(id(p) for p in params)


def _model_for(wanted: frozenset[int]) -> tuple[nn.Module | None, frozenset[int]]:
    """The root module(s) holding the optimizer's parameters, and which ones they cover.

    Roots inside another candidate root (a submodule also called on its own) are dropped;
    several disjoint roots (an encoder and a decoder called one after the other) are put
    in an ``nn.ModuleDict`` keyed by their class names.
    """
    cands: list[tuple[nn.Module, frozenset[int]]] = []
    for ref in _STATE.roots:
        root = ref()
        if root is not None:
            ids = _params_of(root)
            if ids & wanted:
                cands.append((root, ids))
    keep = [
        (m, ids)
        for i, (m, ids) in enumerate(cands)
        if not any(
            j != i and (ids < other or (ids == other and j < i))
            for j, (_, other) in enumerate(cands)
        )
    ]
    if not keep:
        return None, frozenset()
    covered = frozenset().union(*(ids for _, ids in keep)) & wanted
    if len(keep) == 1:
        return keep[0][0], covered
    names: dict[str, nn.Module] = {}
    for m, _ in keep:
        base = type(m).__name__.lower()
        key, k = base, 2
        while key in names:
            key, k = f"{base}{k}", k + 1
        names[key] = m
    return nn.ModuleDict(names), covered


# -- optimizer steps --------------------------------------------------------------------


@_guarded
def _on_step_pre(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    s = _STATE
    _end_eval_pass()
    if id(opt) in s.collectors or s.stood_down:
        return
    wanted = _optimizer_params(opt)
    model, _ = _model_for(wanted)
    if model is None:
        # The model was never called as a module (e.g. torch.func): record the parameters.
        model = nn.ParameterList([p for g in opt.param_groups for p in g["params"]])
    # Registered during this pre-hook, the collector's own step hooks still run for this
    # step: torch reads the optimizer's hook dict after the global ones.
    _start(opt, model)


@_guarded
def _on_step_post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    s = _STATE
    col = s.collectors.get(id(opt))
    loss = s.losses.loss()
    s.stepped = True
    if col is not None:
        col.step(loss=loss)


def _start(opt: torch.optim.Optimizer, model: nn.Module) -> None:
    # The writer's first flush imports pyarrow.compute lazily. An import while Python
    # exits after a KeyboardInterrupt makes the exit status 1 instead of death by SIGINT
    # (CPython 3.11), so load it now, not in the atexit close.
    import pyarrow.compute  # noqa: F401

    from runlens_collect.collector import Collector

    s = _STATE
    active = _active.get_active()
    if active is not None and all(active is not c for c in s.order):
        # The script made its own Collector: it knows better; do not record twice.
        s.stood_down = True
        _manifest({"stood_down": True, "reason": "the script uses an explicit Collector"})
        return
    k = len(s.order) + 1
    run_dir = s.run_dir if k == 1 else s.run_dir.with_name(f"{s.run_dir.name}-{k}")
    knobs: dict[str, Any] = {
        key: (tuple(v) if key == "kinds" else int(v))
        for key, v in s.settings.items()
        if key in ("every", "activation_every", "hist_every", "kinds")
    }
    if "overhead" in s.settings:  # a fraction, or None: fixed cadences
        v = s.settings["overhead"]
        knobs["overhead"] = None if v is None else float(v)
    config = {"optimizer": type(opt).__name__, **_hyperparams(opt), "collected_by": "zero-code"}
    # The loss comes from here (backward calls before *this* optimizer's step), not from
    # the collector's own view of backward, which would mix two optimizers' losses.
    col = Collector(model, opt, run_dir=run_dir, config=config, _watch_backward=False, **knobs)
    s.collectors[id(opt)] = col
    s.order.append(col)
    if k == 1:
        for v in s.pending_val:
            col.log({fmt.VAL_LOSS: v})
        s.pending_val = []
    else:
        _active.set_active(s.order[0])  # runlens_collect.log goes to the first run
    # atexit runs last-registered first: ours must run before the Collector's own
    # flush-at-exit (which would leave the status 'running').
    atexit.unregister(_at_exit)
    atexit.register(_at_exit)
    _manifest(
        {
            "run_dir": str(run_dir),
            "model": type(model).__name__,
            "optimizer": type(opt).__name__,
            "rank": col.rank if col._enabled else None,
        }
    )


# Implementation switches of torch optimizers, not hyperparameters: kept out of the config.
_NOT_HYPERPARAMS = frozenset(
    {"params", "foreach", "fused", "differentiable", "capturable", "maximize", "initial_lr"}
)


def _hyperparams(opt: torch.optim.Optimizer) -> dict[str, Any]:
    group = opt.param_groups[0] if opt.param_groups else {}
    out: dict[str, Any] = {}
    for key, v in group.items():
        if key in _NOT_HYPERPARAMS or v is None:
            continue
        if isinstance(v, bool | int | float | str) or v is None:
            out[key] = v
        elif isinstance(v, tuple | list) and all(isinstance(x, int | float) for x in v):
            out[key] = list(v)
    return out


def _manifest(entry: dict[str, Any]) -> None:
    path = _STATE.manifest
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
    except OSError as exc:
        _warn("manifest", f"could not write {path} ({exc})")


# -- exit -------------------------------------------------------------------------------


def _close_all() -> None:
    s = _STATE
    if s.pid != os.getpid():
        return
    with contextlib.suppress(Exception):
        _end_eval_pass()
    status = fmt.STATUS_FINISHED
    if s.preempted:
        status = fmt.STATUS_PREEMPTED
    elif s.crashed:
        status = fmt.STATUS_CRASHED
    for col in s.order:
        try:
            col.close(status)
        except Exception as exc:
            _warn("close", f"closing {col.run_dir} failed ({exc!r})")
    s.enabled = False


def _at_exit() -> None:
    _close_all()
