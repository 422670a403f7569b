"""benchmarks/paper_recipe.py without a GPU: arguments, configs, the data root's check, the plan (dry run),
and the data preparation. No model is loaded and no command is run."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "paper_recipe.py"


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("paper_recipe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_recipe"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if the recipe starts a command or loads a model."""
    import okd.models

    def refuse(*args, **kwargs):
        raise AssertionError("the recipe ran something it should only have printed")

    monkeypatch.setattr(subprocess, "call", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(okd.models, "load_model", refuse)


RECORD = {"instruction": "Name a colour.", "prompt": "### Instruction:<n>Name a colour.<n><n>### Response:<n>", "input": "", "output": "Blue."}


def _data_root(recipe, root: Path, skip: tuple = ()) -> Path:
    for rel in [*recipe.LAYOUT.values(), *recipe.TEST_SETS.values()]:
        if rel in skip:
            continue
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(RECORD) + "\n" + json.dumps({**RECORD, "output": ["Red.", "Green."]}) + "\n")
    return root


def _one_line_error(capsys, code) -> str:
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paper_recipe: error: "), captured.err
    return lines[0]


def test_a_missing_data_root_is_refused_in_one_line(recipe, tmp_path, capsys, nothing_runs):
    line = _one_line_error(capsys, recipe.main(["--data-root", str(tmp_path / "absent"), "--dry-run"]))
    assert "absent: no such directory" in line
    line = _one_line_error(capsys, recipe.main(["--data-root", str(tmp_path / "absent")]))
    assert "no such directory" in line


def test_a_data_root_without_the_files_is_refused_in_one_line(recipe, tmp_path, capsys, nothing_runs):
    root = _data_root(recipe, tmp_path / "root", skip=("data/vicuna/valid.jsonl", "data/uinst/11_/valid.jsonl"))
    line = _one_line_error(capsys, recipe.main(["--data-root", str(root), "--dry-run"]))
    assert "no data/vicuna/valid.jsonl (and 1 more)" in line
    # Only the test sets asked for are needed.
    assert recipe.main(["--data-root", str(root), "--dry-run", "--test-sets", "dolly,self_inst,sinst"]) == 0


def test_bad_arguments_are_one_line(recipe, tmp_path, capsys, nothing_runs):
    root = _data_root(recipe, tmp_path / "root")
    assert "unknown foo" in _one_line_error(capsys, recipe.main(["--data-root", str(root), "--methods", "kd,foo"]))
    assert "minillm starts from the sft student" in _one_line_error(capsys, recipe.main(["--data-root", str(root), "--methods", "kd,minillm"]))
    assert "--seeds" in _one_line_error(capsys, recipe.main(["--data-root", str(root), "--seeds", "1,x"]))


def test_every_config_loads_as_okd_distill_reads_it(recipe):
    teacher = recipe.load_config([recipe.CONFIGS / "teacher_sft.yaml"], ["--model.student", "gpt2-xl"])
    assert teacher.model.student == "gpt2-xl" and teacher.method.name == "sft" and teacher.resolved()[0].kd_ratio == 0.0
    assert teacher.train.mixed_precision == "bf16" and teacher.train.learning_rate == 5e-5
    assert teacher.train.batch_size * teacher.train.gradient_accumulation_steps == 32
    for method in recipe.METHODS:
        config = recipe.load_config(recipe.method_configs(method), ["--method.name", method])
        resolved = config.resolved()[0]
        assert resolved.name == method and config.model.student == "gpt2", method
        assert config.model.teacher == "runs/paper/teacher/student" and config.model.teacher_dtype == "bfloat16", method
        assert config.train.mixed_precision == "bf16" and config.data.max_length == 512, method
    minillm = recipe.load_config(recipe.method_configs("minillm"), ["--method.name", "minillm"])
    assert minillm.train.learning_rate == 5e-6 and minillm.train.max_steps == 5000 and minillm.resolved()[0].objective == "minillm"
    assert recipe.method_configs("kd") == [recipe.CONFIGS / "student.yaml"]
    # A misspelt key is one line naming the files.
    with pytest.raises(recipe.RecipeError, match="student.yaml"):
        recipe.load_config(recipe.method_configs("kd"), ["--train.max_stepz", "3"])
    with pytest.raises(ValueError, match="method preset"):
        recipe.load_config(recipe.method_configs("kd"), ["--method.name", "nope"])


def test_dry_run_prints_the_commands_in_order(recipe, tmp_path, capsys, nothing_runs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = _data_root(recipe, tmp_path / "root")
    assert recipe.main(["--data-root", str(root), "--dry-run", "--out", "out", "--test-sets", "dolly"]) == 0
    text = capsys.readouterr().out
    labels = [line[2:] for line in text.splitlines() if line.startswith("# ")]
    assert labels == ["prepare", "teacher", *(f"student {m}" for m in recipe.METHODS),
                      "evaluate teacher on dolly", *(f"evaluate {m} on dolly" for m in recipe.METHODS),
                      "compare on dolly (sampled)", "compare on dolly (greedy)"]
    commands = [line for line in text.splitlines() if not line.startswith("# ")]
    assert "teacher_sft.yaml --model.student gpt2-xl" in commands[1] and "--output-dir out/teacher" in commands[1]
    minillm = commands[labels.index("student minillm")]
    assert "methods/minillm.yaml --method.name minillm" in minillm and "--model.student out/students/sft/student" in minillm
    okd = commands[labels.index("student okd")]
    assert "--model.teacher out/teacher/student --model.student gpt2" in okd and "methods/" not in okd
    evaluation = commands[labels.index("evaluate okd on dolly")]
    assert "--seeds 10,20,30,40,50" in evaluation and "--json out/evals/dolly/okd.json" in evaluation
    compare = commands[labels.index("compare on dolly (greedy)")]
    assert "--pairs okd:kd,kd:sft,rkl:sft,okd:sft,gkd:sft,distillm:sft,seqkd:sft,minillm:sft --decoding greedy" in compare
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_a_rerun_skips_what_is_done_and_resumes_what_is_not(recipe, tmp_path, capsys, nothing_runs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = _data_root(recipe, tmp_path / "root")
    (tmp_path / "out/teacher/student").mkdir(parents=True)
    (tmp_path / "out/teacher/student/config.json").write_text("{}")
    (tmp_path / "out/students/kd/checkpoints/step-00000880").mkdir(parents=True)
    (tmp_path / "out/students/rkl").mkdir(parents=True)
    assert recipe.main(["--data-root", str(root), "--dry-run", "--out", "out", "--methods", "kd,rkl", "--steps", "teacher,students"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# teacher (done: skipped)"
    assert lines[3].endswith("--output-dir out/students/kd --resume true")
    assert lines[5].endswith("--output-dir out/students/rkl --overwrite true")


def test_prepare_writes_okd_jsonl(recipe, tmp_path, capsys):
    from okd.data import read_jsonl

    root = _data_root(recipe, tmp_path / "root")
    assert recipe.main(["prepare", "--data-root", str(root), "--out", str(tmp_path / "data"), "--test-sets", "dolly"]) == 0
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["dolly.jsonl", "prepared.json", "train.jsonl", "valid.jsonl"]
    examples = read_jsonl(tmp_path / "data" / "dolly.jsonl")
    assert [e.prompt for e in examples] == ["### Instruction:\nName a colour.\n\n### Response:\n"] * 2
    assert [e.response for e in examples] == ["Blue.", "Red."]  # the first of several references
    assert json.loads((tmp_path / "data" / "prepared.json").read_text())["examples"]["dolly"] == 2
    # A record without a prompt gets the lineage's template; a broken one is one line with its place.
    assert recipe.convert_record({"instruction": "Add.", "input": "1 and 2", "output": "3"})["prompt"].endswith(
        "### Instruction:\nAdd.\n\n### Input:\n1 and 2\n\n### Response:\n")
    (root / "data/dolly/valid.jsonl").write_text(json.dumps({"output": "x"}) + "\n")
    capsys.readouterr()
    line = _one_line_error(capsys, recipe.main(["prepare", "--data-root", str(root), "--out", str(tmp_path / "d2"), "--test-sets", "dolly"]))
    assert "dolly/valid.jsonl, line 1: no 'prompt' and no 'instruction'" in line
    assert not (tmp_path / "d2").exists()  # nothing written when a file is broken


def test_distill_args_reach_every_training_run_and_are_checked(recipe, tmp_path, capsys, nothing_runs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = _data_root(recipe, tmp_path / "root")
    extra = ["--data-root", str(root), "--dry-run", "--out", "out", "--test-sets", "dolly", "--methods", "sft,okd"]
    assert recipe.main([*extra, "--distill-args", "--train.max_steps 20 --train.mixed_precision no"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("# ")]
    distills = [line for line in lines if " distill " in line]
    assert len(distills) == 3 and all("--train.max_steps 20 --train.mixed_precision no --output-dir" in line for line in distills)
    assert not any("max_steps" in line for line in lines if " distill " not in line)
    line = _one_line_error(capsys, recipe.main([*extra, "--distill-args", "--train.max_stepz 20"]))
    assert "teacher_sft.yaml" in line
