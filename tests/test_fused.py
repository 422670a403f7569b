"""Tests for okd.fused: the fused linear distillation loss equals the dense path.

Two references for every check:

* the dense path: logits = h @ W.T (+ b) for the whole batch, then okd.divergences' registry function
  and F.cross_entropy on the full float32 logits, combined as okd.training.DistillationLoss does, and
  torch autograd for the gradients;
* a float64 reference: the same formulas in float64 over the whole batch, with the per-token float64
  divergence references of tests/test_divergences.py (written from the formulas, independently of the
  implementation) and plain autograd.

Tolerances: the inputs are float32 with O(1) logits over a tiny vocabulary, so the only error is float32
rounding (matmuls over d = 8 and log-softmaxes over V <= 40): ~1e-7 relative on the values and on the
gradients, whose entries are O(1e-2). ``rtol = atol = 2e-6`` leaves a margin of ~10x over that while
a wrong weight, mask, temperature, padding cut or direction shows at the 1e-3 level or more.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from okd.divergences import get_divergence
from okd.fused import FusedLinearDistillationLoss, FusedLosses, fused_linear_distillation
from test_divergences import CASES as DIVERGENCE_CASES

CASES = [(name, params, ref) for name, params, _, ref in DIVERGENCE_CASES]
CASE_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in p.items()) or 'default'}" for n, p, _ in CASES]
IGNORE = -100
RTOL = ATOL = 2e-6


# ==================================================================================================
# Inputs and references
# ==================================================================================================


def make_inputs(*, vocab_s=37, vocab_t=37, d_s=8, d_t=6, lead=(2, 13), bias=True, masked=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(*lead, d_s, generator=g)
    w_s = torch.randn(vocab_s, d_s, generator=g) * 0.7
    b_s = torch.randn(vocab_s, generator=g) * 0.5 if bias else None
    h_t = torch.randn(*lead, d_t, generator=g)
    w_t = torch.randn(vocab_t, d_t, generator=g) * 0.8
    b_t = torch.randn(vocab_t, generator=g) * 0.5 if bias else None
    targets = torch.randint(0, vocab_s, lead, generator=g)
    mask = None
    if masked:
        targets.view(-1)[::5] = IGNORE  # positions without a target (prompt, padding)
        mask = torch.rand(lead, generator=g) > 0.25  # and a mask on top
    return {"h_s": h_s, "w_s": w_s, "b_s": b_s, "h_t": h_t, "w_t": w_t, "b_t": b_t, "targets": targets, "mask": mask}


def leaves(inputs, names):
    """Fresh leaf copies (requires_grad for `names`) so each path gets its own .grad."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().clone().requires_grad_(key in names)
        out[key] = value
    return out


def counted_mask(x):
    keep = x["targets"] != IGNORE
    return keep if x["mask"] is None else keep & x["mask"]


def call_fused(x, name, params, kd_ratio, temperature, module=None, chunk_tokens=5):
    return fused_linear_distillation(
        x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["targets"], x["mask"],
        student_bias=x["b_s"], teacher_bias=x["b_t"], divergence=name, divergence_params=params,
        kd_ratio=kd_ratio, temperature=temperature, chunk_tokens=chunk_tokens,
        module_ce_weight=None if module is None else module[0],
        module_student_weight=None if module is None else module[1],
    )


def dense(x, name, params, kd_ratio, temperature, module=None):
    """The dense path: full logits, okd.divergences, F.cross_entropy (float32)."""
    s = F.linear(x["h_s"], x["w_s"], x["b_s"])
    t = F.linear(x["h_t"], x["w_t"], x["b_t"])
    keep = counted_mask(x)
    targets = torch.where(keep, x["targets"], IGNORE)
    d = get_divergence(name, **params, temperature=temperature)
    v_s = s.shape[-1]
    if keep.any():
        ce = F.cross_entropy(s.reshape(-1, v_s), targets.reshape(-1), ignore_index=IGNORE)
    else:
        ce = s.sum() * 0.0
    kd = d(t.detach(), s, keep)
    loss = ce if kd_ratio == 0 else (kd if kd_ratio == 1 else (1 - kd_ratio) * ce + kd_ratio * kd)
    out = {"loss": loss, "ce": ce, "kd": kd}
    if module is not None:
        if keep.any():
            mce = F.cross_entropy(t.reshape(-1, t.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)
        else:
            mce = t.sum() * 0.0
        mdiv = d(s.detach(), t[..., :v_s], keep)  # the padding cut on the teacher (learner) side
        out.update(module_loss=module[0] * mce + module[1] * mdiv, module_ce=mce, module_divergence=mdiv)
    return out


def float64_reference(x, ref_fn, params, kd_ratio, temperature, module=None):
    """Same formulas in float64 with the independent per-token references."""
    x = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in x.items()}
    keep = counted_mask(x).reshape(-1)
    v_s = x["w_s"].shape[0]
    s = F.linear(x["h_s"], x["w_s"], x["b_s"]).reshape(-1, v_s)[keep]
    t = F.linear(x["h_t"], x["w_t"], x["b_t"]).reshape(-1, x["w_t"].shape[0])[keep]
    y = x["targets"].reshape(-1)[keep]
    m = keep.sum()

    def mean(v):
        return v.sum() / m if m > 0 else v.sum() * 0.0

    def ce_of(logits):
        logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        return mean(-logp.gather(1, y[:, None]).squeeze(1))

    ce = ce_of(s)
    kd = mean(ref_fn(t[:, :v_s].detach() / temperature, s / temperature, **params))
    out = {"loss": (1 - kd_ratio) * ce + kd_ratio * kd, "ce": ce, "kd": kd}
    if module is not None:
        mce = ce_of(t)
        mdiv = mean(ref_fn(s.detach() / temperature, t[:, :v_s] / temperature, **params))
        out.update(module_loss=module[0] * mce + module[1] * mdiv, module_ce=mce, module_divergence=mdiv)
    return out


def grads_of(x, total, names):
    total.backward()
    return {n: x[n].grad for n in names}


def assert_close(actual, expected, what):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def check_against_references(base, name, params, ref_fn, kd_ratio, temperature, module, student_names, chunk_tokens=5):
    names = list(student_names) + (["h_t"] if module is not None else [])
    x_f, x_d, x_r = leaves(base, names), leaves(base, names), leaves(base, names)
    fused = call_fused(x_f, name, params, kd_ratio, temperature, module, chunk_tokens)
    assert isinstance(fused, FusedLosses)
    ref_d = dense(x_d, name, params, kd_ratio, temperature, module)
    ref_r = float64_reference(x_r, ref_fn, params, kd_ratio, temperature, module)
    fields = ["loss", "ce"] + (["kd"] if kd_ratio > 0 else []) + (
        ["module_loss", "module_ce", "module_divergence"] if module is not None else []
    )
    for field in fields:
        value = getattr(fused, field)
        assert value.dtype == torch.float32 and value.dim() == 0
        assert_close(value, ref_d[field], f"{field} vs dense")
        assert_close(value, ref_r[field], f"{field} vs float64")
    if kd_ratio == 0:
        assert fused.kd is None
    if module is None:
        assert fused.module_loss is None

    def total(losses, module_key):
        return losses["loss"] + losses[module_key] if module is not None else losses["loss"]

    g_f = grads_of(x_f, fused.loss + fused.module_loss if module is not None else fused.loss, names)
    g_d = grads_of(x_d, total(ref_d, "module_loss"), names)
    g_r = grads_of(x_r, total(ref_r, "module_loss"), names)
    for n in names:
        assert g_f[n] is not None and g_f[n].shape == x_f[n].shape and g_f[n].dtype == x_f[n].dtype, n
        assert torch.isfinite(g_f[n]).all(), n
        assert_close(g_f[n], g_d[n], f"grad {n} vs dense")
        assert_close(g_f[n], g_r[n], f"grad {n} vs float64")
    return fused, g_f


# ==================================================================================================
# Equality with the dense path and the float64 reference
# ==================================================================================================


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kd_ratio", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True], ids=["all_count", "masked"])
def test_student_loss_matches_dense_and_float64(case, kd_ratio, temperature, masked):
    name, params, ref_fn = case
    base = make_inputs(masked=masked, vocab_t=40)  # teacher head padded by 3 rows: the cut
    check_against_references(base, name, params, ref_fn, kd_ratio, temperature, None, ["h_s", "w_s", "b_s"])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("vocab_t", [37, 40], ids=["same_vocab", "teacher_padded"])
def test_okd_module_loss_matches_dense_and_float64(case, temperature, vocab_t):
    """Both losses from one fused pass: the student's (grads into h_s, W_s, b_s) and the module's
    ce_weight CE(teacher) + student_weight D(student.detach() -> teacher) (grads into h_t only)."""
    name, params, ref_fn = case
    base = make_inputs(masked=True, vocab_t=vocab_t)
    check_against_references(base, name, params, ref_fn, 0.5, temperature, (0.3, 1.7), ["h_s", "w_s", "b_s"])


@pytest.mark.parametrize("kd_ratio", [0.0, 0.5, 1.0])
def test_no_bias_and_unbatched_shapes(kd_ratio):
    """[N, d] hidden states (loss positions gathered by the caller), no biases, no mask."""
    base = make_inputs(lead=(23,), bias=False, masked=False)
    check_against_references(base, "forward_kl", {}, CASES[0][2], kd_ratio, 1.0, (1.0, 1.0), ["h_s", "w_s"])


@pytest.mark.parametrize("chunk_tokens", [1, 4, 7, 26, 1000])
def test_result_does_not_depend_on_chunk_size(chunk_tokens):
    """Chunk sizes that do not divide the number of counted tokens, one token, more than all."""
    base = make_inputs(masked=True, vocab_t=40)
    check_against_references(
        base, "jsd", {"beta": 0.5}, CASES[3][2], 0.5, 2.0, (0.5, 1.0), ["h_s", "w_s", "b_s"], chunk_tokens
    )


def test_narrower_teacher_head_raises():
    """align_vocab's semantics: a teacher head with fewer rows than the student's cannot be cut."""
    x = make_inputs(vocab_s=37, vocab_t=30)
    with pytest.raises(ValueError, match="teacher vocab 30 < student vocab 37"):
        call_fused(x, "forward_kl", {}, 1.0, 1.0)


def test_padding_cut_ignores_the_extra_teacher_rows_in_the_divergence():
    """Changing the teacher's padded rows changes the teacher's CE but not the divergences."""
    x = make_inputs(vocab_t=40)
    a = call_fused(x, "reverse_kl", {}, 1.0, 1.0, module=(1.0, 1.0))
    x["w_t"][37:] = 5.0 * torch.randn(3, x["w_t"].shape[1])
    b = call_fused(x, "reverse_kl", {}, 1.0, 1.0, module=(1.0, 1.0))
    assert float(a.kd) == float(b.kd) and float(a.module_divergence) == float(b.module_divergence)
    assert float(a.module_ce) != float(b.module_ce)


# ==================================================================================================
# Tied heads: the gradient reaches the shared parameter through both uses
# ==================================================================================================


def _tiny_llama(tied: bool, vocab: int = 41):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float().eval()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_hf_student_tied_and_untied_head_gradients_match_dense(tied):
    """Hugging Face student: hidden states from model.model (the base model, final norm applied), head
    weight = model.get_output_embeddings().weight; every parameter's gradient equals the dense loss
    on model(...).logits, including the embedding matrix shared with the head when tied."""
    vocab = 41
    student = _tiny_llama(tied, vocab)
    teacher = _tiny_llama(False, vocab + 3)  # padded teacher head
    if tied:
        assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 9), generator=g)
    labels = ids.clone()
    labels[:, :3] = IGNORE  # prompt
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    mask = targets != IGNORE
    with torch.no_grad():
        t_hidden = teacher.model(input_ids=ids).last_hidden_state
        t_logits = teacher(input_ids=ids).logits
    w_t = teacher.get_output_embeddings().weight

    # dense
    student.zero_grad()
    logits = student(input_ids=ids).logits
    ce = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), ignore_index=IGNORE)
    kd = get_divergence("forward_kl", temperature=2.0)(t_logits, logits, mask)
    (0.5 * ce + 0.5 * kd).backward()
    dense_grads = {n: p.grad.clone() for n, p in student.named_parameters()}

    # fused, on the gathered loss positions
    student.zero_grad()
    hidden = student.model(input_ids=ids).last_hidden_state
    head = student.get_output_embeddings()
    out = fused_linear_distillation(
        hidden[mask], head.weight, t_hidden[mask], w_t, targets[mask], kd_ratio=0.5, temperature=2.0, chunk_tokens=4,
        student_bias=head.bias,
    )
    out.loss.backward()
    for n, p in student.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, dense_grads[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
    embedding_grad = student.get_input_embeddings().weight.grad
    assert embedding_grad.abs().sum() > 0


def test_okd_adapter_gradient_reaches_the_module_before_the_frozen_head():
    """OKD: h_t = adapter(teacher body), head frozen; the module's gradient from the fused pass equals
    the dense module loss's."""
    from okd.teacher import ResidualAdapter

    torch.manual_seed(0)
    x = make_inputs(vocab_t=40, d_t=6, bias=False)
    adapter = ResidualAdapter(6, 4)
    torch.nn.init.normal_(adapter.up.weight, std=0.3)  # not the identity, so every weight gets a gradient
    results = []
    for path in ("fused", "dense"):
        adapter.zero_grad()
        h_t = adapter(x["h_t"])
        y = dict(x, h_t=h_t)
        if path == "fused":
            out = call_fused(y, "adaptive_kl", {"mu": 0.5}, 1.0, 1.0, module=(0.5, 1.0))
            (out.loss + out.module_loss).backward()
        else:
            out = dense(y, "adaptive_kl", {"mu": 0.5}, 1.0, 1.0, module=(0.5, 1.0))
            (out["loss"] + out["module_loss"]).backward()
        results.append([p.grad.clone() for p in adapter.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
        assert a.abs().sum() > 0


# ==================================================================================================
# Edge cases
# ==================================================================================================


@pytest.mark.parametrize("how", ["mask", "targets"])
def test_no_counted_token_gives_zero_and_zero_gradients(how):
    x = leaves(make_inputs(masked=False), ["h_s", "w_s", "b_s", "h_t"])
    if how == "mask":
        x["mask"] = torch.zeros(x["targets"].shape, dtype=torch.bool)
    else:
        x["targets"] = torch.full_like(x["targets"], IGNORE)
    out = call_fused(x, "jsd", {"beta": 0.5}, 0.5, 2.0, module=(1.0, 1.0))
    for field in ("loss", "ce", "kd", "module_loss", "module_ce", "module_divergence"):
        assert float(getattr(out, field).detach()) == 0.0
    (out.loss + out.module_loss).backward()
    for n in ("h_s", "w_s", "b_s", "h_t"):
        assert x[n].grad is not None and torch.equal(x[n].grad, torch.zeros_like(x[n])), n


def test_uncounted_positions_are_never_read():
    """Hidden states at positions that do not count (here NaN) change nothing and get zero gradient."""
    base = make_inputs(masked=True)
    keep = counted_mask(base)
    clean = leaves(base, ["h_s"])
    dirty = leaves(base, ["h_s"])
    with torch.no_grad():
        dirty["h_s"][~keep] = float("nan")
        dirty["h_t"][~keep] = float("nan")
    a = call_fused(clean, "forward_kl", {}, 0.5, 1.0)
    b = call_fused(dirty, "forward_kl", {}, 0.5, 1.0)
    assert float(a.loss) == float(b.loss)
    a.loss.backward()
    b.loss.backward()
    assert torch.equal(a_grad := clean["h_s"].grad, dirty["h_s"].grad)
    assert torch.equal(a_grad[~keep], torch.zeros_like(a_grad[~keep]))


def test_gradient_is_scaled_by_the_incoming_gradient():
    """The loop backwards loss * token_share: the buffers are scaled by grad_output."""
    base = make_inputs()
    x1, x3 = leaves(base, ["h_s", "w_s", "h_t"]), leaves(base, ["h_s", "w_s", "h_t"])
    o1 = call_fused(x1, "reverse_kl", {}, 0.5, 1.0, module=(1.0, 1.0))
    (o1.loss + o1.module_loss).backward()
    o3 = call_fused(x3, "reverse_kl", {}, 0.5, 1.0, module=(1.0, 1.0))
    (3.0 * o3.loss + 0.5 * o3.module_loss).backward()
    torch.testing.assert_close(x3["h_s"].grad, 3.0 * x1["h_s"].grad)
    torch.testing.assert_close(x3["w_s"].grad, 3.0 * x1["w_s"].grad)
    torch.testing.assert_close(x3["h_t"].grad, 0.5 * x1["h_t"].grad)


def test_student_loss_alone_gives_zero_module_gradient():
    x = leaves(make_inputs(), ["h_s", "h_t"])
    out = call_fused(x, "forward_kl", {}, 1.0, 1.0, module=(1.0, 1.0))
    out.loss.backward()
    assert torch.equal(x["h_t"].grad, torch.zeros_like(x["h_t"]))
    assert x["h_s"].grad.abs().sum() > 0


def test_only_inputs_that_require_grad_get_one_and_no_grad_mode_works():
    x = leaves(make_inputs(), ["h_s"])
    out = call_fused(x, "tvd", {}, 0.5, 1.0)
    out.loss.backward()
    assert x["h_s"].grad is not None and x["w_s"].grad is None and x["b_s"].grad is None
    with torch.no_grad():
        values = call_fused(leaves(make_inputs(), ["h_s", "w_s"]), "tvd", {}, 0.5, 1.0)
    assert not values.loss.requires_grad
    assert float(values.loss) == pytest.approx(float(out.loss), rel=1e-6)


def test_backward_twice_raises_clear_error():
    x = leaves(make_inputs(), ["h_s"])
    out = call_fused(x, "forward_kl", {}, 1.0, 1.0)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        out.loss.backward()


def test_frozen_teacher_head_is_required_for_the_module_loss():
    x = leaves(make_inputs(), ["h_t", "w_t"])
    with pytest.raises(ValueError, match="teacher_weight requires grad"):
        call_fused(x, "forward_kl", {}, 1.0, 1.0, module=(1.0, 1.0))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x: x.update(w_s=x["w_s"][:, :5]), "must share d"),
        (lambda x: x.update(mask=x["mask"][:, :4]), "mask must have"),
        (lambda x: x.update(targets=x["targets"].float()), "targets must be int64"),
        (lambda x: x.update(h_t=x["h_t"][:1]), "teacher_hidden must be"),
        (lambda x: x.update(b_s=x["b_s"][:3]), "student_bias must have shape"),
    ],
)
def test_bad_input_is_named(change, message):
    x = make_inputs()
    change(x)
    with pytest.raises(ValueError, match=message):
        call_fused(x, "forward_kl", {}, 0.5, 1.0)


def test_bad_settings_are_named():
    x = make_inputs()
    with pytest.raises(ValueError, match="unknown divergence 'fkl'"):
        call_fused(x, "fkl", {}, 0.5, 1.0)
    with pytest.raises(ValueError, match="kd_ratio"):
        call_fused(x, "forward_kl", {}, 1.5, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        call_fused(x, "forward_kl", {}, 0.5, 0.0)
    with pytest.raises(ValueError, match="both module_ce_weight"):
        fused_linear_distillation(x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["targets"], module_ce_weight=1.0)
    with pytest.raises(ValueError, match="targets are needed"):
        fused_linear_distillation(x["h_s"], x["w_s"], x["h_t"], x["w_t"], None, kd_ratio=0.5)
    with pytest.raises(ValueError, match="teacher_hidden and teacher_weight are needed"):
        fused_linear_distillation(x["h_s"], x["w_s"], None, None, x["targets"], kd_ratio=0.5)


def test_plain_fine_tuning_needs_no_teacher():
    base = make_inputs()
    x_f, x_d = leaves(base, ["h_s", "w_s"]), leaves(base, ["h_s", "w_s"])
    out = fused_linear_distillation(x_f["h_s"], x_f["w_s"], None, None, x_f["targets"], x_f["mask"], kd_ratio=0.0,
                                    student_bias=x_f["b_s"], chunk_tokens=3)
    ref = dense(x_d, "forward_kl", {}, 0.0, 1.0)
    assert out.kd is None
    assert_close(out.loss, ref["loss"], "sft loss")
    out.loss.backward()
    ref["loss"].backward()
    assert_close(x_f["w_s"].grad, x_d["w_s"].grad, "sft grad W")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_heads(dtype):
    """Half-precision hidden states and heads: results close to the float32 fused loss, grads in the
    inputs' dtype (W's gradient is accumulated in float32 and rounded once)."""
    base = make_inputs()
    x32 = leaves(base, ["h_s", "w_s"])
    xlow = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in base.items()}
    xlow = leaves(xlow, ["h_s", "w_s"])
    a = call_fused(x32, "forward_kl", {}, 0.5, 1.0)
    b = call_fused(xlow, "forward_kl", {}, 0.5, 1.0)
    assert b.loss.dtype == torch.float32
    assert float(b.loss) == pytest.approx(float(a.loss), rel=3e-2)
    a.loss.backward()
    b.loss.backward()
    assert xlow["w_s"].grad.dtype == dtype and xlow["h_s"].grad.dtype == dtype
    torch.testing.assert_close(xlow["w_s"].grad.float(), x32["w_s"].grad, rtol=5e-2, atol=5e-3)


def test_loss_object_from_method_config():
    from okd.config import MethodConfig, OnlineModuleConfig, resolve_method

    method = resolve_method(MethodConfig(name="jsd", temperature=2.0, kd_ratio=0.5))
    online = OnlineModuleConfig()
    loss_fn = FusedLinearDistillationLoss.from_method(method, online, chunk_tokens=5)
    x = make_inputs()
    with_module = loss_fn(x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["targets"], x["mask"],
                          student_bias=x["b_s"], teacher_bias=x["b_t"], update_module=True)
    without = loss_fn(x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["targets"], x["mask"],
                      student_bias=x["b_s"], teacher_bias=x["b_t"])
    direct = call_fused(x, "jsd", {"beta": 0.5}, 0.5, 2.0, module=(online.ce_weight, online.student_weight))
    assert without.module_loss is None
    for field in ("loss", "ce", "kd", "module_loss", "module_ce", "module_divergence"):
        assert float(getattr(with_module, field)) == float(getattr(direct, field))
    assert float(without.loss) == float(direct.loss)
    assert set(with_module.as_floats()) == {"loss", "ce", "kd", "module_loss", "module_ce", "module_divergence", "module_accuracy"}
    with pytest.raises(ValueError, match="has no parameter"):
        FusedLinearDistillationLoss("jsd", {"alpha": 0.1})
    assert math.isfinite(float(direct.loss))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_okd_module_with_its_own_divergence_matches_dense_and_float64(case, temperature):
    """OKD's ``online.divergence`` other than the student's: the student keeps forward KL, the module's
    D(student.detach() -> teacher) is ``case``'s divergence (values and h_t's gradient vs both references)."""
    name, params, ref_fn = case
    student_name, student_params, student_ref = next(c for c in CASES if c[0] == "forward_kl")
    base = make_inputs(masked=True, vocab_t=40)
    x_f, x_d, x_r = (leaves(base, ["h_s", "w_s", "h_t"]) for _ in range(3))
    fused = fused_linear_distillation(
        x_f["h_s"], x_f["w_s"], x_f["h_t"], x_f["w_t"], x_f["targets"], x_f["mask"],
        student_bias=x_f["b_s"], teacher_bias=x_f["b_t"], divergence=student_name, divergence_params=student_params,
        kd_ratio=0.5, temperature=temperature, chunk_tokens=5, module_ce_weight=0.3, module_student_weight=1.7,
        module_divergence=name, module_divergence_params=params,
    )
    student_d = dense(x_d, student_name, student_params, 0.5, temperature)
    module_d = dense(x_d, name, params, 0.5, temperature, module=(0.3, 1.7))
    student_r = float64_reference(x_r, student_ref, student_params, 0.5, temperature)
    module_r = float64_reference(x_r, ref_fn, params, 0.5, temperature, module=(0.3, 1.7))
    for field, d, r in (("loss", student_d, student_r), ("kd", student_d, student_r),
                        ("module_loss", module_d, module_r), ("module_divergence", module_d, module_r)):
        assert_close(getattr(fused, field), d[field], f"{field} vs dense")
        assert_close(getattr(fused, field), r[field], f"{field} vs float64")
    g_f = grads_of(x_f, fused.loss + fused.module_loss, ["h_s", "w_s", "h_t"])
    g_d = grads_of(x_d, student_d["loss"] + module_d["module_loss"], ["h_s", "w_s", "h_t"])
    g_r = grads_of(x_r, student_r["loss"] + module_r["module_loss"], ["h_s", "w_s", "h_t"])
    for n in ("h_s", "w_s", "h_t"):
        assert_close(g_f[n], g_d[n], f"grad {n} vs dense")
        assert_close(g_f[n], g_r[n], f"grad {n} vs float64")


def test_module_divergence_from_the_online_config():
    from okd.config import MethodConfig, OnlineModuleConfig, resolve_method

    method = resolve_method(MethodConfig(name="okd"))
    own = FusedLinearDistillationLoss.from_method(method, OnlineModuleConfig(divergence="jsd", divergence_params={"beta": 0.3}))
    same = FusedLinearDistillationLoss.from_method(method, OnlineModuleConfig(divergence="same"))
    assert (own.module_divergence, own.module_divergence_params) == ("jsd", {"beta": 0.3})
    assert same.module_divergence is None
    default = FusedLinearDistillationLoss.from_method(method, OnlineModuleConfig())  # the okd preset's: JSD
    assert (default.module_divergence, default.module_divergence_params) == ("jsd", {})
    x = make_inputs()
    args = (x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["targets"], x["mask"])
    a = own(*args, student_bias=x["b_s"], teacher_bias=x["b_t"], update_module=True)
    b = same(*args, student_bias=x["b_s"], teacher_bias=x["b_t"], update_module=True)
    assert float(a.loss) == float(b.loss)  # the student's loss does not depend on the module's divergence
    assert float(a.module_divergence) != float(b.module_divergence)
    with pytest.raises(ValueError, match="has no parameter"):
        FusedLinearDistillationLoss(module_divergence="jsd", module_divergence_params={"alpha": 0.1})
