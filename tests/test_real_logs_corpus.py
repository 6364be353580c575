"""The labelled real-log corpus (tests/real_logs/) is consistent, small, free of held-out owners.

These tests check the corpus itself, not runlens: every folder has a label and every label a
folder, labels use the documented vocabulary, problem step ranges fall inside the log's own x
range (read with the raw readers of plot_log.py), the recorded split is the one make_split.py
draws, and no source repository belongs to an owner on the held-out list.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

CORPUS = Path(__file__).parent / "real_logs"
LABELS = json.loads((CORPUS / "labels.json").read_text())
LOGS: dict[str, dict] = LABELS["logs"]

sys.path.insert(0, str(CORPUS))
import make_split  # noqa: E402
import plot_log  # noqa: E402

KINDS = {"hf-trainer", "lightning-csv", "keras-csv", "other-csv", "tensorboard", "yolo-csv"}
CLASSES = {
    "overfitting",
    "loss-divergence",
    "lr-too-high-warmup",
    "loss-spike",
    "nan-inf",
    "not-learning",
    "loss-collapse-zero",
    "loss-oscillation",
    "noisy-loss",
    "underfitting",
    "val-below-train",
    "other",
}
# Tooling that lives next to the logs, not logs.
NOT_LOGS = {"labels.json", "README.md", "plot_log.py", "make_split.py", "__pycache__"}


def _folders() -> set[str]:
    return {p.name for p in CORPUS.iterdir() if p.is_dir() and p.name not in NOT_LOGS}


def _files(log_id: str) -> list[Path]:
    return sorted(p for p in (CORPUS / log_id).rglob("*") if p.is_file())


def test_every_folder_is_labelled_and_every_label_has_a_folder():
    assert _folders() == set(LOGS)
    assert set(LABELS["classes"]) == CLASSES
    assert len(LOGS) >= 90


@pytest.mark.parametrize("log_id", sorted(LOGS))
def test_label_fields(log_id):
    entry = LOGS[log_id]
    assert entry["kind"] in KINDS
    assert entry["split"] in ("dev", "heldout")
    assert entry["x_axis"] in ("step", "epoch")
    assert entry["verdict"] in ("healthy", "problems")
    assert (entry["verdict"] == "problems") == bool(entry["problems"])
    assert isinstance(entry["uncertain"], bool)
    assert len(entry["rationale"]) > 40 and re.search(r"\d", entry["rationale"])
    for problem in entry["problems"]:
        assert problem["class"] in CLASSES
        assert problem["severity"] in ("warning", "error")
        assert problem["series"] and problem["note"]
        first, last = problem["steps"]
        assert first <= last
    source = entry["source"]
    assert re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source["repo"])
    assert re.fullmatch(r"[0-9a-f]{40}", source["commit"])
    assert source["url"] == (
        f"https://github.com/{source['repo']}/blob/{source['commit']}/{source['path']}"
    )
    assert source["retrieved_via"] in ("fetch", "read_file")


@pytest.mark.parametrize("log_id", sorted(LOGS))
def test_provenance_covers_every_file(log_id):
    """Each file in the folder is accounted for by source (single file, or the files list)."""
    entry = LOGS[log_id]["source"]
    local = {str(p.relative_to(CORPUS / log_id)) for p in _files(log_id)}
    if "files" in entry:
        listed = {f["file"] for f in entry["files"]}
        assert listed == local
        for f in entry["files"]:
            assert re.fullmatch(r"[0-9a-f]{40}", f["commit"]) and f["path"]
    else:
        assert len(local) == 1
        assert Path(entry["path"]).name == Path(local.pop()).name


@pytest.mark.parametrize("log_id", sorted(LOGS))
def test_problem_steps_lie_inside_the_log(log_id):
    """Labelled ranges refer to x values the raw file actually contains."""
    entry = LOGS[log_id]
    if not entry["problems"]:
        return
    groups = plot_log.read_log(CORPUS / log_id)
    xs = [x for series in groups.values() for pts in series.values() for x, _ in pts]
    assert xs, f"{log_id}: the raw readers found no series"
    # Files without an epoch column count rows from 0; an epoch column may start at 1.
    low, high = min(xs), max(xs)
    for problem in entry["problems"]:
        first, last = problem["steps"]
        assert low - 1 <= first <= last <= high + 1, (log_id, problem["steps"], low, high)


def test_corpus_is_small():
    sizes = {p: p.stat().st_size for p in CORPUS.rglob("*") if p.is_file()}
    assert sum(sizes.values()) < 15 * 2**20
    big = {str(p.relative_to(CORPUS)): s for p, s in sizes.items() if s > 2**20}
    assert not big, big


def test_split_is_the_documented_seeded_draw():
    seed, split = make_split.choose_split(LOGS)
    assert seed == LABELS["split_seed"]
    assert split == {log_id: entry["split"] for log_id, entry in LOGS.items()}


def test_split_keeps_repositories_together_and_holds_out_a_third():
    by_repo: dict[str, set[str]] = {}
    for entry in LOGS.values():
        by_repo.setdefault(entry["source"]["repo"].lower(), set()).add(entry["split"])
    assert all(len(splits) == 1 for splits in by_repo.values())
    counts = Counter(entry["split"] for entry in LOGS.values())
    assert abs(counts["heldout"] - len(LOGS) / 3) <= 2
    for kind in KINDS:
        for verdict in ("healthy", "problems"):
            held = sum(
                1
                for e in LOGS.values()
                if (e["kind"], e["verdict"], e["split"]) == (kind, verdict, "heldout")
            )
            assert held >= 1, (kind, verdict)


def _heldout_owner_list() -> Path | None:
    """shared/heldout-log-owners.txt next to the checkout, or $RUNLENS_HELDOUT_OWNERS."""
    candidates = [os.environ.get("RUNLENS_HELDOUT_OWNERS", "")]
    root = Path(__file__).resolve().parents[1]
    candidates += [str(root.parent / "shared" / "heldout-log-owners.txt")]
    candidates += [str(root.parents[1] / "shared" / "heldout-log-owners.txt")]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def test_no_source_repository_belongs_to_a_heldout_owner():
    path = _heldout_owner_list()
    if path is None:
        pytest.skip("held-out owner list not found (set RUNLENS_HELDOUT_OWNERS)")
    owners = {
        line.strip().lower()
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert owners, f"{path} lists no owners"
    used = {entry["source"]["repo"].split("/")[0].lower() for entry in LOGS.values()}
    assert not used & owners, sorted(used & owners)
