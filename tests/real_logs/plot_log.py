"""Render a corpus log's raw curves to a PNG and print a numeric summary.

Labelling aid for tests/real_logs/: reads the raw files with plain Python (csv, json, the
TensorBoard event reader), never with runlens importers, so labels are made from what the
framework wrote, not from what runlens understood of it.

    python tests/real_logs/plot_log.py tests/real_logs/<log_id> [--out /tmp/plots]

Every numeric column / tag / log_history key becomes one series. The x axis is the log's own:
`step` when the file has one, else `epoch`, else the row number (Keras logs without an epoch
column). Needs matplotlib (and tensorboard for event files).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from pathlib import Path

Series = dict[str, list[tuple[float, float]]]

X_NAMES = ("step", "global_step", "epoch", "Epoch", "epochs")


def _num(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def read_csv(path: Path) -> Series:
    """Columns of a CSV; x is step, else epoch, else the row number."""
    text = path.read_text(encoding="utf-8", errors="replace")
    sample = text[:4096]
    delim = "\t" if sample.count("\t") > sample.count(",") else ","
    rows = list(csv.reader(io.StringIO(text), delimiter=delim))
    header = [h.strip() for h in rows[0]]
    xcol = next((header.index(n) for n in X_NAMES if n in header), None)
    out: Series = {}
    for i, row in enumerate(rows[1:]):
        if xcol is not None:
            x = _num(row[xcol]) if xcol < len(row) else None
            if x is None:
                continue
        else:
            x = float(i)
        for j, name in enumerate(header):
            if j == xcol or j >= len(row):
                continue
            y = _num(row[j])
            if y is not None:
                out.setdefault(name, []).append((x, y))
    return out


def read_trainer_state(path: Path) -> Series:
    """HF trainer_state.json log_history keyed by step."""
    state = json.loads(path.read_text())
    out: Series = {}
    for entry in state.get("log_history", []):
        step = entry.get("step")
        for key, value in entry.items():
            if key in ("step",) or not isinstance(value, (int, float)):
                continue
            out.setdefault(key, []).append((float(step), float(value)))
    return out


def read_json_lines(path: Path) -> Series:
    """detectron2-style metrics.json: one JSON object per line keyed by iteration."""
    out: Series = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        x = entry.get("iteration", entry.get("step", entry.get("epoch")))
        if x is None:
            continue
        for key, value in entry.items():
            if isinstance(value, (int, float)) and key not in ("iteration", "step"):
                out.setdefault(key, []).append((float(x), float(value)))
    return out


def read_tfevents(path: Path) -> Series:
    """Scalar summaries (simple_value or scalar tensors) of one event file, keyed by step."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    out: Series = {}
    for event in EventFileLoader(str(path)).Load():
        if not event.HasField("summary"):
            continue
        for value in event.summary.value:
            if value.HasField("simple_value"):
                y = float(value.simple_value)
            elif value.HasField("tensor"):
                try:
                    arr = tensor_util.make_ndarray(value.tensor)
                except Exception:  # text/image tensors are not scalars
                    continue
                if arr.size != 1 or arr.dtype.kind not in "fiu":
                    continue
                y = float(arr.reshape(()))
            else:
                continue
            out.setdefault(value.tag, []).append((float(event.step), y))
    return out


def read_log(folder: Path) -> dict[str, Series]:
    """All series of a corpus folder, grouped by file (relative path)."""
    groups: dict[str, Series] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name in ("hparams.yaml", "args.yaml"):
            continue
        rel = str(path.relative_to(folder))
        if "tfevents" in path.name:
            series = read_tfevents(path)
        elif path.suffix == ".json":
            head = path.read_text(errors="replace")[:200000]
            series = read_trainer_state(path) if '"log_history"' in head else read_json_lines(path)
        elif path.suffix in (".csv", ".log", ".txt", ".tsv"):
            series = read_csv(path)
        else:
            continue
        if series:
            groups[rel] = series
    return groups


def summary(name: str, pts: list[tuple[float, float]], n: int = 10) -> str:
    finite = [(x, y) for x, y in pts if math.isfinite(y)]
    bad = len(pts) - len(finite)
    if not finite:
        return f"  {name}: n={len(pts)} all non-finite"
    k = max(1, len(finite) // n)
    sample = " ".join(f"{x:g}:{y:.4g}" for x, y in finite[::k])
    xmin, ymin = min(finite, key=lambda p: p[1])
    xmax, ymax = max(finite, key=lambda p: p[1])
    last = finite[-1]
    third = max(1, len(finite) // 3)
    means = [
        sum(y for _, y in part) / len(part)
        for part in (finite[:third], finite[third:-third] or finite[:1], finite[-third:])
    ]
    return (
        f"  {name}: n={len(pts)}{f' nonfinite={bad}' if bad else ''} [{sample}] "
        f"last {last[0]:g}:{last[1]:.4g} min {xmin:g}:{ymin:.4g} max {xmax:g}:{ymax:.4g} "
        f"thirds-mean {means[0]:.4g}/{means[1]:.4g}/{means[2]:.4g}"
    )


def _panel(name: str) -> int:
    low = name.lower()
    if "loss" in low or low in ("ppl", "perplexity") or "error" in low:
        return 0
    if "lr" in low.split("/")[-1] or "learning_rate" in low or low.startswith("lr"):
        return 2
    return 1


def plot(groups: dict[str, Series], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(10, 12))
    skip = ("epoch", "time", "runtime", "samples_per_second", "steps_per_second", "flos")
    for file, series in groups.items():
        prefix = "" if len(groups) == 1 else file.split("/events.out")[0] + ":"
        for name, pts in series.items():
            if any(s in name.lower() for s in skip) or len(pts) == 0:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1] if math.isfinite(p[1]) else float("nan") for p in pts]
            style = "o-" if len(pts) < 60 else "-"
            panel = _panel(name)
            axes[panel if panel == 0 else panel + 1].plot(
                xs, ys, style, ms=3, lw=1, label=prefix + name
            )
            if panel == 0:
                # Zoom: drop the first 10% of the x range so late-run shapes are visible.
                cut = xs[0] + 0.1 * (xs[-1] - xs[0])
                tail = [(x, y) for x, y in zip(xs, ys, strict=True) if x >= cut]
                if tail:
                    axes[1].plot(*zip(*tail, strict=True), style, ms=3, lw=1, label=prefix + name)
    titles = ("losses", "losses after first 10% of x", "metrics", "learning rate")
    for ax, what in zip(axes, titles, strict=True):
        ax.set_title(f"{title}: {what}", fontsize=9)
        if ax.lines:
            ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=70)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, default=Path("/tmp/real_log_plots"))
    args = parser.parse_args()
    groups = read_log(args.folder)
    for file, series in groups.items():
        print(file)
        for name, pts in series.items():
            print(summary(name, pts))
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / f"{args.folder.name}.png"
    plot(groups, png, args.folder.name)
    print(png)


if __name__ == "__main__":
    main()
