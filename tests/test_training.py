"""The training loop: every preset learns, OKD's guarantees hold, outputs reload."""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import configs

from okd.config import METHOD_PRESETS, OnlineModuleConfig
from okd.minillm import MiniLLMConfig
from okd.training import Distiller, distill


def _initial_and_final_validation(setting, tmp_path, method, steps=25, **kw):
    distiller = Distiller(**configs(setting, method, steps=steps, **kw), output_dir=str(tmp_path / method))
    before = distiller.validate()
    distiller.train()
    after = distiller.validate()
    rows = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    return distiller, before, after, rows


@pytest.mark.parametrize("method", sorted(METHOD_PRESETS))
def test_every_preset_learns(tiny_setting, tmp_path, method):
    distiller, before, after, rows = _initial_and_final_validation(tiny_setting, tmp_path, method)
    if METHOD_PRESETS[method]["source"] in ("ground_truth", "teacher_generated"):
        # On student-generated batches the training loss is measured on ever-changing sequences,
        # so only the held-out metrics below compare like with like for those methods.
        first = sum(r["loss"] for r in rows[:5]) / 5
        last = sum(r["loss"] for r in rows[-5:]) / 5
        assert last < first, f"{method}: training loss did not go down ({first:.4f} -> {last:.4f})"
    assert after["validation_ce"] < before["validation_ce"]
    if distiller.teacher is not None and method != "sft":
        # Held-out divergence to the teacher goes down: the student moves toward the teacher.
        assert after["validation_divergence"] < before["validation_divergence"]


def _base_weights(teacher):
    return {k: v.clone() for k, v in teacher.base_state_dict().items()}


@pytest.mark.parametrize("kind", ["adapter", "lora"])
def test_okd_trains_only_the_module(tiny_setting, tmp_path, kind):
    distiller = Distiller(
        **configs(tiny_setting, "okd", steps=6, online=OnlineModuleConfig(kind=kind, lora_top_layers=1)),
        output_dir=str(tmp_path / kind),
    )
    teacher = distiller.teacher
    base_before = _base_weights(teacher)
    module_before = {k: v.clone() for k, v in teacher.module_state_dict().items()}
    assert module_before, "the online module has no parameters"
    distiller.train()
    base_after = teacher.base_state_dict()
    assert base_before.keys() == base_after.keys()
    for name, value in base_before.items():
        assert torch.equal(value, base_after[name]), f"frozen teacher weight {name} changed"
    changed = [k for k, v in teacher.module_state_dict().items() if not torch.equal(v, module_before[k])]
    assert changed, "no online-module parameter changed"
    trainable = {id(p) for p in teacher.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in teacher.module_parameters()}


@pytest.mark.parametrize("kind", ["adapter", "lora"])
def test_okd_teacher_equals_plain_teacher_at_step_zero(tiny_setting, kind):
    from okd.models import load_model
    from okd.teacher import Teacher

    plain = load_model(tiny_setting["teacher"])
    adapted = Teacher(load_model(tiny_setting["teacher"]), OnlineModuleConfig(kind=kind, lora_top_layers=1))
    input_ids = torch.randint(0, plain.config.vocab_size, (3, 17))
    mask = torch.ones_like(input_ids)
    mask[0, :4] = 0
    with torch.no_grad():
        expected = plain(input_ids=input_ids, attention_mask=mask).logits
    for track in (False, True):
        assert torch.equal(adapted(input_ids, mask, track_module_grad=track).detach(), expected)


def test_module_updates_exactly_every_k_steps(tiny_setting, tmp_path):
    k = 3
    distiller = Distiller(
        **configs(tiny_setting, "okd", steps=10, online=OnlineModuleConfig(update_every=k)),
        output_dir=str(tmp_path / "every"),
    )
    snapshots = []
    original_step = distiller.training_step

    def recording_step(batch, update_module):
        losses = original_step(batch, update_module)
        snapshots.append(distiller.teacher.adapter.up.weight.detach().clone())
        return losses

    distiller.training_step = recording_step
    distiller.train()
    rows = [json.loads(line) for line in (tmp_path / "every" / "metrics.jsonl").read_text().splitlines()]
    assert [r["module_updated"] for r in rows] == [r["step"] % k == 0 for r in rows]
    assert all(("module_loss" in r) == (r["step"] % k == 0) for r in rows)
    previous = torch.zeros_like(snapshots[0])
    for step, snapshot in enumerate(snapshots, start=1):
        assert torch.equal(snapshot, previous) == (step % k != 0), f"step {step}"
        previous = snapshot
    assert distiller.module_optimizer.state[distiller.teacher.adapter.up.weight]["step"] == 10 // k


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_okd_with_zero_module_lr_equals_plain_method(tiny_setting, tmp_path, divergence):
    plain = distill(**configs(tiny_setting, "kd", steps=5, divergence=divergence), output_dir=str(tmp_path / "plain"))
    okd = distill(
        **configs(tiny_setting, "okd", steps=5, divergence=divergence, online=OnlineModuleConfig(learning_rate=0.0)),
        output_dir=str(tmp_path / "okd"),
    )
    from safetensors.torch import load_file

    a = load_file(str(plain.output_dir / "student" / "model.safetensors"))
    b = load_file(str(okd.output_dir / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_saved_student_reloads_with_plain_transformers_and_generates(tiny_setting, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = distill(**configs(tiny_setting, "okd", steps=3), output_dir=str(tmp_path / "run"))
    model = AutoModelForCausalLM.from_pretrained(str(run.output_dir / "student"))
    tokenizer = AutoTokenizer.from_pretrained(str(run.output_dir / "student"))
    ids = tokenizer("Reverse: alpha bravo\nAnswer:", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert (run.output_dir / "online_module" / "online_module.json").exists()
    summary = json.loads((run.output_dir / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["module_consistent_across_processes"] is True


def test_refuses_to_overwrite_a_run(tiny_setting, tmp_path):
    distill(**configs(tiny_setting, "sft", steps=1), output_dir=str(tmp_path / "run"))
    with pytest.raises(FileExistsError, match="already holds a run"):
        distill(**configs(tiny_setting, "sft", steps=1), output_dir=str(tmp_path / "run"))
    distill(**configs(tiny_setting, "sft", steps=1), output_dir=str(tmp_path / "run"), overwrite=True)


def _resumable_configs(setting, method):
    from okd.config import SamplingConfig

    kwargs = configs(setting, method, steps=8)
    # Short generations; DistiLLM starts with a high threshold and a small buffer so that fresh
    # samples, replays and ground truth all occur within 8 steps.
    kwargs["sampling"] = SamplingConfig(
        max_new_tokens=6, init_threshold=0.7, replay_capacity=16, replay_ratio="0.5", loss_eps=0.0
    )
    kwargs["eval"].every = 3  # validation drives DistiLLM's threshold
    # MiniLLM: rounds of 3 batches served twice, so the checkpoint at step 4 is in the middle of a
    # pass (stored rollouts, shuffle order) and step 7 samples a new round (the sampler's generator).
    kwargs["minillm"] = MiniLLMConfig(num_rollouts=24, ppo_epochs=2)
    return kwargs


@pytest.mark.parametrize("method", ["kd", "okd", "gkd", "distillm", "minillm"])
def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tiny_setting, tmp_path, method):
    from safetensors.torch import load_file

    def rows(path):
        return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]

    kwargs = _resumable_configs(tiny_setting, method)
    full = distill(**kwargs, output_dir=str(tmp_path / "full"))

    # Interrupted run: 5 steps with a checkpoint every 2 (the last one at step 4), then resume to 8.
    interrupted = _resumable_configs(tiny_setting, method)
    interrupted["train"].checkpoint_every = 2
    distiller = Distiller(**interrupted, output_dir=str(tmp_path / "resumed"))
    original_step = distiller.training_step

    def crash_at_step_6(batch, update_module):
        if distiller.step == 6:
            raise KeyboardInterrupt  # the process dies in the middle of the run
        return original_step(batch, update_module)

    distiller.training_step = crash_at_step_6
    with pytest.raises(KeyboardInterrupt):
        distiller.train()
    checkpoints = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000002", "step-00000004"]  # keep_checkpoints=2
    resumed = distill(**interrupted, output_dir=str(tmp_path / "resumed"), resume=True)
    assert resumed.steps == 8

    full_rows, resumed_rows = rows(full.output_dir), rows(resumed.output_dir)
    assert [r["step"] for r in resumed_rows] == list(range(1, 9))
    for a, b in zip(full_rows, resumed_rows):
        assert a["loss"] == b["loss"], f"step {a['step']}: {a['loss']} != {b['loss']}"
        source_stats = {k: v for k, v in a.items() if k.startswith("source_")}
        assert source_stats == {k: b[k] for k in source_stats}, f"step {a['step']}: source state differs"
    a = load_file(str(full.output_dir / "student" / "model.safetensors"))
    b = load_file(str(resumed.output_dir / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    if method == "okd":
        a = load_file(str(full.output_dir / "online_module" / "adapter.safetensors"))
        b = load_file(str(resumed.output_dir / "online_module" / "adapter.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_incomplete_checkpoint_is_ignored(tiny_setting, tmp_path):
    from okd.training import latest_checkpoint

    kwargs = configs(tiny_setting, "kd", steps=4)
    kwargs["train"].checkpoint_every = 2
    distill(**kwargs, output_dir=str(tmp_path / "run"))
    good = latest_checkpoint(tmp_path / "run")
    assert good is not None and good.name == "step-00000002"
    broken = tmp_path / "run" / "checkpoints" / "step-00000003"
    broken.mkdir()
    (broken / "state.pt").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        assert latest_checkpoint(tmp_path / "run") == good


def test_resume_refuses_a_checkpoint_with_different_settings(tiny_setting, tmp_path):
    kwargs = configs(tiny_setting, "kd", steps=4)
    kwargs["train"].checkpoint_every = 2
    distill(**kwargs, output_dir=str(tmp_path / "run"))

    changed = configs(tiny_setting, "kd", steps=4, divergence="reverse_kl")
    with pytest.raises(ValueError, match=r"cannot resume .*method\.divergence: checkpoint 'forward_kl', now 'reverse_kl'"):
        Distiller(**changed, output_dir=str(tmp_path / "run"), resume=True)
    # A longer run (more steps, other logging/checkpointing) continues the same trajectory.
    longer = configs(tiny_setting, "kd", steps=6)
    longer["train"].checkpoint_every, longer["train"].log_every = 3, 2
    assert distill(**longer, output_dir=str(tmp_path / "run"), resume=True).steps == 6


def test_gkd_with_zero_on_policy_ratio_equals_ground_truth_jsd(tiny_setting, tmp_path):
    from safetensors.torch import load_file

    from okd.config import SamplingConfig

    jsd = distill(**configs(tiny_setting, "jsd", steps=5), output_dir=str(tmp_path / "jsd"))
    gkd = distill(
        **configs(tiny_setting, "gkd", steps=5), sampling=SamplingConfig(on_policy_ratio=0.0),
        output_dir=str(tmp_path / "gkd"),
    )
    a = load_file(str(jsd.output_dir / "student" / "model.safetensors"))
    b = load_file(str(gkd.output_dir / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gkd_with_full_on_policy_ratio_never_uses_ground_truth(tiny_setting, tmp_path):
    from okd.config import SamplingConfig

    run = distill(
        **configs(tiny_setting, "gkd", steps=4), sampling=SamplingConfig(on_policy_ratio=1.0, max_new_tokens=6),
        output_dir=str(tmp_path / "gkd"),
    )
    rows = [json.loads(line) for line in (run.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["source_on_policy_fraction"] for r in rows] == [1.0, 1.0, 1.0, 1.0]


def test_resume_with_a_smaller_budget_keeps_the_schedule_and_refuses_a_larger_one(tiny_setting, tmp_path):
    """Cosine and linear schedules are functions of train.max_steps: a resumed run keeps the horizon
    of the run that wrote the checkpoint (it stops earlier on the same trajectory), and a budget past
    that horizon is refused with a one-line error naming train.max_steps."""

    def rates(path):
        return [json.loads(line)["learning_rate"] for line in (path / "metrics.jsonl").read_text().splitlines()]

    def cosine(steps):
        kwargs = configs(tiny_setting, "sft", steps=steps)
        kwargs["train"].lr_scheduler, kwargs["train"].warmup_steps, kwargs["train"].checkpoint_every = "cosine", 2, 2
        kwargs["data"].validation_file = None
        return kwargs

    full = distill(**cosine(8), output_dir=str(tmp_path / "full"))
    distiller = Distiller(**cosine(8), output_dir=str(tmp_path / "run"))
    original_step = distiller.training_step

    def crash_at_step_5(batch, update_module):
        if distiller.step == 5:
            raise KeyboardInterrupt
        return original_step(batch, update_module)

    distiller.training_step = crash_at_step_5
    with pytest.raises(KeyboardInterrupt):
        distiller.train()

    with pytest.raises(ValueError, match=r"train\.max_steps"):
        Distiller(**cosine(12), output_dir=str(tmp_path / "run"), resume=True)
    resumed = distill(**cosine(6), output_dir=str(tmp_path / "run"), resume=True)
    assert resumed.steps == 6
    assert rates(resumed.output_dir) == rates(full.output_dir)[:6]


def test_distill_parameters_are_the_fields_of_distill_config():
    """One description of a run: distill's signature (the CLI's schema) is DistillConfig's fields."""
    import dataclasses
    import inspect

    from okd.config import DistillConfig

    parameters = inspect.signature(distill).parameters
    fields = {f.name: f for f in dataclasses.fields(DistillConfig)}
    assert list(parameters) == list(fields)
    for name, field in fields.items():
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if parameters[name].default is not inspect.Parameter.empty:
            assert parameters[name].default == default, name
