"""MiniLLM's objective and teacher-mixed sampler (okd.minillm) on a tiny tabular problem.

The tabular problem: vocabulary {0 = EOS, 1, 2}, responses of at most H = 3 tokens that end at the first
EOS. A model is a table of logits, one row per prefix of non-EOS tokens (7 prefixes). Every response can
be enumerated (15 of them), so the sequence-level reverse KL and its gradient are known exactly (float64
autograd), and each estimator can be checked against them.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from okd.divergences import reverse_kl
from okd.minillm import (
    MiniLLMConfig,
    MiniLLMLoss,
    TeacherMixedSampler,
    clipped_surrogate,
    lm_loss,
    long_term_advantages,
    per_token_rewards,
    sample_teacher_mixed,
    single_step_reverse_kl,
    token_log_probs,
)

V, H, EOS, PAD = 3, 3, 0, 2  # PAD is a real token on purpose: only the mask may tell padding apart
PREFIXES = [()] + [p for k in (1, 2) for p in itertools.product((1, 2), repeat=k)]
INDEX = {p: i for i, p in enumerate(PREFIXES)}


def all_responses():
    out = []
    for length in range(1, H + 1):
        for body in itertools.product((1, 2), repeat=length - 1):
            out.append(body + (EOS,))
    out += [body + (last,) for body in itertools.product((1, 2), repeat=H - 1) for last in (1, 2)]
    return out  # 1 + 2 + 4 ending in EOS, 8 of full length without EOS: 15


RESPONSES = all_responses()


def batch_of(responses, garbage=None):
    """``ids [B, H]`` (PAD after the end), ``mask [B, H]`` and the prefix row of each position (0 on padding)."""
    ids = torch.full((len(responses), H), PAD)
    mask = torch.zeros(len(responses), H, dtype=torch.bool)
    rows = torch.zeros(len(responses), H, dtype=torch.long)
    for b, y in enumerate(responses):
        ids[b, : len(y)] = torch.tensor(y)
        mask[b, : len(y)] = True
        for t in range(len(y)):
            rows[b, t] = INDEX[tuple(y[:t])]
    return ids, mask, rows


def logits_of(table, rows, mask, garbage=None):
    """Per-position logits ``[B, H, V]``; padded positions get ``garbage`` (default: some table row)."""
    logits = table[rows]
    if garbage is not None:
        logits = torch.where(mask[..., None], logits, garbage)
    return logits


def log_prob_of(table, y):
    lp = F.log_softmax(table, dim=-1)
    return sum(lp[INDEX[tuple(y[:t])], y[t]] for t in range(len(y)))


def sequence_reverse_kl(q_table, p_table):
    """Exact ``KL(q || p)`` over whole responses, by enumeration (differentiable in ``q_table``)."""
    total = q_table.new_zeros(())
    for y in RESPONSES:
        lq, lp = log_prob_of(q_table, y), log_prob_of(p_table, y)
        total = total + lq.exp() * (lq - lp)
    return total


def tables(seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(len(PREFIXES), V, generator=g, dtype=torch.float64) * 1.5
    q = torch.randn(len(PREFIXES), V, generator=g, dtype=torch.float64)
    return q, p


UNBIASED = dict(gamma=1.0, length_norm=False, whiten=False)


def estimator_losses(q_table, p_table, ids, mask, rows, *, include_current_reward=False, single_step=True, clip_range=0.2):
    """Per-response loss ``[B]`` whose gradient is the MiniLLM estimate (on-policy, old = current)."""
    s_logits = logits_of(q_table, rows, mask)
    t_logits = logits_of(p_table, rows, mask)
    logq = token_log_probs(s_logits, ids, mask)
    old = logq.detach()
    rewards = per_token_rewards(token_log_probs(t_logits, ids, mask), old, mask)
    adv = long_term_advantages(rewards, mask, include_current_reward=include_current_reward, **UNBIASED)
    pg, _ = clipped_surrogate(logq, old, adv, mask, clip_range=clip_range, reduction="none")
    loss = pg.sum(-1)
    if single_step:
        loss = loss + single_step_reverse_kl(t_logits, s_logits, mask, reduction="none").sum(-1)
    return loss


def per_response_gradients(q, p, **kwargs):
    grads = []
    for y in RESPONSES:
        theta = q.clone().requires_grad_(True)
        ids, mask, rows = batch_of([y])
        estimator_losses(theta, p, ids, mask, rows, **kwargs).sum().backward()
        grads.append(theta.grad.flatten())
    return torch.stack(grads)  # [15, P * V]


def response_probs(table):
    return torch.stack([log_prob_of(table, y).exp() for y in RESPONSES])


# --------------------------------------------------------------------------------------------------
# The policy-gradient estimate against the exact gradient of sequence-level reverse KL
# --------------------------------------------------------------------------------------------------


def test_enumeration_is_a_distribution():
    q, _ = tables()
    assert len(RESPONSES) == 15
    assert float(response_probs(q).sum()) == pytest.approx(1.0, abs=1e-12)


def test_expected_estimate_equals_exact_gradient():
    """Sum over all responses of q(y) * estimate(y) == d KL(q||p) / d theta (single-step + long-term)."""
    q, p = tables()
    theta = q.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(sequence_reverse_kl(theta, p), theta)
    probs = response_probs(q)
    expected = (probs[:, None] * per_response_gradients(q, p)).sum(0)
    # the single-step term is computed in float32 by okd.divergences: float32-level agreement
    torch.testing.assert_close(expected, exact.flatten(), rtol=1e-5, atol=1e-6)
    # REINFORCE with the reward to go from t (no single-step term) is also unbiased ...
    reinforce = (probs[:, None] * per_response_gradients(q, p, include_current_reward=True, single_step=False)).sum(0)
    torch.testing.assert_close(reinforce, exact.flatten(), rtol=1e-9, atol=1e-12)
    # ... but counting r_t in both terms is not: the check above can fail.
    double = (probs[:, None] * per_response_gradients(q, p, include_current_reward=True)).sum(0)
    assert (double - exact.flatten()).abs().max() > 1e-2


def test_monte_carlo_estimate_matches_exact_gradient_within_standard_errors():
    """Responses drawn by the sampler (alpha = 0): the batch estimate is within 4 standard errors."""
    q, p = tables(seed=1)
    theta = q.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(sequence_reverse_kl(theta, p), theta)
    n = 4000
    samples = sample_teacher_mixed(
        TabularLM(q), TabularLM(p), torch.ones(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.long),
        max_new_tokens=H, eos_token_id=EOS, pad_token_id=PAD, generator=torch.Generator().manual_seed(0),
        teacher_mix_ratio=0.0, student_cache=False, teacher_cache=False,
    )
    drawn = [tuple(row[m].tolist()) for row, m in zip(samples.response_ids, samples.mask)]
    ids, mask, rows = batch_of(drawn)
    torch.testing.assert_close(ids, samples.response_ids)
    torch.testing.assert_close(mask, samples.mask)
    theta = q.clone().requires_grad_(True)
    estimator_losses(theta, p, ids, mask, rows).mean().backward()
    estimate = theta.grad.flatten()
    # standard error from the per-response gradients (each response's estimate is deterministic)
    per_response = per_response_gradients(q, p)
    counts = torch.tensor([drawn.count(y) for y in RESPONSES], dtype=torch.float64)
    mean = (counts[:, None] * per_response).sum(0) / n
    torch.testing.assert_close(mean, estimate, rtol=1e-5, atol=1e-6)
    var = (counts[:, None] * (per_response - mean) ** 2).sum(0) / (n - 1)
    se = (var / n).sqrt()
    assert bool(((estimate - exact.flatten()).abs() <= 4 * se + 1e-6).all()), (estimate - exact.flatten()) / se


def test_reduces_to_reinforce_sample_by_sample():
    """Clipping off, old = current, r_t included, no single-step: the plain score-function estimator."""
    q, p = tables()
    ids, mask, rows = batch_of(RESPONSES)
    theta = q.clone().requires_grad_(True)
    ours = []
    for b in range(len(RESPONSES)):
        loss = estimator_losses(theta, p, ids, mask, rows, include_current_reward=True, single_step=False, clip_range=None)[b]
        ours.append(torch.autograd.grad(loss, theta)[0])
    # hand-written REINFORCE: -sum_t (sum_{k>=t} r_k) grad log q(y_t | y_<t), float64
    for b, y in enumerate(RESPONSES):
        theta = q.clone().requires_grad_(True)
        lq = F.log_softmax(theta, -1)
        lp = F.log_softmax(p, -1)
        steps = [(INDEX[tuple(y[:t])], y[t]) for t in range(len(y))]
        r = [float(lp[i, v] - lq[i, v].detach()) for i, v in steps]
        loss = -sum(sum(r[t:]) * lq[i, v] for t, (i, v) in enumerate(steps))
        (ref,) = torch.autograd.grad(loss, theta)
        torch.testing.assert_close(ours[b], ref, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# The pieces
# --------------------------------------------------------------------------------------------------


def test_single_step_equals_token_level_reverse_kl():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(2, 5, 7, generator=g)
    s = torch.randn(2, 5, 7, generator=g, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    ours = single_step_reverse_kl(t, s, mask)
    (g_ours,) = torch.autograd.grad(ours, s)
    ref = reverse_kl(t, s, mask)
    (g_ref,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)
    # independent float64 formula: mean over counted tokens of sum_v q (log q - log p)
    lq, lp = F.log_softmax(s.detach().double(), -1), F.log_softmax(t.double(), -1)
    per_token = (lq.exp() * (lq - lp)).sum(-1)
    assert float(ours.detach()) == pytest.approx(float(per_token[mask].mean()), rel=1e-5)
    # weights multiply each token's term
    w = torch.rand(2, 5, generator=g)
    weighted = single_step_reverse_kl(t, s, mask, weights=w, reduction="sum")
    assert float(weighted.detach()) == pytest.approx(float((per_token * w.double())[mask].sum()), rel=1e-5)


def test_advantages_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[True, True, True, False]])
    a = long_term_advantages(rewards, mask, gamma=0.5, length_norm=False, whiten=False)
    torch.testing.assert_close(a, torch.tensor([[2.0 + 0.5 * 3.0, 3.0, 0.0, 0.0]]))
    a = long_term_advantages(rewards, mask, gamma=0.5, length_norm=True, whiten=False)
    torch.testing.assert_close(a, torch.tensor([[3.5 / 2, 3.0 / 1, 0.0, 0.0]]))
    a = long_term_advantages(rewards, mask, gamma=0.5, length_norm=True, include_current_reward=True, whiten=False)
    torch.testing.assert_close(a, torch.tensor([[(1 + 1 + 0.75) / 3, (2 + 1.5) / 2, 3.0, 0.0]]))
    w = long_term_advantages(rewards, mask, gamma=0.5, include_current_reward=True)
    assert float(w[mask].mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(w[mask].std()) == pytest.approx(1.0, abs=1e-4)
    assert float(w[0, 3]) == 0.0


def test_discount_is_by_position_within_the_response():
    """The same response placed after a masked prompt (training layout) gets the same advantages (TRL 6626)."""
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(2, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    shifted_r = torch.cat([torch.randn(2, 3, generator=g), rewards, torch.randn(2, 2, generator=g)], dim=1)
    shifted_m = torch.cat([torch.zeros(2, 3, dtype=torch.bool), mask, torch.zeros(2, 2, dtype=torch.bool)], dim=1)
    for kwargs in (dict(), dict(include_current_reward=True), dict(length_norm=False, whiten=False)):
        a = long_term_advantages(rewards, mask, **kwargs)
        b = long_term_advantages(shifted_r, shifted_m, **kwargs)
        torch.testing.assert_close(b[:, 3:7], a)
        assert bool((b[~shifted_m] == 0).all())


def test_padding_changes_nothing():
    """Garbage in every padded position (rewards, log-probs, logits, ids) and extra padded columns leave the
    loss, its parts and its gradients unchanged (TRL 7024: padding leaking into the advantages)."""
    q, p = tables()
    ids, mask, rows = batch_of(RESPONSES[:6])
    g = torch.Generator().manual_seed(5)
    config = MiniLLMConfig(teacher_mix_ratio=0.2)

    def run(extra: int, garbage: bool):
        theta = q.clone().float().requires_grad_(True)
        s_logits = logits_of(theta, rows, mask)
        t_logits = logits_of(p.float(), rows, mask)
        old = token_log_probs(s_logits.detach() + 0.1, ids, mask)  # an older policy: ratios != 1
        tlp = token_log_probs(t_logits, ids, mask)
        logw = torch.full_like(old, -0.05) * mask
        tensors = [s_logits, t_logits, ids, mask, old, tlp, logw]
        if extra:
            tensors = [torch.cat([x, x[:, :extra]], dim=1) for x in tensors]
            tensors[3] = torch.cat([mask, torch.zeros(len(mask), extra, dtype=torch.bool)], dim=1)
        s_l, t_l, i, m, o, tl, lw = tensors
        if garbage:
            pad = ~m
            s_l = torch.where(pad[..., None], torch.randn(s_l.shape, generator=g) * 50, s_l)
            t_l = torch.where(pad[..., None], torch.randn(t_l.shape, generator=g) * 50, t_l)
            i = torch.where(pad, torch.randint(0, V, i.shape, generator=g), i)
            o = torch.where(pad, torch.randn(o.shape, generator=g) * 1e3, o)
            tl = torch.where(pad, torch.randn(tl.shape, generator=g) * 1e3, tl)
            lw = torch.where(pad, torch.randn(lw.shape, generator=g) * 1e3, lw)
        out = MiniLLMLoss(config)(s_l, t_l, i, m, o, tl, lw)
        (grad,) = torch.autograd.grad(out.loss, theta)
        return out, grad

    base, base_grad = run(0, False)
    for extra, garbage in ((0, True), (2, False), (2, True)):
        out, grad = run(extra, garbage)
        torch.testing.assert_close(out.loss, base.loss)
        torch.testing.assert_close(out.policy_gradient, base.policy_gradient)
        torch.testing.assert_close(out.single_step, base.single_step)
        torch.testing.assert_close(grad, base_grad)
        assert out.stats["clipped_fraction"] == pytest.approx(base.stats["clipped_fraction"])


def test_clipped_surrogate_by_hand():
    logprobs = torch.tensor([[0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    old = torch.log(torch.tensor([[0.5, 2.0, 1.0, 1.0]]))  # ratios 2, 0.5, 1, 1
    adv = torch.tensor([[1.0, -1.0, 1.0, 5.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, frac = clipped_surrogate(logprobs, old, adv, mask, clip_range=0.2, reduction="none")
    # t0: max(-2, -1.2) = -1.2 (clipped); t1: max(0.5, 0.8) = 0.8 (clipped); t2: -1; t3 padding
    torch.testing.assert_close(loss.detach(), torch.tensor([[-1.2, 0.8, -1.0, 0.0]]))
    assert float(frac) == pytest.approx(2 / 3)
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, -1.0, 0.0]]))  # clipped tokens pass no gradient
    # the importance weight multiplies the ratio before the clip
    loss, _ = clipped_surrogate(logprobs, old, adv, mask, log_weights=torch.log(torch.full((1, 4), 1.1)), clip_range=None, reduction="none")
    torch.testing.assert_close(loss.detach(), torch.tensor([[-2.2, 0.55, -1.1, 0.0]]))
    # mean = over counted tokens only
    mean, _ = clipped_surrogate(logprobs, old, adv, mask)
    assert float(mean.detach()) == pytest.approx((-1.2 + 0.8 - 1.0) / 3)


def test_rewards_scaled_clipped_and_detached():
    tlp = torch.tensor([[-1.0, -300.0, -2.0]])
    slp = torch.tensor([[-2.0, -1.0, 5.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    r = per_token_rewards(tlp, slp, mask, reward_scaling=0.5, reward_clip=100.0)
    torch.testing.assert_close(r, torch.tensor([[2.0, -100.0, 0.0]]))
    assert not r.requires_grad


def test_lm_loss():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 4, 5, generator=g)
    t = torch.randn(2, 4, 5, generator=g)
    targets = torch.tensor([[1, 2, -100, -100], [0, 4, 3, -100]])
    ce = F.cross_entropy(s.reshape(-1, 5), targets.reshape(-1), ignore_index=-100)
    assert float(lm_loss(s, targets)) == pytest.approx(float(ce), rel=1e-6)
    m = targets != -100
    lp, lq = F.log_softmax(t, -1), F.log_softmax(s, -1)
    fkl = (lp.exp() * (lp - lq)).sum(-1)[m].mean()
    mixed = lm_loss(s, targets, teacher_logits=t, kd_ratio=0.5)
    assert float(mixed) == pytest.approx(float(0.5 * ce + 0.5 * fkl), rel=1e-5)


def test_total_is_the_sum_of_its_parts():
    q, p = tables()
    ids, mask, rows = batch_of(RESPONSES)
    s_logits = logits_of(q.float(), rows, mask).requires_grad_(True)
    t_logits = logits_of(p.float(), rows, mask)
    old = token_log_probs(s_logits.detach(), ids, mask)
    tlp = token_log_probs(t_logits, ids, mask)
    lm_logits = torch.randn(2, 3, V)
    lm_targets = torch.tensor([[1, 2, -100], [0, 0, 1]])
    config = MiniLLMConfig(lm_coef=0.7, lm_kd_ratio=None)
    with torch.no_grad():
        out = MiniLLMLoss(config)(s_logits, t_logits, ids, mask, old, tlp, lm_logits=lm_logits, lm_targets=lm_targets)
    assert float(out.loss) == pytest.approx(float(out.policy_gradient + out.single_step + 0.7 * out.lm), rel=1e-6)
    assert float(out.lm) == pytest.approx(float(lm_loss(lm_logits, lm_targets)), rel=1e-6)
    assert float(out.single_step) == pytest.approx(float(reverse_kl(t_logits, s_logits.detach(), mask)), rel=1e-6)
    assert out.stats["clipped_fraction"] == 0.0  # first PPO epoch, on-policy: every ratio is 1
    with torch.no_grad():
        off = MiniLLMLoss(MiniLLMConfig(single_step=False, lm_coef=0.0))(s_logits, None, ids, mask, old, tlp)
    assert float(off.loss) == pytest.approx(float(out.policy_gradient), rel=1e-6)


# --------------------------------------------------------------------------------------------------
# The teacher-mixed sampler
# --------------------------------------------------------------------------------------------------


class TabularLM(nn.Module):
    """Logits from a table indexed by the response prefix (the tokens after a 1-token prompt).

    Takes right-padded ``input_ids [B, L]`` (``model(input_ids=, attention_mask=)``); position j predicts
    token j + 1. Prefixes containing EOS (never looked at by the sampler) map to row 0.
    """

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table.clone().float(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        B, L = input_ids.shape
        rows = torch.zeros(B, L, dtype=torch.long)
        for b in range(B):
            body = input_ids[b, 1:].tolist()
            for j in range(min(L, H)):
                rows[b, j] = INDEX.get(tuple(body[:j]), 0)
        return self.table[rows]


def mixture_probability(q, p, alpha, y):
    lq, lp = F.log_softmax(q, -1), F.log_softmax(p, -1)
    prob = 1.0
    for t in range(len(y)):
        i = INDEX[tuple(y[:t])]
        prob *= float((1 - alpha) * lq[i, y[t]].exp() + alpha * lp[i, y[t]].exp())
    return prob


def chi_square_quantile(df, z=3.29):  # Wilson-Hilferty; z = 3.29: upper 0.05 % tail
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_mixed_sampler_frequencies_match_the_mixture(alpha):
    q, p = tables(seed=2)
    n = 6000
    ones = torch.ones(n, 1, dtype=torch.long)
    s = sample_teacher_mixed(
        TabularLM(q), TabularLM(p), ones, ones, max_new_tokens=H, eos_token_id=EOS, pad_token_id=PAD,
        generator=torch.Generator().manual_seed(1), teacher_mix_ratio=alpha, student_cache=False, teacher_cache=False,
    )
    drawn = [tuple(row[m].tolist()) for row, m in zip(s.response_ids, s.mask)]
    expected = torch.tensor([mixture_probability(q, p, alpha, y) for y in RESPONSES], dtype=torch.float64)
    assert float(expected.sum()) == pytest.approx(1.0)
    counts = torch.tensor([drawn.count(y) for y in RESPONSES], dtype=torch.float64)
    assert int(counts.sum()) == n  # every draw is a well-formed response
    chi2 = float(((counts - n * expected) ** 2 / (n * expected)).sum())
    assert chi2 < chi_square_quantile(len(RESPONSES) - 1), chi2
    # the returned log-probs are those of the tables, and the weight is q / mix
    ids, mask, rows = batch_of(drawn)
    lq = token_log_probs(logits_of(q, rows, mask), ids, mask)
    lp = token_log_probs(logits_of(p, rows, mask), ids, mask)
    mix = torch.where(mask, torch.log((1 - alpha) * lq.exp() + alpha * lp.exp()), torch.zeros(()))
    torch.testing.assert_close(s.student_logprobs, lq.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.teacher_logprobs, lp.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.mix_logprobs, mix.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.log_weights, (lq - mix).float() * mask, rtol=1e-5, atol=1e-5)
    assert bool((s.response_ids[~s.mask] == PAD).all())


def _tiny(arch, seed):
    from okd.models import build_model

    return build_model(arch, "nano", vocab_size=29, max_positions=64, seed=seed, eos_token_id=3, pad_token_id=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_sampler_log_probs_match_a_full_forward(arch):
    """KV-cached sampling on left-padded prompts gives the log-probs of one full forward in the
    right-padded training layout (so the first PPO ratio is 1), for the student and the teacher."""
    student, teacher = _tiny(arch, 0), _tiny(arch, 1)
    prompts = [[5, 6, 7, 8], [9], [10, 11]]
    width = max(map(len, prompts))
    prompt_ids = torch.tensor([[0] * (width - len(x)) + x for x in prompts])
    prompt_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts])
    s = sample_teacher_mixed(
        student, teacher, prompt_ids, prompt_mask, max_new_tokens=20, eos_token_id=3, pad_token_id=0,
        generator=torch.Generator().manual_seed(0), teacher_mix_ratio=0.3,
    )
    assert s.response_ids.shape[1] <= 20
    for b, prompt in enumerate(prompts):
        n = int(s.lengths[b])
        response = s.response_ids[b, :n]
        assert bool(s.mask[b, :n].all()) and not bool(s.mask[b, n:].any())
        assert 3 not in response[:-1].tolist()  # stops at the first EOS
        ids = torch.tensor(prompt + response.tolist())[None]
        for model, stored in ((student, s.student_logprobs), (teacher, s.teacher_logprobs)):
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
            ref = F.log_softmax(logits.float(), -1).gather(-1, response[:, None]).squeeze(-1)
            torch.testing.assert_close(stored[b, :n], ref, rtol=1e-4, atol=1e-5)
    # the uncached path (any okd forward) draws the same tokens from the same generator state
    u = sample_teacher_mixed(
        student, teacher, prompt_ids, prompt_mask, max_new_tokens=20, eos_token_id=3, pad_token_id=0,
        generator=torch.Generator().manual_seed(0), teacher_mix_ratio=0.3, student_cache=False, teacher_cache=False,
    )
    torch.testing.assert_close(u.response_ids, s.response_ids)
    torch.testing.assert_close(u.mix_logprobs, s.mix_logprobs, rtol=1e-4, atol=1e-5)


def test_sampler_resume_is_exact_and_leaves_the_global_rng_alone():
    student, teacher = _tiny("llama", 0), _tiny("llama", 1)
    prompt_ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    prompt_mask = (prompt_ids != 0).long()
    sampler = TeacherMixedSampler(student, teacher, eos_token_id=3, pad_token_id=0, max_new_tokens=8, seed=7)
    sampler.sample(prompt_ids, prompt_mask)
    state = sampler.state_dict()
    global_state = torch.get_rng_state()
    first = sampler.sample(prompt_ids, prompt_mask)
    assert torch.equal(torch.get_rng_state(), global_state)
    resumed = TeacherMixedSampler(student, teacher, eos_token_id=3, pad_token_id=0, max_new_tokens=8, seed=123)
    resumed.load_state_dict(state)
    again = resumed.sample(prompt_ids, prompt_mask)
    assert torch.equal(first.response_ids, again.response_ids)
    assert resumed.calls == sampler.calls == 2
    assert student.training is False


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("teacher_mix_ratio", 1.5),
        ("teacher_mix_ratio", -0.1),
        ("clip_range", 0.0),
        ("clip_range", -0.2),
        ("gamma", 1.1),
        ("reward_scaling", 0.0),
        ("lm_kd_ratio", 2.0),
        ("ppo_epochs", 0),
        ("temperature", 0.0),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^minillm\.{field} must be") as info:
        MiniLLMConfig(**{field: value})
    assert "\n" not in str(info.value)


def test_functions_reject_bad_values_naming_the_argument():
    one = torch.ones(1, 1, dtype=torch.long)
    q, p = tables()
    with pytest.raises(ValueError, match="^teacher_mix_ratio must be"):
        sample_teacher_mixed(TabularLM(q), TabularLM(p), one, one, max_new_tokens=1, eos_token_id=EOS,
                             pad_token_id=PAD, generator=torch.Generator(), teacher_mix_ratio=1.2,
                             student_cache=False, teacher_cache=False)
    with pytest.raises(ValueError, match="^clip_range must be"):
        clipped_surrogate(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), clip_range=0.0)
    with pytest.raises(ValueError, match="^prompt_mask: prompts must be left-padded"):
        sample_teacher_mixed(TabularLM(q), TabularLM(p), torch.ones(1, 2, dtype=torch.long), torch.tensor([[1, 0]]),
                             max_new_tokens=1, eos_token_id=EOS, pad_token_id=PAD, generator=torch.Generator(),
                             student_cache=False, teacher_cache=False)


def test_training_layout_gives_the_same_loss():
    """From the sampler to the loss through okd's right-padded training layout: stored log-probs equal the
    recomputed ones (first PPO ratio 1), labels are build_batch's, and the loss equals the response-layout loss."""
    from okd.data.generated import build_batch
    from okd.training import next_token_targets

    student, teacher = _tiny("llama", 0), _tiny("llama", 1)
    prompts = [[5, 6, 7], [9], [10, 11, 12, 13]]
    width = max(map(len, prompts))
    prompt_ids = torch.tensor([[0] * (width - len(x)) + x for x in prompts])
    prompt_mask = (torch.arange(width)[None] >= torch.tensor([width - len(x) for x in prompts])[:, None]).long()
    s = sample_teacher_mixed(student, teacher, prompt_ids, prompt_mask, max_new_tokens=10, eos_token_id=3,
                             pad_token_id=0, generator=torch.Generator().manual_seed(4))
    batch = s.training_batch(pad_token_id=0)
    responses = [s.response_ids[b, : int(s.lengths[b])].tolist() for b in range(3)]
    ref = build_batch(prompts, responses, pad_token_id=0, max_length=64)
    for key in ("input_ids", "attention_mask", "labels"):
        torch.testing.assert_close(batch[key], ref[key])
    targets, target_mask = next_token_targets(batch["labels"])
    assert torch.equal(target_mask, batch["response_mask"])
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach().requires_grad_(True)
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    now = token_log_probs(s_logits.detach(), targets.clamp(min=0), target_mask)
    torch.testing.assert_close(now, batch["old_logprobs"], rtol=1e-4, atol=1e-5)
    loss_fn = MiniLLMLoss()
    flat = loss_fn(s_logits, t_logits, targets.clamp(min=0), target_mask, batch["old_logprobs"],
                   batch["teacher_logprobs"], batch["log_weights"])
    # the same tensors gathered into the response layout
    idx = torch.stack([torch.arange(int(s.lengths.max())) + len(p) - 1 for p in prompts]).clamp(max=s_logits.shape[1] - 1)
    take = lambda x: x.gather(1, idx) if x.dim() == 2 else x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
    resp = loss_fn(take(s_logits), take(t_logits), s.response_ids, s.mask, s.student_logprobs,
                   s.teacher_logprobs, s.log_weights)
    torch.testing.assert_close(flat.loss, resp.loss, rtol=1e-4, atol=1e-5)
    flat.loss.backward()
    assert torch.isfinite(s_logits.grad).all() and s_logits.grad.abs().sum() > 0
