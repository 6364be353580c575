"""The ``runlens`` command line: parses arguments, calls the library, renders, exits.

Only this module writes files and chooses exit codes:
0 = ok, 1 = ``--fail-on`` threshold hit, 2 = usage error or bad input.
Every library error (:class:`runlens.RunlensError`) becomes one line on stderr:
``runlens: error: <message>``, never a traceback.
"""

from __future__ import annotations

import functools
import os
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


class _OneLineUsageError(click.UsageError):
    """A click usage error shown as ``runlens: error: ...`` (one line) with exit 2."""

    def show(self, file: Any = None) -> None:
        hint = f" (see `{self.ctx.command_path} --help`)" if self.ctx is not None else ""
        click.echo(f"runlens: error: {self.format_message()}{hint}", err=True)


class RunlensCommand(click.Command):
    """A command whose bad arguments give one line on stderr, not usage + hint + error."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `cmd` alone: show the help
                raise
            raise _OneLineUsageError(exc.format_message(), ctx) from None


class RunlensGroup(click.Group):
    command_class = RunlensCommand

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:
            raise _OneLineUsageError(exc.format_message(), ctx) from None


@click.group(cls=RunlensGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="runlens")
def cli() -> None:
    """runlens: diagnose neural-network training runs.

    \b
    Record a run with the collector (or `runlens collect -- python train.py`), then:
      runlens analyze runs/exp1
      runlens compare runs/lr_*
    """


# -- shared options (reusable by every command) -----------------------------------------


def format_option(choices: tuple[str, ...], default: str) -> Callable[[F], F]:
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(choices),
        default=default,
        show_default=True,
        help="Output format.",
    )


output_option = click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Write the output to FILE instead of stdout.",
)

fail_on_option = click.option(
    "--fail-on",
    type=click.Choice(["warning", "error"]),
    default=None,
    help="Exit 1 when a finding of this severity (or worse) is found: gates CI jobs.",
)


def _every_option(flag: str, what: str, collector_default: int) -> Callable[[F], F]:
    """A ``runlens collect`` cadence option (None: the collector's default)."""
    return click.option(
        flag,
        type=click.IntRange(min=1),
        default=None,
        help=f"{what} every N steps (collector default: {collector_default}).",
    )


def analysis_options(fn: F) -> F:
    """--set / --config / --smoothing / --only / --task; read them with
    :func:`analyze_options`."""
    decorators = [
        click.option(
            "--set",
            "set_",
            multiple=True,
            metavar="NAME.PARAM=V",
            help="Override a signature parameter, e.g. --set loss-spike.threshold=8 "
            "(repeatable; see `runlens explain NAME`).",
        ),
        click.option(
            "--config",
            "config",
            type=click.Path(dir_okay=False),
            default=None,
            help="TOML file of parameter overrides, one [signature-name] table each.",
        ),
        click.option(
            "--smoothing",
            type=float,
            default=None,
            metavar="W",
            help="EMA smoothing weight in [0, 1) used for verdicts (default 0.9).",
        ),
        click.option(
            "--only",
            multiple=True,
            metavar="NAME",
            help="Run only this signature (repeatable or comma-separated).",
        ),
        click.option(
            "--task",
            default=None,
            metavar="TYPE[:C]",
            help="What the model is trained to do, when the run does not say: "
            "classification:C, multilabel:C, regression, language-modeling, unknown. "
            "The chance-level checks need classification:C.",
        ),
    ]
    for d in reversed(decorators):
        fn = d(fn)
    return fn


memory_option = click.option(
    "--memory-mb",
    "memory_mb",
    type=float,
    default=None,
    metavar="MB",
    help="Bound on the memory of reading a run's layer statistics (default 1024): a run "
    "too long for it is read in chunks as window levels.",
)


def analyze_options(
    set_: tuple[str, ...],
    config: str | None,
    smoothing: float | None,
    only: tuple[str, ...],
    task: str | None = None,
    memory_mb: float | None = None,
) -> Any:
    """AnalyzeOptions from the :func:`analysis_options` values (--set wins over --config)."""
    from runlens.engine import AnalyzeOptions, load_config, parse_set

    overrides: dict[str, dict[str, float]] = load_config(config) if config else {}
    for sig, values in parse_set(set_).items():
        overrides.setdefault(sig, {}).update(values)
    names = tuple(n.strip() for item in only for n in item.split(",") if n.strip())
    kwargs: dict[str, Any] = {"overrides": overrides, "only": names or None, "task": task}
    if smoothing is not None:
        kwargs["smoothing"] = smoothing
    if memory_mb is not None:
        kwargs["memory_mb"] = memory_mb
    return AnalyzeOptions(**kwargs)


def input_options(fn: F) -> F:
    """--input-format / --map: how to read logs that are not runlens runs."""
    from runlens.importers import FORMATS

    fn = click.option(
        "--map",
        "map_",
        multiple=True,
        metavar="SRC=NAME",
        help="Map a metric name of an imported log to a runlens name, e.g. "
        "--map eval/loss=val/loss (repeatable; SRC= drops it). See docs/importing.md.",
    )(fn)
    return click.option(
        "--input-format",
        type=click.Choice(["auto", *FORMATS]),
        default="auto",
        show_default=True,
        help="Format of the input: a runlens run, a TensorBoard log, a CSV metrics file or "
        "a Hugging Face trainer_state.json (auto detects it).",
    )(fn)


def emit(text: str, output: str | None) -> None:
    """Write ``text`` to ``output`` (only there) or to stdout."""
    if output is None:
        click.echo(text, nl=False)
        return
    with open(output, "w", encoding="utf-8") as fh:
        fh.write(text)


def _stdout_is_tty() -> bool:
    import os

    stream = click.get_text_stream("stdout")
    return bool(stream.isatty()) and "NO_COLOR" not in os.environ


def _refuse_html_to_tty(output: str | None) -> None:
    if output is None and click.get_text_stream("stdout").isatty():
        fail("--format html writes a web page: add -o report.html")


def _html_report(run: Any, report: Any, smoothing: float) -> str:
    from runlens.plotdata import build_plot_data
    from runlens.report import html

    return html.render(report, build_plot_data(run, report, smoothing=smoothing))


def _write_plots(
    text: str, run: Any, report: Any, plots: str, output: str | None, smoothing: float
) -> str:
    """Write the PNG plots into ``plots`` and return ``text`` with an image section whose
    paths are relative to the Markdown file (or to the current directory for stdout)."""
    import os

    from runlens.plotdata import build_plot_data
    from runlens.report.figures import render_pngs, with_images

    pngs = render_pngs(build_plot_data(run, report, smoothing=smoothing))
    os.makedirs(plots, exist_ok=True)
    base = os.path.dirname(os.path.abspath(output)) if output else os.getcwd()
    images = []
    for name, data in pngs.items():
        path = os.path.join(plots, name)
        with open(path, "wb") as fh:
            fh.write(data)
        images.append((name, os.path.relpath(os.path.abspath(path), base).replace(os.sep, "/")))
    return with_images(text, images)


# -- analyze / signatures / explain -----------------------------------------------------


@cli.command()
@click.argument("run_dir", metavar="RUN_DIR")
@format_option(("terminal", "markdown", "json", "html"), "terminal")
@click.option(
    "-o",
    "--output",
    type=click.Path(writable=True),
    default=None,
    help="Write the output to FILE instead of stdout (html of several runs: a folder, one "
    "page per run).",
)
@fail_on_option
@click.option(
    "--plots",
    type=click.Path(file_okay=False),
    default=None,
    metavar="DIR",
    help="With --format markdown: write PNG plots into DIR (created) and embed them "
    "(needs matplotlib).",
)
@analysis_options
@memory_option
@input_options
@click.option(
    "--rank",
    type=click.IntRange(min=0),
    default=None,
    metavar="R",
    help="A distributed run: report rank R alone instead of the ranks merged (scalars "
    "averaged, shards combined). See docs/distributed.md.",
)
@handle_errors
def analyze(
    run_dir: str,
    fmt: str,
    output: str | None,
    fail_on: str | None,
    plots: str | None,
    set_: tuple[str, ...],
    config: str | None,
    smoothing: float | None,
    only: tuple[str, ...],
    task: str | None,
    memory_mb: float | None,
    input_format: str,
    map_: tuple[str, ...],
    rank: int | None,
) -> None:
    """Diagnose a recorded run: what went wrong, where, the evidence, the fix.

    RUN_DIR is a run directory or a log (TensorBoard, CSV, HF trainer_state.json), or a
    folder of several (TensorBoard runs/, lightning_logs/, a folder of runs or CSV logs):
    each run found is analyzed and reported in turn (html: one page per run with
    -o DIR). A CSV holding several runs appended to each other is split likewise.

    \b
    Exit status: 0 ok, 1 when --fail-on is hit, 2 on bad input (the worst over all runs).
    \b
    Examples:
      runlens analyze runs/exp1
      runlens analyze runs/exp1 --format markdown -o report.md
      runlens analyze runs/exp1 --format html -o report.html
      runlens analyze runs/exp1 --fail-on error --set loss-spike.threshold=8
      runlens analyze tb_logs/run1            # TensorBoard, CSV, HF trainer_state too
      runlens analyze runs/exp1 --task classification:10
      runlens analyze lightning_logs/         # every version_N, one report each
    """
    from runlens.discover import discover
    from runlens.importers import parse_map

    options = analyze_options(set_, config, smoothing, only, task, memory_mb)
    if plots is not None and fmt != "markdown":
        fail("--plots works with --format markdown (the html format has its own plots)")
    found = discover(run_dir, None if input_format == "auto" else input_format)
    mapping = parse_map(map_) or None
    if found.single:
        if output is not None and os.path.isdir(output):
            fail(f"-o {output} is a directory: give a file name")
        if fmt == "html":
            _refuse_html_to_tty(output)
        status = _analyze_one(found.runs[0], fmt, output, fail_on, plots, options, mapping, rank)
    else:
        if rank is not None:
            fail("--rank applies to one run")
        status = _analyze_many(found, fmt, output, fail_on, plots, options, mapping)
    if status:
        sys.exit(status)


def _analyze_one(
    found: Any,
    fmt: str,
    output: str | None,
    fail_on: str | None,
    plots: str | None,
    options: Any,
    mapping: dict[str, str] | None,
    rank: int | None = None,
) -> int:
    """Analyze one run and write its report; the exit status (0 or EXIT_FAIL_ON)."""
    from runlens.engine import analyze as run_analysis
    from runlens.engine import make_context
    from runlens.segments import LIST_RETRIES, SegmentsChanged
    from runlens.sources import open_found

    for attempt in range(LIST_RETRIES):
        try:
            # One Context: the graphical reports reuse what the analysis read.
            run = make_context(open_found(found, mapping, rank), options)
            report = run_analysis(run, options)
            text = _render(run, report, fmt, output, plots, options)
            break
        except SegmentsChanged:  # a live run's segments merged while read: read again
            if attempt == LIST_RETRIES - 1:
                raise
    emit(text, output)
    return _fail_on_status(report, fail_on)


def _render(
    run: Any, report: Any, fmt: str, output: str | None, plots: str | None, options: Any
) -> str:
    import shutil

    from runlens.report import json_report, markdown, terminal

    if fmt == "json":
        return json_report.render(report)
    if fmt == "html":
        return _html_report(run, report, options.smoothing)
    if fmt == "markdown":
        text = markdown.render(report)
        if plots is not None:
            text = _write_plots(text, run, report, plots, output, options.smoothing)
        return text
    tty = output is None and _stdout_is_tty()
    width = shutil.get_terminal_size((100, 24)).columns if tty else 100
    return terminal.render(report, width=width, color=tty)


def _fail_on_status(report: Any, fail_on: str | None) -> int:
    from runlens.findings import SEVERITY_ORDER

    if fail_on is not None and any(
        SEVERITY_ORDER[f.severity] <= SEVERITY_ORDER[fail_on] for f in report.findings
    ):
        return EXIT_FAIL_ON
    return EXIT_OK


def _analyze_many(
    found: Any,
    fmt: str,
    output: str | None,
    fail_on: str | None,
    plots: str | None,
    options: Any,
    mapping: dict[str, str] | None,
) -> int:
    """Analyze every run ``discover`` found, in its order: one report each (terminal,
    markdown), one JSON document listing them, or one HTML page each in the folder -o.
    A run that cannot be read is reported (stderr and the output) and the others still
    are. Returns the worst exit status over the runs."""
    from runlens.engine import analyze as run_analysis
    from runlens.engine import make_context
    from runlens.report import json_report
    from runlens.sources import open_found

    pages_dir = None
    if fmt == "html":
        if output is None or output.lower().endswith((".html", ".htm")) or os.path.isfile(output):
            fail(
                f"{found.root} holds {len(found.runs)} runs ({found.describe()}): --format "
                "html writes one page per run: give -o DIR (a folder), or pass one run at a time"
            )
        pages_dir = output
        os.makedirs(pages_dir, exist_ok=True)
    elif output is not None and os.path.isdir(output):
        fail(f"-o {output} is a directory: give a file name")
    if output is not None or fmt in ("json", "html"):  # else the preamble shows them
        for note in found.notes:
            click.echo(f"runlens: {note}", err=True)

    status = EXIT_OK
    texts: list[str] = []
    pages: list[str] = []
    reports: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    names = _page_names([r.label for r in found.runs])
    for item, page in zip(found.runs, names, strict=True):
        try:
            run = make_context(open_found(item, mapping), options)
            report = run_analysis(run, options)
        except RunlensError as exc:
            click.echo(f"runlens: error: {item.label}: {exc}", err=True)
            errors.append({"label": item.label, "path": str(item.path), "message": str(exc)})
            texts.append(_run_error_text(fmt, item.label, str(exc)))
            status = max(status, EXIT_USAGE)
            continue
        status = max(status, _fail_on_status(report, fail_on))
        if fmt == "json":
            reports.append({"label": item.label, "format": item.format,
                            "reason": item.reason, **json_report.to_json_dict(report)})  # fmt: skip
        elif pages_dir is not None:
            path = os.path.join(pages_dir, page + ".html")
            emit(_html_report(run, report, options.smoothing), path)
            pages.append(path)
        else:
            sub = None if plots is None else os.path.join(plots, page)
            texts.append(_render(run, report, fmt, output, sub, options))
    if pages_dir is not None:
        click.echo(f"runlens: wrote {len(pages)} pages: {', '.join(pages)}", err=True)
        return status
    if fmt == "json":
        emit(json_report.render_many(found, reports, errors), output)
        return status
    emit(_many_preamble(found, fmt) + "\n".join(texts), output)
    return status


def _page_names(labels: list[str]) -> list[str]:
    """File-system-safe, unique names for the runs' pages and plot folders."""
    import re

    out: list[str] = []
    for label in labels:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", label.replace("#", "-run")).strip("._") or "run"
        name, k = base, 2
        while name in out:
            name, k = f"{base}-{k}", k + 1
        out.append(name)
    return out


def _many_preamble(found: Any, fmt: str) -> str:
    n = len(found.runs)
    head = f"{found.root}: {n} runs, one report each: {found.describe(limit=n)}"
    if fmt == "markdown":
        from runlens.report.markdown import escape

        lines = [f"# runlens: {escape(head)}", ""]
        lines += [f"- {escape(note)}" for note in found.notes]
        return "\n".join([*lines, ""]) + "\n"
    return "\n".join([f"runlens: {head}", *(f"runlens: {n}" for n in found.notes), ""]) + "\n"


def _run_error_text(fmt: str, label: str, message: str) -> str:
    if fmt == "markdown":
        from runlens.report.markdown import escape

        return f"## runlens report: {escape(label)}\n\n**error:** {escape(message)}\n"
    return f"runlens report: {label}\nerror: {message}\n"


@cli.command()
@format_option(("text", "markdown", "json"), "text")
@handle_errors
def signatures(fmt: str) -> None:
    """List every signature runlens checks: name, category, severity, summary.

    \b
    Examples:
      runlens signatures
      runlens signatures --format json
    """
    import json

    from runlens.docgen import signature_table
    from runlens.signatures import REGISTRY

    if fmt == "json":
        text = json.dumps([s.describe() for s in REGISTRY.values()], indent=2) + "\n"
    elif fmt == "markdown":
        text = signature_table() + "\n"
    else:
        width = max(len(n) for n in REGISTRY) if REGISTRY else 4
        lines = [f"{'NAME':<{width}}  {'CATEGORY':<8}  {'SEVERITY':<8}  SUMMARY"]
        for name, s in REGISTRY.items():
            lines.append(f"{name:<{width}}  {s.category:<8}  {s.severity:<8}  {s.summary}")
        n = len(REGISTRY)
        lines.append(f"\n{n} signature{'s' if n != 1 else ''}; `runlens explain NAME` for details.")
        text = "\n".join(lines) + "\n"
    click.echo(text, nl=False)


@cli.command()
@click.argument("name")
@handle_errors
def explain(name: str) -> None:
    """Explain one signature: what it detects, why, evidence, fix, parameters.

    \b
    Example:
      runlens explain nan-inf
    """
    import difflib

    from runlens.docgen import explain_text
    from runlens.errors import OptionError
    from runlens.signatures import REGISTRY

    if name not in REGISTRY:
        close = difflib.get_close_matches(name, list(REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see `runlens signatures`)"
        raise OptionError(f"unknown signature {name!r}{hint}")
    click.echo(explain_text(REGISTRY[name]), nl=False)


# -- compare ------------------------------------------------------------------------------


@cli.command()
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
@format_option(("terminal", "markdown", "json", "html"), "terminal")
@output_option
@click.option(
    "--metric",
    default=None,
    metavar="NAME",
    help="Scalar to rank by (default: val/loss if every run has it, else train/loss). "
    "Names with acc/accuracy/f1/auc/... rank higher-is-better, others lower-is-better.",
)
@click.option(
    "--by",
    type=click.Choice(["step", "time"]),
    default="step",
    show_default=True,
    help="Align curves by step or by wall-clock seconds since each run started.",
)
@analysis_options
@memory_option
@input_options
@handle_errors
def compare(
    runs: tuple[str, ...],
    fmt: str,
    output: str | None,
    metric: str | None,
    by: str,
    set_: tuple[str, ...],
    config: str | None,
    smoothing: float | None,
    only: tuple[str, ...],
    task: str | None,
    memory_mb: float | None,
    input_format: str,
    map_: tuple[str, ...],
) -> None:
    """Compare runs side by side: ranking, config differences, findings per run, the
    step where curves separate, layers that differ by 10x or more.

    RUN is a run directory, a folder of runs, or a glob (quoted globs are expanded
    here too), or a log to import: TensorBoard, CSV metrics, HF trainer_state.json.
    The first run is the baseline for pairwise results. Unreadable runs are
    reported and skipped; exit 2 only when none can be read.

    \b
    Examples:
      runlens compare runs/baseline runs/fix
      runlens compare 'runs/lr_*' --metric val/accuracy
      runlens compare runs/sweep --format json -o sweep.json
      runlens compare 'runs/lr_*' --format html -o sweep.html
    """
    import shutil

    from runlens.compare import CompareOptions, progress_bar
    from runlens.compare import compare as run_compare
    from runlens.importers import parse_map
    from runlens.report import compare_json, compare_markdown, compare_terminal

    options = CompareOptions(
        metric=metric,
        by=by,
        analyze=analyze_options(set_, config, smoothing, only, task, memory_mb),  # type: ignore[arg-type]
        input_format=input_format,
        mapping=tuple(parse_map(map_).items()),
    )
    if fmt == "html":
        _refuse_html_to_tty(output)
    with progress_bar() as on_progress:
        comparison = run_compare(list(runs), options, on_progress=on_progress)
    if fmt == "json":
        text = compare_json.render(comparison)
    elif fmt == "html":
        from runlens.plotdata import build_comparison_plot_data
        from runlens.report import html

        data = build_comparison_plot_data(comparison, smoothing=options.analyze.smoothing)
        text = html.render_comparison(comparison, data)
    elif fmt == "markdown":
        text = compare_markdown.render(comparison)
    else:
        tty = output is None and _stdout_is_tty()
        width = shutil.get_terminal_size((120, 24)).columns if tty else 120
        text = compare_terminal.render(comparison, width=width, color=tty)
    emit(text, output)
    if fmt != "terminal" or output is not None:
        for e in comparison.errors:  # the report has them too; say so where a person looks
            click.echo(f"runlens: warning: skipped {e.path}: {e.message}", err=True)


# -- import -------------------------------------------------------------------------------


@cli.command("import")
@click.argument("path", metavar="PATH")
@click.option(
    "-o",
    "--output",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Run directory to create (must not exist or be empty).",
)
@input_options
@handle_errors
def import_(path: str, out_dir: str, input_format: str, map_: tuple[str, ...]) -> None:
    """Convert a TensorBoard log, a CSV metrics file or a Hugging Face trainer_state.json
    into a runlens run directory (analyze and compare read those logs directly too; this
    keeps a converted copy).

    \b
    Examples:
      runlens import tb_logs/run1 -o runs/run1
      runlens import lightning_logs/version_0/metrics.csv -o runs/v0 --map val_acc=val/accuracy
      runlens import out/checkpoint-500 -o runs/bert --input-format hf-trainer
    """
    from runlens.importers import convert, parse_map
    from runlens.run import load_run

    fmt = None if input_format == "auto" else input_format
    dest = convert(path, out_dir, fmt, parse_map(map_) or None)
    run = load_run(dest)
    click.echo(
        f"imported {run.source_format} log {path} -> {dest} "
        f"({len(run.scalar_names)} series, {len(run.layer_kinds)} layer kinds)"
    )
    for w in run.warnings:
        click.echo(f"runlens: warning: {w}", err=True)


@cli.command("compact")
@click.argument("run_dir", metavar="RUN_DIR")
@click.option("--dry-run", is_flag=True, help="Say what would be merged; change nothing.")
@handle_errors
def compact_(run_dir: str, dry_run: bool) -> None:
    """Merge a run's many small segments into few large ones, so it reads fast.

    The collector does this on close(); run it for a run that ended abnormally (killed,
    crashed before closing) or was recorded with compact=False. Crash-safe: the old
    segments stay readable until the merged one is in place (docs/run-format.md).

    \b
    Examples:
      runlens compact runs/exp1
      runlens compact runs/exp1 --dry-run
    """
    from runlens_collect.compact import compact_run

    from runlens.run import load_run

    load_run(run_dir)  # a one-line error for anything that is not a run directory
    done = compact_run(run_dir, dry_run=dry_run)
    prefix = "would compact" if dry_run else "compacted"
    click.echo(f"{prefix} {run_dir}: {done.describe()}")
    for line in done.skipped:
        click.echo(f"runlens: warning: {line}", err=True)


# -- collect ------------------------------------------------------------------------------


def _kinds_option(value: str | None) -> tuple[str, ...] | None:
    from runlens_collect.format import KINDS

    if value is None:
        return None
    kinds = tuple(k.strip() for k in value.split(",") if k.strip())
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        fail(
            f"--kinds: unknown kind(s) {', '.join(unknown) or '(none)'}; choose from "
            f"{','.join(KINDS)}"
        )
    return kinds


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- COMMAND...")
@click.option(
    "--out",
    default="runs",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory the run directory is created in.",
)
@click.option("--name", default=None, help="Run directory name (default: script name + time).")
@_every_option("--every", "Layer statistics", 1)
@_every_option("--activation-every", "Activation statistics", 10)
@_every_option("--hist-every", "Histograms", 50)
@click.option(
    "--kinds",
    default=None,
    metavar="K1,K2",
    help="Layer kinds to record: weight,grad,update,activation,output (default all).",
)
@click.option(
    "--overhead",
    default=None,
    metavar="FRACTION|none",
    help="Share of the step time the collector may take; it thins its cadences to fit "
    "(collector default: 0.03). 'none': the cadences above, fixed.",
)
@click.option(
    "--analyze",
    "then_analyze",
    is_flag=True,
    help="Analyze the run(s) when the command ends and print the diagnosis.",
)
@handle_errors
def collect(
    command: tuple[str, ...],
    out: str,
    name: str | None,
    every: int | None,
    activation_every: int | None,
    hist_every: int | None,
    kinds: str | None,
    overhead: str | None,
    then_analyze: bool,
) -> None:
    """Run an unmodified training command and record it (no code change).

    Everything after `--` runs as is: its arguments, output and exit status are its own.
    Each optimizer's steps become a run (see docs/collect.md for how and the limits).

    \b
    Examples:
      runlens collect -- python train.py --lr 3e-4
      runlens collect --name baseline --analyze -- python -m mypkg.train
      runlens collect --every 10 --kinds weight,grad,update -- python train.py
    """
    import os

    from runlens.launch import default_run_name, describe, run_collect

    settings: dict[str, object] = {
        k: v
        for k, v in {
            "every": every,
            "activation_every": activation_every,
            "hist_every": hist_every,
            "kinds": _kinds_option(kinds),
        }.items()
        if v is not None
    }
    if overhead is not None:
        settings["overhead"] = _overhead_option(overhead)
    run_dir = os.path.join(out, name or default_run_name(command))
    result = run_collect(command, run_dir, settings)
    for line in describe(result):
        click.echo(f"runlens: {line}", err=True)
    code = result.returncode
    if then_analyze and result.runs:
        code = _analyze_collected([r.run_dir for r in result.runs]) or code
    sys.exit(code if code else EXIT_OK)


def _overhead_option(text: str) -> float | None:
    from runlens.errors import OptionError

    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise OptionError(f"--overhead must be a fraction in (0, 1) or 'none', got {text!r}")
    return value


def _analyze_collected(run_dirs: list[str]) -> int:
    """Print the terminal report of each run; 0, or EXIT_USAGE if one cannot be read."""
    import shutil

    from runlens.engine import AnalyzeOptions
    from runlens.engine import analyze as run_analysis
    from runlens.report import terminal
    from runlens.run import load_run

    tty = _stdout_is_tty()
    width = shutil.get_terminal_size((100, 24)).columns if tty else 100
    status = EXIT_OK
    for run_dir in run_dirs:
        try:
            report = run_analysis(load_run(run_dir), AnalyzeOptions())
        except RunlensError as exc:
            click.echo(f"runlens: error: {run_dir}: {exc}", err=True)
            status = EXIT_USAGE
            continue
        click.echo(terminal.render(report, width=width, color=tty), nl=False)
    return status


# -- watch / triage (runlens/cli_live.py) -----------------------------------------------

from runlens import cli_live  # noqa: E402  (it imports the shared options defined above)

cli_live.register(cli)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        cli.main(args=argv, prog_name="runlens", standalone_mode=True)
    except SystemExit:
        raise
