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
    """The toy path `okd demo --quick` takes, at a smaller size (the quick run itself takes ~2 minutes)."""
    settings = DemoSettings(teacher_size="tiny", teacher_steps=8, student_size="nano", student_steps=4, batch_size=8,
                            vocab_size=512, eval_examples=8, eval_seeds=[10], max_new_tokens=8, max_length=64)
    results = run_demo(quick=True, output_dir=str(tmp_path), methods=["sft", "kd"], settings=settings)
    assert set(results["methods"]) == {"teacher", "sft", "kd"}
    assert (tmp_path / "report.md").read_text().startswith("# okd demo report")
    assert json.loads((tmp_path / "results.json").read_text())["methods"]["kd"]["steps"] == 4
