"""MiniLLM in the one loop: the teacher_mixed source, the minillm objective and preset, config errors, CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import yaml
from engine_helpers import configs

from okd.cli import main
from okd.config import MethodConfig, SamplingConfig, resolve_method
from okd.minillm import MiniLLMConfig
from okd.training import Distiller, distill


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_minillm_moves_the_student_toward_the_teacher(tiny_setting, tmp_path):
    """Without the LM term only MiniLLM's own terms (policy gradient, single-step reverse KL on the
    sampled prefixes) train the student: its held-out reverse KL to the teacher must still drop."""
    kwargs = configs(tiny_setting, "minillm", steps=12)
    kwargs["minillm"] = MiniLLMConfig(num_rollouts=16, ppo_epochs=2, lm_coef=0.0)
    kwargs["sampling"] = SamplingConfig(max_new_tokens=12)
    distiller = Distiller(**kwargs, output_dir=str(tmp_path / "run"))
    assert distiller.method.divergence == "reverse_kl" and distiller.method.objective == "minillm"
    weights = {k: v.clone() for k, v in distiller.student.state_dict().items()}
    before = distiller.validate()
    distiller.train()
    after = distiller.validate()
    rows = _rows(tmp_path / "run")
    assert len(rows) == 12
    for row in rows:
        for term in ("loss", "ce", "kd", "pg", "lm", "sequence_reward", "clipped_fraction"):
            assert math.isfinite(row[term]), f"step {row['step']}: {term} = {row[term]}"
        assert row["lm"] == 0.0 and 0.0 <= row["clipped_fraction"] <= 1.0
    # 16 rollouts = 2 batches of 8, served twice: a new round every 4 steps.
    assert [r["source_rollout_round"] for r in rows] == [1.0] * 4 + [2.0] * 4 + [3.0] * 4
    assert [r["source_ppo_pass"] for r in rows] == [1.0, 1.0, 2.0, 2.0] * 3
    assert any(not torch.equal(v, weights[k]) for k, v in distiller.student.state_dict().items())
    assert after["validation_divergence"] < before["validation_divergence"]


def test_teacher_mixed_source_serves_each_rollout_once_per_ppo_epoch(tiny_setting, tmp_path):
    kwargs = configs(tiny_setting, "minillm", steps=1)
    kwargs["minillm"] = MiniLLMConfig(num_rollouts=16, ppo_epochs=3)
    kwargs["sampling"] = SamplingConfig(max_new_tokens=5)
    source = Distiller(**kwargs, output_dir=str(tmp_path / "run")).source
    batches = [source.next_batch() for _ in range(6)]  # one round: 2 minibatches x 3 passes
    assert source.rounds == 1 and source.passes == 3
    for batch in batches:
        targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
        assert torch.equal(batch["response_mask"], targets != -100)  # aligned with the shifted targets
        assert set(batch) >= {"old_logprobs", "teacher_logprobs", "log_weights", "lm_input_ids", "lm_labels"}
        assert bool((batch["old_logprobs"][~batch["response_mask"]] == 0).all())

    def keys(batch):
        return [tuple(row[m].tolist()) for row, m in zip(batch["input_ids"], batch["attention_mask"].bool())]

    per_pass = [sorted(keys(batches[i]) + keys(batches[i + 1])) for i in (0, 2, 4)]
    assert per_pass[0] == per_pass[1] == per_pass[2] and len(per_pass[0]) == 16  # every sample, each pass
    assert [keys(b) for b in batches[:2]] != [keys(b) for b in batches[2:4]]  # reshuffled between passes
    source.next_batch()
    assert source.rounds == 2  # then a new round is sampled


def test_teacher_mixed_source_with_a_plain_divergence(tiny_setting, tmp_path):
    """The mixed sampler feeds any divergence: reverse KL on teacher-mixed samples (no MiniLLM loss, no LM batch)."""
    kwargs = configs(tiny_setting, "rkl", steps=4, source="teacher_mixed")
    kwargs["sampling"] = SamplingConfig(max_new_tokens=6)
    distiller = Distiller(**kwargs, output_dir=str(tmp_path / "run"))
    assert distiller.minillm_loss is None and distiller.source.lm_source is None
    distiller.train()
    rows = _rows(tmp_path / "run")
    assert all(math.isfinite(r["kd"]) for r in rows) and "pg" not in rows[0]
    assert rows[-1]["source_rollout_round"] == 1.0


@pytest.mark.parametrize(
    "fields, culprit",
    [
        ({"teacher_mix_ratio": 1.5}, "minillm.teacher_mix_ratio"),
        ({"teacher_mix_ratio": -0.1}, "minillm.teacher_mix_ratio"),
        ({"clip_range": 0.0}, "minillm.clip_range"),
        ({"clip_range": -0.2}, "minillm.clip_range"),
    ],
)
def test_out_of_range_minillm_settings_name_the_field(fields, culprit):
    with pytest.raises(ValueError, match=culprit) as raised:
        MiniLLMConfig(**fields)
    assert "\n" not in str(raised.value)


def test_minillm_method_errors_name_the_field(tiny_setting, tmp_path):
    with pytest.raises(ValueError, match=r"method\.objective=minillm needs method\.source=teacher_mixed"):
        resolve_method(MethodConfig(name="minillm", source="ground_truth"))
    with pytest.raises(ValueError, match=r"method\.online_teacher"):
        resolve_method(MethodConfig(name="minillm", online_teacher=True))
    with pytest.raises(ValueError, match=r"unknown method\.objective"):
        resolve_method(MethodConfig(name="kd", objective="minilm"))
    kwargs = configs(tiny_setting, "minillm", steps=1)
    kwargs["model"] = dataclasses.replace(kwargs["model"], teacher="")
    with pytest.raises(ValueError, match=r"method 'minillm' needs a teacher: set model\.teacher") as raised:
        distill(**kwargs, output_dir=str(tmp_path / "no_teacher"))
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "no_teacher").exists()


def _cli(setting, out, *extra):
    return ["distill", "--model.teacher", setting["teacher"], "--model.tokenizer", setting["tokenizer"],
            "--model.student_size", "nano", "--data.train_file", setting["train"], "--data.validation_file", "",
            "--data.max_length", "48", "--train.batch_size", "8", "--train.max_steps", "1", "--progress", "false",
            "--output-dir", str(out), "--method.name", "minillm", *extra]


def test_cli_minillm_parses_and_trains(tiny_setting, tmp_path):
    out = tmp_path / "cli"
    main(_cli(tiny_setting, out, "--minillm.teacher_mix_ratio", "0.3", "--minillm.num_rollouts", "8",
              "--minillm.ppo_epochs", "1", "--minillm.clip_range", "null", "--sampling.max_new_tokens", "4"))
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["method"]["objective"] == "minillm" and saved["method"]["source"] == "teacher_mixed"
    assert saved["minillm"]["teacher_mix_ratio"] == 0.3 and saved["minillm"]["clip_range"] is None
    assert (out / "student").is_dir()


def test_cli_out_of_range_teacher_mix_ratio_is_one_line(tiny_setting, tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        main(_cli(tiny_setting, tmp_path / "bad", "--minillm.teacher_mix_ratio", "1.5"))
    assert raised.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "minillm.teacher_mix_ratio" in errors[0], errors
    assert not (tmp_path / "bad").exists()


def test_checkpoints_from_before_the_minillm_settings_still_resume():
    """A run_config saved before ``method.objective`` and the ``minillm`` section existed is the same run."""
    from pathlib import Path

    from okd.config import DistillConfig
    from okd.training.checkpoint import check_same_run, flatten_run_config

    current = flatten_run_config(DistillConfig().run_config(1))
    older = {k: v for k, v in current.items() if k not in ("method.objective", "minillm")}
    check_same_run(older, current, Path("checkpoint"))
    minillm = flatten_run_config(DistillConfig(method=MethodConfig(name="minillm")).run_config(1))
    with pytest.raises(ValueError, match="method.objective: checkpoint 'distillation', now 'minillm'"):
        check_same_run(older, minillm, Path("checkpoint"))
