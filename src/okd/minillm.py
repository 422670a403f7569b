"""MiniLLM's objective and its teacher-mixed sampler, as standalone building blocks.

MiniLLM (Gu et al., ICLR 2024, "MiniLLM: Knowledge Distillation of Large Language Models") minimises the
*sequence-level* reverse KL ``KL(q_theta || p) = E_{y ~ q_theta}[log q_theta(y|x) - log p(y|x)]`` between
the student ``q_theta`` and the teacher ``p`` by policy gradient on sampled responses. The paper (Sec. 2.2)
writes the gradient of ``L(theta) = KL(q_theta || p)`` as two parts, with the per-token reward

    r_t = log p(y_t | y_<t, x) - log q(y_t | y_<t, x)      (the sum over t is -log q(y)/p(y))

* the *single-step* part: the gradient of the exact per-token reverse KL
  ``sum_t KL(q_theta(.|y_<t) || p(.|y_<t))`` with the sampled prefixes held fixed
  (:func:`single_step_reverse_kl`); it is ``-E[sum_t r_t grad log q(y_t|y_<t)]``, computed exactly over
  the vocabulary instead of from one sampled token, which lowers the variance;
* the *long-term* part: ``-E[sum_t R_{t+1} grad log q(y_t|y_<t)]`` with the reward to go from the NEXT
  token ``R_{t+1} = sum_{k > t} r_k`` (:func:`long_term_advantages`), optimised through a PPO-style clipped
  surrogate (:func:`clipped_surrogate`).

Together they are an unbiased estimate of ``grad KL(q_theta || p)`` on on-policy samples (the tabular tests
check this exactly). The reference implementation (microsoft/LMOps, ``minillm/minillm/losses.py``,
``sampler.py``) adds the heuristics the paper's results use, all on by default here: discount ``gamma``,
length normalisation of the reward to go, whitened advantages, reward scaling and clipping, teacher-mixed
sampling with a per-token importance weight, PPO clipping, a language-modelling loss. Each one biases the
estimate away from the exact gradient (that is the trade the paper makes for lower variance); switch them
off (``gamma=1, length_norm=False, whiten_advantages=False, reward_scaling=None, reward_clip=None,
teacher_mix_ratio=0``) to get the unbiased estimator.

Conventions
-----------
* ``p`` is the teacher, ``q`` the student (as in :mod:`okd.divergences`). Rewards are "higher is better"
  (``r_t <= 0`` on average: its expectation under ``q`` is minus the token-level reverse KL); every loss
  here is "lower is better" and is minimised.
* **Response layout.** Tensors named ``[B, N]`` are per response token: ``B`` sequences, ``N`` response
  positions, ``mask[b, t]`` True where position ``t`` holds a real response token of row ``b`` (the EOS
  included), False on padding. Position ``t`` of a logits tensor ``[B, N, V]`` is the distribution that
  *predicts* token ``t``. The sampler returns this layout with each response starting at column 0; the
  functions also accept any layout whose masked positions are the response (e.g. the shifted training
  layout, prompt masked out), because discounting and length normalisation count only masked positions:
  the discount is by position *within the response*, never by absolute position (TRL #6626), and
  padding never enters a reward, an advantage, a whitening statistic or a loss (TRL #7024).
* **What is detached.** Rewards, advantages, old log-probs and importance weights are constants
  (computed under ``no_grad`` at sampling time, or detached here). Gradients flow only through the current
  student's log-probs (the surrogate) and the current student's logits (single-step term, LM loss).
* **Reductions.** ``"mean"``: over the counted tokens of the whole batch (what the reference does:
  ``sum(x * mask) / mask.sum()``); ``"sum"``: summed over counted tokens; ``"none"``: ``[B, N]``, 0 on
  padding. A batch with no counted token gives a zero that is still connected to the graph.

Public API: :class:`MiniLLMConfig`, :func:`token_log_probs`, :func:`single_step_reverse_kl`,
:func:`per_token_rewards`, :func:`long_term_advantages`, :func:`clipped_surrogate`, :func:`lm_loss`,
:class:`MiniLLMLoss` (with :class:`MiniLLMLossOutput`), :func:`sample_teacher_mixed` (with
:class:`MixedSamples`, whose ``training_batch()`` puts the samples in okd's training layout) and :class:`TeacherMixedSampler` (the sampler with its own checkpointable
``torch.Generator``).
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from okd.divergences import align_vocab, forward_kl, reverse_kl
from okd.targets import IGNORE_INDEX, mix_losses

__all__ = [
    "MiniLLMConfig",
    "MiniLLMLoss",
    "MiniLLMLossOutput",
    "MixedSamples",
    "TeacherMixedSampler",
    "clipped_surrogate",
    "long_term_advantages",
    "lm_loss",
    "per_token_rewards",
    "sample_teacher_mixed",
    "single_step_reverse_kl",
    "token_log_probs",
]

_REF = "microsoft/LMOps minillm"
_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


@dataclass
class MiniLLMConfig:
    """MiniLLM (Gu et al., ICLR 2024): sequence-level reverse KL by policy gradient on teacher-mixed samples.

    Defaults are those of the paper's runs: the reference code's training scripts
    (microsoft/LMOps ``minillm/scripts/gpt2/minillm/train_base_xl.sh``, the same values in the OPT and
    LLaMA scripts) where they set a value, else its ``minillm/arguments.py`` defaults.
    """

    teacher_mix_ratio: float = 0.2
    """Teacher-mix ratio alpha in [0, 1]: tokens are sampled from (1 - alpha) * q_student + alpha * p_teacher.
    0 samples from the student only. Source: paper Sec. 2.2 (alpha = 0.2) and the scripts' --teacher-mixed-alpha 0.2."""

    clip_range: Optional[float] = 0.2
    """PPO clip range (> 0): the importance ratio is clipped to [1 - c, 1 + c]; None switches clipping off.
    Source: arguments.py --cliprange 0.2 (paper Sec. 2.2: "the clipping strategy of PPO")."""

    gamma: float = 0.95
    """Discount in [0, 1] of the reward to go, by position within the response. 1 is the paper's undiscounted
    sum. Source: arguments.py --gamma 0.95 (not overridden by the scripts)."""

    length_norm: bool = True
    """Divide the reward to go at t by the number of response tokens it sums (paper Sec. 2.2, "length
    normalization"). Source: the scripts' --length-norm; losses.py _get_advantages_and_returns."""

    single_step: bool = True
    """Add the single-step term (the exact per-token reverse KL, paper Sec. 2.2). Source: the scripts'
    --single-step-reg; losses.py _reg_loss."""

    include_current_reward: bool = False
    """Let the reward to go at t start at r_t (the reference code's advantage) instead of r_{t+1} (the
    paper's decomposition, in which r_t is the single-step term's job). With single_step on, True counts r_t
    twice. Source: paper Sec. 2.2 (False); losses.py _get_advantages_and_returns (True)."""

    whiten_advantages: bool = True
    """Whiten the advantages over the batch's response tokens (zero mean, unit variance; padding excluded).
    Source: losses.py _get_advantages_and_returns(use_whitening=True)."""

    reward_scaling: Optional[float] = 0.5
    """Rewards are divided by this (> 0); None leaves them unscaled. Source: the scripts' --reward-scaling 0.5
    (arguments.py default: None); sampler.py."""

    reward_clip: Optional[float] = 100.0
    """Scaled rewards are clipped to [-c, c] (c > 0); None: no clipping. Source: the scripts'
    --cliprange-reward 100 (arguments.py default: 1); sampler.py."""

    lm_coef: float = 1.0
    """Weight (>= 0) of the language-modelling loss on ground-truth text (the reference's "pt" loss on a
    pre-training corpus); 0 leaves it out. Source: arguments.py --lm-coef 1; trainer.py
    (loss = rl_loss + lm_coef * pt_loss)."""

    lm_kd_ratio: Optional[float] = 0.5
    """In [0, 1] or None: the LM loss is (1 - r) * cross-entropy + r * forward KL to the teacher on the same
    text (None: cross-entropy only). Source: the scripts' --kd-ratio 0.5; losses.py pt_loss (which uses the
    soft cross-entropy, equal to forward KL up to the teacher's entropy, a constant)."""

    ppo_epochs: int = 4
    """Updates (>= 1) on each batch of samples before new samples are drawn; the first uses old = current
    policy. Source: the scripts' --ppo-epochs 4; trainer.py (n_updates_per_batch)."""

    num_rollouts: int = 256
    """Responses (>= 1) sampled per round, then cut into training batches for ppo_epochs passes.
    Source: the scripts' --num-rollouts 256."""

    temperature: float = 1.0
    """Sampling temperature (> 0), applied to both student and teacher logits in the mixture and in every
    log-prob. Source: the scripts' --temperature 1.0 (full distribution: --top-k 0 --top-p 1.0)."""

    def __post_init__(self):
        def fail(name: str, rule: str) -> None:
            raise ValueError(f"minillm.{name} must be {rule}, got {getattr(self, name)!r}")

        if not _is_number(self.teacher_mix_ratio) or not 0.0 <= self.teacher_mix_ratio <= 1.0:
            fail("teacher_mix_ratio", "a number in [0, 1]")
        if self.clip_range is not None and (not _is_number(self.clip_range) or self.clip_range <= 0):
            fail("clip_range", "a number > 0 (or None for no clipping)")
        if not _is_number(self.gamma) or not 0.0 <= self.gamma <= 1.0:
            fail("gamma", "a number in [0, 1]")
        for name in ("reward_scaling", "reward_clip"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value <= 0):
                fail(name, "a number > 0 (or None)")
        if not _is_number(self.lm_coef) or self.lm_coef < 0:
            fail("lm_coef", "a number >= 0")
        if self.lm_kd_ratio is not None and (not _is_number(self.lm_kd_ratio) or not 0 <= self.lm_kd_ratio <= 1):
            fail("lm_kd_ratio", "a number in [0, 1] (or None)")
        for name in ("ppo_epochs", "num_rollouts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(name, "an int >= 1")
        if not _is_number(self.temperature) or self.temperature <= 0:
            fail("temperature", "a number > 0")


# --------------------------------------------------------------------------------------------------
# Small pieces of the objective
# --------------------------------------------------------------------------------------------------


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _as_mask(mask: Optional[Tensor], like: Tensor) -> Tensor:
    if mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != values shape {tuple(like.shape)}")
    return mask.bool()


def _reduce(values: Tensor, mask: Tensor, reduction: str) -> Tensor:
    """``values [B, N]`` (any float) reduced over ``mask``; padding is zeroed with where (never NaN)."""
    values = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    return total / mask.sum().clamp(min=1)


def token_log_probs(logits: Tensor, tokens: Tensor, mask: Optional[Tensor] = None, *, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits / T)[tokens]``, at least float32 (float64 stays float64), 0 on padding.

    Args:
        logits: ``[B, N, V]``, position t predicting ``tokens[:, t]``.
        tokens: ``[B, N]`` int64 (padding may hold any id in ``[0, V)``).
        mask: ``[B, N]`` bool, True = counts; None = all count.

    Returns:
        ``[B, N]``, differentiable with respect to ``logits``.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_probs = F.log_softmax(logits.to(dtype) / temperature, dim=-1)
    picked = log_probs.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return _reduce(picked, _as_mask(mask, picked), "none")


def single_step_reverse_kl(
    teacher_logits: Tensor,
    student_logits: Tensor,
    mask: Optional[Tensor] = None,
    *,
    weights: Optional[Tensor] = None,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """The single-step term: exact per-token reverse KL ``KL(q_theta(.|y_<t) || p(.|y_<t))`` over the response.

    It is :func:`okd.divergences.reverse_kl` on the response positions (same values, same gradients), with
    optional per-token ``weights`` (e.g. the importance weights of teacher-mixed samples, which the paper's
    Eq. 7 applies; the reference's ``_reg_loss`` uses none, which is the default here).

    Args:
        teacher_logits: ``[B, N, V_t]`` (no grad needed), ``V_t >= V``.
        student_logits: ``[B, N, V]`` (the gradient flows here).
        mask: ``[B, N]`` bool, True = a response token.
        weights: ``[B, N]`` constants (detached here) or None.
        reduction: ``"mean"`` (over counted tokens; the reference's), ``"sum"`` or ``"none"``.

    Returns:
        float32 scalar, or ``[B, N]`` for ``"none"``.
    """
    _check_reduction(reduction)
    if weights is None and reduction != "none":
        return reverse_kl(teacher_logits, student_logits, mask, temperature=temperature, reduction=reduction)
    per_token = reverse_kl(teacher_logits, student_logits, mask, temperature=temperature, reduction="none")
    if weights is not None:
        per_token = per_token * weights.detach().float()
    return _reduce(per_token, _as_mask(mask, per_token), reduction)


def per_token_rewards(
    teacher_logprobs: Tensor,
    student_logprobs: Tensor,
    mask: Tensor,
    *,
    reward_scaling: Optional[float] = None,
    reward_clip: Optional[float] = None,
) -> Tensor:
    """Per-token reward ``r_t = (log p(y_t|y_<t) - log q_old(y_t|y_<t)) / reward_scaling``, clipped to
    ``[-reward_clip, reward_clip]``, 0 on padding, detached.

    ``student_logprobs`` are the sampling-time (old) student's, so the rewards stay fixed across the PPO
    epochs on one batch of samples (the reference computes them once in ``sampler.py``:
    ``rewards = t_rewards + ent_rewards``, then ``/ reward_scaling`` and ``clip(-c, c)``).

    Args:
        teacher_logprobs, student_logprobs: ``[B, N]`` log-probs of the sampled tokens.
        mask: ``[B, N]`` bool, True = a response token.

    Returns:
        ``[B, N]`` float32 (float64 inputs stay float64).
    """
    mask = _as_mask(mask, teacher_logprobs)
    dtype = torch.promote_types(teacher_logprobs.dtype, torch.float32)
    rewards = teacher_logprobs.detach().to(dtype) - student_logprobs.detach().to(dtype)
    if reward_scaling is not None:
        rewards = rewards / reward_scaling
    if reward_clip is not None:
        rewards = rewards.clamp(-reward_clip, reward_clip)
    return _reduce(rewards, mask, "none")


def long_term_advantages(
    rewards: Tensor,
    mask: Tensor,
    *,
    gamma: float = 0.95,
    length_norm: bool = True,
    include_current_reward: bool = False,
    whiten: bool = True,
) -> Tensor:
    """Advantages of the long-term term: the discounted reward to go, length-normalised and whitened.

    With ``k`` counting only response tokens (masked positions are skipped, not discounted):

        R_t = sum_{k > t} gamma^(k - t - 1) r_k        (include_current_reward=False: paper Sec. 2.2, R_{t+1})
        R_t = sum_{k >= t} gamma^(k - t) r_k           (include_current_reward=True: the reference's advantage)

    ``length_norm`` divides ``R_t`` by the number of response tokens it sums (at least 1), as the
    reference's ``lens`` do in ``losses.py`` ``_get_advantages_and_returns`` (paper: "length
    normalization", ``R^Norm``). ``whiten`` standardises the result over the batch's response tokens (the
    reference's ``whiten``, but with mean and unbiased variance taken over counted tokens only, so padding
    cannot leak in). The last token's advantage is 0 before whitening when ``include_current_reward`` is
    False (nothing follows it).

    Args:
        rewards: ``[B, N]`` (from :func:`per_token_rewards`; values on padding are ignored).
        mask: ``[B, N]`` bool, True = a response token.

    Returns:
        ``[B, N]`` detached, 0 on padding, in the rewards' float dtype (at least float32).
    """
    mask = _as_mask(mask, rewards)
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    rewards = torch.where(mask, rewards.detach().to(dtype), torch.zeros((), dtype=dtype, device=rewards.device))
    maskf = mask.to(dtype)
    to_go = torch.zeros_like(rewards[:, 0])  # reward to go from t (inclusive), response tokens only
    count = torch.zeros_like(to_go)  # response tokens from t (inclusive)
    advantages = torch.zeros_like(rewards)
    counts = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        valid = mask[:, t]
        if include_current_reward:
            to_go = torch.where(valid, rewards[:, t] + gamma * to_go, to_go)
            count = count + maskf[:, t]
            advantages[:, t], counts[:, t] = to_go, count
        else:
            advantages[:, t], counts[:, t] = to_go, count  # what follows t
            to_go = torch.where(valid, rewards[:, t] + gamma * to_go, to_go)
            count = count + maskf[:, t]
    if length_norm:
        advantages = advantages / counts.clamp(min=1)
    if whiten:
        n = maskf.sum()
        if n > 0:
            mean = (advantages * maskf).sum() / n
            var = (((advantages - mean) * maskf) ** 2).sum() / (n - 1).clamp(min=1)
            advantages = (advantages - mean) * torch.rsqrt(var + 1e-8)
    return _reduce(advantages, mask, "none").detach()


def clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    log_weights: Optional[Tensor] = None,
    clip_range: Optional[float] = 0.2,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    """PPO's clipped policy-gradient loss ``max(-A * rho, -A * clip(rho, 1 - c, 1 + c))``.

    ``rho = exp(logprobs - old_logprobs) * exp(log_weights)``: the ratio of the current student to the
    sampling-time student, times the importance weight ``w = q_old(y_t) / mix(y_t)`` of teacher-mixed
    samples, so ``rho = q_theta(y_t) / mix(y_t)``. As in the reference (``losses.py`` ``_pg_loss``) the
    clip applies to that product. With ``old_logprobs == logprobs.detach()``, no weights and
    ``clip_range=None``, the gradient is REINFORCE's ``-A grad log q``.

    Args:
        logprobs: ``[B, N]`` current student log-probs of the sampled tokens (the gradient flows here).
        old_logprobs: ``[B, N]`` log-probs at sampling time (detached here).
        advantages: ``[B, N]`` (detached here), e.g. from :func:`long_term_advantages`.
        mask: ``[B, N]`` bool, True = a response token.
        log_weights: ``[B, N]`` log importance weights (detached) or None (on-policy: w = 1).
        clip_range: ``c > 0``, or None for no clipping.
        reduction: ``"mean"`` (over counted tokens, the reference's), ``"sum"`` or ``"none"``.

    Returns:
        ``(loss, clipped_fraction)``: the loss (float32 scalar, ``[B, N]`` for ``"none"``) and the share of
        counted tokens where the clipped branch was taken (detached scalar).
    """
    _check_reduction(reduction)
    if clip_range is not None and clip_range <= 0:
        raise ValueError(f"clip_range must be > 0 (or None for no clipping), got {clip_range!r}")
    mask = _as_mask(mask, logprobs)
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    log_ratio = torch.where(mask, logprobs.to(dtype) - old_logprobs.detach().to(dtype), zero)
    if log_weights is not None:
        log_ratio = log_ratio + torch.where(mask, log_weights.detach().to(dtype), zero)
    ratio = log_ratio.exp()
    advantages = torch.where(mask, advantages.detach().to(dtype), zero)
    unclipped = -advantages * ratio
    if clip_range is None:
        loss, took_clip = unclipped, torch.zeros_like(mask)
    else:
        clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
        loss = torch.maximum(unclipped, clipped)
        took_clip = (clipped > unclipped) & mask
    fraction = took_clip.sum().to(dtype) / mask.sum().clamp(min=1)
    return _reduce(loss, mask, reduction), fraction.detach()


def lm_loss(
    student_logits: Tensor,
    targets: Tensor,
    *,
    teacher_logits: Optional[Tensor] = None,
    kd_ratio: Optional[float] = None,
) -> Tensor:
    """Language-modelling loss on ground-truth text: ``(1 - r) * CE + r * KL(p || q)`` (r = ``kd_ratio``).

    Args:
        student_logits: ``[B, L, V]``, position t predicting ``targets[:, t]`` (already shifted).
        targets: ``[B, L]`` int64 with ``-100`` where no loss is taken.
        teacher_logits: ``[B, L, V_t]``, needed when ``kd_ratio`` is a number > 0.
        kd_ratio: None or 0 = cross-entropy only.

    Returns:
        float32 scalar, means over the counted tokens (0, still in the graph, if none counts).
    """
    mask = targets != IGNORE_INDEX
    log_probs = F.log_softmax(student_logits.float(), dim=-1)
    nll = -log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ce = _reduce(nll, mask, "mean")
    if not kd_ratio:
        return ce
    if teacher_logits is None:
        raise ValueError("lm_loss: kd_ratio > 0 needs teacher_logits")
    kd = forward_kl(teacher_logits, student_logits, mask, reduction="mean")
    return mix_losses(ce, kd, kd_ratio)


# --------------------------------------------------------------------------------------------------
# The total objective
# --------------------------------------------------------------------------------------------------


@dataclass
class MiniLLMLossOutput:
    """The total loss and its parts (floats in ``stats`` for logging)."""

    loss: Tensor
    single_step: Tensor
    policy_gradient: Tensor
    lm: Tensor
    stats: dict[str, float]


class MiniLLMLoss(nn.Module):
    """``loss = pg + single_step * KL_token + lm_coef * LM``, the reference's ``rl_loss + lm_coef * pt_loss``.

    Call with the current student's and the teacher's logits on the response positions and what the
    sampler stored (see :class:`MixedSamples`); the rewards and advantages are recomputed from the stored
    (sampling-time) log-probs, so they are the same on every PPO epoch over one batch of samples.

    Args (of ``forward``):
        student_logits: ``[B, N, V]`` current student, position t predicting ``response_ids[:, t]``.
        teacher_logits: ``[B, N, V_t]`` teacher on the same positions (for the single-step term; may be
            None when ``config.single_step`` is False).
        response_ids, mask: ``[B, N]``.
        old_logprobs: ``[B, N]`` student log-probs at sampling time.
        teacher_logprobs: ``[B, N]`` teacher log-probs of the sampled tokens.
        log_weights: ``[B, N]`` log importance weights ``log q_old - log mix`` (None = on-policy).
        lm_logits, lm_targets, lm_teacher_logits: a ground-truth batch for the LM loss (shifted;
            ``-100`` = no loss), or None to leave it out.

    The ``[B, N]`` arguments may also be in the shifted training layout (``[B, L]``, see
    :meth:`MixedSamples.training_batch`): the result is the same.
    """

    def __init__(self, config: Optional[MiniLLMConfig] = None):
        super().__init__()
        self.config = config if config is not None else MiniLLMConfig()

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Optional[Tensor],
        response_ids: Tensor,
        mask: Tensor,
        old_logprobs: Tensor,
        teacher_logprobs: Tensor,
        log_weights: Optional[Tensor] = None,
        *,
        lm_logits: Optional[Tensor] = None,
        lm_targets: Optional[Tensor] = None,
        lm_teacher_logits: Optional[Tensor] = None,
    ) -> MiniLLMLossOutput:
        c = self.config
        mask = mask.bool()
        logprobs = token_log_probs(student_logits, response_ids, mask, temperature=c.temperature)
        rewards = per_token_rewards(
            teacher_logprobs, old_logprobs, mask, reward_scaling=c.reward_scaling, reward_clip=c.reward_clip
        )
        advantages = long_term_advantages(
            rewards,
            mask,
            gamma=c.gamma,
            length_norm=c.length_norm,
            include_current_reward=c.include_current_reward,
            whiten=c.whiten_advantages,
        )
        pg, clipped = clipped_surrogate(
            logprobs, old_logprobs, advantages, mask, log_weights=log_weights, clip_range=c.clip_range
        )
        zero = pg.new_zeros(())
        single = zero
        if c.single_step:
            if teacher_logits is None:
                raise ValueError("MiniLLMLoss: config.single_step needs teacher_logits")
            single = single_step_reverse_kl(teacher_logits, student_logits, mask, temperature=c.temperature)
        lm = zero
        if c.lm_coef > 0 and lm_logits is not None:
            if lm_targets is None:
                raise ValueError("MiniLLMLoss: lm_logits given without lm_targets")
            lm = lm_loss(lm_logits, lm_targets, teacher_logits=lm_teacher_logits, kd_ratio=c.lm_kd_ratio)
        loss = pg + single + c.lm_coef * lm
        with torch.no_grad():
            n = mask.sum().clamp(min=1)
            stats = {
                "pg_loss": float(pg),
                "single_step": float(single),
                "lm_loss": float(lm),
                "clipped_fraction": float(clipped),
                # sum_t r_t per sequence, averaged: an estimate of -KL(q_old || p) per sequence (scaled rewards)
                "reward": float(rewards.sum() / mask.shape[0]),
                "response_tokens_mean": float(n / mask.shape[0]),
            }
        return MiniLLMLossOutput(loss=loss, single_step=single, policy_gradient=pg, lm=lm, stats=stats)


# --------------------------------------------------------------------------------------------------
# The teacher-mixed sampler
# --------------------------------------------------------------------------------------------------


@dataclass
class MixedSamples:
    """What :func:`sample_teacher_mixed` returns; every ``[B, N]`` tensor is 0 (or pad) where ``mask`` is False.

    Attributes:
        prompt_ids, prompt_mask: ``[B, P]`` the left-padded prompts as given.
        response_ids: ``[B, N]`` sampled tokens (the EOS kept), ``pad_token_id`` after it.
        mask: ``[B, N]`` bool, True on response tokens (up to and including the first EOS).
        student_logprobs: ``[B, N]`` ``log q_old(y_t|y_<t)`` at the temperature (the PPO "old" log-probs).
        teacher_logprobs: ``[B, N]`` ``log p(y_t|y_<t)`` at the temperature (for the rewards).
        mix_logprobs: ``[B, N]`` ``log((1 - alpha) q_old + alpha p)(y_t)``: the distribution actually sampled.
        log_weights: ``[B, N]`` ``student_logprobs - mix_logprobs``, the per-token importance weight's log
            (0 when alpha = 0). Not clipped here: the reference clips it only inside the PPO ratio.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    mask: Tensor
    student_logprobs: Tensor
    teacher_logprobs: Tensor
    mix_logprobs: Tensor
    log_weights: Tensor

    @property
    def lengths(self) -> Tensor:
        """``[B]`` response lengths."""
        return self.mask.sum(-1)

    def training_batch(self, pad_token_id: int) -> dict[str, Tensor]:
        """The samples in okd's training layout, with the stored per-token values aligned to it.

        Returns ``input_ids``, ``attention_mask``, ``labels`` ``[B, L]`` (each row: its prompt's real
        tokens, then its response, right-padded; ``labels`` -100 on the prompt and the padding: the layout
        of ``okd.data.generated.build_batch``, without truncation) and ``old_logprobs``,
        ``teacher_logprobs``, ``log_weights``, ``response_mask`` ``[B, L]`` aligned with the SHIFTED targets
        (``okd.training.next_token_targets(labels)``: position i holds the value of the token at i + 1, so
        they line up with the logits that predict it); 0 / False elsewhere. With the student's logits
        ``[B, L, V]`` on ``input_ids`` and ``targets = next_token_targets(labels)[0]``,
        ``MiniLLMLoss(student_logits, teacher_logits, targets.clamp(min=0), response_mask, ...)`` is the
        loss on the response layout (discounting counts response positions only).
        """
        prompt_lengths = self.prompt_mask.sum(-1).tolist()
        lengths = self.lengths.tolist()
        B = len(lengths)
        L = max(p + n for p, n in zip(prompt_lengths, lengths))
        device = self.response_ids.device
        ids = torch.full((B, L), pad_token_id, dtype=torch.long, device=device)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long, device=device)
        attention = torch.zeros((B, L), dtype=torch.long, device=device)
        aligned = {k: torch.zeros((B, L), device=device) for k in ("old_logprobs", "teacher_logprobs", "log_weights")}
        response_mask = torch.zeros((B, L), dtype=torch.bool, device=device)
        sources = {"old_logprobs": self.student_logprobs, "teacher_logprobs": self.teacher_logprobs, "log_weights": self.log_weights}
        for b, (p, n) in enumerate(zip(prompt_lengths, lengths)):
            ids[b, :p] = self.prompt_ids[b, self.prompt_ids.shape[1] - p :]
            ids[b, p : p + n] = self.response_ids[b, :n]
            labels[b, p : p + n] = self.response_ids[b, :n]
            attention[b, : p + n] = 1
            response_mask[b, p - 1 : p - 1 + n] = True
            for key, values in sources.items():
                aligned[key][b, p - 1 : p - 1 + n] = values[b, :n]
        return {"input_ids": ids, "attention_mask": attention, "labels": labels, "response_mask": response_mask, **aligned}


class _Stepper:
    """Next-token logits of one model, one step at a time.

    ``cached``: a Hugging Face causal LM run with its KV cache on the left-padded rows; positions are
    ``cumsum(attention_mask) - 1`` so that each row's first real token is position 0, exactly as in the
    right-padded training layout. Otherwise the model is called as ``model(input_ids=, attention_mask=)``
    on the whole sequence so far, rebuilt right-padded (the training layout, so any okd forward works,
    e.g. :class:`okd.teacher.Teacher` with an online module), and the logits are read at each row's last
    real token: correct for any model, quadratic in the length.
    """

    def __init__(self, model, cached: bool):
        self.model = model
        self.cached = cached
        self.cache = None
        # transformers 5.x renamed the forward argument ``past_key_values`` to ``cache`` (the old name still
        # works, with a deprecation warning); use whichever this model's forward takes.
        forward = getattr(model, "forward", model)
        try:
            names = inspect.signature(forward).parameters
        except (TypeError, ValueError):
            names = {}
        self.cache_argument = "cache" if "cache" in names else "past_key_values"

    @staticmethod
    def _cache_of(out):
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    @staticmethod
    def _logits(out) -> Tensor:
        return out if isinstance(out, Tensor) else out.logits

    def start(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        self.prompt_ids, self.prompt_mask = prompt_ids, prompt_mask
        self.lengths = prompt_mask.sum(-1)
        self.generated: list[Tensor] = []
        if self.cached:
            self.attention = prompt_mask.long()
            positions = (self.attention.cumsum(-1) - 1).clamp(min=0)
            out = self.model(input_ids=prompt_ids, attention_mask=self.attention, position_ids=positions, use_cache=True)
            self.cache = self._cache_of(out)
            self.next_position = positions[:, -1] + 1
            return self._logits(out)[:, -1]
        return self._full()

    def step(self, tokens: Tensor) -> Tensor:
        if self.cached:
            self.attention = torch.cat([self.attention, torch.ones_like(tokens)[:, None]], dim=1)
            out = self.model(
                input_ids=tokens[:, None],
                attention_mask=self.attention,
                position_ids=self.next_position[:, None],
                use_cache=True,
                **{self.cache_argument: self.cache},
            )
            self.cache = self._cache_of(out)
            self.next_position = self.next_position + 1
            return self._logits(out)[:, -1]
        self.generated.append(tokens)
        return self._full()

    def _full(self) -> Tensor:
        # Right-padded rows: each left-padded row shifted left by its padding, so that its prompt starts in
        # column 0 and the generated tokens follow it (columns past its length are masked out).
        full = self.prompt_ids
        if self.generated:
            full = torch.cat([full, torch.stack(self.generated, dim=1)], dim=1)  # [B, P + n], left-padded
        B, total = full.shape
        n = len(self.generated)
        pad = total - n - self.lengths  # [B] left padding of each row
        width = int(self.lengths.max()) + n
        columns = torch.arange(width, device=full.device)
        ids = full.gather(1, (columns[None, :] + pad[:, None]).clamp(max=total - 1))
        attention = (columns[None, :] < (self.lengths + n)[:, None]).long()
        logits = self._logits(self.model(input_ids=ids, attention_mask=attention))
        last = (self.lengths + n - 1).long()
        return logits[torch.arange(B, device=logits.device), last]


def _check_prompts(prompt_ids: Tensor, prompt_mask: Tensor) -> None:
    if prompt_ids.dim() != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_ids and prompt_mask must both be [B, P], got {tuple(prompt_ids.shape)} and {tuple(prompt_mask.shape)}")
    mask = prompt_mask.bool()
    if not bool(mask.any(-1).all()):
        raise ValueError("prompt_mask: every prompt needs at least one real token")
    # Left padding: once a row's real tokens start they run to the last column.
    if not bool((mask.long().cummax(-1).values.bool() == mask).all()):
        raise ValueError("prompt_mask: prompts must be left-padded (real tokens contiguous, ending in the last column)")


@torch.no_grad()
def sample_teacher_mixed(
    student,
    teacher,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None,
    pad_token_id: int,
    generator: torch.Generator,
    teacher_mix_ratio: float = 0.2,
    temperature: float = 1.0,
    student_cache: bool = True,
    teacher_cache: bool = True,
) -> MixedSamples:
    """Sample responses token by token from ``(1 - alpha) * q_student + alpha * p_teacher``.

    This is MiniLLM's teacher-mixed sampling (paper Sec. 2.2, alpha = 0.2; the reference mixes the two
    softmaxes inside its forked ``generate`` and derives ``w = q / mix`` in ``minillm/minillm/sampler.py``).
    Both models run on the same left-padded prompts, each with its own KV cache (``*_cache=False`` for a
    model without one, see :class:`_Stepper`), in eval mode under ``no_grad`` (their modes are restored).
    Tokens are drawn with ``torch.multinomial`` from ``generator`` only, so the samples depend on its state
    and nothing else (the global RNG is neither used nor advanced): save ``generator.get_state()`` to resume
    exactly. A row stops after its first EOS (kept in the response); sampling stops when every row has, or
    after ``max_new_tokens``. A teacher vocabulary larger than the student's is sliced to it
    (:func:`okd.divergences.align_vocab`).

    Args:
        student, teacher: causal LMs (HF models; with ``*_cache=False`` any callable
            ``model(input_ids=, attention_mask=)`` returning logits ``[B, L, V]`` or an output with ``.logits``).
        prompt_ids, prompt_mask: ``[B, P]`` left-padded prompts (every row with >= 1 real token).
        max_new_tokens: the most tokens per response (>= 1).
        eos_token_id: id(s) that end a response, or None.
        pad_token_id: written after a row's EOS.
        generator: a ``torch.Generator`` on the models' device.
        teacher_mix_ratio: alpha in [0, 1].
        temperature: > 0, divides both models' logits.

    Returns:
        :class:`MixedSamples`, every tensor on the models' device, log-probs float32.
    """
    if isinstance(teacher_mix_ratio, bool) or not _is_number(teacher_mix_ratio) or not 0 <= teacher_mix_ratio <= 1:
        raise ValueError(f"teacher_mix_ratio must be a number in [0, 1], got {teacher_mix_ratio!r}")
    if not _is_number(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    _check_prompts(prompt_ids, prompt_mask)
    device = prompt_ids.device
    if generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, the prompts on {device}: put them on the same device")
    alpha = float(teacher_mix_ratio)
    eos = torch.tensor(
        [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)),
        dtype=torch.long,
        device=device,
    )
    log_1ma = math.log1p(-alpha) if alpha < 1 else -math.inf
    log_a = math.log(alpha) if alpha > 0 else -math.inf

    models = [m for m in (student, teacher) if isinstance(m, nn.Module)]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        s_step, t_step = _Stepper(student, student_cache), _Stepper(teacher, teacher_cache)
        s_logits = s_step.start(prompt_ids, prompt_mask)
        t_logits = t_step.start(prompt_ids, prompt_mask)
        B = prompt_ids.shape[0]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        columns: dict[str, list[Tensor]] = {k: [] for k in ("ids", "mask", "s", "t", "mix")}
        for step in range(max_new_tokens):
            log_q = F.log_softmax(s_logits.float() / temperature, dim=-1)
            log_p = F.log_softmax(align_vocab(t_logits, log_q.shape[-1]).float() / temperature, dim=-1)
            # log((1 - a) q + a p) without leaving log space; a = 0 or 1 give exactly log q or log p.
            log_mix = torch.logaddexp(log_q + log_1ma, log_p + log_a)
            tokens = torch.multinomial(log_mix.exp(), 1, generator=generator).squeeze(-1)
            live = ~done
            tokens = torch.where(live, tokens, torch.full_like(tokens, pad_token_id))
            pick = tokens.clamp(min=0, max=log_q.shape[-1] - 1)[:, None]
            zero = torch.zeros((), device=device)
            columns["ids"].append(tokens)
            columns["mask"].append(live)
            for key, table in (("s", log_q), ("t", log_p), ("mix", log_mix)):
                columns[key].append(torch.where(live, table.gather(-1, pick).squeeze(-1), zero))
            done = done | (live & torch.isin(tokens, eos))
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            s_logits = s_step.step(tokens)
            t_logits = t_step.step(tokens)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    stack = {k: torch.stack(v, dim=1) for k, v in columns.items()}
    return MixedSamples(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask.bool(),
        response_ids=stack["ids"],
        mask=stack["mask"],
        student_logprobs=stack["s"],
        teacher_logprobs=stack["t"],
        mix_logprobs=stack["mix"],
        log_weights=torch.where(stack["mask"], stack["s"] - stack["mix"], torch.zeros((), device=device)),
    )


class TeacherMixedSampler:
    """:func:`sample_teacher_mixed` with its settings and its own seeded ``torch.Generator``.

    ``state_dict()`` / ``load_state_dict()`` hold the generator's state (and the count of calls), so a
    resumed run draws exactly the samples the uninterrupted run would have drawn, given the same weights.
    The seed is the same on every process unless the caller offsets it (data-parallel ranks that sample
    different prompts may share it; ranks that must agree, e.g. with sharded models, must).
    """

    def __init__(
        self,
        student,
        teacher,
        *,
        eos_token_id: int | list[int] | None,
        pad_token_id: int,
        max_new_tokens: int,
        config: Optional[MiniLLMConfig] = None,
        seed: int = 42,
        device: torch.device | str = "cpu",
        student_cache: bool = True,
        teacher_cache: bool = True,
    ):
        self.student, self.teacher = student, teacher
        self.config = config if config is not None else MiniLLMConfig()
        self.eos_token_id, self.pad_token_id, self.max_new_tokens = eos_token_id, pad_token_id, max_new_tokens
        self.student_cache, self.teacher_cache = student_cache, teacher_cache
        # seed 42: the reference's --seed-ppo default (arguments.py).
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.calls = 0

    def sample(self, prompt_ids: Tensor, prompt_mask: Tensor) -> MixedSamples:
        samples = sample_teacher_mixed(
            self.student,
            self.teacher,
            prompt_ids,
            prompt_mask,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            generator=self.generator,
            teacher_mix_ratio=self.config.teacher_mix_ratio,
            temperature=self.config.temperature,
            student_cache=self.student_cache,
            teacher_cache=self.teacher_cache,
        )
        self.calls += 1
        return samples

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.calls = int(state["calls"])
