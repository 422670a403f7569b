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


def _run(method, seed, curve, setup=1.0):
    return {
        "method": method, "size": "nano", "seed": seed, "setup_seconds": setup,
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
    assert "| gkd | 6.00 +- 0.00 | 20.0 | 1.0 | 21.0 | 20.0 |" in table
    assert "| okd | 5.00 +- 0.00 | 10.0 | 1.0 | 11.0 | not reached |" in table
    assert (tmp_path / "rouge_vs_time_nano.png").stat().st_size > 0
    assert (tmp_path / "final_rouge_nano.png").stat().st_size > 0
