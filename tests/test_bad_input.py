"""Bad input: each case fails with a one-line error that names the culprit and leaves no partial outputs.

Covered: malformed JSONL (file and line), missing fields, empty prompt or response, an example that
cannot be truncated without losing its whole response, non-UTF-8 bytes, an empty dataset after
filtering, teacher and student with different tokenizers or incompatible vocabularies, a model path
that does not exist, a config key that does not exist (closest one suggested, on the command line
and inside a YAML file given with --config), and an output directory that holds a different run
(refused unless --overwrite or --resume). Data errors (missing fields, an empty file, a missing
validation file), a bad nested option (``--model.student_lora``, one line naming it instead of
jsonargparse's report of every type tried) and bad ``okd teacher cache`` options or data fail before any
model weights load: the tests make loading or building a model fail.

Most cases go through the command line (``okd.cli.main``), which must print one ``error:`` line to
stderr and exit with status 2; a few go through ``okd.training.distill``, which must raise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from engine_helpers import configs, make_examples, write_jsonl

from okd.cli import main
from okd.training import distill

# Everything a run writes into its output directory (okd.training.Distiller.train / save).
RUN_OUTPUTS = ("student", "metrics.jsonl", "checkpoints", "run_config.yaml", "train_summary.json", "online_module")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _cli_args(setting: dict, out: Path, **overrides) -> list[str]:
    """``okd distill`` arguments for a short valid run in the tiny setting, with ``overrides``
    (option name -> value; None drops the option)."""
    options = {
        "model.teacher": setting["teacher"],
        "model.tokenizer": setting["tokenizer"],
        "model.student_size": "nano",
        "method.name": "kd",
        "data.train_file": setting["train"],
        "data.validation_file": setting["validation"],
        "data.max_length": 48,
        "data.max_validation_examples": 8,
        "train.max_steps": 2,
        "train.batch_size": 4,
        "train.log_every": 1,
        "progress": "false",
        "output_dir": str(out),
    }
    options.update(overrides)
    argv = ["distill"]
    for name, value in options.items():
        if value is not None:
            argv += [f"--{name}", str(value)]
    return argv


def _cli_error(capsys, *argv: str) -> str:
    """Run ``okd`` with ``argv``; it must exit with status 2 and print a one-line error.

    Returns the error line. For okd's own errors (raised inside ``distill``) stderr must be exactly
    that one line, ``okd: error: ...``. For the argument parser's errors, argparse's usage and
    jsonargparse's "tip" lines may come first, but the error itself (from ``error:`` to the end)
    must be one line.
    """
    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        main(list(argv))
    err = capsys.readouterr().err
    assert raised.value.code == 2, f"exit status {raised.value.code!r}; stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("okd: error:"):
        assert len(lines) == 1, f"the error is {len(lines)} lines, not one:\n{err}"
        return lines[0]
    starts = [i for i, line in enumerate(lines) if re.match(r"\s*error:", line)]
    assert starts, f"no error line in stderr:\n{err}"
    tail = lines[starts[0]:]
    assert len(tail) == 1, f"the error is {len(tail)} lines, not one:\n{err}"
    return tail[0]


def _assert_no_outputs(out: Path) -> None:
    """No partial outputs: ``out`` does not exist, or holds none of a run's outputs."""
    if not out.exists():
        return
    left = sorted(p.name for p in out.iterdir())
    assert not left, f"{out} was left with {left}"


def _assert_names_line(message: str, path: Path, line: int) -> None:
    assert path.name in message, f"the file {path.name} is not named: {message}"
    assert re.search(rf"\bline {line}\b", message), f"line {line} is not named: {message}"


def _snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


GOOD = json.dumps({"prompt": "Reverse: alpha bravo\nAnswer:", "response": " bravo alpha"})


def _jsonl(path: Path, *lines: str | bytes, pad: bool = True) -> Path:
    """Write ``lines`` (str or raw bytes) as a file, one per line, followed (``pad``) by enough
    good examples that the file has more than one batch: the culprit is then the only problem."""
    lines = lines + ((GOOD,) * 6 if pad else ())
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return path


# ----------------------------------------------------------------------------------------------
# Malformed JSONL, missing fields, empty prompt/response, non-UTF-8 bytes
# ----------------------------------------------------------------------------------------------
# (lines of the file, line number of the culprit, words the message must contain)
MALFORMED = {
    "missing_value": ([GOOD, "", '{"prompt": "a", "response": }'], 3, []),
    "truncated_object": ([GOOD, GOOD, '{"prompt": "a", "response": "b"'], 3, []),
    "not_an_object": ([GOOD, '["a", "b"]'], 2, ["object"]),
    "trailing_garbage": ([GOOD, GOOD, GOOD, GOOD + " x"], 4, []),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_jsonl_names_file_and_line(tiny_setting, tmp_path, capsys, case):
    lines, lineno, words = MALFORMED[case]
    bad = _jsonl(tmp_path / "bad_train.jsonl", *lines)
    out = tmp_path / "run"
    message = _cli_error(capsys, *_cli_args(tiny_setting, out, **{"data.train_file": bad}))
    _assert_names_line(message, bad, lineno)
    for word in words:
        assert word in message
    _assert_no_outputs(out)


def test_malformed_validation_file_names_the_validation_file(tiny_setting, tmp_path, capsys):
    bad = _jsonl(tmp_path / "bad_validation.jsonl", GOOD, GOOD, "{not json")
    out = tmp_path / "run"
    message = _cli_error(capsys, *_cli_args(tiny_setting, out, **{"data.validation_file": bad}))
    _assert_names_line(message, bad, 3)
    _assert_no_outputs(out)


# record at line 2 -> the field the message must name
MISSING_FIELDS = {
    "prompt_response_without_response": ({"prompt": "Reverse: a\nAnswer:"}, "response"),
    "prompt_response_without_prompt": ({"response": " a"}, "prompt"),
    "instruction_without_output": ({"instruction": "Say hi", "input": ""}, "output"),
    "instruction_without_instruction": ({"output": "hi"}, "instruction"),
    "no_known_field": ({"text": "hello"}, "prompt"),
    "message_without_content": ({"messages": [{"role": "user"}, {"role": "assistant", "content": "hi"}]}, "content"),
    "message_without_role": ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}, "role"),
    "null_prompt": ({"prompt": None, "response": " a"}, "prompt"),
    "number_response": ({"prompt": "Reverse: a\nAnswer:", "response": 3}, "response"),
}


@pytest.mark.parametrize("case", sorted(MISSING_FIELDS))
def test_missing_field_names_the_field_file_and_line(tiny_setting, tmp_path, capsys, case):
    record, field = MISSING_FIELDS[case]
    bad = _jsonl(tmp_path / "bad_train.jsonl", GOOD, json.dumps(record), GOOD)
    out = tmp_path / "run"
    message = _cli_error(capsys, *_cli_args(tiny_setting, out, **{"data.train_file": bad}))
    _assert_names_line(message, bad, 2)
    assert f"'{field}'" in message, f"the field {field!r} is not named: {message}"
    _assert_no_outputs(out)


# record at line 3 -> "prompt" or "response" (what the message must say is empty)
EMPTY = {
    "empty_prompt": ({"prompt": "", "response": " a"}, "prompt"),
    "blank_prompt": ({"prompt": " \n\t", "response": " a"}, "prompt"),
    "empty_response": ({"prompt": "Reverse: a\nAnswer:", "response": ""}, "response"),
    "blank_response": ({"prompt": "Reverse: a\nAnswer:", "response": "  \n"}, "response"),
    "empty_instruction": ({"instruction": " ", "output": "hi"}, "instruction"),
    "empty_output": ({"instruction": "Say hi", "output": ""}, "response"),
    "empty_assistant_message": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
        "response",
    ),
    "empty_user_message": (
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "hi"}]},
        "prompt",
    ),
}


@pytest.mark.parametrize(
    "case",
    sorted(EMPTY),
)
def test_empty_prompt_or_response_names_file_and_line(tiny_setting, tmp_path, capsys, case):
    record, what = EMPTY[case]
    bad = _jsonl(tmp_path / "bad_train.jsonl", GOOD, GOOD, json.dumps(record))
    out = tmp_path / "run"
    message = _cli_error(capsys, *_cli_args(tiny_setting, out, **{"data.train_file": bad}))
    _assert_names_line(message, bad, 3)
    assert "empty" in message and what in message, message
    _assert_no_outputs(out)


def test_non_utf8_bytes_name_file_and_line(tiny_setting, tmp_path, capsys):
    latin1 = '{"prompt": "Caf\u00e9?\\nAnswer:", "response": " oui"}'.encode("latin-1")
    bad = _jsonl(tmp_path / "bad_train.jsonl", GOOD, GOOD, GOOD, latin1, GOOD)
    out = tmp_path / "run"
    message = _cli_error(capsys, *_cli_args(tiny_setting, out, **{"data.train_file": bad}))
    _assert_names_line(message, bad, 4)
    assert "UTF-8" in message.upper(), message
    _assert_no_outputs(out)


def _python_api_error(tiny_setting, tmp_path, bad_train_file) -> str:
    """distill() on a bad training file: the one-line ValueError message; no outputs left behind."""
    kwargs = configs(tiny_setting, "kd", steps=2)
    kwargs["data"] = dataclasses.replace(kwargs["data"], train_file=str(bad_train_file))
    out = tmp_path / "run"
    with pytest.raises(ValueError) as raised:
        distill(**kwargs, output_dir=str(out))
    message = str(raised.value)
    assert "\n" not in message.strip()
    _assert_no_outputs(out)
    return message


def test_non_utf8_file_on_the_python_api(tiny_setting, tmp_path):
    bad = _jsonl(tmp_path / "bad_train.jsonl", "\ufeff" + GOOD, b"\xff\xfe" + GOOD.encode())
    _assert_names_line(_python_api_error(tiny_setting, tmp_path, bad), bad, 2)


@pytest.mark.parametrize("case", ["missing_value", "not_an_object"])
def test_malformed_jsonl_on_the_python_api(tiny_setting, tmp_path, case):
    lines, lineno, _ = MALFORMED[case]
    bad = _jsonl(tmp_path / "bad_train.jsonl", *lines)
    _assert_names_line(_python_api_error(tiny_setting, tmp_path, bad), bad, lineno)


# ----------------------------------------------------------------------------------------------
# An example that cannot be truncated without losing its whole response
# ----------------------------------------------------------------------------------------------
def _too_long_setup(tmp_path: Path) -> tuple[Path, Path]:
    """A train file whose line 3 cannot fit max_length=8 without dropping its whole response
    (the response is guaranteed 8 tokens, which leaves no room for a prompt token); every other
    example is short enough to fit. Returns (train file, validation file)."""
    short = [json.dumps({"prompt": "R: a\nA:", "response": " a"}) for _ in range(4)]
    long = json.dumps({"prompt": "Reverse: alpha\nAnswer:", "response": " " + " ".join(["alpha bravo charlie"] * 10)})
    train = _jsonl(tmp_path / "long_train.jsonl", short[0], short[1], long, short[2], short[3], pad=False)
    validation = _jsonl(tmp_path / "short_validation.jsonl", *short, pad=False)
    return train, validation


def _too_long_args(setting: dict, tmp_path: Path, out: Path) -> list[str]:
    train, validation = _too_long_setup(tmp_path)
    return _cli_args(
        setting, out, **{"data.train_file": train, "data.validation_file": validation, "data.max_length": 8}
    )


def test_untruncatable_example_is_refused_in_one_line(tiny_setting, tmp_path, capsys):
    out = tmp_path / "run"
    message = _cli_error(capsys, *_too_long_args(tiny_setting, tmp_path, out))
    assert "max_length" in message, message
    _assert_no_outputs(out)


def test_untruncatable_example_names_file_and_line(tiny_setting, tmp_path, capsys):
    out = tmp_path / "run"
    message = _cli_error(capsys, *_too_long_args(tiny_setting, tmp_path, out))
    _assert_names_line(message, tmp_path / "long_train.jsonl", 3)
    _assert_no_outputs(out)


# ----------------------------------------------------------------------------------------------
# An empty dataset after filtering
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b"\n\n   \n\t\n"], ids=["empty_file", "only_blank_lines"])
@pytest.mark.parametrize("split", ["train", "validation"])
def test_empty_data_file_names_the_file(tiny_setting, tmp_path, capsys, content, split):
    empty = tmp_path / f"empty_{split}.jsonl"
    empty.write_bytes(content)
    out = tmp_path / "run"
    message = _cli_error(capsys, *_cli_args(tiny_setting, out, **{f"data.{split}_file": empty}))
    assert empty.name in message and "no examples" in message, message
    _assert_no_outputs(out)


@pytest.mark.parametrize("field", ["max_train_examples", "max_validation_examples"])
def test_zero_examples_after_the_limit_is_an_error(tiny_setting, tmp_path, capsys, field):
    # "Use only the first N examples" with N = 0 leaves nothing to train (or validate) on.
    out = tmp_path / "run"
    message = _cli_error(capsys, *_cli_args(tiny_setting, out, **{f"data.{field}": 0}))
    assert field in message, message
    _assert_no_outputs(out)


# ----------------------------------------------------------------------------------------------
# Teacher and student with different tokenizers or incompatible vocabularies
# ----------------------------------------------------------------------------------------------
def _other_tokenizer(size: int):
    """A byte-level BPE tokenizer of exactly ``size`` tokens, trained on unrelated text: same
    special tokens and the same length as the tiny setting's, but different merges."""
    from okd.models import train_tokenizer

    colours = "crimson scarlet amber golden emerald jade turquoise cobalt indigo violet magenta ivory".split()
    animals = "pelican walrus octopus giraffe hedgehog platypus armadillo flamingo penguin leopard".split()
    texts = [f"The {c} {a} number {i} sleeps quietly." for i in range(20) for c in colours for a in animals]
    tokenizer = train_tokenizer(texts, vocab_size=size)
    assert len(tokenizer) == size, "precondition: the second tokenizer must have the same length"
    return tokenizer


def _save_model(path: Path, tokenizer, vocab_size: int) -> Path:
    from okd.models import build_model, save_pretrained_atomic

    model = build_model(
        "llama",
        "nano",
        vocab_size=vocab_size,
        max_positions=48,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return save_pretrained_atomic(model, tokenizer, path)


@pytest.mark.parametrize("where", ["student", "tokenizer"])
def test_different_tokenizers_are_refused(tiny_setting, tmp_path, capsys, where):
    """student: the student checkpoint was trained with another tokenizer (saved beside it).
    tokenizer: model.tokenizer is another tokenizer than the one saved with the teacher."""
    from okd.models import load_tokenizer

    size = len(load_tokenizer(tiny_setting["tokenizer"]))
    other = _other_tokenizer(size)
    overrides = {}
    if where == "student":
        overrides["model.student"] = _save_model(tmp_path / "other_student", other, size)
    else:
        other.save_pretrained(str(tmp_path / "other_tokenizer"))
        overrides["model.tokenizer"] = tmp_path / "other_tokenizer"
    out = tmp_path / "run"
    message = _cli_error(capsys, *_cli_args(tiny_setting, out, **overrides))
    assert "tokenizer" in message and "differ" in message, message
    _assert_no_outputs(out)


@pytest.mark.parametrize("narrow", ["teacher", "student"])
def test_vocabulary_smaller_than_the_tokenizer_names_both_sizes(tiny_setting, tmp_path, capsys, narrow):
    from okd.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_setting["tokenizer"])
    size = len(tokenizer)
    small = size - 8
    path = _save_model(tmp_path / f"small_{narrow}", tokenizer, small)
    out = tmp_path / "run"
    message = _cli_error(capsys, *_cli_args(tiny_setting, out, **{f"model.{narrow}": path}))
    assert str(small) in message and str(size) in message, message
    assert narrow in message, message
    _assert_no_outputs(out)


# ----------------------------------------------------------------------------------------------
# A path that does not exist
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["model.teacher", "model.student", "model.tokenizer", "data.train_file", "data.validation_file"])
def test_missing_path_is_named(tiny_setting, tmp_path, capsys, option):
    missing = tmp_path / "does_not_exist" / f"missing_{option.replace('.', '_')}"
    out = tmp_path / "run"
    message = _cli_error(capsys, *_cli_args(tiny_setting, out, **{option: missing}))
    assert str(missing) in message, message
    _assert_no_outputs(out)


def test_missing_teacher_on_the_python_api(tiny_setting, tmp_path):
    kwargs = configs(tiny_setting, "kd", steps=2)
    missing = tmp_path / "no_teacher"
    kwargs["model"] = dataclasses.replace(kwargs["model"], teacher=str(missing))
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError) as raised:
        distill(**kwargs, output_dir=str(out))
    assert str(missing) in str(raised.value) and "\n" not in str(raised.value)
    _assert_no_outputs(out)


# ----------------------------------------------------------------------------------------------
# A config key that does not exist
# ----------------------------------------------------------------------------------------------
def _assert_suggests(message: str, typo: str, expected: str) -> None:
    assert typo in message, f"the unknown key {typo!r} is not named: {message}"
    match = re.search(r"did you mean(.*)", message)
    assert match, f"no suggestion: {message}"
    assert expected in match.group(1), f"suggested {match.group(1)!r}, not {expected!r}: {message}"


CLI_TYPOS = {
    "field": ("--train.max_stepz", "2", "max_stepz", "train.max_steps"),
    "section": ("--trian.max_steps", "2", "trian", "train.max_steps"),
    "method_field": ("--method.divergance", "reverse_kl", "divergance", "method.divergence"),
    "top_level": ("--ouput_dir", "x", "ouput_dir", "output_dir"),
}


@pytest.mark.parametrize("case", sorted(CLI_TYPOS))
def test_unknown_option_suggests_the_closest_in_one_line(tiny_setting, tmp_path, capsys, case):
    option, value, typo, expected = CLI_TYPOS[case]
    out = tmp_path / "run"
    message = _cli_error(capsys, *_cli_args(tiny_setting, out), option, value)
    _assert_suggests(message, typo, expected)
    _assert_no_outputs(out)


def _yaml_config(setting: dict) -> dict:
    return {
        "model": {"teacher": setting["teacher"], "tokenizer": setting["tokenizer"], "student_size": "nano"},
        "method": {"name": "kd"},
        "data": {"train_file": setting["train"], "validation_file": setting["validation"], "max_length": 48},
        "train": {"max_steps": 2, "batch_size": 4, "log_every": 1},
    }


# (section, key to rename: None renames the section itself, misspelling, expected suggestion)
YAML_TYPOS = {
    "field": ("train", "max_steps", "max_stepz", "max_steps"),
    "model_field": ("model", "teacher", "techer", "teacher"),
    "method_field": ("method", "name", "nmae", "name"),
    "section": ("train", None, "trian", "train"),
}


@pytest.mark.parametrize("case", sorted(YAML_TYPOS))
def test_unknown_yaml_key_suggests_the_closest_in_one_line(tiny_setting, tmp_path, capsys, case):
    section, key, typo, expected = YAML_TYPOS[case]
    config = _yaml_config(tiny_setting)
    if key is None:
        config[typo] = config.pop(section)
    else:
        config[section][typo] = config[section].pop(key)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    message = _cli_error(capsys, "distill", "--config", str(path), "--output-dir", str(out), "--progress", "false")
    _assert_suggests(message, typo, expected)
    _assert_no_outputs(out)


# ----------------------------------------------------------------------------------------------
# An output directory that holds a different run
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tiny_setting, tmp_path_factory) -> Path:
    """A complete 2-step kd run (student, metrics, run config, summary)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    distill(**configs(tiny_setting, "kd", steps=2), output_dir=str(out))
    return out


def _copy_run(finished_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def test_output_dir_with_another_run_is_refused_and_left_alone(tiny_setting, finished_run, tmp_path, capsys):
    out = _copy_run(finished_run, tmp_path)
    before = _snapshot(out)
    message = _cli_error(capsys, *_cli_args(tiny_setting, out, **{"method.name": "rkl"}))
    assert str(out) in message and "--overwrite" in message and "--resume" in message, message
    assert _snapshot(out) == before, "the refused command changed the existing run"


def test_output_dir_with_another_run_is_refused_on_the_python_api(tiny_setting, finished_run, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    before = _snapshot(out)
    with pytest.raises(FileExistsError) as raised:
        distill(**configs(tiny_setting, "rkl", steps=2), output_dir=str(out))
    assert str(out) in str(raised.value)
    assert _snapshot(out) == before


@pytest.mark.parametrize("kept", ["student", "checkpoints"])
def test_output_dir_with_only_part_of_a_run_is_refused(tiny_setting, finished_run, tmp_path, capsys, kept):
    """A directory holding a run's student or checkpoints (without its metrics.jsonl or
    run_config.yaml) still holds a run: replacing it silently would lose it."""
    out = tmp_path / "run"
    out.mkdir()
    if kept == "student":
        shutil.copytree(finished_run / "student", out / "student")
    else:
        (out / "checkpoints" / "step-00000001").mkdir(parents=True)
        (out / "checkpoints" / "step-00000001" / "checkpoint_complete.json").write_text('{"step": 1}\n')
    before = _snapshot(out)
    message = _cli_error(capsys, *_cli_args(tiny_setting, out))
    assert str(out) in message and "--overwrite" in message, message
    assert _snapshot(out) == before


def test_overwrite_replaces_the_other_run(tiny_setting, finished_run, tmp_path, capsys):
    out = _copy_run(finished_run, tmp_path)
    main(_cli_args(tiny_setting, out, **{"method.name": "rkl", "train.max_steps": 3}) + ["--overwrite"])
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["method"]["name"] == "rkl"
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (out / "student" / "config.json").exists()


def test_resume_is_accepted_in_a_dir_with_a_run(tiny_setting, finished_run, tmp_path, capsys):
    out = _copy_run(finished_run, tmp_path)
    main(_cli_args(tiny_setting, out) + ["--resume"])
    assert (out / "student" / "config.json").exists()
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 2


def test_output_dir_without_a_run_is_accepted(tiny_setting, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("not a run\n")
    main(_cli_args(tiny_setting, out))
    assert (out / "notes.txt").read_text() == "not a run\n"
    assert (out / "student" / "config.json").exists()


@pytest.mark.parametrize(
    "flag",
    ["--overwrite", "--resume"],
)
def test_bad_input_with_overwrite_or_resume_keeps_the_previous_run(tiny_setting, finished_run, tmp_path, capsys, flag):
    """A command that fails on bad input changes nothing: with --overwrite or --resume, the run
    already in the directory is still there, unchanged."""
    out = _copy_run(finished_run, tmp_path)
    before = _snapshot(out)
    bad = _jsonl(tmp_path / "bad_train.jsonl", GOOD, '{"prompt": "a", "response": }')
    message = _cli_error(capsys, *_cli_args(tiny_setting, out, **{"data.train_file": bad}), flag)
    _assert_names_line(message, bad, 2)
    assert _snapshot(out) == before, f"the failed command with {flag} changed the previous run"


def test_gradient_accumulation_below_one_is_one_line(tiny_setting, tmp_path, capsys):
    out = tmp_path / "run"
    message = _cli_error(capsys, *_cli_args(tiny_setting, out, **{"train.gradient_accumulation_steps": 0}))
    assert "train.gradient_accumulation_steps" in message and "got 0" in message
    _assert_no_outputs(out)


def test_lora_targets_matching_no_module_are_one_line_listing_the_names(tiny_setting, tmp_path, capsys):
    out = tmp_path / "run"
    targets = json.dumps({"target_modules": ["qkv_proj"]})
    message = _cli_error(capsys, *_cli_args(tiny_setting, out, **{"model.student_lora": targets}))
    assert "model.student_lora.target_modules ['qkv_proj'] match no module" in message
    assert "q_proj" in message and "v_proj" in message  # the names that exist
    _assert_no_outputs(out)


# ----------------------------------------------------------------------------------------------
# Bad input is caught before any model weights load (the tokenizer may load: it is cheap)
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def no_weights(monkeypatch):
    """Loading or building a model fails the test: the check must come first."""
    import okd.models

    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(okd.models, "load_model", refuse)
    monkeypatch.setattr(okd.models, "build_model", refuse)


def _missing_fields_file(tmp_path: Path) -> Path:
    return _jsonl(tmp_path / "no_fields.jsonl", json.dumps({"question": "a", "answer": "b"}), pad=False)


def _empty_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    return path


# option -> (how to make the bad value, words the message must contain besides the file's name)
EARLY_DATA = {
    "missing_fields": ("data.train_file", _missing_fields_file, ["prompt"]),
    "empty_train_file": ("data.train_file", _empty_file, ["no examples"]),
    "missing_validation_file": ("data.validation_file", lambda tmp: tmp / "nowhere" / "validation.jsonl", []),
}


@pytest.mark.parametrize("case", sorted(EARLY_DATA))
def test_data_errors_come_before_any_model_loads_on_the_command_line(tiny_setting, tmp_path, capsys, no_weights, case):
    option, make, words = EARLY_DATA[case]
    bad = make(tmp_path)
    out = tmp_path / "run"
    message = _cli_error(capsys, *_cli_args(tiny_setting, out, **{option: bad}))
    assert bad.name in message and all(w in message for w in words), message
    _assert_no_outputs(out)


@pytest.mark.parametrize("case", sorted(EARLY_DATA))
def test_data_errors_come_before_any_model_loads_on_the_python_api(tiny_setting, tmp_path, no_weights, case):
    option, make, words = EARLY_DATA[case]
    bad = make(tmp_path)
    kwargs = configs(tiny_setting, "kd", steps=2)
    kwargs["data"] = dataclasses.replace(kwargs["data"], **{option.split(".")[1]: str(bad)})
    out = tmp_path / "run"
    with pytest.raises(ValueError) as raised:  # DataError is a ValueError
        distill(**kwargs, output_dir=str(out))
    message = str(raised.value)
    assert "\n" not in message.strip() and bad.name in message and all(w in message for w in words), message
    _assert_no_outputs(out)


# --model.student_lora value -> what the one line must say
LORA_VALUES = {
    '{"rank": 0}': "model.student_lora.rank must be >= 1, got 0",
    '{"dropout": 2}': "model.student_lora.dropout must be in [0, 1)",
    '{"rank": "x"}': "model.student_lora.rank: Expected a <class 'int'>",
    '{"rnk": 1}': "model.student_lora: Option 'rnk' is not accepted",
}


@pytest.mark.parametrize("value", sorted(LORA_VALUES))
def test_bad_nested_option_is_one_line_naming_it_before_any_model_loads(tiny_setting, tmp_path, capsys, no_weights, value):
    out = tmp_path / "run"
    message = _cli_error(capsys, *_cli_args(tiny_setting, out, **{"model.student_lora": value}))
    assert LORA_VALUES[value] in message, message
    assert "Subtypes" not in message and "NoneType" not in message, message
    _assert_no_outputs(out)


def test_one_line_error_keeps_the_innermost_reason():
    from okd.cli import one_line_error

    report = (
        'Parser key "model.student_lora":\n\n  - Expected a path but {"rank": "x"} either not accessible or invalid\n'
        "  - Does not validate against any of the Union subtypes\n  Subtypes: [<class 'LoraStudentConfig'>, <class 'NoneType'>]\n"
        "  Errors:\n    - Problem with given class_path 'LoraStudentConfig':\n        rank: Expected a <class 'int'>. Got value: x\n"
        "    - Expected a <class 'NoneType'>\n  Given value type: <class 'dict'>\n  Given value: {'rank': 'x'}"
    )
    assert one_line_error(report) == "model.student_lora.rank: Expected a <class 'int'>. Got value: x"
    assert one_line_error("data.max_length must be >= 2, got 1") == "data.max_length must be >= 2, got 1"


# `okd teacher cache`: options, the data and the output directory before the teacher loads
def _cache_args(setting: dict, out: Path, **overrides) -> list[str]:
    options = {"teacher": setting["teacher"], "data": setting["train"], "out": str(out), "max_length": 48,
               "device": "cpu", "progress": "false"}
    options.update(overrides)
    argv = ["teacher", "cache"]
    for name, value in options.items():
        argv += [f"--{name}", str(value)]
    return argv


CACHE_CASES = {
    "top_k_0": ({"top_k": 0}, "top_k must be an int >= 1, got 0"),
    "batch_size_0": ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
    "max_examples_0": ({"max_examples": 0}, "max_examples must be an int >= 1, got 0"),
    "missing_data": ({"data": "nowhere/train.jsonl"}, "train.jsonl"),
}


@pytest.mark.parametrize("case", sorted(CACHE_CASES))
def test_teacher_cache_refuses_bad_input_before_the_teacher_loads(tiny_setting, tmp_path, capsys, no_weights, case):
    overrides, expected = CACHE_CASES[case]
    out = tmp_path / "cache"
    message = _cli_error(capsys, *_cache_args(tiny_setting, out, **overrides))
    assert expected in message, message
    assert not out.exists()


@pytest.mark.parametrize("case", ["top_k_0", "empty_data", "missing_fields"])
def test_teacher_cache_on_the_python_api_refuses_before_the_teacher_loads(tiny_setting, tmp_path, no_weights, case):
    from okd.teacher_cache import cache_teacher

    data, kwargs = tiny_setting["train"], {}
    if case == "top_k_0":
        kwargs["top_k"] = 0
    elif case == "empty_data":
        data = str(_empty_file(tmp_path))
    else:
        data = str(_missing_fields_file(tmp_path))
    out = tmp_path / "cache"
    with pytest.raises(ValueError) as raised:
        cache_teacher(tiny_setting["teacher"], data, str(out), max_length=48, device="cpu", progress=False, **kwargs)
    assert "\n" not in str(raised.value).strip()
    assert not out.exists()
