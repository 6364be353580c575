"""runlens against the labelled real-log corpus (tests/real_logs/): precision and recall.

Every corpus log is analyzed once per session through the public library, the way
``runlens analyze`` does (tests/real_logs/score.py); the development split must reach
precision >= 0.9 and recall >= 0.8 on its certain labels, with no log refused and no run
read as nothing. The held-out split is measured and printed, never asserted (and never
looked at log by log: only its totals are printed). ``python tests/real_logs/score.py``
prints the per-log table of the development split.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import runlens

CORPUS = Path(__file__).parent / "real_logs"
sys.path.insert(0, str(CORPUS))
import score  # noqa: E402 (tests/real_logs on sys.path)

LABELS = score.load_labels()
DEV = {k: v for k, v in LABELS.items() if v["split"] == "dev"}
HELDOUT = {k: v for k, v in LABELS.items() if v["split"] == "heldout"}

MIN_PRECISION = 0.9
MIN_RECALL = 0.8


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, score.LogResult]:
    cache = tmp_path_factory.mktemp("score-cache")
    return score.analyze_all(LABELS, cache_dir=str(cache))


def test_dev_split_meets_the_targets(results: dict[str, score.LogResult]) -> None:
    certain = score.score(DEV, results, certain_only=True)
    every = score.score(DEV, results, certain_only=False)
    print(f"\ndev, certain labels: {certain.line()}\ndev, all labels: {every.line()}")
    table = score.table(DEV, results)
    assert certain.precision >= MIN_PRECISION, table
    assert certain.recall >= MIN_RECALL, table
    assert certain.labels >= 15 and certain.findings >= 10  # not passing on nothing
    # Refused logs and runs read as nothing are failures wherever they are.
    assert every.errors == 0, table
    assert certain.read_nothing == 0, table


def test_heldout_split_is_measured(results: dict[str, score.LogResult]) -> None:
    """Reported, not asserted: the held-out labels were never tuned on."""
    for name, certain in (("certain labels", True), ("all labels", False)):
        sc = score.score(HELDOUT, results, certain_only=certain)
        print(f"\nheld-out, {name}: {sc.line()}\n{score.confusion(sc)}")
        assert sc.logs > 0 and 0.0 <= sc.precision <= 1.0 and 0.0 <= sc.recall <= 1.0


# -- the scorer itself ----------------------------------------------------------------------


def _hit(sig: str, steps: tuple[int, int] | None, series: tuple[str, ...] = ()) -> score.Hit:
    return score.Hit("run", sig, "warning", steps, series, (0, 100), "step", "summary")


def _label(cls: str, steps: tuple[int, int], series: str = "train/loss") -> dict:
    return {"class": cls, "series": series, "steps": list(steps)}


def test_every_mapped_signature_exists_and_every_class_can_be_found() -> None:
    assert set(score.CLASS_OF) <= set(runlens.REGISTRY)
    reachable = set(score.CLASS_OF.values())
    vocabulary = {"overfitting", "loss-divergence", "lr-too-high-warmup", "loss-spike",
                  "nan-inf", "not-learning", "loss-collapse-zero", "loss-oscillation",
                  "noisy-loss", "underfitting", "val-below-train"}  # fmt: skip
    assert vocabulary <= reachable
    assert score.class_of("dead-relu") == "other"


def test_matching_needs_class_overlap_and_series_role() -> None:
    lab = _label("loss-spike", (40, 42))
    assert score.matches(_hit("loss-spike", (41, 41)), lab, "step")
    # tolerance: 5% of the run's 100-step span on each side
    assert score.matches(_hit("loss-spike", (46, 50)), lab, "step")
    assert not score.matches(_hit("loss-spike", (48, 50)), lab, "step")
    assert not score.matches(_hit("noisy-loss", (41, 41)), lab, "step")
    # a finding on the validation curve does not match a training-loss label
    assert not score.matches(_hit("loss-spike", (41, 41), ("val/loss",)), lab, "step")
    assert score.matches(_hit("loss-spike", (41, 41), ("train/loss",)), lab, "step")
    val = _label("overfitting", (10, 90), "eval/loss")
    assert score.matches(_hit("overfitting", (30, 90), ("val/loss", "train/loss")), val, "step")
    # loss-flat and not-learning both answer a not-learning label
    nl = _label("not-learning", (0, 100))
    assert score.matches(_hit("loss-flat", (0, 100)), nl, "step")
    assert score.matches(_hit("not-learning", (0, 100)), nl, "step")
    # other units than the label's: class and series only
    assert score.matches(_hit("loss-spike", (400, 400)), lab, "epoch")


def test_scores_count_findings_labels_and_failures() -> None:
    entries = {
        "a": {"split": "dev", "x_axis": "step", "problems": [_label("loss-spike", (40, 42))]},
        "b": {"split": "dev", "x_axis": "step", "problems": [], "uncertain": True},
        "c": {"split": "dev", "x_axis": "step", "problems": [_label("overfitting", (5, 9))]},
    }
    results = {
        "a": score.LogResult("a", [_hit("loss-spike", (41, 41)), _hit("noisy-loss", (0, 99))]),
        "b": score.LogResult("b", [_hit("underfitting", (50, 99))]),
        "c": score.LogResult("c", read_nothing=["run"]),
    }
    every = score.score(entries, results, certain_only=False)
    assert (every.true_findings, every.findings) == (1, 3)
    assert (every.found_labels, every.labels) == (1, 2)
    assert every.read_nothing == 1
    certain = score.score(entries, results, certain_only=True)
    assert (certain.true_findings, certain.findings) == (1, 2)  # log b left out
    assert certain.by_signature[("noisy-loss", "fp")] == 1
    assert certain.by_class[("overfitting", "missed")] == 1
