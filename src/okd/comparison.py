"""Paired statistics between distillation methods, from per-example evaluation scores.

Input: evaluation JSON files written by ``okd eval`` (or ``okd.evaluation.evaluate_model`` +
``EvalResult.to_dict``), each holding one score per example and per sampling draw. A method may have
several files, one per training seed (a *run*). All files must be over the same examples in the same
order, which the per-example hashes of prompt and reference let us check.

Per-example score of a run: the mean over its sampling draws (or its greedy score). Per-example score
of a method: the mean over its runs. For a comparison "A minus B":

- the *mean paired difference* is the mean over examples of (score of A - score of B);
- the *confidence interval* is a percentile bootstrap. With one run per method it is
  ``scipy.stats.bootstrap`` on the paired per-example scores (examples resampled with replacement).
  With several runs it is a two-level bootstrap: each resample first draws the runs of A and of B
  with replacement (independently), then draws the examples with replacement (the same examples for
  A and B, which keeps the pairing), and takes the mean difference; so the interval reflects both the
  choice of test examples and the training seed;
- the *p-value* is a two-sided paired permutation test (``scipy.stats.permutation_test`` with
  ``permutation_type='samples'``: the A and B scores of each example are swapped at random, i.e. the
  sign of each per-example difference is flipped). It is exact (all 2^n flips) when 2^n is at most
  ``n_resamples``. It treats the runs as fixed: it asks whether the examples show a difference, not
  whether a new training seed would;
- p-values are adjusted for the number of comparisons with Holm's step-down method.

This module reads JSON only and does not import the training code.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from okd.io import write_json, write_text

EVAL_FORMAT = "okd-eval"  # okd.evaluation.EVAL_FORMAT (not imported: that module loads torch)
COMPARE_FORMAT = "okd-compare"
METRICS = ("rouge_l", "exact_match")
DECODINGS = ("sampled", "greedy")


@dataclass
class Run:
    """One evaluation file: a method's run (training seed), its per-example scores and hashes."""

    name: str
    path: str
    scores: np.ndarray
    """Per-example score (float64), the mean over the sampling draws or the greedy score."""
    hashes: list[str]
    draws: int
    meta: dict = field(default_factory=dict)


def holm(p_values) -> list[float]:
    """Holm's step-down adjustment: the i-th smallest of m p-values becomes
    ``max over j <= i of min(1, (m - j + 1) * p_(j))``; returned in the input order."""
    p = [float(x) for x in p_values]
    m = len(p)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda k: p[k])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def parse_eval_arg(arg: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> (NAME, PATH); a bare ``PATH`` -> (None, PATH)."""
    name, eq, path = arg.partition("=")
    if eq and name and "/" not in name and os.sep not in name and not os.path.exists(arg):
        return name.strip(), path
    return None, arg


def load_run(path: str, name: str | None = None, metric: str = "rouge_l", decoding: str = "sampled") -> Run:
    """Read one evaluation JSON into a ``Run``; every problem raises a one-line error naming the file."""
    if metric not in METRICS:
        raise ValueError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if decoding not in DECODINGS:
        raise ValueError(f"--decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        payload = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a JSON file ({error})") from None
    if not isinstance(payload, dict) or payload.get("format") != EVAL_FORMAT or not isinstance(payload.get("examples"), list):
        raise ValueError(f"{path}: not an okd eval JSON with per-example scores (write one with okd eval --json-out)")
    examples = payload["examples"]
    if not examples:
        raise ValueError(f"{path}: no per-example scores (the 'examples' list is empty)")
    scores, hashes, draws = [], [], None
    for i, example in enumerate(examples):
        try:
            hashes.append(str(example["hash"]))
            if decoding == "greedy":
                if "greedy" not in example:
                    raise ValueError(f"{path}: no greedy scores per example (evaluate with --greedy true, or use --decoding sampled)")
                values = [float(example["greedy"][metric])]
            else:
                values = [float(draw[metric]) for draw in example["samples"]]
                if not values:
                    raise ValueError(f"{path}: no sampled draws per example (evaluated greedily; use --decoding greedy)")
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path}: example {i} has no {error} score field; not an okd eval JSON") from None
        if draws is None:
            draws = len(values)
        elif len(values) != draws:
            raise ValueError(f"{path}: example {i} has {len(values)} draws, example 0 has {draws}")
        scores.append(math.fsum(values) / len(values))
    name = name or payload.get("name") or file.stem
    meta = {k: payload.get(k) for k in ("model", "data", "max_length", "generation", "seeds")}
    return Run(name=str(name), path=str(path), scores=np.asarray(scores, dtype=np.float64), hashes=hashes, draws=draws, meta=meta)


def check_same_examples(runs: list[Run]) -> None:
    """Refuse (ValueError naming both files) unless every run is over the same examples in the same order."""
    first = runs[0]
    for run in runs[1:]:
        if run.hashes == first.hashes:
            continue
        if len(run.hashes) != len(first.hashes):
            detail = f"{len(first.hashes)} vs {len(run.hashes)} examples"
        else:
            detail = f"example {next(i for i, (a, b) in enumerate(zip(first.hashes, run.hashes)) if a != b)} differs"
        raise ValueError(f"{first.path} and {run.path} are not over the same examples ({detail}): paired comparison refused")


def parse_pairs(pairs: str | None, baseline: str | None, names: list[str]) -> list[tuple[str, str]]:
    """The comparisons (A, B), meaning A minus B: from ``--pairs a:b,c:d``, or every method against
    ``--baseline``, or the only pair when there are two methods."""
    def known(name: str, option: str) -> str:
        if name not in names:
            raise ValueError(f"{option}: unknown method {name!r} (known: {', '.join(names)})")
        return name

    if pairs and baseline:
        raise ValueError("give --pairs or --baseline, not both")
    if pairs:
        out = []
        for item in pairs.split(","):
            a, colon, b = item.strip().partition(":")
            if not colon or not a.strip() or not b.strip():
                raise ValueError(f"--pairs: expected A:B[,C:D...], got {item.strip()!r}")
            a, b = known(a.strip(), "--pairs"), known(b.strip(), "--pairs")
            if a == b:
                raise ValueError(f"--pairs: {a}:{b} compares a method with itself")
            out.append((a, b))
        return out
    if baseline:
        known(baseline, "--baseline")
        return [(n, baseline) for n in names if n != baseline]
    if len(names) == 2:
        return [(names[0], names[1])]
    raise ValueError(f"{len(names)} methods ({', '.join(names)}): say which to compare with --pairs A:B,... or --baseline NAME")


def _rng(seed: int, a: str, b: str) -> np.random.Generator:
    # One stream per comparison, from the seed and the two names: a comparison's interval does not
    # depend on which other comparisons were asked for.
    return np.random.default_rng([seed, zlib.crc32(f"{a}\0{b}".encode())])


def _mean_difference(x, y, axis=-1):
    return np.mean(x - y, axis=axis)


def two_level_bootstrap(a: np.ndarray, b: np.ndarray, n_resamples: int, rng: np.random.Generator, batch: int = 1000) -> np.ndarray:
    """Bootstrap distribution of the mean paired difference for runs x examples score matrices ``a``
    (R_a x n) and ``b`` (R_b x n): per resample, draw R_a runs of A and R_b runs of B with replacement,
    average each method over its drawn runs, then draw n examples with replacement (the same for A and
    B) and take the mean difference. Returns ``n_resamples`` float64 values."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = a.shape[1]
    out = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, batch):
        k = min(batch, n_resamples - start)
        weights_a = rng.multinomial(a.shape[0], np.full(a.shape[0], 1.0 / a.shape[0]), size=k) / a.shape[0]
        weights_b = rng.multinomial(b.shape[0], np.full(b.shape[0], 1.0 / b.shape[0]), size=k) / b.shape[0]
        examples = rng.integers(0, n, size=(k, n))
        differences = weights_a @ a - weights_b @ b  # k x n: per-example difference of the drawn runs
        out[start : start + k] = np.take_along_axis(differences, examples, axis=1).mean(axis=1)
    return out


def compare_pair(a: np.ndarray, b: np.ndarray, confidence_level: float = 0.95, n_resamples: int = 10000, rng=None) -> dict:
    """Paired statistics of A minus B from runs x examples score matrices (one row per run).

    Returns the means, the mean paired difference, the percentile bootstrap interval (one level with a
    single run per method, two levels otherwise) and the two-sided paired permutation p-value.
    """
    from scipy import stats

    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"A has {a.shape[1]} examples and B {b.shape[1]}: not paired")
    rng = rng if rng is not None else np.random.default_rng(0)
    per_a, per_b = a.mean(axis=0), b.mean(axis=0)
    difference = per_a - per_b
    n = difference.size
    if a.shape[0] == 1 and b.shape[0] == 1:
        scheme = "examples"
        if np.ptp(difference) == 0:  # every resample gives the same mean: the interval is a point
            low = high = float(difference[0])
        else:
            ci = stats.bootstrap((per_a, per_b), _mean_difference, paired=True, vectorized=True, n_resamples=n_resamples, batch=1000,
                                 confidence_level=confidence_level, method="percentile", rng=rng).confidence_interval
            low, high = float(ci.low), float(ci.high)
    else:
        scheme = "runs+examples"
        distribution = two_level_bootstrap(a, b, n_resamples, rng)
        alpha = (1.0 - confidence_level) / 2.0
        low, high = (float(v) for v in np.quantile(distribution, [alpha, 1.0 - alpha]))
    exact = n < 63 and 2**n <= n_resamples
    if np.all(difference == 0):
        p_value = 1.0
    else:
        test = stats.permutation_test((per_a, per_b), _mean_difference, permutation_type="samples", vectorized=True, batch=1000,
                                      n_resamples=n_resamples, alternative="two-sided", rng=rng)
        p_value = float(test.pvalue)
    return {
        "mean_a": float(per_a.mean()), "mean_b": float(per_b.mean()), "mean_difference": float(difference.mean()),
        "ci_low": low, "ci_high": high, "p_value": p_value, "p_exact": exact, "bootstrap": scheme,
        "runs_a": int(a.shape[0]), "runs_b": int(b.shape[0]), "num_examples": int(n),
    }


def run_comparison(
    evals: list[str],
    pairs: str | None = None,
    baseline: str | None = None,
    metric: str = "rouge_l",
    decoding: str = "sampled",
    confidence_level: float = 0.95,
    n_resamples: int = 10000,
    seed: int = 0,
) -> dict:
    """Load the evaluation files (``NAME=PATH`` or ``PATH``), check they pair up, and compare the
    methods; returns the result dict that ``format_table`` renders and ``okd compare --json`` writes."""
    if not evals:
        raise ValueError("no evaluation files given: okd compare NAME=EVAL.json ...")
    if not 0.0 < confidence_level < 1.0:
        raise ValueError(f"--confidence-level must be between 0 and 1, got {confidence_level}")
    if n_resamples < 100:
        raise ValueError(f"--n-resamples must be at least 100, got {n_resamples}")
    runs, seen = [], set()
    for arg in evals:
        name, path = parse_eval_arg(arg)
        key = os.path.realpath(path)
        if key in seen:
            raise ValueError(f"{path}: given twice")
        seen.add(key)
        runs.append(load_run(path, name, metric, decoding))
    check_same_examples(runs)
    methods: dict[str, list[Run]] = {}
    for run in runs:
        methods.setdefault(run.name, []).append(run)
    names = list(methods)
    comparisons = []
    for a, b in parse_pairs(pairs, baseline, names):
        matrix_a = np.stack([r.scores for r in methods[a]])
        matrix_b = np.stack([r.scores for r in methods[b]])
        row = compare_pair(matrix_a, matrix_b, confidence_level, n_resamples, _rng(seed, a, b))
        comparisons.append({"a": a, "b": b, **row})
    for row, adjusted in zip(comparisons, holm([c["p_value"] for c in comparisons])):
        row["p_holm"] = adjusted
    notes = []
    for key in ("generation", "max_length"):
        settings = {json.dumps(r.meta.get(key), sort_keys=True) for r in runs if r.meta.get(key) is not None}
        if len(settings) > 1:
            notes.append(f"the files were evaluated with different {key} settings ({len(settings)} kinds)")
    return {
        "format": COMPARE_FORMAT,
        "format_version": 1,
        "settings": {
            "metric": metric, "decoding": decoding, "confidence_level": confidence_level, "n_resamples": n_resamples,
            "seed": seed, "interval": "percentile bootstrap", "test": "paired permutation (sign flip), two-sided",
            "correction": "holm",
        },
        "num_examples": len(runs[0].hashes),
        "methods": {
            name: {"runs": [r.path for r in rs], "draws": [r.draws for r in rs], "mean": float(np.mean([r.scores.mean() for r in rs])),
                   "models": [r.meta.get("model") for r in rs], "data": sorted({str(r.meta["data"]) for r in rs if r.meta.get("data")})}
            for name, rs in methods.items()
        },
        "comparisons": comparisons,
        "notes": notes,
    }


def _p(value: float) -> str:
    return "<0.0001" if value < 1e-4 else f"{value:.4f}"


def format_table(result: dict) -> str:
    """The comparisons as a markdown table, with a line stating the settings."""
    s = result["settings"]
    level = f"{100 * s['confidence_level']:g}%"
    lines = [
        f"{s['metric']} ({s['decoding']}), {result['num_examples']} paired examples; {level} {s['interval']} "
        f"({s['n_resamples']} resamples, seed {s['seed']}); p: {s['test']}, Holm-adjusted over {len(result['comparisons'])} comparison(s).",
        "",
        f"| A - B | mean A | mean B | difference | {level} CI | p | p (Holm) | runs A/B |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for c in result["comparisons"]:
        lines.append(
            f"| {c['a']} - {c['b']} | {c['mean_a']:.2f} | {c['mean_b']:.2f} | {c['mean_difference']:+.2f} | "
            f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] | {_p(c['p_value'])} | {_p(c['p_holm'])} | {c['runs_a']}/{c['runs_b']} |"
        )
    lines.extend(f"\nNote: {note}." for note in result.get("notes", []))
    return "\n".join(lines) + "\n"


def compare(
    evals: list[str],
    pairs: str | None = None,
    baseline: str | None = None,
    metric: Literal["rouge_l", "exact_match"] = "rouge_l",
    decoding: Literal["sampled", "greedy"] = "sampled",
    confidence_level: float = 0.95,
    n_resamples: int = 10000,
    seed: int = 0,
    md: str | None = None,
    json: str | None = None,
) -> dict:
    """Paired comparison of methods over the same examples, from okd eval JSON files.

    okd compare okd=runs/okd-s1.json okd=runs/okd-s2.json kd=runs/kd-s1.json kd=runs/kd-s2.json --baseline kd

    For each comparison A - B: the means, the mean paired difference over examples, a percentile
    bootstrap confidence interval (examples resampled; with several runs of a method, training seeds
    resampled first, then examples) and a two-sided paired permutation p-value, Holm-adjusted over the
    comparisons. Prints a markdown table.

    Args:
        evals: Evaluation JSON files written by okd eval (positional arguments), as NAME=PATH or PATH (the
            name is then the file's 'name' field or its stem); several files with the same name are that
            method's training seeds.
        pairs: Comparisons A:B (A minus B), comma-separated, e.g. okd:kd,okd:rkl.
        baseline: Compare every other method with this one (instead of --pairs).
        metric: Per-example score compared.
        decoding: sampled: a run's per-example score is the mean over its sampling draws; greedy: its greedy score.
        confidence_level: Confidence level of the bootstrap interval.
        n_resamples: Bootstrap resamples, and permutations of the test (exact when 2^examples is at most this).
        seed: Seed of the resampling (the result is deterministic given it).
        md: Also write the markdown table to this file.
        json: Write the full result (settings, methods, comparisons) to this JSON file.
    """
    result = run_comparison(evals, pairs, baseline, metric, decoding, confidence_level, n_resamples, seed)
    table = format_table(result)
    if md:
        write_text(md, table)
    if json:
        write_json(json, result)
    result["table"] = table
    return result
