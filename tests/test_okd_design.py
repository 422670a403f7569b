"""The selection and reporting logic of benchmarks/okd_design.py on hand-made results (no training)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "okd_design.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("okd_design", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["okd_design"] = module
    spec.loader.exec_module(module)
    return module


def _run(variant, seed, val, test=None, ce=3.0, kl=None):
    validation = {"validation_ce": ce}
    if kl is not None:
        validation.update(validation_teacher_ce=2.0, validation_teacher_accuracy=0.5,
                          validation_teacher_kl_from_frozen=kl, validation_frozen_teacher_ce=1.9)
    return {"variant": variant, "seed": seed, "train_seconds": 10.0 + seed, "validation_rouge_l": val,
            "validation": validation, "test_rouge_l": test, "student": "unused"}


def test_every_variant_builds_a_valid_config(bench):
    from okd.config import MethodConfig, OnlineModuleConfig, resolve_method

    for name in bench.VARIANTS:
        method, online = bench.variant_configs(name, steps=300)
        resolve_method(MethodConfig(**method))
        OnlineModuleConfig(**online)
    assert bench.variant_configs("okd_late", 300)[1]["start_step"] == 100


def test_summary_means_and_stds_over_seeds(bench):
    runs = [_run("kd", 0, 5.0), _run("kd", 1, 7.0), _run("okd_kl", 0, 6.0, kl=0.1), _run("okd_kl", 1, 6.0, kl=0.3)]
    table = bench.summarise(runs, ["kd", "okd_kl"])
    assert table["kd"]["validation_rouge_l_mean"] == 6.0
    assert table["kd"]["validation_rouge_l_std"] == pytest.approx(2**0.5)
    assert table["kd"]["train_seconds"] == 10.5
    assert "validation_teacher_kl_from_frozen_mean" not in table["kd"]
    assert table["okd_kl"]["validation_teacher_kl_from_frozen_mean"] == pytest.approx(0.2)
    assert "test_rouge_l_mean" not in table["okd_kl"]


def test_selection_uses_validation_never_test(bench):
    # okd_b is best on validation; okd_a would be best on test: the rule must pick okd_b.
    runs = [
        _run("kd", 0, 9.0, test=1.0), _run("kd", 1, 9.0, test=1.0),  # the baseline is never a candidate
        _run("okd_a", 0, 5.0, test=9.0), _run("okd_a", 1, 5.0, test=9.0),
        _run("okd_b", 0, 6.0, test=2.0), _run("okd_b", 1, 6.0, test=2.0),
    ]
    table = bench.summarise(runs, ["kd", "okd_a", "okd_b"])
    assert bench.select(table) == "okd_b"
    # A tie on validation ROUGE-L goes to the lower validation CE.
    runs = [_run("okd_a", 0, 6.0, ce=3.0), _run("okd_b", 0, 6.0, ce=2.5)]
    assert bench.select(bench.summarise(runs, ["okd_a", "okd_b"])) == "okd_b"


def test_beats_only_beyond_the_seed_spread(bench):
    a = {"validation_rouge_l_mean": 7.0, "validation_rouge_l_std": 0.5, "seeds": [0, 1]}
    b = {"validation_rouge_l_mean": 6.0, "validation_rouge_l_std": 0.4, "seeds": [0, 1]}
    assert bench.beats(a, b) is True
    b["validation_rouge_l_std"] = 0.6
    assert bench.beats(a, b) is False
    assert bench.beats(b, a) is False
    # One seed: no spread, no verdict (a std of 0 must not count as "beyond the spread").
    assert bench.beats({**a, "seeds": [0]}, {**b, "validation_rouge_l_std": 0.0, "seeds": [0]}) is None


def test_tested_variants_are_baseline_default_and_selected(bench):
    assert bench.tested_variants("okd_rkl", ["kd", "okd_kl", "okd_rkl"]) == ["kd", "okd_kl", "okd_rkl"]
    assert bench.tested_variants("okd_kl", ["kd", "okd_kl", "okd_rkl"]) == ["kd", "okd_kl"]


def test_report_writes_json_and_markdown(bench, tmp_path):
    runs = [_run("kd", s, 6.0 + s, test=5.0 + s) for s in (0, 1)]
    runs += [_run("okd_kl", s, 6.0, test=5.0, kl=0.1) for s in (0, 1)]
    runs += [_run("okd_rkl", s, 9.0 + s, test=8.0, kl=0.2) for s in (0, 1)]
    results = {
        "command": "python benchmarks/okd_design.py", "total_seconds": 120.0,
        "machine": {"cpu_count": 2, "torch": "x", "torch_threads": 1},
        "settings": {"variants": ["kd", "okd_kl", "okd_rkl"], "seeds": [0, 1], "teacher": "t", "student_size": "nano",
                     "steps": 300, "eval_examples": 150, "max_new_tokens": 40},
        "runs": runs,
    }
    bench.report(results, tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["selected"] == "okd_rkl"
    assert written["summary"]["okd_rkl"]["test_rouge_l_mean"] == 8.0
    md = (tmp_path / "results.md").read_text()
    assert "| kd | plain KD (forward KL), the baseline | 6.50 +- 0.71 | 3.000 +- 0.000 | - | - | - | 10.5 |" in md
    assert "| okd_rkl | 8.00 +- 0.00 |" in md
    assert "Selected on validation ROUGE-L: **okd_rkl**" in md
    # 9.5 - 6.5 = 3 > 0.71 + 0.71: beats on validation; on test 8.0 - 5.5 = 2.5 > 0.71.
    assert "On validation it beats kd beyond the seed spread" in md
    assert "On test, okd_rkl beats kd beyond the seed spread." in md
    assert "KL(q \\|\\| p_phi)" in md  # pipes in the design column are escaped for the table


def test_the_selected_okd_jsd_is_the_okd_presets_default_and_okd_kl_the_former_one(bench):
    """The study's choice became the preset's default: okd_jsd's module settings are OnlineModuleConfig()'s
    (JSD at its default beta 0.5), and every other variant still starts from the former default
    (online.divergence=same), so the study reproduces after the change."""
    import dataclasses
    import inspect

    from okd.config import OnlineModuleConfig
    from okd.divergences import generalized_jsd

    method, online = bench.variant_configs("okd_jsd", 90)
    assert method == {"name": "okd"}
    chosen = OnlineModuleConfig(**online)
    assert chosen.divergence_params == {"beta": inspect.signature(generalized_jsd).parameters["beta"].default}
    assert dataclasses.replace(chosen, divergence_params=None) == OnlineModuleConfig()
    assert bench.variant_configs("okd_kl", 90) == ({"name": "okd"}, {"divergence": "same"})
    assert bench.variant_configs("okd_ce3", 90)[1] == {"divergence": "same", "ce_weight": 3.0}
    assert bench.variant_configs("kd", 90) == ({"name": "kd"}, {})
