"""Render the generated parts of docs/run-format.md from runlens_collect.format.

    python docs/gen_run_format.py          # rewrite the doc in place
    python docs/gen_run_format.py --check  # exit 1 if the doc is stale (used by the tests)

Everything between ``<!-- BEGIN GENERATED: name -->`` and ``<!-- END GENERATED: name -->``
is replaced; the prose around the markers is hand-written.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pyarrow as pa
from runlens_collect import format as fmt

DOC = Path(__file__).with_name("run-format.md")

# Meanings of the table columns (the schemas themselves come from format.py).
SCALAR_COLUMNS = {
    "step": "training step (0-based; the step a `Collector.step()` call ended)",
    "wall_time": "UNIX seconds when the step ended (host clock)",
    "name": "series name, e.g. `train/loss`, `lr/0`, `grad_norm`, `val/accuracy`",
    "value": "the value (NaN/inf kept as recorded)",
}
LAYER_COLUMNS = {
    "step": "training step",
    "layer": "parameter name (`named_parameters()`), module path, or `<output>`",
    "kind": "one of " + ", ".join(f"`{k}`" for k in fmt.KINDS),
    "numel": "number of elements of the tensor",
    "missing": "true when the tensor did not exist this step (no gradient; parameter not "
    "in the optimizer for `update`); its statistics are NaN. A tensor the step did not "
    "sample has no row at all (see `collector.memory` / `collector.sampling`)",
    "mean": "mean of the elements",
    "std": "standard deviation (unbiased, correction 1; NaN for one element)",
    "norm": "L2 norm",
    "absmax": "max |x| (NaN if any NaN)",
    "frac_zero": "fraction of elements exactly 0",
    "frac_nonfinite": "fraction of elements that are NaN or ±inf",
    "update_ratio": "`update` rows: ‖w_after − w_before‖ / ‖w_before‖",
    "frac_dead_units": "`activation` rows of ReLU-family modules: fraction of units (channels "
    "after a conv, else the last dim) that are 0 for every example of the batch",
    "frac_saturated": "`activation` rows of bounded activations (Tanh, Sigmoid, Hardtanh, "
    "ReLU6, Softsign, Hardsigmoid): fraction of outputs within 1% of the range of a bound",
    "min": "`output` rows: minimum",
    "max": "`output` rows: maximum",
    "row_sum_mean": "`output` rows: mean over rows of the sum over the last dim (≈1 for "
    "probabilities)",
    "hist": f"fixed-bin counts ({fmt.HIST_NUM_BINS} bins, see below) on histogram steps, else null",
}


def _type(t: pa.DataType) -> str:
    return str(t).replace("dictionary<values=string, indices=int32, ordered=0>", "dict<string>")


def schema_table(schema: pa.Schema, meanings: dict[str, str]) -> str:
    lines = ["| column | type | nullable | meaning |", "|---|---|---|---|"]
    for f in schema:
        lines.append(
            f"| `{f.name}` | `{_type(f.type)}` | {'yes' if f.nullable else 'no'} | "
            f"{meanings.get(f.name, '')} |"
        )
    return "\n".join(lines)


def keys_table(keys: dict[str, str]) -> str:
    lines = ["| key | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {v.replace('|', '&#124;')} |" for k, v in keys.items()]
    return "\n".join(lines)


def hist_table() -> str:
    edges = fmt.hist_bin_edges()
    lines = [
        f"{fmt.HIST_NUM_BINS} bins; zero bin index {fmt.HIST_ZERO_BIN}; magnitudes below "
        f"2^{fmt.HIST_LOG2_MIN} count as zero, at or above 2^{fmt.HIST_LOG2_MAX} overflow.",
        "",
        "| bin | holds |",
        "|---|---|",
    ]
    z = fmt.HIST_ZERO_BIN
    lines.append(f"| 0 | x ≤ −2^{fmt.HIST_LOG2_MAX} (negative overflow) |")
    lines.append(
        f"| 1 … {z - 1} | −2^(k+1) < x ≤ −2^k, k from {fmt.HIST_LOG2_MAX - 1} down "
        f"to {fmt.HIST_LOG2_MIN} |"
    )
    lines.append(f"| {z} | \\|x\\| < 2^{fmt.HIST_LOG2_MIN} |")
    lines.append(
        f"| {z + 1} … {fmt.HIST_NUM_BINS - 2} | 2^k ≤ x < 2^(k+1), k from "
        f"{fmt.HIST_LOG2_MIN} up to {fmt.HIST_LOG2_MAX - 1} |"
    )
    lines.append(f"| {fmt.HIST_NUM_BINS - 1} | x ≥ 2^{fmt.HIST_LOG2_MAX} (positive overflow) |")
    assert len(edges) == fmt.HIST_NUM_BINS + 1
    return "\n".join(lines)


def scalar_names_table() -> str:
    lines = ["| name | when and what |", "|---|---|"]
    for name, text in fmt.SCALAR_NAMES.items():
        shown = ", ".join(f"`{n.strip()}`" for n in name.split(","))
        lines.append(f"| {shown} | {text.replace('|', '&#124;')} |")
    return "\n".join(lines)


def compaction() -> str:
    steps = [f"{i}. {text}" for i, text in enumerate(fmt.COMPACTION_STEPS, 1)]
    return "\n".join([fmt.READER_RULE, "", *steps, "", fmt.ROLLING_POLICY])


def sections() -> dict[str, str]:
    return {
        "scalar-names": scalar_names_table(),
        "run-json": keys_table(fmt.RUN_JSON_KEYS),
        "model-summary": keys_table(fmt.MODEL_SUMMARY_KEYS),
        "task": keys_table(fmt.TASK_KEYS),
        "collector-memory": keys_table(fmt.COLLECTOR_MEMORY_KEYS),
        "collector-sampling": keys_table(fmt.COLLECTOR_SAMPLING_KEYS),
        "scalars-schema": schema_table(fmt.SCALARS_SCHEMA, SCALAR_COLUMNS),
        "layers-schema": schema_table(fmt.LAYERS_SCHEMA, LAYER_COLUMNS),
        "hist-bins": hist_table(),
        "events": keys_table(fmt.EVENT_KINDS),
        "probe-scalars": keys_table(fmt.PROBE_SCALARS),
        "probe-json": keys_table(fmt.PROBE_JSON_KEYS),
        "distributed": keys_table(fmt.DISTRIBUTED_KEYS),
        "version": f"Current `SCHEMA_VERSION`: **{fmt.SCHEMA_VERSION}**.",
        "compaction": compaction(),
    }


def render(text: str) -> str:
    for name, body in sections().items():
        pat = re.compile(
            rf"(<!-- BEGIN GENERATED: {name} -->\n).*?(<!-- END GENERATED: {name} -->)", re.S
        )
        if not pat.search(text):
            raise SystemExit(f"{DOC.name}: missing markers for {name!r}")
        text = pat.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main(argv: list[str]) -> int:
    text = DOC.read_text(encoding="utf-8")
    new = render(text)
    if "--check" in argv:
        if new != text:
            print(f"{DOC} is stale: run python docs/gen_run_format.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
