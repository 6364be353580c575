"""The rich console setup shared by the terminal reporters (report and comparison)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from io import StringIO

from rich.console import Console, RenderableType


def render_sections(sections: Iterable[Sequence[RenderableType]], width: int, color: bool) -> str:
    """Print ``sections`` (a blank line between two) to text ``width`` columns wide.

    ANSI colours only if ``color``; markup, highlighting and emoji stay off so text taken
    from a run prints exactly as written.
    """
    buf = StringIO()
    console = Console(
        file=buf,
        width=width,
        force_terminal=color,
        no_color=not color,
        color_system="standard" if color else None,
        highlight=False,
        markup=False,
        emoji=False,
        soft_wrap=False,
    )
    for i, section in enumerate(sections):
        if i:
            console.print()
        for part in section:
            console.print(part)
    # Trailing spaces come from table padding; they only make diffs and pastes noisy.
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"
