"""The ``runlens`` command line: parses arguments, calls the library, renders, exits.

Only this module writes files and chooses exit codes:
0 = ok, 1 = ``--fail-on`` threshold hit, 2 = usage error or bad input.
Every library error (:class:`runlens.RunlensError`) becomes one line on stderr:
``runlens: error: <message>``, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from runlens.errors import RunlensError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_FAIL_ON = 1
EXIT_USAGE = 2


def fail(message: str) -> None:
    """Print a one-line error and exit 2."""
    click.echo(f"runlens: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def handle_errors(fn: F) -> F:
    """Turn library errors (and a few OS errors) into one-line messages with exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RunlensError as exc:
            fail(str(exc))
        except OSError as exc:
            fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
        except KeyboardInterrupt:
            click.echo("runlens: interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="runlens")
def cli() -> None:
    """runlens: diagnose neural-network training runs.

    \b
    Record a run with the collector (or `runlens collect -- python train.py`), then:
      runlens analyze runs/exp1
      runlens compare runs/lr_*
    """


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        cli.main(args=argv, prog_name="runlens", standalone_mode=True)
    except SystemExit:
        raise
