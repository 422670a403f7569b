"""`okd demo`: the teacher cache's key, the real tier's report on hand-made results, and a toy run end to end.

The real tier itself (30 minutes on 2 CPU cores) is not run here; its pieces are: the key that decides
whether the fine-tuned teacher is reused, the cache check, and the report and plots written from results.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from okd.demo import DemoSettings, RealDemoSettings, run_demo
from okd.demo.real import _fine_tune_teacher, eval_key, teacher_key
from okd.demo.report import BEFORE, plot_real, rewrite, write_real_report

MANIFEST = {"okd": "model convert", "format_version": 1, "source": "/a/b.gguf", "source_sha256": "abc", "dtype": "float32"}


def test_teacher_key_follows_the_teachers_settings_only():
    base = RealDemoSettings()
    key = teacher_key(base, MANIFEST, "meta")
    assert key == teacher_key(RealDemoSettings(), dict(MANIFEST), "meta")
    # What the teacher does not depend on leaves it cached.
    for change in ({"student_steps": 7}, {"student_layers": 4}, {"student_learning_rate": 1.0}, {"eval_examples": 3},
                   {"eval_seeds": [1]}, {"max_new_tokens": 5}):
        assert teacher_key(dataclasses.replace(base, **change), MANIFEST, "meta") == key, change
    # The base model's location does not matter, its content does.
    assert teacher_key(base, {**MANIFEST, "source": "/elsewhere.gguf"}, "meta") == key
    assert teacher_key(base, {**MANIFEST, "source_sha256": "def"}, "meta") != key
    assert teacher_key(base, MANIFEST, "other data") != key
    for change in ({"teacher_steps": 61}, {"teacher_learning_rate": 2e-4}, {"batch_size": 4}, {"max_length": 128}, {"seed": 1}):
        assert teacher_key(dataclasses.replace(base, **change), MANIFEST, "meta") != key, change


def test_eval_key_follows_model_and_eval_settings():
    base = RealDemoSettings()
    key = eval_key(base, "m")
    assert eval_key(dataclasses.replace(base, student_steps=1), "m") == key
    assert eval_key(base, "other model") != key
    for change in ({"eval_examples": 3}, {"eval_seeds": [1]}, {"max_new_tokens": 5}):
        assert eval_key(dataclasses.replace(base, **change), "m") != key, change


def test_cached_teacher_is_reused_only_with_its_key(tmp_path, monkeypatch):
    out = tmp_path / "teacher"
    out.mkdir()
    (out / "config.json").write_text("{}")
    run = tmp_path / "teacher_run"
    run.mkdir()
    (run / "okd_teacher_key.txt").write_text("k1\n")
    (run / "train_summary.json").write_text(json.dumps({"train_seconds": 12.0, "steps": 3}))
    calls = []
    import okd.training

    monkeypatch.setattr(okd.training, "distill", lambda **kw: calls.append(kw) or (_ for _ in ()).throw(RuntimeError("trained")))
    teacher, summary = _fine_tune_teacher(RealDemoSettings(), tmp_path / "base", None, "k1", out, print)
    assert teacher == out and summary["cached"] and summary["steps"] == 3 and not calls
    with pytest.raises(RuntimeError, match="trained"):
        _fine_tune_teacher(RealDemoSettings(), tmp_path / "base", None, "k2", out, print)
    assert calls and calls[0]["model"].student == str(tmp_path / "base")


def _model(rouge: float, greedy: float, steps: int, params: int = 1000) -> dict:
    sample = {"prompt": "Describe `abc.ABC()`.", "reference": "Helper class.", "prediction": f"A helper class ({rouge})."}
    return {
        "parameters": params, "rouge_l_mean": rouge, "rouge_l_std": 0.5,
        "rouge_l_per_seed": {"10": rouge - 0.5, "20": rouge, "30": rouge + 0.5},
        "exact_match_mean": 0.0, "greedy_rouge_l": greedy, "greedy_exact_match": 0.0,
        "greedy_samples": [sample], "sampled_samples": [sample], "eval_seconds": 1.0,
        "train_seconds": 10.0 * steps, "steps": steps, "ce_curve": [[1, 3.0], [2, 2.5]] if steps else [],
    }


def test_real_report_from_hand_made_results(tmp_path):
    results = {
        "tier": "real",
        "settings": dataclasses.asdict(RealDemoSettings()),
        "methods_run": ["sft", "kd"],
        "machine": {"machine": "x86_64", "cpu_count": 2, "torch_threads": 2, "cuda": False},
        "student_layers_kept": [0, 3, 29],
        "models": {"teacher": {**_model(20.0, 22.0, 60, 134), "cached": True}, BEFORE: _model(1.0, 0.5, 0),
                   "sft": _model(8.0, 9.0, 40, 63), "kd": _model(9.5, 10.0, 40, 63)},
        "timings": {"teacher_fine_tune": 300.0, "train_sft": 80.0},
        "total_seconds": 1500.0,
        "load_average": {"start": [3.0, 2.0, 1.0], "end": [4.0, 3.0, 2.0]},
    }
    text = write_real_report(results, tmp_path).read_text()
    assert "| teacher (SmolLM2-135M-Instruct + sft) | 134 | 20.00 +- 0.50 | 19.5, 20.0, 20.5 | 22.00 | 60 | 600 |" in text
    assert "| `kd` student | 63 | 9.50 +- 0.50 |" in text
    assert text.index("student before distillation") < text.index("`sft` student") < text.index("`kd` student")
    assert "Teacher minus `sft` student: +12.00 ROUGE-L (sampled), +13.00 (greedy): there is something to distil." in text
    assert "`sft` +7.00, `kd` +8.50" in text
    assert "1500 s (25 min 00 s)" in text and "(cached from an earlier run)" in text
    assert "kept layers [0, 3, 29]" in text and "| train_sft | 80 |" in text
    assert "sampling seeds of one trained model per row" in text
    assert "'A helper class (9.5).'" in text
    # A teacher that does not beat the sft student is said so.
    results["models"]["sft"] = _model(25.0, 25.0, 40)
    assert "does NOT beat the sft student" in write_real_report(results, tmp_path).read_text()
    plot_real(results, tmp_path)
    for name in ("rouge_l.png", "loss_curves.png", "train_time.png"):
        assert (tmp_path / name).stat().st_size > 1000
    # The same report again from the saved results.json.
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "report.md").unlink()
    assert "does NOT beat the sft student" in rewrite(tmp_path).read_text()


def test_quick_needs_the_toy_tier(tmp_path):
    with pytest.raises(ValueError, match="toy tier"):
        run_demo(quick=True, tier="real", output_dir=str(tmp_path))


def test_toy_tier_end_to_end(tmp_path):
    """The toy path `okd demo --quick` takes, at a smaller size (the quick run itself takes ~2 minutes):
    per-example scores of every model that `okd compare` reads, and the paired table in the report."""
    settings = DemoSettings(teacher_size="tiny", teacher_steps=8, student_size="nano", student_steps=4, batch_size=8,
                            vocab_size=512, eval_examples=8, eval_seeds=[10, 20], max_new_tokens=8, max_length=64)
    results = run_demo(quick=True, output_dir=str(tmp_path), methods=["sft", "kd", "okd"], settings=settings)
    assert set(results["methods"]) == {"teacher", "sft", "kd", "okd"}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["methods"]["kd"]["steps"] == 4
    assert saved["eval_files"] == {n: f"eval-{n}.json" for n in ("teacher", "sft", "kd", "okd")}
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# okd demo report")
    # okd - kd first, then every method minus sft; sampled rows, then greedy rows.
    rows = [line.split(" | ")[:2] for line in text.splitlines() if line.split(" | ")[1:2] in (["sampled"], ["greedy"])]
    assert rows == [["| okd - kd", "sampled"], ["| kd - sft", "sampled"], ["| okd - sft", "sampled"],
                    ["| okd - kd", "greedy"], ["| kd - sft", "greedy"], ["| okd - sft", "greedy"]]
    assert "p (Holm): adjusted over the 6 rows of this table" in text
    assert "an interval that covers 0 means this demo cannot tell those two methods apart" in text
    assert "docs/results/protocol.md" in text
    # The per-example files load in okd compare, and give the report's numbers.
    from okd.comparison import run_comparison

    for decoding in ("sampled", "greedy"):
        compared = run_comparison([str(tmp_path / "eval-okd.json"), str(tmp_path / "eval-kd.json")], decoding=decoding)
        ours = next(r for r in saved["paired"]["rows"] if (r["a"], r["b"], r["decoding"]) == ("okd", "kd", decoding))
        theirs = compared["comparisons"][0]
        assert compared["num_examples"] == 8 and theirs["a"] == "okd" and theirs["b"] == "kd"
        for key in ("mean_a", "mean_b", "mean_difference", "ci_low", "ci_high", "p_value"):
            assert theirs[key] == pytest.approx(ours[key]), (decoding, key)
    teacher = json.loads((tmp_path / "eval-teacher.json").read_text())
    assert teacher["format"] == "okd-eval" and teacher["name"] == "teacher" and len(teacher["examples"]) == 8
    assert [d["seed"] for d in teacher["examples"][0]["samples"]] == [10, 20] and "greedy" in teacher["examples"][0]


def _evaluation(scores: list[float], greedy: list[float]) -> dict:
    """An EvalResult.to_dict() by hand: one sampling draw per example (seed 10) and greedy."""
    from okd.evaluation import EVAL_FORMAT, example_hash

    examples = [
        {"index": i, "source": f"test.jsonl, line {i + 1}", "hash": example_hash(f"p{i}", f"r{i}"), "prompt": f"p{i}",
         "reference": f"r{i}", "samples": [{"seed": 10, "prediction": "x", "rouge_l": s, "exact_match": 0.0}],
         "greedy": {"prediction": "y", "rouge_l": g, "exact_match": 0.0}}
        for i, (s, g) in enumerate(zip(scores, greedy))
    ]
    return {"format": EVAL_FORMAT, "format_version": 1, "rouge_l_mean": sum(scores) / len(scores), "rouge_l_std": 0.0,
            "exact_match_mean": 0.0, "exact_match_std": 0.0, "per_seed": [], "num_examples": len(scores), "generation": {},
            "greedy_rouge_l": sum(greedy) / len(greedy), "greedy_exact_match": 0.0, "seeds": [10], "examples": examples}


def test_paired_table_rows_and_numbers(tmp_path):
    """okd - kd first, then each method minus sft; Holm over every row; files that okd compare reads."""
    from okd.comparison import run_comparison
    from okd.demo.paired import paired_statistics, paired_table, write_eval_file

    base = [float(10 + (7 * i) % 13) for i in range(40)]
    models = {"sft": base, "kd": [x + 1.0 for x in base], "okd": [x + 1.0 + (i % 2) * 0.5 for i, x in enumerate(base)],
              "rkl": [x + 12.0 + (i % 5) for i, x in enumerate(base)]}
    files = {}
    for name, scores in models.items():
        files[name] = write_eval_file(tmp_path, name, _evaluation(scores, scores[::-1]), f"m/{name}", "test.jsonl", 96, 40).name
    paired = paired_statistics(tmp_path, files, ["sft", "kd", "rkl", "okd"])
    order = [(r["a"], r["b"], r["decoding"]) for r in paired["rows"]]
    assert order == [(a, b, d) for d in ("sampled", "greedy") for a, b in (("okd", "kd"), ("kd", "sft"), ("rkl", "sft"), ("okd", "sft"))]
    rkl = paired["rows"][2]
    assert rkl["mean_difference"] == pytest.approx(14.0) and rkl["ci_low"] > 12.0 and rkl["p_holm"] < 0.01
    okd = paired["rows"][0]
    assert okd["mean_difference"] == pytest.approx(0.25) and okd["ci_low"] > 0
    # Holm over all 8 rows: the smallest p is multiplied by 8.
    smallest = min(paired["rows"], key=lambda r: r["p_value"])
    assert smallest["p_holm"] == pytest.approx(min(1.0, 8 * smallest["p_value"]))
    # The same interval and p as okd compare on the files.
    compared = run_comparison([str(tmp_path / files["rkl"]), str(tmp_path / files["sft"])])["comparisons"][0]
    assert (compared["ci_low"], compared["ci_high"], compared["p_value"]) == pytest.approx((rkl["ci_low"], rkl["ci_high"], rkl["p_value"]))
    text = "\n".join(paired_table(paired, files))
    assert f"| rkl - sft | sampled | {sum(models['rkl']) / 40:.2f} | {sum(base) / 40:.2f} | +14.00 |" in text
    assert "adjusted over the 8 rows" in text and "docs/results/protocol.md" in text
    assert "`okd compare eval-okd.json eval-kd.json`" in text
    # Without sft only okd - kd; with neither pair nothing to show.
    assert [(r["a"], r["b"]) for r in paired_statistics(tmp_path, files, ["kd", "okd"])["rows"]] == [("okd", "kd")] * 2
    assert paired_table(paired_statistics(tmp_path, files, ["kd"])) == []


def test_real_report_has_the_paired_table(tmp_path):
    from okd.demo.paired import paired_statistics, write_eval_file

    results = {
        "tier": "real", "settings": dataclasses.asdict(RealDemoSettings()), "methods_run": ["sft", "kd"],
        "models": {"teacher": _model(20.0, 22.0, 60), BEFORE: _model(1.0, 0.5, 0), "sft": _model(8.0, 9.0, 40), "kd": _model(9.5, 10.0, 40)},
        "total_seconds": 10.0,
    }
    files = {name: write_eval_file(tmp_path, name, _evaluation(s, s), "m", "t.jsonl", 96, 3).name
             for name, s in (("teacher", [5.0, 6.0, 9.0]), (BEFORE, [0.0, 1.0, 0.0]), ("sft", [1.0, 2.0, 3.0]), ("kd", [2.0, 2.0, 5.0]))}
    assert files[BEFORE] == "eval-student-before.json"
    results["eval_files"] = files
    results["paired"] = paired_statistics(tmp_path, files, results["methods_run"])
    text = write_real_report(results, tmp_path).read_text()
    assert "## Paired differences between methods" in text
    assert "| kd - sft | sampled | 3.00 | 2.00 | +1.00 |" in text and "| kd - sft | greedy |" in text
    assert text.index("Paired differences") < text.index("## What varies between runs")
    # A results.json from before the paired statistics still renders, without the table.
    del results["paired"]
    assert "Paired differences" not in write_real_report(results, tmp_path).read_text()


def test_an_eval_cache_without_per_example_scores_is_recomputed(tmp_path, monkeypatch):
    import okd.demo.real as real

    model_dir = tmp_path / "student"
    cache = tmp_path / "student_eval.json"
    calls = []

    def fake_evaluate(model_dir, test_set, settings, name):
        calls.append(name)
        return {"rouge_l_mean": 3.0, "evaluation": {"examples": [{"hash": "h"}]}}

    monkeypatch.setattr(real, "evaluate_dir", fake_evaluate)
    cache.write_text(json.dumps({"key": "k", "scores": {"rouge_l_mean": 3.0}}))  # written before per-example scores
    scores = real._evaluate_cached(model_dir, None, RealDemoSettings(), "kd", "k", print)
    assert calls == ["kd"] and not scores["eval_cached"] and scores["evaluation"]["examples"]
    assert json.loads(cache.read_text())["scores"]["evaluation"]["examples"] == [{"hash": "h"}]
    scores = real._evaluate_cached(model_dir, None, RealDemoSettings(), "kd", "k", print)
    assert calls == ["kd"] and scores["eval_cached"]
    real._evaluate_cached(model_dir, None, RealDemoSettings(), "kd", "other key", print)
    assert calls == ["kd", "kd"]
    cache.write_text("{not json")
    real._evaluate_cached(model_dir, None, RealDemoSettings(), "kd", "other key", print)
    assert calls == ["kd", "kd", "kd"]
