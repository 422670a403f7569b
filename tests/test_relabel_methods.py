"""benchmarks/relabel_methods.py: renaming methods of a comparison grid (no training)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "relabel_methods.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("relabel_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _grid(tmp_path):
    runs = [{"method": m, "seed": s} for m in ("kd", "okd", "okd_jsd") for s in (0, 1)]
    results = {"settings": {"methods": "kd,okd,okd_jsd"},
               "sizes": {"10l": {"runs": runs, "summary": {"kd": 1, "okd": 2, "okd_jsd": 3}}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    for run in runs:
        d = tmp_path / "runs" / f"10l-{run['method']}-{run['seed']}"
        d.mkdir(parents=True)
        (d / "who").write_text(run["method"])
    return results


def test_a_swap_renames_runs_summaries_settings_and_directories(tmp_path):
    _grid(tmp_path)
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "okd=okd_kl", "okd_jsd=okd", "--why", "default changed"], check=True)
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in results["sizes"]["10l"]["runs"]] == ["kd", "kd", "okd_kl", "okd_kl", "okd", "okd"]
    assert results["sizes"]["10l"]["summary"] == {"kd": 1, "okd_kl": 2, "okd": 3}
    assert results["settings"]["methods"] == "kd,okd_kl,okd"
    assert results["relabelled"] == [{"renames": {"okd": "okd_kl", "okd_jsd": "okd"}, "why": "default changed"}]
    assert (tmp_path / "runs" / "10l-okd-1" / "who").read_text() == "okd_jsd"  # the old okd_jsd run
    assert (tmp_path / "runs" / "10l-okd_kl-0" / "who").read_text() == "okd"
    assert not list((tmp_path / "runs").glob("*.relabelling"))


def test_renaming_onto_a_name_that_stays_is_refused_and_changes_nothing(bench, tmp_path):
    results = _grid(tmp_path)
    with pytest.raises(ValueError, match="cannot rename to okd"):
        bench.relabel(results, {"okd_jsd": "okd"})
    before = (tmp_path / "results.json").read_text()
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "okd_jsd=okd", "--why", "x"], capture_output=True, text=True)
    assert done.returncode != 0 and "cannot rename to okd" in done.stderr
    assert (tmp_path / "results.json").read_text() == before
    assert (tmp_path / "runs" / "10l-okd_jsd-0").exists()
