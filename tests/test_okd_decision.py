"""benchmarks/okd_decision.py, the runner of docs/results/protocol.md: its bookkeeping (labels, the
plan of each stage, selection on validation only, the runs that test scores wait for). Training itself
is the Distiller's, tested elsewhere."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "okd_decision.py"


@pytest.fixture(scope="module")
def decision():
    spec = importlib.util.spec_from_file_location("okd_decision", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["okd_decision"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def paths(decision, tmp_path, monkeypatch):
    monkeypatch.setenv("OKD_DECISION_NO_COMMIT", "1")  # results are committed by the grid's own checkout only
    return decision.Paths("builtin", tmp_path / "runs", tmp_path / "results", tmp_path / "base")


def _finished(decision, paths, method, lr, seed, score):
    path = paths.result(decision.run_label(method, lr, seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"best": {"rouge_l": score, "epoch": 1.0}, "train_seconds": 10.0, "stop_reason": "x", "curve": []}))


def test_learning_rate_labels_keep_their_digits_and_differ(decision):
    labels = [decision.lr_label(lr) for lr in decision.PROTOCOL.learning_rates]
    assert labels == ["5e-5", "1.5e-4", "4.5e-4"]
    assert decision.run_label("okd", 1.5e-4, 2) == "okd-lr1.5e-4-s2"


def test_okd_kl_is_the_okd_preset_with_a_kl_module(decision):
    assert decision.method_sections("okd_kl") == ({"name": "okd"}, {"divergence": "kl"})
    assert decision.method_sections("kd") == ({"name": "kd"}, {})


def test_the_sweep_is_every_rate_at_seed_zero(decision, paths):
    jobs = decision.plan("sweep", paths, ["kd", "okd"])
    assert jobs == [(m, lr, 0) for m in ("kd", "okd") for lr in decision.PROTOCOL.learning_rates]


def test_selection_takes_the_best_validation_score_and_seeds_follow_it(decision, paths, tmp_path):
    rates = decision.PROTOCOL.learning_rates
    for lr, score in zip(rates, (10.0, 12.5, 11.0)):
        _finished(decision, paths, "kd", lr, 0, score)
    for lr, score in zip(rates, (9.0, 8.0, 13.0)):
        _finished(decision, paths, "okd", lr, 0, score)
    args = type("Args", (), {"methods": ["kd", "okd"]})
    decision.stage_select(args, paths, None)
    chosen = decision.read_selection(paths)
    assert chosen == {"kd": rates[1], "okd": rates[2]}
    assert decision.plan("seeds", paths, ["kd", "okd"]) == [("kd", rates[1], 1), ("kd", rates[1], 2), ("okd", rates[2], 1), ("okd", rates[2], 2)]
    # a one-seed method runs at kd's rate
    assert decision.plan("seeds", paths, ["seqkd"]) == [("seqkd", rates[1], 0)]


def test_selection_refuses_an_unfinished_sweep(decision, paths):
    _finished(decision, paths, "kd", decision.PROTOCOL.learning_rates[0], 0, 10.0)
    args = type("Args", (), {"methods": ["kd"]})
    with pytest.raises(SystemExit, match="kd has 1 of 3 sweep runs"):
        decision.stage_select(args, paths, None)


def test_test_scores_wait_for_selection_and_every_seed(decision, paths):
    with pytest.raises(SystemExit, match="no selected learning rate"):
        decision.test_runs(paths, ["kd"])
    rates = decision.PROTOCOL.learning_rates
    for lr in rates:
        _finished(decision, paths, "kd", lr, 0, 10.0 + lr)
    args = type("Args", (), {"methods": ["kd"]})
    decision.stage_select(args, paths, None)
    with pytest.raises(SystemExit, match="not trained yet: kd-lr4.5e-4-s1, kd-lr4.5e-4-s2"):
        decision.test_runs(paths, ["kd"])
    for seed in (1, 2):
        _finished(decision, paths, "kd", rates[2], seed, 11.0)
    assert decision.test_runs(paths, ["kd"]) == [("kd", rates[2], s) for s in (0, 1, 2)]


def test_dose_levels_set_the_module_strength_and_the_first_is_the_preset(decision):
    levels = list(decision.DOSE_LEVELS)
    assert levels[0] == "okd"  # the preset's own seed-0 run is the first level
    assert decision.method_sections("okd@m8e-3w4") == ({"name": "okd"}, {"learning_rate": 8e-3, "student_weight": 4.0})
    from okd.config import OnlineModuleConfig

    preset = OnlineModuleConfig()
    assert decision.DOSE_LEVELS["okd"] == (preset.learning_rate, preset.student_weight)
