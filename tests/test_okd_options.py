"""OKD's online-module options inside the training loop (tiny setting): delayed start, the module's
schedule, the anchor, the teacher mix, LoRA on every layer, the adapted-teacher metrics, and OKD with
the student divergences the paper sets it against."""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import configs

from okd.config import OnlineModuleConfig
from okd.online.objective import module_lr_factor
from okd.training import Distiller, distill


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_delayed_start_and_module_schedule(tiny_setting, tmp_path):
    online = OnlineModuleConfig(start_step=4, update_every=2, lr_scheduler="cosine", warmup_steps=2, learning_rate=1e-2)
    distiller = Distiller(**configs(tiny_setting, "okd", steps=12, online=online), output_dir=str(tmp_path / "run"))
    weights, lrs = [], []
    original = distiller.training_step

    def recording(batch, update_module):
        losses = original(batch, update_module)
        weights.append(distiller.teacher.adapter.up.weight.detach().clone())
        lrs.append(distiller.module_optimizer.param_groups[0]["lr"])
        return losses

    distiller.training_step = recording
    distiller.train()
    rows = _rows(tmp_path / "run")
    expected_updates = [s > 4 and s % 2 == 0 for s in range(1, 13)]
    assert [r["module_updated"] for r in rows] == expected_updates
    previous = torch.zeros_like(weights[0])
    for step, (w, lr) in enumerate(zip(weights, lrs), start=1):
        assert torch.equal(w, previous) == (not expected_updates[step - 1]), f"step {step}"
        previous = w
        if expected_updates[step - 1]:  # the rate used on that update follows the schedule
            assert lr == pytest.approx(1e-2 * module_lr_factor(online, step, 12))
    assert torch.equal(weights[3], torch.zeros_like(weights[3]))  # identity until start_step


def test_identity_module_metrics_equal_the_frozen_teacher(tiny_setting, tmp_path):
    from okd.data import Collator, InstructionDataset, read_jsonl
    from okd.models import load_model, load_tokenizer
    from okd.training import cross_entropy, next_token_targets

    distiller = Distiller(**configs(tiny_setting, "okd", steps=6), output_dir=str(tmp_path / "run"))
    before = distiller.validate()
    assert before["validation_teacher_kl_from_frozen"] == 0.0
    # The frozen teacher's CE, computed here independently with plain transformers.
    tokenizer = load_tokenizer(tiny_setting["tokenizer"])
    plain = load_model(tiny_setting["teacher"])
    dataset = InstructionDataset(read_jsonl(tiny_setting["validation"], tokenizer=tokenizer)[:32], tokenizer, 48)
    batch = Collator(pad_token_id=tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    targets, mask = next_token_targets(batch["labels"])
    with torch.no_grad():
        logits = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = float(cross_entropy(logits, targets))
    assert before["validation_teacher_ce"] == pytest.approx(reference, rel=1e-5)
    assert before["validation_frozen_teacher_ce"] == pytest.approx(reference, rel=1e-5)
    accuracy = float(((logits.argmax(-1) == targets) & mask).sum() / mask.sum())
    assert before["validation_teacher_accuracy"] == pytest.approx(accuracy)
    distiller.train()
    after = distiller.validate()
    assert after["validation_teacher_kl_from_frozen"] > 0  # the module moved the teacher
    assert after["validation_frozen_teacher_ce"] == pytest.approx(reference, rel=1e-5)
    rows = _rows(tmp_path / "run")
    # Logged on module-update steps (adapter: p_0 from the same body pass) and at validation.
    assert all({"module_ce", "module_accuracy", "module_kl_from_frozen"} <= r.keys() for r in rows)
    assert "validation_teacher_kl_from_frozen" in rows[-1]


@pytest.mark.parametrize("kind", ["adapter", "lora"])
def test_anchor_keeps_the_adapted_teacher_near_the_frozen_one(tiny_setting, tmp_path, kind):
    kls = {}
    for weight in (0.0, 50.0):
        online = OnlineModuleConfig(kind=kind, lora_top_layers=1, learning_rate=2e-2, ce_weight=0.0, anchor_weight=weight)
        distiller = Distiller(**configs(tiny_setting, "okd", steps=8, online=online), output_dir=str(tmp_path / f"{kind}{weight}"))
        distiller.train()
        kls[weight] = distiller.validate()["validation_teacher_kl_from_frozen"]
        rows = _rows(tmp_path / f"{kind}{weight}")
        if weight:
            assert all("module_kl_from_frozen" in r for r in rows)
    assert kls[50.0] < 0.5 * kls[0.0], kls


def test_teacher_mix_one_learns_from_the_frozen_teacher(tiny_setting, tmp_path):
    """With m = 1 the student's target is p_0: the student trains as under plain KD (up to the float
    rounding of log_softmax), while the module still trains."""
    from safetensors.torch import load_file

    kd = distill(**configs(tiny_setting, "kd", steps=5), output_dir=str(tmp_path / "kd"))
    mixed = distill(
        **configs(tiny_setting, "okd", steps=5, online=OnlineModuleConfig(teacher_mix=1.0, learning_rate=5e-2)),
        output_dir=str(tmp_path / "mix"),
    )
    for a, b in zip(_rows(kd.output_dir), _rows(mixed.output_dir)):
        assert b["kd"] == pytest.approx(a["kd"], rel=1e-4)
    a = load_file(str(kd.output_dir / "student" / "model.safetensors"))
    b = load_file(str(mixed.output_dir / "student" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5)
    assert _rows(mixed.output_dir)[-1]["validation_teacher_kl_from_frozen"] > 0


def test_teacher_mix_half_target_is_the_mixture(tiny_setting, tmp_path):
    distiller = Distiller(
        **configs(tiny_setting, "okd", steps=1, online=OnlineModuleConfig(teacher_mix=0.5)), output_dir=str(tmp_path / "r")
    )
    with torch.no_grad():
        for p in distiller.teacher.module_parameters():
            p.add_(0.2 * torch.randn_like(p))
    ids = torch.randint(3, 100, (2, 9))
    adapted, frozen = distiller.teacher.adapted_and_frozen(ids, None, need_frozen=True)
    target = distiller.loss_fn.objective.student_target(adapted, frozen)
    expected = 0.5 * adapted.double().softmax(-1) + 0.5 * frozen.double().softmax(-1)
    torch.testing.assert_close(target.double().softmax(-1), expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(adapted, frozen)


def test_lora_on_all_layers(tiny_setting):
    from okd.models import load_model
    from okd.teacher import Teacher

    model = load_model(tiny_setting["teacher"])
    n = model.config.num_hidden_layers
    layers = lambda t: {  # noqa: E731
        int(name.split("layers.")[1].split(".")[0]) for name, _ in t.model.named_parameters() if "lora_" in name
    }
    assert layers(Teacher(model, OnlineModuleConfig(kind="lora", lora_top_layers=0))) == set(range(n))
    assert layers(Teacher(load_model(tiny_setting["teacher"]), OnlineModuleConfig(kind="lora", lora_top_layers=1))) == {n - 1}
    # frozen_forward switches LoRA off: equal to the plain teacher after the module moved.
    teacher = Teacher(load_model(tiny_setting["teacher"]), OnlineModuleConfig(kind="lora", lora_top_layers=0))
    with torch.no_grad():
        for p in teacher.module_parameters():
            p.add_(0.3 * torch.randn_like(p))
    ids = torch.randint(3, 100, (2, 9))
    adapted, frozen = teacher.adapted_and_frozen(ids, None, need_frozen=True)
    with torch.no_grad():
        plain = load_model(tiny_setting["teacher"])(input_ids=ids).logits
    assert torch.equal(frozen, plain) and not torch.allclose(adapted, plain, atol=1e-3)


@pytest.mark.parametrize(
    "divergence, params",
    [("reverse_kl", None), ("skew_reverse_kl", {"alpha": 0.1})],
)
@pytest.mark.parametrize("module_divergence", ["same", "reverse_kl"])
def test_okd_trains_with_other_student_divergences(tiny_setting, tmp_path, divergence, params, module_divergence):
    distiller = Distiller(
        **configs(tiny_setting, "okd", steps=25, divergence=divergence, divergence_params=params,
                  online=OnlineModuleConfig(divergence=module_divergence)),
        output_dir=str(tmp_path / "run"),
    )
    before = distiller.validate()
    distiller.train()
    after = distiller.validate()
    rows = _rows(tmp_path / "run")
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first, (first, last)
    assert after["validation_ce"] < before["validation_ce"]
    assert all(r["module_updated"] for r in rows)
