"""``runlens watch`` and ``runlens triage``: registered on the group in runlens/cli.py.

Kept apart from cli.py (which is long already); same rules: parse, call the library,
render, choose the exit code.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from runlens.cli import (
    EXIT_FAIL_ON,
    RunlensCommand,
    analysis_options,
    analyze_options,
    fail_on_option,
    handle_errors,
)

ACTIONS_DRAIN_S = 30.0
"""How long an exiting watch waits for --exec / --webhook deliveries still queued."""


@click.command(cls=RunlensCommand)
@click.argument("run_dir", metavar="RUN_DIR")
@click.option(
    "--interval",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    metavar="S",
    help="Seconds between polls of the run.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["terminal", "jsonl"]),
    default="terminal",
    show_default=True,
    help="terminal: readable lines; jsonl: one JSON object per event.",
)
@fail_on_option
@click.option(
    "--fail-on-stall",
    is_flag=True,
    help="Exit 1 when the run stalls (no new step for longer than the stall limit).",
)
@click.option(
    "--exec",
    "exec_",
    default=None,
    metavar="CMD",
    help="Run CMD (a shell command) for each new finding and stall, the event as one line "
    "of JSON on its stdin. Runs beside the watch, never blocking it.",
)
@click.option(
    "--exec-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    metavar="S",
    help="Kill an --exec command running longer than this.",
)
@click.option(
    "--webhook",
    default=None,
    metavar="URL",
    help="POST each new finding and stall as JSON to URL (5 s timeout, 3 retries with "
    "backoff; never blocks the watch).",
)
@click.option(
    "--min-steps",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="Steps before signatures other than nan-inf run.",
)
@click.option(
    "--layer-window",
    type=click.IntRange(min=0),
    default=2000,
    show_default=True,
    metavar="STEPS",
    help="Recorded layer steps kept for live layer signatures (plus the first 20); 0: all.",
)
@click.option(
    "--stall-factor",
    type=click.FloatRange(min=0, min_open=True),
    default=20.0,
    show_default=True,
    metavar="K",
    help="Stalled: no new step for K x the median step time ...",
)
@click.option(
    "--stall-floor",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    metavar="S",
    help="... and at least S seconds (and twice the collector's flush interval).",
)
@analysis_options
@handle_errors
def watch(
    run_dir: str,
    interval: float,
    fmt: str,
    fail_on: str | None,
    fail_on_stall: bool,
    exec_: str | None,
    exec_timeout: float,
    webhook: str | None,
    min_steps: int,
    layer_window: int,
    stall_factor: float,
    stall_floor: float,
    set_: tuple[str, ...],
    config: str | None,
    smoothing: float | None,
    only: tuple[str, ...],
    task: str | None,
) -> None:
    """Follow a run while it trains: print each new finding once, as it appears.

    RUN_DIR is a run directory being written by the collector, or its copy on object
    storage (s3://..., polled). Stops when run.json says the run ended (after one last
    analysis of the whole run); a run that stops making progress is reported as stalled.

    \b
    Exit status: 0 the run ended, 1 --fail-on (or --fail-on-stall) hit, 2 bad input.
    \b
    Examples:
      runlens watch runs/exp1
      runlens watch runs/exp1 --fail-on error || scancel $SLURM_JOB_ID
      runlens watch runs/exp1 --format jsonl --exec 'notify-send "$(jq -r .message)"'
      runlens watch s3://bucket/runs/exp1 --interval 30 --webhook https://hooks.example/x
    """
    from runlens.findings import SEVERITY_ORDER
    from runlens.live import WatchOptions
    from runlens.live import watch as follow
    from runlens.live.actions import Action, ExecAction, WebhookAction
    from runlens.live.render import jsonl, terminal

    def warn(msg: str) -> None:
        click.echo(f"runlens: warning: {msg}", err=True)

    options = WatchOptions(
        analyze=analyze_options(set_, config, smoothing, only, task),
        interval=interval,
        min_steps=min_steps,
        window_steps=layer_window or None,
        stall_factor=stall_factor,
        stall_floor=stall_floor,
    )
    actions: list[Action] = []
    if exec_:
        actions.append(ExecAction(exec_, timeout=exec_timeout, on_warning=warn))
    if webhook:
        actions.append(WebhookAction(webhook, on_warning=warn))
    render = jsonl if fmt == "jsonl" else terminal
    code = 0
    try:
        for event in follow(run_dir, options):
            click.echo(render(event), nl=False)
            sys.stdout.flush()
            if event.kind in ("finding", "stalled"):
                payload = event.to_dict()
                for a in actions:
                    a.submit(payload)
            hit = (
                event.finding is not None
                and fail_on is not None
                and SEVERITY_ORDER[event.finding.severity] <= SEVERITY_ORDER[fail_on]
            )
            if hit or (fail_on_stall and event.kind == "stalled"):
                code = EXIT_FAIL_ON
                break
    finally:
        for a in actions:
            if not a.close(ACTIONS_DRAIN_S):
                warn(f"{a.name}: gave up waiting for deliveries still queued")
    sys.exit(code)


@click.command(cls=RunlensCommand)
@click.argument("root", metavar="ROOT")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for the findings table, reports and summary (created; reused next time).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes analyzing runs in parallel (with --ray local: the CPUs Ray may use).",
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    default=None,
    metavar="[ADDRESS]",
    help="Analyze the runs as Ray tasks: alone, on a local Ray instance started here; "
    "with an address (auto, ray://head:10001), on that cluster. Needs runlens[ray].",
)
@click.option(
    "--partition-by",
    type=click.Choice(["date", "status", "source_format", "signature", "severity", "run", "none"]),
    default="date",
    show_default=True,
    help="Hive partition key of the findings table (date: UTC day the run started).",
)
@click.option(
    "--reports",
    type=click.Choice(["md", "html", "none"]),
    default="md",
    show_default=True,
    help="Write each run's report under OUT/reports in this format.",
)
@click.option("--force", is_flag=True, help="Analyze every run again, changed or not.")
@analysis_options
@handle_errors
def triage(
    root: str,
    out_dir: str,
    workers: int,
    ray_address: str | None,
    partition_by: str,
    reports: str,
    force: bool,
    set_: tuple[str, ...],
    config: str | None,
    smoothing: float | None,
    only: tuple[str, ...],
    task: str | None,
) -> None:
    """Analyze every run under ROOT into one queryable findings table and a summary.

    ROOT is a folder or an object-storage URL (s3://bucket/prefix). Runs are runlens run
    directories and the logs runlens imports (TensorBoard, CSV, trainer_state.json).
    Runs unchanged since the last triage into OUT are not analyzed again; unreadable runs
    are listed, never fatal.

    \b
    Examples:
      runlens triage /shared/runs --out triage/
      runlens triage s3://team-bucket/runs --out triage/ --workers 8
      runlens triage /shared/runs --out triage/ --ray auto --partition-by status
    """
    from runlens.compare import progress_bar
    from runlens.fleet.summary import render_terminal
    from runlens.fleet.triage import TriageOptions
    from runlens.fleet.triage import triage as run_triage

    options = TriageOptions(
        analyze=analyze_options(set_, config, smoothing, only, task),
        workers=workers,
        ray=ray_address,
        partition_by=partition_by,
        reports=reports,
        force=force,
    )
    with progress_bar() as on_progress:
        result = run_triage(root, out_dir, options, on_progress=on_progress)
    click.echo(render_terminal(result.summary, out_dir), nl=False)


def register(group: Any) -> None:
    group.add_command(watch)
    group.add_command(triage)
