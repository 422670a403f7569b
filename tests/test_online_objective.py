"""okd.online.objective: the module's loss (direction, anchor), the student's target (mix), the module's
schedule and delayed start, and the adapted-teacher metrics, against float64 references and formulas."""

from __future__ import annotations

import math

import pytest
import torch

from okd.config import OnlineModuleConfig
from okd.online.objective import (
    AdaptedTeacherMetrics,
    ModuleSchedule,
    OnlineObjective,
    anchor_weight_at,
    mix_logits,
    module_lr_factor,
    module_updates_at,
)

B, T, V = 2, 5, 7


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g) * 2
    teacher = torch.randn(B, T, V, generator=g) * 2
    frozen = torch.randn(B, T, V, generator=g) * 2
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :2] = -100  # prompt tokens
    targets[1, -1] = -100
    return student, teacher, frozen, targets


def _kl64(a_logits, b_logits):
    """Per-token KL(softmax(a) || softmax(b)), float64, [B, T]."""
    la, lb = a_logits.double().log_softmax(-1), b_logits.double().log_softmax(-1)
    return (la.exp() * (la - lb)).sum(-1)


def _jsd64(p_logits, q_logits, beta):
    """Per-token b KL(p || m) + (1 - b) KL(q || m), m = b p + (1 - b) q, float64."""
    p, q = p_logits.double().softmax(-1), q_logits.double().softmax(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)


def _ce64(logits, targets):
    mask = targets != -100
    logp = logits.double().log_softmax(-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum() / mask.sum()


def _masked_mean(per_token, targets):
    mask = targets != -100
    return (per_token * mask).sum() / mask.sum()


REFERENCES = {
    # online.divergence -> D(q -> p_phi) per token, q the detached student, p_phi the adapted teacher
    "forward_kl": lambda q, p_phi: _kl64(q, p_phi),  # KL(q || p_phi)
    "reverse_kl": lambda q, p_phi: _kl64(p_phi, q),  # KL(p_phi || q)
    "jsd": lambda q, p_phi: _jsd64(q, p_phi, 0.3),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize("anchor", [0.0, 0.7])
def test_module_loss_matches_float64_reference_values_and_gradients(name, anchor):
    student, teacher, frozen, targets = _inputs()
    params = {"beta": 0.3} if name == "jsd" else None
    config = OnlineModuleConfig(divergence=name, divergence_params=params, ce_weight=0.5, student_weight=2.0, anchor_weight=anchor)
    objective = OnlineObjective(config, "forward_kl", {}, total_steps=10)
    teacher_leaf = teacher.clone().requires_grad_(True)
    student_leaf = student.clone().requires_grad_(True)
    out = objective(student_leaf, teacher_leaf, frozen, targets, step=3)
    out.loss.backward()

    teacher64 = teacher.double().requires_grad_(True)
    div = _masked_mean(REFERENCES[name](student.double(), teacher64), targets)
    kl0 = _masked_mean(_kl64(frozen, teacher64), targets)
    reference = 0.5 * _ce64(teacher64, targets) + 2.0 * div + anchor * kl0
    reference.backward()
    assert float(out.divergence.detach()) == pytest.approx(float(div.detach()), rel=1e-5)
    assert float(out.anchor.detach()) == pytest.approx(float(kl0.detach()), rel=1e-5)  # logged even at weight 0
    assert float(out.loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    torch.testing.assert_close(teacher_leaf.grad.double(), teacher64.grad, rtol=1e-4, atol=1e-6)
    assert student_leaf.grad is None  # the module's loss never moves the student


def test_same_is_the_methods_divergence_with_roles_swapped():
    student, teacher, frozen, targets = _inputs(1)
    for method, params in (("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.2})):
        same = OnlineObjective(OnlineModuleConfig(divergence="same"), method, params)(student, teacher, None, targets, 1)
        named = OnlineObjective(OnlineModuleConfig(divergence=method, divergence_params=params or None), "tvd")(
            student, teacher, None, targets, 1
        )
        assert torch.equal(same.divergence, named.divergence), method
    # okd's preset (forward KL): "same" is KL(q || p_phi), the mass-covering direction.
    same = OnlineObjective(OnlineModuleConfig(divergence="same"), "forward_kl", {})(student, teacher, None, targets, 1)
    assert float(same.divergence) == pytest.approx(float(_masked_mean(_kl64(student, teacher), targets)), rel=1e-5)


def test_the_default_module_divergence_is_the_generalized_jsd_with_beta_one_half():
    """The design study's choice (docs/results/okd_design.md): D(q -> p_phi) = JSD_0.5, whatever the
    method's own divergence, i.e. benchmarks/okd_design.py's okd_jsd variant."""
    student, teacher, frozen, targets = _inputs(1)
    default = OnlineObjective(OnlineModuleConfig(), "forward_kl", {})(student, teacher, None, targets, 1)
    jsd = OnlineObjective(OnlineModuleConfig(divergence="jsd", divergence_params={"beta": 0.5}), "reverse_kl", {})(
        student, teacher, None, targets, 1
    )
    assert torch.equal(default.divergence, jsd.divergence)
    assert not torch.equal(default.divergence, OnlineObjective(OnlineModuleConfig(divergence="same"), "forward_kl", {})(
        student, teacher, None, targets, 1).divergence)


def test_anchor_schedule_constant_and_linear_decay():
    constant = OnlineModuleConfig(anchor_weight=2.0)
    linear = OnlineModuleConfig(anchor_weight=2.0, anchor_schedule="linear")
    for step in (1, 25, 100):
        assert anchor_weight_at(constant, step, 100) == 2.0
        assert anchor_weight_at(linear, step, 100) == pytest.approx(2.0 * (1 - step / 100))
    assert anchor_weight_at(linear, 100, 100) == 0.0
    # The objective uses the scheduled weight.
    student, teacher, frozen, targets = _inputs()
    objective = OnlineObjective(linear, "forward_kl", total_steps=100)
    a, b = objective(student, teacher, frozen, targets, 25), objective(student, teacher, frozen, targets, 100)
    assert float(a.loss - b.loss) == pytest.approx(1.5 * float(a.anchor), rel=1e-5)
    with pytest.raises(ValueError, match="anchor_weight"):
        objective(student, teacher, None, targets, 25)


def test_needs_frozen_only_for_anchor_on_update_steps_and_for_the_mix():
    objective = lambda **kw: OnlineObjective(OnlineModuleConfig(**kw), "forward_kl")  # noqa: E731
    assert not objective().needs_frozen(True)
    assert objective(anchor_weight=1.0).needs_frozen(True) and not objective(anchor_weight=1.0).needs_frozen(False)
    assert objective(teacher_mix=0.5).needs_frozen(False)


@pytest.mark.parametrize("mix", [0.0, 0.25, 1.0])
def test_teacher_mix_is_a_probability_space_mixture(mix):
    _, teacher, frozen, _ = _inputs(2)
    mixed = mix_logits(teacher, frozen, mix)
    expected = (1 - mix) * teacher.double().softmax(-1) + mix * frozen.double().softmax(-1)
    torch.testing.assert_close(mixed.double().exp(), expected, rtol=1e-5, atol=1e-7)
    objective = OnlineObjective(OnlineModuleConfig(teacher_mix=mix), "forward_kl")
    target = objective.student_target(teacher, frozen)
    if mix == 0:
        assert target is teacher  # p_phi unchanged when there is no teacher mix
    else:
        torch.testing.assert_close(target.double().softmax(-1), expected, rtol=1e-5, atol=1e-7)


def test_module_updates_only_after_start_step_and_every_k():
    config = OnlineModuleConfig(update_every=3, start_step=6)  # step 6 itself: no update
    assert [s for s in range(1, 20) if module_updates_at(config, s)] == [9, 12, 15, 18]
    assert [s for s in range(1, 8) if module_updates_at(OnlineModuleConfig(), s)] == list(range(1, 8))


def test_module_learning_rate_schedules_follow_their_formulas():
    total, start, warm = 110, 10, 4
    horizon = total - start - warm
    for name, formula in (
        ("constant", lambda p: 1.0),
        ("linear", lambda p: 1.0 - p),
        ("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p))),
    ):
        config = OnlineModuleConfig(learning_rate=0.01, lr_scheduler=name, warmup_steps=warm, start_step=start)
        # Warm-up on the first updating steps 11..14: 1/4, 2/4, 3/4, 4/4.
        assert [module_lr_factor(config, s, total) for s in range(11, 15)] == [0.25, 0.5, 0.75, 1.0]
        for step in (15, 40, 80, 110):
            progress = (step - start - 1 - warm) / horizon
            assert module_lr_factor(config, step, total) == pytest.approx(formula(progress)), (name, step)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        ModuleSchedule(config, total).apply(optimizer, 40)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * formula((40 - start - 1 - warm) / horizon))


def test_adapted_teacher_metrics_identity_and_reference():
    _, teacher, frozen, targets = _inputs(3)
    metrics = AdaptedTeacherMetrics()
    metrics.update(frozen, frozen, targets)  # an identity module: p_phi == p_0
    result = metrics.result()
    assert result["validation_teacher_kl_from_frozen"] == 0.0
    assert result["validation_teacher_ce"] == result["validation_frozen_teacher_ce"]
    metrics = AdaptedTeacherMetrics()
    metrics.update(teacher[:1], frozen[:1], targets[:1])
    metrics.update(teacher[1:], frozen[1:], targets[1:])
    result = metrics.result()
    mask = targets != -100
    assert result["validation_teacher_ce"] == pytest.approx(float(_ce64(teacher, targets)), rel=1e-5)
    assert result["validation_teacher_kl_from_frozen"] == pytest.approx(float(_masked_mean(_kl64(frozen, teacher), targets)), rel=1e-5)
    accuracy = float(((teacher.argmax(-1) == targets) & mask).sum() / mask.sum())
    assert result["validation_teacher_accuracy"] == pytest.approx(accuracy)


@pytest.mark.parametrize(
    "field, value",
    [
        ("divergence", "kl"),
        ("anchor_weight", -1.0),
        ("anchor_schedule", "cosine"),
        ("teacher_mix", 1.5),
        ("start_step", -1),
        ("warmup_steps", -2),
        ("lr_scheduler", "step"),
        ("lora_top_layers", -1),
        ("learning_rate", -1e-3),
    ],
)
def test_bad_online_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"online.{field}") as error:
        OnlineModuleConfig(**{field: value})
    assert "\n" not in str(error.value)


def test_divergence_params_need_a_named_divergence_and_valid_values():
    with pytest.raises(ValueError, match="online.divergence_params"):
        OnlineModuleConfig(divergence="same", divergence_params={"beta": 0.5})
    with pytest.raises(ValueError, match="online.divergence.*beta"):
        OnlineObjective(OnlineModuleConfig(divergence="jsd", divergence_params={"beta": 2.0}), "forward_kl")
