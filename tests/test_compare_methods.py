"""The reporting logic of benchmarks/compare_methods.py on hand-made runs (no training)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compare_methods.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compare_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_methods"] = module
    spec.loader.exec_module(module)
    return module


def _run(method, seed, curve, setup=1.0, validation=None):
    return {
        "method": method, "size": "nano", "seed": seed, "setup_seconds": setup, "validation_rouge_l": validation,
        "curve": [{"step": 10 * (i + 1), "train_seconds": t, "rouge_l": r} for i, (t, r) in enumerate(curve)],
        "final_rouge_l": curve[-1][1], "train_seconds": curve[-1][0],
    }


def test_parse_method_reads_sampling_overrides(bench):
    assert bench.parse_method("kd") == ("kd", {})
    assert bench.parse_method("distillm:init_threshold=0.5;replay_capacity=32;replay_ratio=decreasing") == (
        "distillm", {"init_threshold": 0.5, "replay_capacity": 32, "replay_ratio": "decreasing"},
    )


def test_summary_means_over_seeds_and_time_to_95_percent_of_the_best(bench):
    runs = [
        _run("a", 0, [(1.0, 2.0), (2.0, 8.0)]), _run("a", 1, [(3.0, 4.0), (4.0, 10.0)]),  # final 9 +- 1.41
        _run("b", 0, [(1.0, 5.0), (2.0, 6.0)], setup=30.0), _run("b", 1, [(1.0, 5.0), (2.0, 6.0)], setup=10.0),
    ]
    table = bench.summarise(runs, ["a", "b"])
    assert table["a"]["rouge_l_mean"] == pytest.approx(9.0)
    assert table["a"]["rouge_l_std"] == pytest.approx(2**0.5)
    assert table["a"]["train_seconds"] == pytest.approx(3.0)
    assert table["b"]["setup_seconds"] == pytest.approx(20.0)
    # Mean curves: a = [(2, 3), (3, 9)], b = [(1, 5), (2, 6)]; 95% of the best (9) is 8.55.
    assert table["a"]["mean_curve"] == [(2.0, 3.0), (3.0, 9.0)]
    assert table["a"]["seconds_to_95pct_of_best"] == pytest.approx(3.0)
    assert table["b"]["seconds_to_95pct_of_best"] is None


def test_report_writes_table_ratios_and_figures(bench, tmp_path):
    runs = [_run("okd", s, [(5.0, 4.0), (10.0, 5.0)]) for s in (0, 1)]
    runs += [_run("gkd", s, [(10.0, 4.0), (20.0, 6.0)]) for s in (0, 1)]
    results = {
        "command": "python benchmarks/compare_methods.py", "total_seconds": 60.0,
        "machine": {"cpu_count": 2, "torch": "x", "torch_threads": 1}, "settings": {"methods": "okd,gkd"},
        "sizes": {"nano": {"runs": runs}},
    }
    bench.report(results, ["okd", "gkd"], tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    # (20 + 1) / (10 + 1): training + setup seconds of GKD over OKD's.
    assert written["sizes"]["nano"]["generated_output_methods_over_okd_seconds"]["gkd"] == pytest.approx(21 / 11)
    table = (tmp_path / "results.md").read_text()
    assert "| gkd | 2 | 6.00 +- 0.00 | - | 20.0 | 1.0 | 21.0 | 20.0 |" in table
    assert "| okd | 2 | 5.00 +- 0.00 | - | 10.0 | 1.0 | 11.0 | not reached |" in table
    assert (tmp_path / "rouge_vs_time_nano.png").stat().st_size > 0
    assert (tmp_path / "final_rouge_nano.png").stat().st_size > 0


def test_method_fields_reads_presets_and_okd_design_variants(bench):
    assert bench.method_fields("distillm:init_threshold=0.5", 90) == ({"name": "distillm"}, {}, {"init_threshold": 0.5})
    method, online, overrides = bench.method_fields("okd_jsd", 90)
    assert method == {"name": "okd"} and online["divergence"] == "jsd" and overrides == {}
    assert bench.method_fields("okd_late", 90)[1]["start_step"] == 30  # "T/3" of 90 steps
    with pytest.raises(SystemExit, match="unknown method 'okd_nope'"):
        bench.method_fields("okd_nope", 90)


def test_okd_variants_are_selected_on_validation_not_test(bench, tmp_path):
    # okd_a is best on test, okd_b on validation: the selection must follow validation.
    runs = [_run("kd", s, [(1.0, 5.0)], validation=5.0 + s) for s in (0, 1)]
    runs += [_run("okd_a", s, [(1.0, 9.0 + s)], validation=4.0) for s in (0, 1)]
    runs += [_run("okd_b", s, [(1.0, 6.0)], validation=9.0 + 0.1 * s) for s in (0, 1)]
    results = {
        "command": "c", "total_seconds": 1.0, "machine": {"cpu_count": 2, "torch": "x"},
        "settings": {"methods": "kd,okd_a,okd_b"}, "sizes": {"nano": {"runs": runs}},
    }
    bench.report(results, ["kd", "okd_a", "okd_b"], tmp_path)
    selected = json.loads((tmp_path / "results.json").read_text())["sizes"]["nano"]["okd_selected"]
    # kd validation 5.5 +- 0.71; okd_b 9.05 +- 0.07: beyond the spread. On test okd_b 6.0 vs kd 5.0 +- 0: also.
    assert selected == {"variant": "okd_b", "beats_kd_validation": True, "beats_kd_test": True}
    assert "**okd_b**" in (tmp_path / "results.md").read_text()


def test_okd_variant_table_shows_what_each_module_did_to_the_teacher(bench, tmp_path):
    runs = [_run("kd", s, [(1.0, 5.0)], validation=5.0) for s in (0, 1)]
    for s, (ce, kl) in enumerate([(2.4, 0.04), (2.6, 0.06)]):
        run = _run("okd_a", s, [(1.0, 6.0)], validation=7.0)
        run["validation"] = {"validation_teacher_ce": ce, "validation_teacher_accuracy": 0.5,
                             "validation_teacher_kl_from_frozen": kl, "validation_frozen_teacher_ce": 2.55}
        runs.append(run)
    runs += [_run("okd_b", s, [(1.0, 6.0)], validation=6.0) for s in (0, 1)]
    results = {
        "command": "c", "total_seconds": 1.0, "machine": {"cpu_count": 2, "torch": "x"},
        "settings": {"methods": "kd,okd_a,okd_b"}, "sizes": {"nano": {"runs": runs}},
    }
    bench.report(results, ["kd", "okd_a", "okd_b"], tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "| okd_a | 2 | 7.00 +- 0.00 | 6.00 +- 0.00 | 2.500 +- 0.141 | 0.500 +- 0.000 | 0.050 +- 0.014 |" in md
    assert "| okd_b | 2 | 6.00 +- 0.00 | 6.00 +- 0.00 | - | - | - |" in md
    assert "The frozen teacher's validation CE: 2.550." in md


def test_an_interrupted_grid_reports_the_methods_it_has(bench, tmp_path):
    runs = [_run("kd", 0, [(1.0, 5.0)])]
    results = {"command": "c", "total_seconds": 1.0, "machine": {"cpu_count": 2, "torch": "x"},
               "settings": {"methods": "kd,okd"}, "sizes": {"nano": {"runs": runs}}}
    bench.report(results, ["kd", "okd"], tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert "| kd | 1 |" in table and "| okd |" not in table


def test_a_rerun_with_other_settings_is_refused(bench, tmp_path):
    settings = {"tier": "toy", "steps": 10, "eval_every": 5, "eval_examples": 4, "max_new_tokens": 8,
                "max_train_examples": None}
    (tmp_path / "results.json").write_text(json.dumps({"settings": settings, "sizes": {"nano": {"runs": [_run("kd", 0, [(1.0, 5.0)])]}}}))
    assert list(bench._previous_runs(tmp_path, settings)) == [("nano", "kd", 0)]
    with pytest.raises(SystemExit, match=r"other settings \(steps\)"):
        bench._previous_runs(tmp_path, {**settings, "steps": 20})


def test_results_written_before_the_real_tier_count_as_toy_runs(bench, tmp_path):
    old = {"steps": 10, "eval_every": 5, "eval_examples": 4, "max_new_tokens": 8, "demo_dir": "runs/demo"}
    (tmp_path / "results.json").write_text(json.dumps({"settings": old, "sizes": {"nano": {"runs": [_run("kd", 0, [(1.0, 5.0)])]}}}))
    now = {**old, "tier": "toy", "max_train_examples": None, "demo_dir": "runs/demo-toy"}
    assert list(bench._previous_runs(tmp_path, now)) == [("nano", "kd", 0)]
    with pytest.raises(SystemExit, match=r"other settings \(tier\)"):
        bench._previous_runs(tmp_path, {**now, "tier": "real"})


def test_merging_grids_of_other_students(bench, tmp_path):
    settings = {"tier": "real", "steps": 10, "eval_every": 5, "eval_examples": 4, "max_new_tokens": 8, "max_train_examples": 8}
    a = {"command": "a", "total_seconds": 2.0, "machine": {}, "settings": {**settings, "methods": "kd,okd"},
         "sizes": {"10l": {"runs": [_run("kd", 0, [(1.0, 5.0)])]}}}
    b = {"command": "b", "total_seconds": 3.0, "machine": {}, "settings": {**settings, "methods": "kd,gkd"},
         "sizes": {"4l": {"runs": [_run("gkd", 0, [(1.0, 4.0)])]}}}
    merged = bench.merge_results(a, b)
    assert list(merged["sizes"]) == ["10l", "4l"] and merged["settings"]["methods"] == "kd,okd,gkd"
    assert merged["total_seconds"] == 5.0
    with pytest.raises(SystemExit, match="already in the results: 10l kd seed 0"):
        bench.merge_results(a, a)
    # Other methods of the same student (a grid run beside it) join that student's runs.
    c = {**b, "sizes": {"10l": {"runs": [_run("okd_ce3", 0, [(1.0, 6.0)])]}}}
    merged = bench.merge_results(a, c)
    assert [r["method"] for r in merged["sizes"]["10l"]["runs"]] == ["kd", "okd_ce3"]
    assert [r["method"] for r in a["sizes"]["10l"]["runs"]] == ["kd"]  # the inputs are left as they were
    with pytest.raises(SystemExit, match=r"other settings \(steps\)"):
        bench.merge_results(a, {**b, "settings": {**b["settings"], "steps": 11}})


def test_one_seed_shows_no_spread(bench, tmp_path):
    results = {"command": "c", "total_seconds": 1.0, "machine": {"cpu_count": 2, "torch": "x"},
               "settings": {"methods": "kd"}, "sizes": {"nano": {"runs": [_run("kd", 0, [(1.0, 5.0)], validation=4.0)]}}}
    bench.report(results, ["kd"], tmp_path)
    assert "| kd | 1 | 5.00 | 4.00 |" in (tmp_path / "results.md").read_text()


def test_a_narrower_rerun_keeps_the_runs_it_does_not_visit(bench):
    previous = {("10l", "kd", 0): _run("kd", 0, [(1.0, 5.0)]), ("10l", "okd", 0): _run("okd", 0, [(1.0, 6.0)]),
                ("4l", "kd", 0): _run("kd", 0, [(1.0, 4.0)])}
    results = {"settings": {"methods": "okd,gkd"}, "sizes": {"10l": {"runs": []}}}
    reported = bench.carry_over(results, previous, ["10l"], [0, 1], ["okd", "gkd"])
    # okd seed 0 is planned (the loop reuses it); kd at 10l and the 4l student are not: kept here.
    assert [r["method"] for r in results["sizes"]["10l"]["runs"]] == ["kd"]
    assert [r["method"] for r in results["sizes"]["4l"]["runs"]] == ["kd"]
    assert reported == ["okd", "gkd", "kd"] and results["settings"]["methods"] == "okd,gkd,kd"


def test_okd_time_to_quality_interpolates_the_mean_curve(bench):
    """OKD's seconds to the best sampling method's final ROUGE-L (linear between evaluation points,
    setup added) over that method's seconds; None when OKD's curve never gets there."""
    table = {
        "okd": {"rouge_l_mean": 8.0, "setup_seconds": 2.0, "mean_curve": [(10.0, 4.0), (20.0, 8.0)]},
        "gkd": {"rouge_l_mean": 6.0, "train_seconds": 40.0, "setup_seconds": 0.0},
        "seqkd": {"rouge_l_mean": 3.0, "train_seconds": 5.0, "setup_seconds": 1.0},
    }
    quality = bench.okd_time_to_quality(table, ["gkd", "seqkd"])
    assert quality["method"] == "gkd" and quality["target_rouge_l"] == 6.0
    assert quality["okd_seconds"] == pytest.approx(15.0 + 2.0)  # halfway from 4 to 8 between 10 s and 20 s
    assert quality["ratio"] == pytest.approx(17.0 / 40.0)
    table["gkd"]["rouge_l_mean"] = 9.0
    assert bench.okd_time_to_quality(table, ["gkd"])["ratio"] is None
    # Reached at the first evaluation: interpolated from (0 s, 0).
    table["gkd"]["rouge_l_mean"] = 2.0
    assert bench.okd_time_to_quality(table, ["gkd"])["okd_seconds"] == pytest.approx(5.0 + 2.0)
    assert bench.okd_time_to_quality(table, []) is None


def test_real_students_evenly_spaced_and_ends(bench, tmp_path):
    """``--students 3,4ends`` on the real tier: 3 evenly spaced layers of the teacher (first and last
    among them) and its first 2 + last 2 layers; a count the teacher cannot give stops the grid."""
    from okd.models import build_model, save_pretrained_atomic, train_tokenizer
    from okd.pretrained import MANIFEST

    tokenizer = train_tokenizer(["the cat sat on the mat.", "a dog ran under the big tree."] * 20, vocab_size=300)
    teacher = build_model("llama", "small", len(tokenizer), 32, seed=0, pad_token_id=tokenizer.pad_token_id)
    depth = teacher.config.num_hidden_layers
    assert depth >= 4
    save_pretrained_atomic(teacher, tokenizer, tmp_path / "demo" / "teacher")
    students = bench.real_students(tmp_path / "demo", ["3", "4ends"], tmp_path / "out")
    assert list(students) == ["3l", "4ends"]
    kept = {name: json.loads((Path(d) / MANIFEST).read_text())["keep"] for name, d in students.items()}
    assert kept["4ends"] == [0, 1, depth - 2, depth - 1]
    assert kept["3l"][0] == 0 and kept["3l"][-1] == depth - 1 and len(kept["3l"]) == 3
    with pytest.raises(SystemExit, match="1ends: needs 2"):
        bench.real_students(tmp_path / "demo", ["1ends"], tmp_path / "out")
