"""Paired statistics between methods (okd.comparison) and `okd compare`: hand-computed cases, a known
effect and a null case, the two-level bootstrap over training seeds, refusals of bad input."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from okd.comparison import (
    EVAL_FORMAT,
    compare_pair,
    holm,
    parse_eval_arg,
    parse_pairs,
    run_comparison,
    two_level_bootstrap,
)
from okd.evaluation import example_hash


def write_eval(path, name, draws, greedy=None, prompts=None, generation=None):
    """An eval JSON as okd eval writes it: ``draws`` is examples x draws of ROUGE-L scores."""
    draws = np.atleast_2d(np.asarray(draws, dtype=float))
    prompts = prompts or [f"prompt {i}" for i in range(len(draws))]
    examples = []
    for i, row in enumerate(draws):
        example = {
            "index": i, "source": None, "hash": example_hash(prompts[i], f"ref {i}"), "prompt": prompts[i], "reference": f"ref {i}",
            "samples": [{"seed": 10 + k, "prediction": "p", "rouge_l": float(v), "exact_match": 100.0 * (v >= 50)} for k, v in enumerate(row)],
        }
        if greedy is not None:
            example["greedy"] = {"prediction": "g", "rouge_l": float(greedy[i]), "exact_match": 100.0 * (greedy[i] >= 50)}
        examples.append(example)
    path.write_text(json.dumps({"format": "okd-eval", "format_version": 1, "name": name, "model": "m", "data": "d.jsonl",
                                "generation": generation or {"max_new_tokens": 8}, "examples": examples}))
    return str(path)


# --- Holm ---------------------------------------------------------------------------------------


def test_holm_on_known_p_values():
    # Sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> 0.06, monotone).
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # Capped at 1; a single p-value is unchanged.
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([0.2]) == pytest.approx([0.2])
    assert holm([]) == []


def test_eval_format_matches_the_evaluation_module():
    from okd.evaluation import EVAL_FORMAT as written

    assert EVAL_FORMAT == written


# --- the paired statistics on hand-computed cases -------------------------------------------------


def test_means_and_mean_paired_difference():
    a = [[10.0, 20.0, 30.0, 40.0]]
    b = [[5.0, 25.0, 30.0, 20.0]]
    row = compare_pair(a, b, n_resamples=1000)
    assert row["mean_a"] == pytest.approx(25.0)
    assert row["mean_b"] == pytest.approx(20.0)
    assert row["mean_difference"] == pytest.approx(5.0)  # differences 5, -5, 0, 20
    # Several runs: the per-example score of a method is the mean over its runs.
    row = compare_pair([[10.0, 20.0], [30.0, 0.0]], [[0.0, 0.0]], n_resamples=1000)
    assert (row["mean_a"], row["mean_difference"], row["runs_a"], row["bootstrap"]) == (15.0, 15.0, 2, "runs+examples")


def _exact_sign_flip_p(d):
    d = np.asarray(d, dtype=float)
    observed = abs(d.mean())
    flips = [abs(np.mean(np.array(signs) * d)) for signs in itertools.product((1, -1), repeat=len(d))]
    return sum(f >= observed - 1e-12 for f in flips) / len(flips)


def test_permutation_p_value_is_exact_over_all_sign_flips():
    # d = 1, 2, 3, 4: only the all-plus and all-minus flips reach |mean| = 2.5 -> p = 2/16.
    row = compare_pair([[1.0, 2.0, 3.0, 4.0]], [[0.0, 0.0, 0.0, 0.0]], n_resamples=1000)
    assert row["p_exact"]
    assert row["p_value"] == pytest.approx(2 / 16)
    # d = 1, 2, 3, -0.5: |sum| >= 5.5 for the flips of the set {+1, +2, +3} and its mirror, and the
    # flip of -0.5 alone ({1, 2, 3, 0.5}: 6.5) and its mirror -> 4/16.
    d = [1.0, 2.0, 3.0, -0.5]
    assert _exact_sign_flip_p(d) == pytest.approx(4 / 16)
    row = compare_pair([[5.0 + x for x in d]], [[5.0] * 4], n_resamples=1000)
    assert row["p_value"] == pytest.approx(4 / 16)
    # A few more, against the enumeration.
    rng = np.random.default_rng(3)
    for _ in range(5):
        d = rng.normal(0.5, 1.0, size=6)
        assert compare_pair([d], [np.zeros(6)], n_resamples=1000)["p_value"] == pytest.approx(_exact_sign_flip_p(d))


def test_identical_methods_give_p_one_and_a_zero_interval():
    row = compare_pair([[3.0, 1.0, 4.0]], [[3.0, 1.0, 4.0]], n_resamples=1000)
    assert (row["mean_difference"], row["ci_low"], row["ci_high"], row["p_value"]) == (0.0, 0.0, 0.0, 1.0)


def test_known_large_effect_excludes_zero_and_null_case_covers_it():
    rng = np.random.default_rng(0)
    base = rng.uniform(20, 80, size=60)
    better = base + 10.0 + rng.normal(0, 3, size=60)
    row = compare_pair([better], [base], n_resamples=5000, rng=np.random.default_rng(1))
    assert 8.0 < row["mean_difference"] < 12.0
    assert 0.0 < row["ci_low"] < row["mean_difference"] < row["ci_high"]
    assert row["p_value"] < 0.001
    same = base + rng.normal(0, 3, size=60)
    row = compare_pair([same], [base], n_resamples=5000, rng=np.random.default_rng(1))
    assert row["ci_low"] < 0.0 < row["ci_high"]
    assert row["p_value"] > 0.05
    # The interval shrinks as the examples grow more numerous (same per-example noise).
    big = rng.uniform(20, 80, size=600)
    wide = compare_pair([big[:60] + 1 + rng.normal(0, 3, 60)], [big[:60]], n_resamples=2000)
    narrow = compare_pair([big + 1 + rng.normal(0, 3, 600)], [big], n_resamples=2000)
    assert narrow["ci_high"] - narrow["ci_low"] < 0.5 * (wide["ci_high"] - wide["ci_low"])


def test_confidence_level_widens_the_interval():
    rng = np.random.default_rng(5)
    a, b = rng.normal(1, 5, 50), rng.normal(0, 5, 50)
    ci90 = compare_pair([a], [b], confidence_level=0.90, n_resamples=4000, rng=np.random.default_rng(0))
    ci99 = compare_pair([a], [b], confidence_level=0.99, n_resamples=4000, rng=np.random.default_rng(0))
    assert ci99["ci_low"] < ci90["ci_low"] and ci90["ci_high"] < ci99["ci_high"]


# --- the two-level bootstrap -----------------------------------------------------------------------


def test_two_level_bootstrap_resamples_runs_with_replacement():
    # One example, A's two runs score 0 and 10, B's one run 0: a resample averages two runs drawn with
    # replacement -> 0, 5 or 10 with probabilities 1/4, 1/2, 1/4.
    values = two_level_bootstrap(np.array([[0.0], [10.0]]), np.array([[0.0]]), 20000, np.random.default_rng(0))
    assert set(np.unique(values)) == {0.0, 5.0, 10.0}
    for value, probability in ((0.0, 0.25), (5.0, 0.5), (10.0, 0.25)):
        assert np.mean(values == value) == pytest.approx(probability, abs=0.015)
    # Deterministic given the generator's seed.
    again = two_level_bootstrap(np.array([[0.0], [10.0]]), np.array([[0.0]]), 20000, np.random.default_rng(0))
    assert np.array_equal(values, again)


def test_two_level_bootstrap_resamples_examples_in_pairs():
    # One run each: the examples are resampled, the same for A and B (the pairing is kept): B = A + 3
    # on every example, so every resample's difference is exactly -3 although the scores vary a lot.
    a = np.array([[0.0, 50.0, 100.0, 20.0, 70.0]])
    values = two_level_bootstrap(a, a + 3.0, 2000, np.random.default_rng(0))
    assert np.allclose(values, -3.0)
    # With unpaired noise, the spread matches the example bootstrap: sd(d) / sqrt(n).
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 10, (1, 400)), rng.normal(0, 10, (1, 400))
    values = two_level_bootstrap(a, b, 4000, rng)
    d = (a - b)[0]
    assert values.mean() == pytest.approx(d.mean(), abs=0.1)
    assert values.std() == pytest.approx(d.std() / np.sqrt(400), rel=0.1)


def test_training_seed_spread_widens_the_interval():
    # A's three runs differ by a constant offset (-6, 0, +6) on every example; per example, the mean
    # over runs equals B plus small noise. Resampling examples alone sees no spread; resampling the runs
    # too does.
    rng = np.random.default_rng(2)
    base = rng.uniform(20, 80, 80)
    b = base[None, :]
    a = np.stack([base + offset + rng.normal(0, 0.5, 80) for offset in (-6.0, 0.0, 6.0)])
    averaged = compare_pair(a.mean(axis=0, keepdims=True), b, n_resamples=4000, rng=np.random.default_rng(0))
    two_level = compare_pair(a, b, n_resamples=4000, rng=np.random.default_rng(0))
    assert two_level["bootstrap"] == "runs+examples" and averaged["bootstrap"] == "examples"
    assert two_level["mean_difference"] == pytest.approx(averaged["mean_difference"])
    assert averaged["ci_high"] - averaged["ci_low"] < 1.0
    assert two_level["ci_high"] - two_level["ci_low"] > 6.0
    assert two_level["ci_low"] < 0.0 < two_level["ci_high"]


# --- loading, pairing and refusals -----------------------------------------------------------------


def test_name_from_argument_field_or_stem(tmp_path):
    assert parse_eval_arg("okd=runs/a.json") == ("okd", "runs/a.json")
    assert parse_eval_arg("runs/a.json") == (None, "runs/a.json")
    named = write_eval(tmp_path / "x.json", "okd", [[1.0], [2.0]])
    anonymous = write_eval(tmp_path / "kd-seed1.json", None, [[1.0], [2.0]])
    result = run_comparison([named, anonymous], n_resamples=200)
    assert list(result["methods"]) == ["okd", "kd-seed1"]
    result = run_comparison([f"a={named}", f"b={anonymous}"], n_resamples=200)
    assert list(result["methods"]) == ["a", "b"]


def test_per_example_score_is_the_mean_over_draws_or_greedy(tmp_path):
    a = write_eval(tmp_path / "a.json", "a", [[10.0, 30.0], [50.0, 70.0]], greedy=[0.0, 0.0])
    b = write_eval(tmp_path / "b.json", "b", [[0.0, 0.0], [0.0, 0.0]], greedy=[40.0, 20.0])
    sampled = run_comparison([a, b], n_resamples=200)["comparisons"][0]
    assert (sampled["mean_a"], sampled["mean_b"], sampled["mean_difference"]) == (40.0, 0.0, 40.0)
    greedy = run_comparison([a, b], decoding="greedy", n_resamples=200)["comparisons"][0]
    assert (greedy["mean_a"], greedy["mean_b"], greedy["mean_difference"]) == (0.0, 30.0, -30.0)
    exact = run_comparison([a, b], metric="exact_match", n_resamples=200)["comparisons"][0]
    assert exact["mean_a"] == 50.0  # 0, 0 | 100, 100


def test_mismatched_examples_are_refused_naming_both_files(tmp_path):
    a = write_eval(tmp_path / "a.json", "a", [[1.0], [2.0], [3.0]])
    other = write_eval(tmp_path / "b.json", "b", [[1.0], [2.0], [3.0]], prompts=["prompt 0", "another", "prompt 2"])
    with pytest.raises(ValueError, match=r"a\.json and .*b\.json are not over the same examples \(example 1 differs\)"):
        run_comparison([a, other], n_resamples=200)
    shorter = write_eval(tmp_path / "c.json", "c", [[1.0], [2.0]])
    with pytest.raises(ValueError, match=r"3 vs 2 examples"):
        run_comparison([a, shorter], n_resamples=200)


def test_bad_input_gives_one_line_errors(tmp_path):
    a = write_eval(tmp_path / "a.json", "a", [[1.0], [2.0]])
    b = write_eval(tmp_path / "b.json", "b", [[1.0], [2.0]])
    c = write_eval(tmp_path / "c.json", "c", [[1.0], [2.0]])
    with pytest.raises(FileNotFoundError, match="missing.json: no such file"):
        run_comparison([a, str(tmp_path / "missing.json")])
    summary_only = tmp_path / "old.json"
    summary_only.write_text(json.dumps({"rouge_l_mean": 1.0, "per_seed": []}))
    with pytest.raises(ValueError, match="old.json: not an okd eval JSON with per-example scores"):
        run_comparison([a, str(summary_only)])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: not a JSON file"):
        run_comparison([a, str(tmp_path / "broken.json")])
    with pytest.raises(ValueError, match="a.json: no greedy scores per example"):
        run_comparison([a, b], decoding="greedy")
    with pytest.raises(ValueError, match=r"--pairs: unknown method 'x' \(known: a, b, c\)"):
        run_comparison([a, b, c], pairs="a:x")
    with pytest.raises(ValueError, match="--baseline: unknown method 'z'"):
        run_comparison([a, b, c], baseline="z")
    with pytest.raises(ValueError, match="3 methods .* --pairs"):
        run_comparison([a, b, c])
    with pytest.raises(ValueError, match="expected A:B"):
        run_comparison([a, b], pairs="a-b")
    with pytest.raises(ValueError, match="given twice"):
        run_comparison([a, a])


def test_pairs_and_baseline():
    names = ["okd", "kd", "rkl"]
    assert parse_pairs("okd:kd, okd:rkl", None, names) == [("okd", "kd"), ("okd", "rkl")]
    assert parse_pairs(None, "kd", names) == [("okd", "kd"), ("rkl", "kd")]
    assert parse_pairs(None, None, ["okd", "kd"]) == [("okd", "kd")]


def test_several_runs_of_a_method_and_holm_over_comparisons(tmp_path):
    rng = np.random.default_rng(4)
    base = rng.uniform(20, 80, 30)
    files = [
        write_eval(tmp_path / f"okd{s}.json", "okd", (base + 12 + rng.normal(0, 2, 30))[:, None]) for s in (1, 2, 3)
    ] + [write_eval(tmp_path / f"kd{s}.json", "kd", (base + rng.normal(0, 2, 30))[:, None]) for s in (1, 2)] + [
        write_eval(tmp_path / "rkl.json", "rkl", (base + rng.normal(0, 2, 30))[:, None])
    ]
    result = run_comparison(files, baseline="kd", n_resamples=2000, seed=7)
    okd, rkl = result["comparisons"]
    assert (okd["a"], okd["runs_a"], okd["runs_b"], okd["bootstrap"]) == ("okd", 3, 2, "runs+examples")
    assert okd["ci_low"] > 0 and okd["p_value"] < 0.01
    assert rkl["ci_low"] < 0 < rkl["ci_high"]
    assert [c["p_holm"] for c in result["comparisons"]] == pytest.approx(holm([okd["p_value"], rkl["p_value"]]))
    assert result["methods"]["okd"]["runs"] == files[:3]
    # Deterministic given the seed; another seed moves the interval a little.
    assert run_comparison(files, baseline="kd", n_resamples=2000, seed=7) == result
    assert run_comparison(files, baseline="kd", n_resamples=2000, seed=8)["comparisons"][0]["ci_low"] != okd["ci_low"]
    # A comparison's interval does not depend on which others were asked for.
    alone = run_comparison(files, pairs="okd:kd", n_resamples=2000, seed=7)["comparisons"][0]
    assert (alone["ci_low"], alone["ci_high"]) == (okd["ci_low"], okd["ci_high"])


# --- the command line ----------------------------------------------------------------------------------


def test_okd_compare_end_to_end(tmp_path, capsys):
    from okd.cli import main

    # 4 examples: okd beats kd by 1, 2, 3, 4 (exact p = 2/16); rkl equals kd plus 1, -1, 1, -1.
    kd = [[10.0], [20.0], [30.0], [40.0]]
    okd = [[11.0], [22.0], [33.0], [44.0]]
    rkl = [[11.0], [19.0], [31.0], [39.0]]
    paths = [write_eval(tmp_path / f"{n}.json", None, s) for n, s in (("okd", okd), ("kd", kd), ("rkl", rkl))]
    md, out = tmp_path / "table.md", tmp_path / "result.json"
    main(["compare", *paths, "--baseline", "kd", "--n-resamples", "1000", "--md", str(md), "--json", str(out)])
    printed = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]] for line in printed.splitlines() if line.startswith("| ") and " - " in line.split("|")[1]}
    # mean A, mean B, difference, CI, p, p (Holm), runs
    assert rows["okd - kd"][:3] == ["27.50", "25.00", "+2.50"]
    assert rows["okd - kd"][4:] == ["0.1250", "0.2500", "1/1"]  # Holm: 2 x 0.125 (the smaller p)
    assert rows["rkl - kd"][:3] == ["25.00", "25.00", "+0.00"]
    assert rows["rkl - kd"][4:6] == ["1.0000", "1.0000"]
    assert "95% percentile bootstrap (1000 resamples, seed 0)" in printed
    assert md.read_text() == printed
    saved = json.loads(out.read_text())
    assert saved["format"] == "okd-compare"
    assert saved["settings"]["n_resamples"] == 1000 and saved["settings"]["seed"] == 0
    assert saved["settings"]["confidence_level"] == 0.95
    assert [(c["a"], c["b"]) for c in saved["comparisons"]] == [("okd", "kd"), ("rkl", "kd")]
    low, high = (float(x) for x in rows["okd - kd"][3].strip("[]").split(","))
    assert 1.0 <= low <= high <= 4.0  # the resampled means of 1, 2, 3, 4


def test_okd_compare_refusal_is_one_line(tmp_path):
    a = write_eval(tmp_path / "a.json", "a", [[1.0], [2.0]])
    b = write_eval(tmp_path / "b.json", "b", [[1.0], [2.0]], prompts=["x", "y"])
    done = subprocess.run([sys.executable, "-m", "okd.cli", "compare", a, b], capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "a.json and" in lines[0] and "b.json are not over the same examples" in lines[0]


def test_different_generation_settings_are_noted(tmp_path, capsys):
    from okd.cli import main

    a = write_eval(tmp_path / "a.json", "a", [[1.0], [2.0]])
    b = write_eval(tmp_path / "b.json", "b", [[1.0], [3.0]])
    assert run_comparison([a, b], n_resamples=200)["notes"] == []
    c = write_eval(tmp_path / "c.json", "c", [[1.0], [3.0]], generation={"max_new_tokens": 64})
    main(["compare", a, c, "--n-resamples", "200"])
    assert "Note: the files were evaluated with different generation settings (2 kinds)." in capsys.readouterr().out


def test_the_statistics_module_loads_neither_training_code_nor_torch():
    code = "import sys, okd.comparison; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('okd.training')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
