"""Resume: checkpoint pruning, DistiLLM's threshold across an interruption, and the refusal of changed settings."""

from __future__ import annotations

import json
import re

import pytest
import torch
from engine_helpers import configs

from okd.config import SamplingConfig
from okd.training import Distiller, distill


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoints(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _crash_at(distiller: Distiller, step: int) -> None:
    """Make ``distiller`` die (KeyboardInterrupt, no checkpoint) when it reaches ``step``."""
    original_step = distiller.training_step

    def crashing(batch, update_module):
        if distiller.step == step:
            raise KeyboardInterrupt
        return original_step(batch, update_module)

    distiller.training_step = crashing


def test_only_the_last_keep_checkpoints_remain_across_a_resume(tiny_setting, tmp_path):
    kwargs = configs(tiny_setting, "kd", steps=7)
    kwargs["train"].checkpoint_every, kwargs["train"].keep_checkpoints = 1, 3
    run = tmp_path / "run"
    distill(**kwargs, output_dir=str(run))
    # Checkpoints at steps 1..6 (none at the last step: the finished run saves its student instead).
    assert _checkpoints(run) == ["step-00000004", "step-00000005", "step-00000006"]

    longer = configs(tiny_setting, "kd", steps=10)
    longer["train"].checkpoint_every, longer["train"].keep_checkpoints = 1, 2  # both may change on resume
    assert distill(**longer, output_dir=str(run), resume=True).steps == 10
    assert _checkpoints(run) == ["step-00000008", "step-00000009"]


def _distillm_configs(setting, steps=10):
    kwargs = configs(setting, "distillm", steps=steps)
    # A learning rate high enough that the validation loss rises within a few steps: with loss_eps 0 the
    # threshold then rises (0.5 -> 0.7 -> 0.9 -> 1.0) and the reference loss moves with it. Validation at
    # every step, so the threshold can change between the checkpoint and the crash too.
    kwargs["train"].learning_rate = 0.1
    kwargs["sampling"] = SamplingConfig(
        max_new_tokens=6, init_threshold=0.5, threshold_step=0.2, replay_capacity=16, replay_ratio="0.5", loss_eps=0.0
    )
    kwargs["eval"].every = 1
    return kwargs


def test_distillm_resume_across_a_threshold_change_reproduces_the_uninterrupted_run(tiny_setting, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import okd.generation

    # The schedule below (a threshold rise before and after step 7) was found with HF generate's
    # samples; okd's loop samples the same distribution with other draws, so pin the backend.
    monkeypatch.setattr(okd.generation, "DEFAULT_BACKEND", "hf")

    full = distill(**_distillm_configs(tiny_setting), output_dir=str(tmp_path / "full"))
    full_rows = _rows(full.output_dir)

    interrupted = _distillm_configs(tiny_setting)
    interrupted["train"].checkpoint_every = 2
    distiller = Distiller(**interrupted, output_dir=str(tmp_path / "resumed"))
    _crash_at(distiller, 8)  # last checkpoint at step 6; step 7 is lost and redone
    with pytest.raises(KeyboardInterrupt):
        distiller.train()
    resumed = distill(**interrupted, output_dir=str(tmp_path / "resumed"), resume=True)
    resumed_rows = _rows(resumed.output_dir)

    # The setting does what this test is about (on the uninterrupted run). A record's threshold is the
    # one its batch was drawn with; the validation at the end of step k moves the threshold of step k + 1.
    thresholds = {r["step"]: r["source_adaptive_threshold"] for r in full_rows}
    assert thresholds[7] > 0.5, f"no threshold rise before the checkpoint at step 6: {thresholds}"
    assert max(thresholds[s] for s in (8, 9, 10)) > thresholds[7], (
        f"no rise after the resume point, so the restored reference loss is never used: {thresholds}"
    )
    last = full_rows[-1]
    fresh = round(last["source_fresh_fraction"] * last["step"])
    replay = round(last["source_replay_fraction"] * last["step"])
    ground_truth = last["step"] - fresh - replay
    assert fresh > 0 and replay > 0 and ground_truth > 0, (fresh, replay, ground_truth)

    assert [r["step"] for r in resumed_rows] == list(range(1, 11))
    for a, b in zip(full_rows, resumed_rows, strict=True):
        assert a["loss"] == b["loss"], f"step {a['step']}: {a['loss']} != {b['loss']}"
        assert a["validation_ce"] == b["validation_ce"], f"step {a['step']}"
        source_stats = {k: v for k, v in a.items() if k.startswith("source_")}
        assert source_stats == {k: b[k] for k in source_stats}, f"step {a['step']}: source state differs"
    a = load_file(str(full.output_dir / "student" / "model.safetensors"))
    b = load_file(str(resumed.output_dir / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- refusal of changed settings ------------------------------------------------------------------
def _change(kwargs: dict, section: str, field: str, value) -> dict:
    import dataclasses

    kwargs[section] = dataclasses.replace(kwargs[section], **{field: value})
    return kwargs


@pytest.fixture(scope="module")
def checkpointed_runs(tiny_setting, tmp_path_factory):
    """A `kd` run and a `gkd` run (which has a sampling section), each with a checkpoint at step 2."""
    root = tmp_path_factory.mktemp("refusal")
    runs = {}
    for method in ("kd", "gkd"):
        kwargs = _configs(tiny_setting, method)
        distill(**kwargs, output_dir=str(root / method))
        runs[method] = root / method
    return runs


def _configs(setting, method):
    kwargs = configs(setting, method, steps=3)
    kwargs["train"].checkpoint_every = 2
    if method == "gkd":
        kwargs["sampling"] = SamplingConfig(max_new_tokens=4)
    return kwargs


@pytest.mark.parametrize(
    "method, section, field, value, key",
    [
        ("kd", "method", "name", "rkl", "method.name"),
        ("kd", "data", "max_length", 40, "data.max_length"),
        ("kd", "data", "train_file", "VALIDATION", "data.train_file"),
        ("kd", "model", "student_size", "tiny", "model.student_size"),
        ("kd", "train", "seed", 1, "train.seed"),
        ("kd", "train", "learning_rate", 1e-3, "train.learning_rate"),
        ("gkd", "sampling", "temperature", 0.5, "sampling.temperature"),
        ("gkd", "sampling", "on_policy_ratio", 0.25, "sampling.on_policy_ratio"),
    ],
)
def test_resume_refuses_each_changed_field_group(tiny_setting, checkpointed_runs, method, section, field, value, key):
    kwargs = _configs(tiny_setting, method)
    if value == "VALIDATION":
        value = tiny_setting["validation"]
    if key == "method.name":
        kwargs["method"] = type(kwargs["method"])(name=value)
    else:
        _change(kwargs, section, field, value)
    with pytest.raises(ValueError, match=rf"cannot resume .*{re.escape(key)}: checkpoint "):
        Distiller(**kwargs, output_dir=str(checkpointed_runs[method]), resume=True)


def test_resume_refusal_on_the_command_line_is_one_line_naming_the_field(tiny_setting, tmp_path, capsys):
    from okd.cli import main

    out = tmp_path / "run"
    args = [
        "distill", "--model.teacher", tiny_setting["teacher"], "--model.tokenizer", tiny_setting["tokenizer"],
        "--model.student_size", "nano", "--method.name", "kd", "--data.train_file", tiny_setting["train"],
        "--data.validation_file", tiny_setting["validation"],
        "--data.max_length", "48", "--train.batch_size", "4", "--train.max_steps", "3",
        "--train.checkpoint_every", "2", "--output-dir", str(out), "--progress", "false",
    ]
    main(args)
    capsys.readouterr()
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as raised:
        main([*args, "--train.seed", "7", "--train.max_steps", "5", "--resume"])
    assert raised.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("okd: error: cannot resume") and "train.seed: checkpoint 0, now 7" in err
    assert "train.max_steps" not in err  # a longer run is allowed; only the seed is named
    assert (out / "metrics.jsonl").read_text() == before  # the refused resume touched nothing
