"""Tests for okd.divergences.

The implementation works in float32, chunk by chunk, with a hand-written autograd Function. It is
checked against references written here from the formulas, in float64, over the whole tensor, with a
different technique for the 0 * log 0 terms (boolean indexing instead of torch.where / finite
stand-ins) and with plain torch autograd for the gradients. None of the implementation's helpers are used.

Tolerances. Inputs are float32, so the float64 reference sees the exact same numbers; the only error
is float32 rounding inside the implementation. A log-probability ``x - logsumexp(x)`` of magnitude L
carries an absolute error of a few ulps of L (unit roundoff u = 6e-8), and a per-token divergence is a
probability-weighted sum of such terms, so its error is a few ulps of the typical |log-prob| and of the
value: about 1e-6 absolute for the N(0, 2^2) logits used here (divergences of a few nats), and about
1e-7 *relative* for the +-1e4 logits (the divergence itself is ~1e4 and one rounding of a log-prob near
1e4 is ~5e-4 absolute). Hence the combined criterion ``|actual - expected| <= 1e-6 + 1e-6 * |expected|``
(torch.testing's atol + rtol form). The largest error measured over the whole reference matrix is 0.3
of that tolerance, while real bugs (a wrong sign, mask, mixture weight or head/tail rule) show at the
1e-3 level or more.
"""

from __future__ import annotations

import math

import pytest
import torch

from okd.divergences import (
    DIVERGENCES,
    adaptive_kl,
    align_vocab,
    forward_kl,
    generalized_jsd,
    get_divergence,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    total_variation,
)

NEG_INF = float("-inf")

# ==================================================================================================
# float64 references: one function per divergence, [N, V] logits -> [N] per-token values
# ==================================================================================================


def ref_log_probs(x: torch.Tensor) -> torch.Tensor:
    """log softmax in float64, written out: x - max - log(sum(exp(x - max)))."""
    x = x.double()
    shift = x.max(dim=-1, keepdim=True).values
    return x - shift - torch.log(torch.exp(x - shift).sum(dim=-1, keepdim=True))


def ref_kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum over entries with a > 0 of a (log a - log b), per row. Entries with a == 0 are skipped."""
    a = log_a.exp()
    keep = a > 0
    terms = torch.zeros_like(log_a)
    terms[keep] = a[keep] * (log_a[keep] - log_b[keep])
    return terms.sum(dim=-1)


def ref_kl_to_mixture(log_a: torch.Tensor, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """KL(a || m) per row, with m given as probabilities (float64 is exact enough for mixtures)."""
    keep = a > 0
    terms = torch.zeros_like(a)
    terms[keep] = a[keep] * (log_a[keep] - torch.log(m[keep]))
    return terms.sum(dim=-1)


def ref_forward_kl(t, s):
    return ref_kl_rows(ref_log_probs(t), ref_log_probs(s))


def ref_reverse_kl(t, s):
    return ref_kl_rows(ref_log_probs(s), ref_log_probs(t))


def ref_tvd(t, s):
    return 0.5 * (ref_log_probs(t).exp() - ref_log_probs(s).exp()).abs().sum(dim=-1)


def ref_jsd(t, s, beta=0.5, scaled=False):
    if beta == 0:
        return ref_forward_kl(t, s)
    if beta == 1:
        return ref_reverse_kl(t, s)
    lp, lq = ref_log_probs(t), ref_log_probs(s)
    p, q = lp.exp(), lq.exp()
    m = beta * p + (1 - beta) * q
    value = beta * ref_kl_to_mixture(lp, p, m) + (1 - beta) * ref_kl_to_mixture(lq, q, m)
    return value / (beta * (1 - beta)) if scaled else value


def ref_skew_kl(t, s, alpha=0.1):
    lp, lq = ref_log_probs(t), ref_log_probs(s)
    p, q = lp.exp(), lq.exp()
    return ref_kl_to_mixture(lp, p, alpha * p + (1 - alpha) * q)


def ref_skew_reverse_kl(t, s, alpha=0.1):
    lp, lq = ref_log_probs(t), ref_log_probs(s)
    p, q = lp.exp(), lq.exp()
    return ref_kl_to_mixture(lq, q, (1 - alpha) * p + alpha * q)


def ref_akl_head_weight(p: torch.Tensor, q: torch.Tensor, mu: float) -> torch.Tensor:
    """Without sorting: token v is head iff the teacher mass on tokens strictly more likely than v is
    < mu, or v is a most likely token. Weight on forward KL = head gap / (head gap + tail gap)."""
    p, q = p.detach(), q.detach()
    weights = []
    for p_row, q_row in zip(p, q):
        more_likely = p_row[None, :] > p_row[:, None]  # [V, V]: entry (v, u) = p_u > p_v
        mass_before = (more_likely * p_row[None, :]).sum(dim=1)
        head = (mass_before < mu) | (p_row == p_row.max())
        gap = (p_row - q_row).abs()
        g_head, g_tail = gap[head].sum(), gap[~head].sum()
        weights.append(torch.tensor(0.5, dtype=p.dtype) if g_head + g_tail == 0 else g_head / (g_head + g_tail))
    return torch.stack(weights) if weights else torch.zeros(0, dtype=p.dtype)


def ref_akl(t, s, mu=0.5):
    lp, lq = ref_log_probs(t), ref_log_probs(s)
    w = ref_akl_head_weight(lp.exp(), lq.exp(), mu)
    return w * ref_kl_rows(lp, lq) + (1 - w) * ref_kl_rows(lq, lp)


def trl_style_gjsd(t, s, beta):
    """TRL's generalized_jsd_loss convention, re-implemented from its formula in float64 (finite logits):
    mixture in log space by logsumexp, KL via kl_div(log_target=True), beta = 0 / 1 special-cased."""
    lp = torch.log_softmax(t.double(), dim=-1)
    lq = torch.log_softmax(s.double(), dim=-1)
    kl = torch.nn.functional.kl_div  # kl_div(input, target) = sum target * (target - input) = KL(target || input)
    if beta == 0:
        return kl(lq, lp, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return kl(lp, lq, reduction="none", log_target=True).sum(-1)
    log_m = torch.logsumexp(torch.stack([lq + math.log(1 - beta), lp + math.log(beta)]), dim=0)
    kl_teacher = kl(log_m, lp, reduction="none", log_target=True).sum(-1)
    kl_student = kl(log_m, lq, reduction="none", log_target=True).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


# (registry name, params, implementation, reference) for every divergence and interesting parameters.
CASES = [
    ("forward_kl", {}, forward_kl, ref_forward_kl),
    ("reverse_kl", {}, reverse_kl, ref_reverse_kl),
    ("tvd", {}, total_variation, ref_tvd),
    ("jsd", {"beta": 0.5}, generalized_jsd, ref_jsd),
    ("jsd", {"beta": 0.1}, generalized_jsd, ref_jsd),
    ("jsd", {"beta": 0.9, "scaled": True}, generalized_jsd, ref_jsd),
    ("skew_kl", {"alpha": 0.1}, skew_kl, ref_skew_kl),
    ("skew_reverse_kl", {"alpha": 0.1}, skew_reverse_kl, ref_skew_reverse_kl),
    ("skew_kl", {"alpha": 0.6}, skew_kl, ref_skew_kl),
    ("adaptive_kl", {"mu": 0.5}, adaptive_kl, ref_akl),
    ("adaptive_kl", {"mu": 0.8}, adaptive_kl, ref_akl),
]
CASE_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in params.items()) or 'default'}" for name, params, _, _ in CASES]


def ref_reduce(per_token: torch.Tensor, mask, lead_shape, reduction: str) -> torch.Tensor:
    """Apply the documented reduction to float64 per-token values [N]."""
    keep = torch.ones(per_token.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    if reduction == "none":
        return torch.where(keep, per_token, torch.zeros_like(per_token)).reshape(lead_shape)
    total = per_token[keep].sum()
    if reduction == "sum":
        return total
    return total / keep.sum() if keep.any() else total * 0.0


def reference_per_token(ref_fn, t, s, params, temperature=1.0):
    vocab = s.shape[-1]
    t2 = t[..., :vocab].reshape(-1, vocab).double() / temperature
    s2 = s.reshape(-1, vocab).double() / temperature
    return ref_fn(t2, s2, **params)


def reference(ref_fn, t, s, mask, params, reduction, temperature=1.0):
    per_token = reference_per_token(ref_fn, t, s, params, temperature)
    return ref_reduce(per_token, mask, s.shape[:-1], reduction)


# ==================================================================================================
# Inputs
# ==================================================================================================

SHAPES = [(2, 3, 11), (4, 17, 50), (1, 1, 7), (3, 5, 1000)]
KINDS = ["random", "masked", "extreme", "padded_vocab"]


def make_inputs(shape, kind, seed=0):
    """fp32 teacher/student logits and a mask (or None) for one test scenario."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen) * 2.0
    s = torch.randn(shape, generator=gen) * 2.0
    lead = shape[:-1]
    mask = None
    if kind in ("masked", "extreme", "padded_vocab"):
        mask = torch.rand(lead, generator=gen) < 0.6
        mask.reshape(-1)[0] = True  # keep at least one token
        if lead[0] > 1:
            mask[-1] = False  # a fully masked row (whole sequence of the last batch element)
    if kind == "extreme":
        for x in (t, s):
            where = torch.rand(shape, generator=gen) < 0.1
            signs = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
            x[where] = 1.0e4 * signs[where]
    if kind == "padded_vocab":
        n_pad = 2 if shape[-1] < 20 else 5
        t[..., -n_pad:] = NEG_INF
        s[..., -n_pad:] = NEG_INF
    return t, s, mask


def close(actual, expected, rtol=1e-6, atol=1e-6):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=False)


# ==================================================================================================
# Against the float64 references
# ==================================================================================================


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS)
def test_matches_float64_reference(case, shape, kind):
    _, params, fn, ref_fn = case
    t, s, mask = make_inputs(shape, kind, seed=10 * SHAPES.index(shape) + KINDS.index(kind))
    per_token = reference_per_token(ref_fn, t, s, params)
    for reduction in ("mean", "sum", "none"):
        # chunk_tokens=4 forces several chunks (and a ragged last one) on every shape but [1, 1, 7].
        out = fn(t, s, mask, chunk_tokens=4, reduction=reduction, **params)
        expected = ref_reduce(per_token, mask, shape[:-1], reduction)
        assert out.dtype == torch.float32
        assert out.shape == expected.shape
        assert torch.isfinite(out).all()
        close(out, expected)
    if mask is not None:  # masked positions are exactly zero in "none"
        per_token = fn(t, s, mask, reduction="none", **params)
        assert (per_token[~mask] == 0).all()


@pytest.mark.parametrize("shape", [(2, 3, 11), (3, 5, 1000)], ids=lambda s: "x".join(map(str, s)))
def test_temperature_matches_reference(shape):
    t, s, mask = make_inputs(shape, "masked", seed=3)
    for _, params, fn, ref_fn in CASES:
        close(fn(t, s, mask, temperature=3.0, **params), reference(ref_fn, t, s, mask, params, "mean", 3.0))


# ==================================================================================================
# Gradients
# ==================================================================================================

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradients_match_float64_reference(case, kind, reduction):
    _, params, fn, ref_fn = case
    t, s, mask = make_inputs((3, 5, 50), kind, seed=11)
    t.requires_grad_(True)
    s.requires_grad_(True)
    out = fn(t, s, mask, chunk_tokens=4, reduction=reduction, **params)
    # For "none", a non-uniform upstream gradient checks that each token's row is scaled by its own weight.
    upstream = torch.arange(1.0, out.numel() + 1).reshape(out.shape) if reduction == "none" else torch.tensor(1.0)
    (out * upstream).sum().backward()

    t64 = t.detach().double().requires_grad_(True)
    s64 = s.detach().double().requires_grad_(True)
    expected = reference(ref_fn, t64, s64, mask, params, reduction)
    (expected * upstream.double()).sum().backward()

    for got, want in ((t.grad, t64.grad), (s.grad, s64.grad)):
        assert got.dtype == torch.float32
        assert torch.isfinite(got).all()
        # float32 log-probs of magnitude L carry ~u*L absolute error, which a gradient entry sees times
        # a probability; scale the tolerance by the largest gradient entry (large for +-1e4 logits).
        scale = max(1.0, want.abs().max().item())
        close(got, want, rtol=1e-5, atol=1e-6 * scale)
        if mask is not None:
            assert (got[~mask] == 0).all()  # tokens that do not count get no gradient
    if kind == "padded_vocab":
        assert (t.grad[..., -5:] == 0).all() and (s.grad[..., -5:] == 0).all()


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("kind", ["extreme", "padded_vocab"])
def test_gradients_finite_for_extreme_and_padded_inputs(name, kind):
    t, s, mask = make_inputs((2, 6, 40), kind, seed=5)
    t.requires_grad_(True)
    s.requires_grad_(True)
    out = DIVERGENCES[name](t, s, None, chunk_tokens=5)
    out.backward()
    assert torch.isfinite(out)
    assert torch.isfinite(t.grad).all() and torch.isfinite(s.grad).all()
    assert t.grad.abs().sum() > 0 and s.grad.abs().sum() > 0


def test_only_inputs_that_require_grad_get_one():
    t, s, mask = make_inputs((2, 4, 30), "masked")
    # KD: teacher detached, student trained.
    s.requires_grad_(True)
    forward_kl(t, s, mask).backward()
    assert t.grad is None and s.grad is not None
    # OKD module update: student detached, teacher (module) trained.
    t2 = t.clone().requires_grad_(True)
    reverse_kl(t2, s.detach(), mask).backward()
    assert t2.grad is not None and torch.isfinite(t2.grad).all() and t2.grad.abs().sum() > 0
    # Under no_grad nothing is recorded.
    with torch.no_grad():
        assert not forward_kl(t2, s, mask).requires_grad


def test_gradient_through_vocab_slice_and_upstream_ops():
    """The teacher slice and ops before the divergence are ordinary autograd: gradients reach the
    original tensors, zero on the sliced-off vocab columns."""
    base = torch.randn(2, 3, 24, requires_grad=True)
    student = torch.randn(2, 3, 20, requires_grad=True)
    teacher = base * 1.5
    generalized_jsd(teacher, student, beta=0.3).backward()
    assert base.grad.shape == (2, 3, 24)
    assert (base.grad[..., 20:] == 0).all() and base.grad[..., :20].abs().sum() > 0

    t64 = (base.detach().double() * 1.5).requires_grad_(True)
    s64 = student.detach().double().requires_grad_(True)
    ref_jsd(t64[..., :20].reshape(-1, 20), s64.reshape(-1, 20), beta=0.3).mean().backward()
    close(base.grad[..., :20], 1.5 * t64.grad[..., :20], rtol=1e-5, atol=1e-7)
    close(student.grad, s64.grad, rtol=1e-5, atol=1e-7)


def test_backward_twice_raises_clear_error():
    t, s, _ = make_inputs((1, 3, 9), "random")
    s.requires_grad_(True)
    out = forward_kl(t, s)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        out.backward()


# ==================================================================================================
# Properties
# ==================================================================================================


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kind", ["random", "extreme", "padded_vocab"])
def test_zero_on_identical_inputs(case, kind):
    _, params, fn, _ = case
    t, _, mask = make_inputs((2, 5, 33), kind, seed=2)
    t.requires_grad_(True)
    per_token = fn(t, t, mask, reduction="none", **params)
    assert per_token.abs().max() <= 1e-6
    per_token.sum().backward()
    assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_non_negative(case):
    _, params, fn, _ = case
    t, s, _ = make_inputs((4, 8, 64), "random", seed=4)
    # Near-identical inputs make the divergence tiny (~1e-6), where a sign error would show; allow
    # -1e-8 for float32 rounding of values that small.
    for student in (s, t + 1e-3 * s):
        values = fn(t, student, reduction="none", **params)
        assert (values >= -1e-8).all() and (values > 0).any()


def test_jsd_symmetric_at_half():
    t, s, mask = make_inputs((3, 6, 40), "masked", seed=6)
    a = generalized_jsd(t, s, mask, beta=0.5, reduction="none")
    b = generalized_jsd(s, t, mask, beta=0.5, reduction="none")
    close(a, b, rtol=1e-6, atol=1e-7)
    # ... and not symmetric away from 0.5 (so the check above can fail).
    assert not torch.allclose(generalized_jsd(t, s, beta=0.2), generalized_jsd(s, t, beta=0.2), rtol=1e-3)
    close(total_variation(t, s, mask, reduction="none"), total_variation(s, t, mask, reduction="none"))


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_gjsd_equals_trl_convention(beta):
    t, s, mask = make_inputs((3, 7, 60), "masked", seed=8)
    keep = mask.reshape(-1)
    expected = trl_style_gjsd(t.reshape(-1, 60), s.reshape(-1, 60), beta)[keep].mean()
    close(generalized_jsd(t, s, mask, beta=beta), expected)
    if beta == 0.0:
        close(generalized_jsd(t, s, mask, beta=beta), forward_kl(t, s, mask), rtol=0, atol=0)
    if beta == 1.0:
        close(generalized_jsd(t, s, mask, beta=beta), reverse_kl(t, s, mask), rtol=0, atol=0)


def chi_square(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """chi^2(a || b) = sum a^2 / b - 1 per row (float64)."""
    return (torch.exp(2 * log_a - log_b)).sum(-1) - 1


def test_scaled_jsd_is_continuous_at_both_ends():
    """JSD_b / (b (1 - b)) = KL(p||q) + b (KL(p||q) - chi2(p||q) / 2) + O(b^2) near b = 0 (expand
    log(1 + b (p - q) / q) to second order), and symmetrically KL(q||p) + O(1 - b) near b = 1. So at
    b = 1e-4 the gap to forward KL must be within 2 b (KL + chi2 / 2) (factor 2 for the O(b^2) rest),
    plus 1e-5 for float32 rounding; and it must shrink when b does."""
    t, s, _ = make_inputs((2, 4, 30), "random", seed=9)
    t, s = t / 2, s / 2  # moderate logits keep chi^2 (the first-order coefficient) moderate
    lp, lq = ref_log_probs(t), ref_log_probs(s)
    fkl, rkl = ref_kl_rows(lp, lq), ref_kl_rows(lq, lp)
    eps = 1e-4
    for b, target, kl, chi2 in (
        (eps, forward_kl(t, s, reduction="none"), fkl, chi_square(lp, lq)),
        (1 - eps, reverse_kl(t, s, reduction="none"), rkl, chi_square(lq, lp)),
    ):
        scaled = generalized_jsd(t, s, beta=b, scaled=True, reduction="none")
        gap = (scaled.double() - target.double()).abs()
        bound = 2 * eps * (kl + chi2 / 2) + 1e-5
        assert (gap <= bound).all(), (gap, bound)
        # Shrinks with b: 10x closer to the endpoint gives a clearly smaller gap.
        far = generalized_jsd(t, s, beta=b * 10 if b < 0.5 else 1 - eps * 10, scaled=True, reduction="none")
        assert ((far.double() - target.double()).abs() > 3 * gap).all()
    # The unscaled loss, by contrast, jumps at the ends (it is ~b KL(p||q) near b = 0).
    unscaled = generalized_jsd(t, s, beta=eps, reduction="none")
    assert (unscaled < 10 * eps * forward_kl(t, s, reduction="none")).all()
    # Endpoints of the scaled form are plain forward / reverse KL.
    close(generalized_jsd(t, s, beta=0.0, scaled=True), forward_kl(t, s), rtol=0, atol=0)
    close(generalized_jsd(t, s, beta=1.0, scaled=True), reverse_kl(t, s), rtol=0, atol=0)


def test_scaled_jsd_matches_reference_near_endpoints():
    """The log-space mixture keeps float32 accurate even where b (1 - b) amplifies rounding."""
    t, s, mask = make_inputs((2, 5, 200), "masked", seed=10)
    for beta in (1e-3, 1e-2, 0.99, 0.999):
        expected = reference(ref_jsd, t, s, mask, {"beta": beta, "scaled": True}, "none")
        close(generalized_jsd(t, s, mask, beta=beta, scaled=True, reduction="none"), expected, rtol=1e-5, atol=1e-5)


def test_temperature_equals_prescaled_logits():
    t, s, mask = make_inputs((2, 4, 25), "masked", seed=12)
    for name, params, fn, _ in CASES:
        at_two = fn(t, s, mask, temperature=2.0, **params)
        close(at_two, fn(t / 2, s / 2, mask, **params), rtol=1e-7, atol=1e-7)
        assert not torch.allclose(at_two, fn(t, s, mask, **params)), name  # temperature does something


def test_adaptive_kl_head_tail_rule_on_a_worked_example():
    """p = [0.45, 0.35, 0.20], q = [0.20, 0.50, 0.30], mu = 0.5. Teacher mass before each token in
    sorted order: 0, 0.45, 0.80, so the head is {0.45, 0.35} (0.35 crosses mu and is still head) and the
    tail {0.20}. g_head = 0.25 + 0.15 = 0.4, g_tail = 0.1: AKL = 0.8 KL(p||q) + 0.2 KL(q||p)."""
    p = torch.tensor([0.45, 0.35, 0.20], dtype=torch.float64)
    q = torch.tensor([0.20, 0.50, 0.30], dtype=torch.float64)
    fkl = (p * (p / q).log()).sum()
    rkl = (q * (q / p).log()).sum()
    t, s = p.log().float()[None], q.log().float()[None]
    close(adaptive_kl(t, s, mu=0.5), 0.8 * fkl + 0.2 * rkl)
    # mu = 0: only the top-1 token is head: g_head = 0.25, g_tail = 0.25.
    close(adaptive_kl(t, s, mu=0.0), 0.5 * fkl + 0.5 * rkl)
    # mu = 1: every token is head: pure forward KL.
    close(adaptive_kl(t, s, mu=1.0), fkl)
    # Ties with the last head token are head, whatever the sort order: p = [0.4, 0.3, 0.3].
    p_tie = torch.tensor([0.3, 0.4, 0.3], dtype=torch.float64)
    fkl_tie = (p_tie * (p_tie / q).log()).sum()
    close(adaptive_kl(p_tie.log().float()[None], s, mu=0.5), fkl_tie)  # all head -> forward KL


def test_adaptive_kl_weights_carry_no_gradient():
    """d AKL / d logits must equal w_head * d FKL + w_tail * d RKL with the weights held fixed."""
    t, s, _ = make_inputs((1, 1, 12), "random", seed=13)
    s.requires_grad_(True)
    adaptive_kl(t, s).backward()
    lp, lq = ref_log_probs(t[0]), ref_log_probs(s.detach()[0])
    w = ref_akl_head_weight(lp.exp(), lq.exp(), 0.5)
    s_f = s.detach().clone().requires_grad_(True)
    (w.float() * forward_kl(t, s_f) + (1 - w.float()) * reverse_kl(t, s_f)).backward()
    close(s.grad, s_f.grad, rtol=1e-5, atol=1e-7)


# ==================================================================================================
# Vocab handling and dtypes
# ==================================================================================================


def test_larger_teacher_vocab_is_sliced():
    t, s, mask = make_inputs((2, 3, 40), "masked", seed=14)
    padded = torch.cat([t, torch.full((2, 3, 8), 50.0)], dim=-1)  # large logits: would dominate if used
    for _, params, fn, _ in CASES:
        close(fn(padded, s, mask, **params), fn(t, s, mask, **params), rtol=0, atol=0)
    sliced = align_vocab(padded, 40)
    assert sliced.shape == (2, 3, 40) and sliced.data_ptr() == padded.data_ptr()  # a view, no copy
    assert align_vocab(t, 40) is t


def test_smaller_teacher_vocab_raises():
    t = torch.randn(2, 3, 100)
    s = torch.randn(2, 3, 120)
    with pytest.raises(ValueError, match=r"teacher vocab 100 < student vocab 120"):
        forward_kl(t, s)
    with pytest.raises(ValueError, match=r"100.*120"):
        align_vocab(t, 120)
    for name in DIVERGENCES:
        with pytest.raises(ValueError, match="100"):
            DIVERGENCES[name](t, s)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    t32, s32, mask = make_inputs((2, 5, 64), "padded_vocab", seed=15)
    t, s = t32.to(dtype).requires_grad_(True), s32.to(dtype).requires_grad_(True)
    for _, params, fn, _ in CASES:
        out = fn(t, s, mask, chunk_tokens=3, **params)
        assert out.dtype == torch.float32
        # Upcast per chunk: identical to float32 maths on the rounded values.
        close(out, fn(t.detach().float(), s.detach().float(), mask, **params), rtol=1e-6, atol=1e-6)
        out.backward()
        assert t.grad.dtype == dtype and s.grad.dtype == dtype
        assert torch.isfinite(t.grad.float()).all() and torch.isfinite(s.grad.float()).all()
        t.grad = s.grad = None


def test_mixed_dtypes_and_mask_dtypes():
    t, s, mask = make_inputs((2, 4, 30), "masked", seed=16)
    expected = forward_kl(t, s, mask)
    close(forward_kl(t.bfloat16().float(), s, mask), forward_kl(t.bfloat16(), s, mask))
    close(forward_kl(t, s, mask.long()), expected, rtol=0, atol=0)
    close(forward_kl(t, s, mask.float()), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="only 0 and 1"):
        forward_kl(t, s, mask.float() * 0.5)
    with pytest.raises(ValueError, match="leading shape"):
        forward_kl(t, s, mask[:, :2])


# ==================================================================================================
# Chunking and masking
# ==================================================================================================


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("kind", ["random", "masked"])
def test_result_does_not_depend_on_chunk_size(name, kind):
    t, s, mask = make_inputs((3, 7, 90), kind, seed=17)
    results, grads = [], []
    for chunk in (1, 4, 7, 21, 10_000):  # 10_000 >= N: a single chunk
        t_ = t.clone().requires_grad_(True)
        s_ = s.clone().requires_grad_(True)
        out = DIVERGENCES[name](t_, s_, mask, chunk_tokens=chunk)
        out.backward()
        results.append(out)
        grads.append((t_.grad, s_.grad))
    for out, (gt, gs) in zip(results[:-1], grads[:-1]):
        close(out, results[-1], rtol=1e-6, atol=1e-7)
        close(gt, grads[-1][0], rtol=1e-6, atol=1e-8)
        close(gs, grads[-1][1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_fully_masked_input_gives_zero_and_zero_grads(name):
    t, s, _ = make_inputs((2, 3, 16), "padded_vocab", seed=18)
    t.requires_grad_(True)
    s.requires_grad_(True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for reduction in ("mean", "sum", "none"):
        out = DIVERGENCES[name](t, s, mask, reduction=reduction)
        assert out.requires_grad
        assert (out == 0).all() and not torch.isnan(out).any()
        out.sum().backward()
        assert (t.grad == 0).all() and (s.grad == 0).all()
        t.grad = s.grad = None


def test_masked_tokens_do_not_change_the_result():
    """Whatever sits at masked positions (here NaN) is never read."""
    t, s, mask = make_inputs((2, 5, 20), "masked", seed=19)
    garbage_t, garbage_s = t.clone(), s.clone()
    garbage_t[~mask] = float("nan")
    garbage_s[~mask] = float("nan")
    for _, params, fn, _ in CASES:
        close(fn(garbage_t, garbage_s, mask, **params), fn(t, s, mask, **params), rtol=0, atol=0)


def test_argument_validation():
    t, s, _ = make_inputs((1, 2, 5), "random")
    with pytest.raises(ValueError, match="reduction"):
        forward_kl(t, s, reduction="avg")
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(t, s, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        forward_kl(t, s, chunk_tokens=0)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(t, s, beta=1.5)
    with pytest.raises(ValueError, match="leading shape"):
        forward_kl(t, s[:, :1])


# ==================================================================================================
# Registry
# ==================================================================================================


def test_registry_names():
    assert set(DIVERGENCES) == {"forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "adaptive_kl"}
    assert DIVERGENCES["jsd"] is generalized_jsd and DIVERGENCES["tvd"] is total_variation


def test_get_divergence_binds_params():
    t, s, mask = make_inputs((2, 3, 20), "masked", seed=20)
    loss_fn = get_divergence("jsd", beta=0.9, temperature=2.0)
    close(loss_fn(t, s, mask), generalized_jsd(t, s, mask, beta=0.9, temperature=2.0), rtol=0, atol=0)
    assert loss_fn.keywords == {"beta": 0.9, "temperature": 2.0}
    close(get_divergence("forward_kl")(t, s, mask), forward_kl(t, s, mask), rtol=0, atol=0)


def test_get_divergence_errors():
    with pytest.raises(ValueError, match="Did you mean 'reverse_kl'") as info:
        get_divergence("reverse_kld")
    assert "forward_kl" in str(info.value)  # lists the valid names
    with pytest.raises(ValueError, match="unknown divergence"):
        get_divergence("wasserstein")
    with pytest.raises(ValueError, match=r"no parameter 'bta'.*'beta'"):
        get_divergence("jsd", bta=0.5)
    with pytest.raises(ValueError, match="no parameter 'beta'"):
        get_divergence("forward_kl", beta=0.5)
    with pytest.raises(ValueError, match="mu"):
        get_divergence("adaptive_kl", mu=2.0)


def test_module_has_no_hidden_full_tensor_path():
    """The chunked Function is the only path: every public divergence goes through it."""
    t, s, _ = make_inputs((1, 2, 6), "random")
    s.requires_grad_(True)
    for name, fn in DIVERGENCES.items():
        assert type(fn(t, s).grad_fn).__name__ == "_ChunkedDivergenceBackward", name


# ==================================================================================================
# Closed-form gradients (forward KL, reverse KL, generalized JSD) against autograd and float64
# ==================================================================================================

CLOSED_FORM_CASES = [
    (forward_kl, {}, ref_forward_kl),
    (reverse_kl, {}, ref_reverse_kl),
    *[(generalized_jsd, {"beta": b, "scaled": sc}, ref_jsd) for b in (0.0, 0.1, 0.5, 0.9, 1.0) for sc in (False, True)],
]


def test_closed_forms_cover_forward_kl_reverse_kl_and_the_generalized_jsd():
    import functools

    from okd import divergences

    for token_fn in (divergences._fkl_tokens, divergences._rkl_tokens, functools.partial(divergences._jsd_tokens, beta=0.3, scaled=False)):
        assert divergences._closed_form(token_fn) is not None
    assert divergences._closed_form(functools.partial(divergences._skew_kl_tokens, alpha=0.1)) is None  # autograd


@pytest.mark.parametrize("fn,params,ref_fn", CLOSED_FORM_CASES, ids=lambda x: getattr(x, "__name__", str(x)))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_closed_form_gradients_equal_autograd_and_float64(fn, params, ref_fn, kind, temperature, monkeypatch):
    from okd import divergences

    t, s, mask = make_inputs((3, 5, 50), kind, seed=17)
    upstream = torch.arange(1.0, 16.0).reshape(3, 5)

    def run(closed: bool):
        monkeypatch.setattr(divergences, "USE_CLOSED_FORMS", closed)
        tt, ss = t.clone().requires_grad_(True), s.clone().requires_grad_(True)
        out = fn(tt, ss, mask, chunk_tokens=4, reduction="none", temperature=temperature, **params)
        (out * upstream).sum().backward()
        return out.detach(), tt.grad, ss.grad

    closed, autograd = run(True), run(False)
    t64, s64 = t.double().requires_grad_(True), s.double().requires_grad_(True)
    expected = reference(ref_fn, t64, s64, mask, params, "none", temperature)
    (expected * upstream.double()).sum().backward()
    for got, via_autograd, want in zip(closed, autograd, (expected.detach(), t64.grad, s64.grad)):
        scale = max(1.0, want.abs().max().item())
        close(got, want, rtol=1e-5, atol=1e-6 * scale)
        close(got, via_autograd, rtol=1e-5, atol=1e-6 * scale)
    if mask is not None:
        assert (closed[1][~mask] == 0).all() and (closed[2][~mask] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradients_with_temperature_match_float64_reference(case):
    # Every divergence, by either route (closed form or autograd), differentiates through the temperature.
    _, params, fn, ref_fn = case
    t, s, mask = make_inputs((3, 5, 50), "masked", seed=23)
    t.requires_grad_(True)
    s.requires_grad_(True)
    fn(t, s, mask, chunk_tokens=4, temperature=2.0, **params).backward()
    t64 = t.detach().double().requires_grad_(True)
    s64 = s.detach().double().requires_grad_(True)
    reference(ref_fn, t64, s64, mask, params, "mean", 2.0).backward()
    for got, want in ((t.grad, t64.grad), (s.grad, s64.grad)):
        assert want.abs().max() > 0
        close(got, want, rtol=1e-5, atol=1e-6 * max(1.0, want.abs().max().item()))
