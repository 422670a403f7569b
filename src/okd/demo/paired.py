"""The demo's per-example scores and the paired differences between its methods.

Every model the demo scores gets an ``okd eval`` JSON file next to ``results.json``
(``eval-<name>.json``: per-example sampled and greedy scores, readable by ``okd compare``). From
them, ``paired_statistics`` computes, for sampled and for greedy ROUGE-L, ``okd`` minus ``kd`` first
and then every other method minus ``sft``: the mean paired difference over the test examples, a 95%
percentile bootstrap interval and a paired permutation p-value, Holm-adjusted over all the rows of the
table. ``paired_table`` renders it, with what such a table can and cannot establish. The statistics
take a few seconds (numpy / scipy on a few hundred numbers), nothing next to generation.
"""

from __future__ import annotations

import re
from pathlib import Path

from okd.comparison import compare_pair, holm, load_run, _rng
from okd.io import write_json

CONFIDENCE_LEVEL = 0.95
N_RESAMPLES = 10000
SEED = 0
DECODINGS = ("sampled", "greedy")
PROTOCOL = "docs/results/protocol.md"


def eval_file_name(name: str) -> str:
    """``eval-<name>.json`` with the name made file-safe (``student (before)`` -> ``eval-student-before.json``)."""
    return "eval-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "model") + ".json"


def write_eval_file(out: Path, name: str, evaluation: dict, model_dir, data_file, max_length: int, max_examples: int | None) -> Path:
    """Write one model's evaluation (``EvalResult.to_dict()``) as the JSON ``okd eval --json`` writes."""
    body = dict(evaluation)
    header = {key: body.pop(key) for key in ("format", "format_version")}
    payload = {**header, "name": name, "model": str(model_dir), "data": str(data_file), "max_length": max_length,
               "max_examples": max_examples, **body}
    path = Path(out) / eval_file_name(name)
    write_json(path, payload)
    return path


def comparison_pairs(methods: list[str]) -> list[tuple[str, str]]:
    """``okd - kd`` first (when both ran), then every other method minus ``sft`` (when sft ran)."""
    pairs = [("okd", "kd")] if "okd" in methods and "kd" in methods else []
    if "sft" in methods:
        pairs += [(name, "sft") for name in methods if name != "sft"]
    return pairs


def paired_statistics(out: Path, eval_files: dict[str, str], methods: list[str]) -> dict:
    """The table's rows, from the eval files (``{name: file name in out}``): for each pair and each decoding,
    ``compare_pair``'s numbers; ``p_holm`` is Holm's adjustment over every row (both decodings)."""
    out = Path(out)
    rows = []
    pairs = [(a, b) for a, b in comparison_pairs(methods) if a in eval_files and b in eval_files]
    num_examples = None
    for decoding in DECODINGS:
        runs = {name: load_run(str(out / eval_files[name]), name, "rouge_l", decoding) for pair in pairs for name in pair}
        for a, b in pairs:
            if runs[a].hashes != runs[b].hashes:
                raise ValueError(f"{eval_files[a]} and {eval_files[b]} are not over the same examples")
            row = compare_pair(runs[a].scores, runs[b].scores, CONFIDENCE_LEVEL, N_RESAMPLES, _rng(SEED, a, b))
            rows.append({"a": a, "b": b, "decoding": decoding, **row})
            num_examples = row["num_examples"]
    for row, adjusted in zip(rows, holm([r["p_value"] for r in rows])):
        row["p_holm"] = adjusted
    return {
        "metric": "rouge_l", "confidence_level": CONFIDENCE_LEVEL, "n_resamples": N_RESAMPLES, "seed": SEED,
        "interval": "percentile bootstrap over examples", "test": "paired permutation (sign flip), two-sided",
        "correction": "holm over all rows", "num_examples": num_examples, "rows": rows,
    }


def _p(value: float) -> str:
    return "<0.0001" if value < 1e-4 else f"{value:.4f}"


def paired_table(paired: dict | None, eval_files: dict[str, str] | None = None) -> list[str]:
    """The section of the report: the table, then what it can and cannot establish."""
    if not paired or not paired.get("rows"):
        return []
    n, level = paired["num_examples"], f"{100 * paired['confidence_level']:g}%"
    lines = [
        "## Paired differences between methods",
        "",
        f"ROUGE-L of method A minus method B on the same {n} test examples (sampled: each example's mean over the "
        f"sampling seeds; greedy: its greedy score). {level} CI: percentile bootstrap over the examples "
        f"({paired['n_resamples']} resamples, seed {paired['seed']}); p: two-sided paired permutation test (sign flip); "
        f"p (Holm): adjusted over the {len(paired['rows'])} rows of this table.",
        "",
        f"| A - B | decoding | mean A | mean B | difference | {level} CI | p | p (Holm) |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in paired["rows"]:
        lines.append(
            f"| {r['a']} - {r['b']} | {r['decoding']} | {r['mean_a']:.2f} | {r['mean_b']:.2f} | {r['mean_difference']:+.2f} | "
            f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] | {_p(r['p_value'])} | {_p(r['p_holm'])} |"
        )
    lines += [
        "",
        f"Each method is one trained student (one training seed) scored on {n} examples, so an interval that covers 0 "
        "means this demo cannot tell those two methods apart, and one that excludes 0 says only that these two "
        "students differ on these examples, not that another training seed would agree; whether OKD beats KD is "
        f"decided by the pre-registered experiment (`{PROTOCOL}`), not by this demo.",
    ]
    if eval_files:
        a, b = paired["rows"][0]["a"], paired["rows"][0]["b"]
        lines += [
            "",
            f"Every model's per-example scores are in this directory (`eval-<model>.json`, `okd eval`'s format): "
            f"`okd compare {eval_files[a]} {eval_files[b]}` (add `--decoding greedy`) recomputes the {a} - {b} rows, "
            "with the same interval and p (its Holm adjustment covers only the comparisons it is asked for).",
        ]
    return lines
