"""Errors the library raises on bad input. The CLI turns them into one-line messages."""

from __future__ import annotations


class RunlensError(Exception):
    """Bad input: a path that is not a run, an unreadable file, a bad option.

    The message is one line meant for a person; the CLI prints ``runlens: error: <msg>``
    and exits with status 2.
    """


class RunLoadError(RunlensError):
    """A run directory (or log file) that cannot be read at all."""


class OptionError(RunlensError):
    """A bad option value, e.g. ``--set`` naming an unknown signature or parameter."""
