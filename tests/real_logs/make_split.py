"""Assign each corpus log to the development or the held-out split.

    python tests/real_logs/make_split.py            # print the split labels.json should hold
    python tests/real_logs/make_split.py --write    # rewrite the "split" fields in labels.json

Method (fixed before anyone analyzes the corpus with runlens):

* Logs from one repository always share a split (several runs of one project look alike, so
  splitting them would leak the held-out third into development).
* Repositories are visited in an order drawn with ``random.Random(seed)``; each goes to the
  held-out split when that lowers the total shortfall of held-out logs against the target of
  one third of every (kind, verdict) stratum and the held-out split is still below one third of
  the corpus; otherwise it goes to development.
* Whole repositories are coarse units, so one draw can miss a stratum badly. The draw is
  repeated for seeds BASE_SEED .. BASE_SEED + TRIES - 1 and the seed whose held-out counts are
  closest to the per-stratum targets (sum of squared deviations, ties to the lower seed) is
  kept. Only labels (kind, verdict, repository) enter the choice, never an analysis result.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

BASE_SEED = 20240615
TRIES = 200
HELDOUT_SHARE = 1 / 3
LABELS = Path(__file__).with_name("labels.json")


def imbalance(logs: dict[str, dict], split: dict[str, str]) -> float:
    """Sum over (kind, verdict) strata of (held-out count - target)^2."""
    strata = Counter((e["kind"], e["verdict"]) for e in logs.values())
    held = Counter((e["kind"], e["verdict"]) for i, e in logs.items() if split[i] == "heldout")
    return sum((held[s] - n * HELDOUT_SHARE) ** 2 for s, n in strata.items())


def choose_split(logs: dict[str, dict]) -> tuple[int, dict[str, str]]:
    """The (seed, split) with the smallest imbalance over the fixed range of seeds."""
    best = None
    for seed in range(BASE_SEED, BASE_SEED + TRIES):
        split = assign_splits(logs, seed)
        score = imbalance(logs, split)
        if best is None or score < best[0]:
            best = (score, seed, split)
    return best[1], best[2]


def assign_splits(logs: dict[str, dict], seed: int) -> dict[str, str]:
    """Map log_id -> "dev" | "heldout" for the labels.json ``logs`` mapping."""
    strata = Counter((e["kind"], e["verdict"]) for e in logs.values())
    target = {s: n * HELDOUT_SHARE for s, n in strata.items()}
    groups: dict[str, list[str]] = defaultdict(list)
    for log_id in sorted(logs):
        groups[logs[log_id]["source"]["repo"].lower()].append(log_id)
    order = sorted(groups)
    random.Random(seed).shuffle(order)

    held: Counter = Counter()
    held_total = 0
    limit = len(logs) * HELDOUT_SHARE
    split: dict[str, str] = {}
    for repo in order:
        members = groups[repo]
        need = Counter((logs[i]["kind"], logs[i]["verdict"]) for i in members)
        # Shortfall after adding the group, summed over strata; lower is better.
        before = sum(max(0.0, target[s] - held[s]) for s in target)
        after = sum(max(0.0, target[s] - held[s] - need[s]) for s in target)
        overshoot = sum(max(0.0, held[s] + need[s] - target[s] - 0.5) for s in need)
        to_held = after + overshoot < before and held_total + len(members) <= limit + 0.5
        for log_id in members:
            split[log_id] = "heldout" if to_held else "dev"
        if to_held:
            held.update(need)
            held_total += len(members)
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the split fields")
    args = parser.parse_args()
    data = json.loads(LABELS.read_text())
    seed, split = choose_split(data["logs"])
    print("seed", seed, "imbalance", round(imbalance(data["logs"], split), 2))
    counts = Counter((split[i], e["kind"], e["verdict"]) for i, e in data["logs"].items())
    for key in sorted(counts):
        print(*key, counts[key])
    if args.write:
        data["split_seed"] = seed
        for log_id, entry in data["logs"].items():
            entry["split"] = split[log_id]
        LABELS.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
