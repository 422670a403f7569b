"""Smoke test of benchmarks/divergence_geometry.py (--quick) plus the geometry it must show."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "divergence_geometry.py"


def _load():
    spec = importlib.util.spec_from_file_location("divergence_geometry", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    bench = _load()
    out = tmp_path_factory.mktemp("geometry")
    payload = bench.main(
        ["--quick", "--out", str(out / "g.json"), "--figure", str(out / "g.png"), "--markdown", str(out / "g.md")]
    )
    return bench, out, payload


def test_quick_run_writes_every_divergence_and_metric(quick_run):
    bench, out, payload = quick_run
    data = json.loads((out / "g.json").read_text())
    assert data == json.loads(json.dumps(payload))  # what main returns is what it wrote
    assert (out / "g.png").stat().st_size > 0
    table = (out / "g.md").read_text()
    assert bench.TABLE_START in table and bench.TABLE_END in table
    ranks = [str(r) for r in data["settings"]["ranks"]]
    assert set(data["results"]) == set(bench.METHODS)
    for name, result in data["results"].items():
        assert f"| {name} (" in table
        assert set(result["ranks"]) == set(ranks)
        for rank in ranks:
            row = result["ranks"][rank]
            for key in bench.METRICS + ("final_loss",):
                assert math.isfinite(row[key]["mean"]) and math.isfinite(row[key]["std"]), (name, rank, key)
                assert len(row[key]["per_seed"]) == len(data["settings"]["seeds"])
    assert set(data["teacher"]) == set(bench.METRICS)
    assert data["teacher"]["mode1_prob"] == pytest.approx(0.4, abs=1e-6)
    assert data["teacher"]["tail_mass"] == pytest.approx(0.35, abs=1e-6)
    # Every metric of a probability is a probability; recovery rates are rates.
    for result in data["results"].values():
        for row in result["ranks"].values():
            for key in ("mode1_recovered", "mode2_recovered", "mode1_prob", "mode2_prob", "tail_mass", "tvd"):
                assert 0.0 <= row[key]["mean"] <= 1.0 + 1e-6
    # The OKD rows report the adapted teacher, which starts as the teacher and must have moved.
    okd = data["results"]["OKD"]
    assert okd["online_teacher"] and okd["okd_settings"]["ce_weight"] == 1.0
    assert okd["okd_teacher"][ranks[0]]["fkl"]["mean"] > 1e-3


def test_quick_run_shows_the_expected_geometry(quick_run):
    """At the middle capacity (clear-cut in the full run, and in --quick with wide margins):
    reverse KL is mode-seeking (more mass on the first mode, lower entropy, less tail than forward KL),
    forward KL over-spreads (entropy and tail mass above the teacher's), and forward KL is, among the
    fixed-teacher divergences, the one closest to the teacher in KL(p || q), which it minimises."""
    _, _, data = quick_run
    rank = str(data["settings"]["table_rank"])
    row = {name: result["ranks"][rank] for name, result in data["results"].items()}
    fkl, rkl, teacher = row["FKL"], row["RKL"], data["teacher"]

    def mean(r, key):
        return r[key]["mean"]

    assert mean(rkl, "mode1_prob") > mean(fkl, "mode1_prob") + 0.05
    assert mean(rkl, "entropy") < mean(fkl, "entropy") - 0.2
    assert mean(rkl, "tail_mass") < mean(fkl, "tail_mass") - 0.05
    assert mean(fkl, "entropy") > teacher["entropy"]
    assert mean(fkl, "tail_mass") > teacher["tail_mass"]
    fixed = [n for n, r in data["results"].items() if not r["online_teacher"]]
    assert min(fixed, key=lambda n: mean(row[n], "fkl")) == "FKL"
