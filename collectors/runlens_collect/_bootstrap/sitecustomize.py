"""runlens zero-code bootstrap (put first on PYTHONPATH by ``runlens collect``).

Python imports ``sitecustomize`` at start-up. This one does nothing unless
``RUNLENS_COLLECT_DIR`` is set; then it waits for the script to import torch (a one-shot
import hook, so Python processes that never use torch pay nothing) and calls
``runlens_collect.autocollect.activate()``. A ``sitecustomize`` that was already on the
path is imported as well, so environments that rely on one keep working.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _chain_previous() -> None:
    # Import the sitecustomize this one shadows, if any, from the rest of sys.path.
    saved = sys.path[:]
    me = sys.modules.pop("sitecustomize", None)
    try:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
        if importlib.util.find_spec("sitecustomize") is not None:
            importlib.import_module("sitecustomize")
    except Exception as exc:
        print(f"runlens_collect: the previous sitecustomize failed: {exc!r}", file=sys.stderr)
    finally:
        sys.path[:] = saved
        if me is not None:
            sys.modules["sitecustomize"] = me


def _activate() -> None:
    try:
        from runlens_collect import autocollect

        autocollect.activate()
    except Exception as exc:
        print(
            f"runlens_collect: zero-code collection is off ({exc!r}); the script runs as is",
            file=sys.stderr,
        )


class _AfterTorchImport(importlib.abc.MetaPathFinder):
    """Wraps torch's loader so that activation runs right after ``import torch``."""

    def find_spec(self, name, path, target=None):
        if name != "torch":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one shot; also avoids finding ourselves below
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_activate(module):
            exec_module(module)
            _activate()

        spec.loader.exec_module = exec_then_activate
        return spec


_chain_previous()
if os.environ.get("RUNLENS_COLLECT_DIR"):
    if "torch" in sys.modules:
        _activate()
    else:
        sys.meta_path.insert(0, _AfterTorchImport())
