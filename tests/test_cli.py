"""The `okd` command line: help, data build, distill from YAML with overrides, eval, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from okd.cli import _normalise_option_names, main


def _okd(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    okd = Path(sys.executable).with_name("okd")
    return subprocess.run([str(okd), *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_subcommands():
    result = _okd("--help")
    assert result.returncode == 0
    for name in ("data", "distill", "eval", "compare", "demo"):
        assert name in result.stdout


def test_data_build(tmp_path):
    result = _okd("data", "build", "--out-dir", str(tmp_path / "builtin"))
    assert result.returncode == 0, result.stderr
    for split in ("train", "validation", "test"):
        assert (tmp_path / "builtin" / f"{split}.jsonl").stat().st_size > 0


def test_option_name_normalisation():
    assert _normalise_option_names(["--output-dir", "x", "--quick"]) == ["--output_dir", "x", "--quick", "true"]
    assert _normalise_option_names(["--quick", "false", "--train.max-steps=3"]) == ["--quick", "false", "--train.max_steps=3"]


def test_distill_from_yaml_with_override_then_eval(tiny_setting, tmp_path, capsys):
    config = {
        "model": {"teacher": tiny_setting["teacher"], "tokenizer": tiny_setting["tokenizer"], "student_size": "nano"},
        "method": {"name": "okd", "divergence": "reverse_kl"},
        "data": {"train_file": tiny_setting["train"], "validation_file": tiny_setting["validation"], "max_length": 48},
        "train": {"max_steps": 50, "batch_size": 4, "log_every": 1},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    main(["distill", "--config", str(path), "--train.max_steps", "3", "--output-dir", str(out), "--progress", "false"])
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["train"]["max_steps"] == 3  # the command line wins over the file
    assert saved["method"]["divergence"] == "reverse_kl" and saved["method"]["online_teacher"] is True
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3

    main(["eval", "--model", str(out / "student"), "--data", tiny_setting["validation"], "--seeds", "1,2",
          "--max-examples", "4", "--generation.max_new_tokens", "4", "--json", str(tmp_path / "eval.json")])
    assert "ROUGE-L" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "eval.json").read_text())["per_seed"]) == 2


def test_misspelled_option_suggests_the_closest(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["distill", "--train.max_stepz", "3"])
    assert raised.value.code == 2
    # The usage text argparse prints already lists every option name: look only at the error line.
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: unrecognized arguments: --train.max_stepz 3 (did you mean --train.max_steps?)"]


def test_user_errors_are_one_line(tiny_setting, tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["distill", "--model.teacher", str(tmp_path / "missing"), "--method.name", "kd",
              "--data.train_file", tiny_setting["train"], "--output-dir", str(tmp_path / "x")])
    assert raised.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("okd: error:") and "missing" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["distill", "--model.teacher", tiny_setting["teacher"], "--method.name", "kdd",
              "--data.train_file", tiny_setting["train"], "--output-dir", str(tmp_path / "y")])
    assert "did you mean 'kd'" in capsys.readouterr().err


def test_version_is_the_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as raised:
        main(["--version"])
    assert raised.value.code == 0
    assert capsys.readouterr().out.strip() == f"okd {version('okd')}"


def test_python_dash_m_okd_runs_the_command_line():
    result = subprocess.run([sys.executable, "-m", "okd", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: okd ") and "distill" in result.stdout


def test_a_saved_run_config_reruns_the_run(tiny_setting, tmp_path, monkeypatch):
    """`okd distill --config run_config.yaml` (the file every run saves) repeats the run: its record-only
    keys (num_processes) and the unused sections (saved as null) do not stop it."""
    first = tmp_path / "first"
    main(["distill", "--model.teacher", tiny_setting["teacher"], "--model.tokenizer", tiny_setting["tokenizer"],
          "--model.student_size", "nano", "--method.name", "kd", "--data.train_file", tiny_setting["train"],
          "--data.validation_file", tiny_setting["validation"], "--data.max_length", "48", "--train.max_steps", "2",
          "--train.batch_size", "4", "--output-dir", str(first), "--no-progress"])
    saved = yaml.safe_load((first / "run_config.yaml").read_text())
    assert saved["num_processes"] == 1 and saved["online"] is None
    monkeypatch.chdir(first)
    main(["distill", "--config", "run_config.yaml", "--output-dir", str(tmp_path / "again"), "--no-progress"])
    assert (tmp_path / "again" / "run_config.yaml").read_text() == (first / "run_config.yaml").read_text()
    first_summary = json.loads((first / "train_summary.json").read_text())["final"]
    again_summary = json.loads((tmp_path / "again" / "train_summary.json").read_text())["final"]
    assert again_summary["validation_ce"] == pytest.approx(first_summary["validation_ce"], rel=1e-5)
