"""Token-level divergences between a teacher's and a student's next-token distributions.

Every function here compares two sets of logits position by position and returns a divergence per
token (summed over the vocabulary), reduced over the tokens that count.

Conventions
-----------
* **p is the teacher, q is the student.** ``p = softmax(teacher_logits / T)``,
  ``q = softmax(student_logits / T)``. "Forward KL" is ``KL(p || q)`` (what word-level KD minimises),
  "reverse KL" is ``KL(q || p)``.
* **Shapes.** ``teacher_logits`` and ``student_logits`` are ``[..., V]`` (typically ``[B, T, V]``) and
  share their leading shape ``[...]``. ``mask`` has shape ``[...]`` (e.g. ``[B, T]``), bool or 0/1:
  True (1) means "this token counts"; ``mask=None`` means every token counts. Any float dtype is accepted
  (fp32, bf16, fp16): the maths is done in float32, one chunk at a time.
* **Reduction.** ``"mean"`` (default): mean over the counted tokens of the per-token divergence. If no
  token counts, the result is a float32 zero that is still connected to the autograd graph, so
  ``.backward()`` works and gives all-zero gradients (never NaN). ``"sum"``: sum over the counted
  tokens. ``"none"``: the per-token values, float32, with the inputs' leading shape ``[...]`` and 0 at
  positions that do not count.
* **Temperature.** ``T`` divides both sets of logits before the softmax. There is no ``T**2`` factor
  (Hinton et al. multiply the loss by ``T**2`` to keep gradient magnitudes comparable across
  temperatures; do that in the caller if you want it).
* **Chunking (memory).** Logits of a full batch are large (8 x 1024 tokens x 50k vocab = 1.6 GiB in
  float32). A plain implementation (``log_softmax`` of the whole tensor, products, ...) keeps several
  full-size float32 temporaries alive for the backward pass. Here the counted tokens are processed
  ``chunk_tokens`` at a time, in the forward AND in the backward: while computing a chunk's values we
  also compute that chunk's gradient and write it into one preallocated buffer per input that requires
  grad (same shape and dtype as that input): by the closed form for forward KL, reverse KL and the
  generalized JSD, by autograd for the others. The backward pass only scales those buffers. Peak extra
  memory is therefore about one gradient buffer per input that needs one, plus the float32 temporaries of
  a single chunk. Tokens that do not count (prompt, padding) are skipped entirely, which also saves
  compute. The result does not depend on ``chunk_tokens`` beyond float32 rounding. A chunk's
  temporaries are about six ``[chunk_tokens, V]`` float32 arrays (more for JSD and AKL), so lowering
  ``chunk_tokens`` lowers the peak further. ``benchmarks/divergence_memory.py`` measures this (forward
  KL, 8 x 1024 tokens, V = 50257: peak extra memory ~1.8x one input tensor, gradient included, versus
  ~5x for the usual full-tensor code). Consequences of this design: the backward of a divergence can
  run only once (no ``retain_graph`` re-use) and double backward is not supported.
* **Vocab padding.** Teachers are often padded to a larger vocabulary than the student (e.g. 152064 vs
  151936 rows in the output layer). When the teacher's last dim is larger, it is sliced to the
  student's size with :func:`align_vocab`; checking that the tokenizer never produces the extra ids is
  the caller's job. A teacher vocabulary smaller than the student's raises ``ValueError``. Padded
  positions whose logits are ``-inf`` in both teacher and student contribute exactly 0 (never NaN).
* **Numerics.** Log-probabilities come from ``log_softmax`` (stable for logits of +-1e4). Terms of the
  form ``0 * log 0`` are 0. Where the teacher gives mass to a token the student assigns exactly zero
  (``-inf`` student logit) forward KL is legitimately ``+inf``. Gradients are finite for finite inputs.

Public API: :func:`forward_kl`, :func:`reverse_kl`, :func:`generalized_jsd`, :func:`total_variation`,
:func:`skew_kl`, :func:`skew_reverse_kl`, :func:`adaptive_kl`, the registry :data:`DIVERGENCES`,
:func:`get_divergence` and :func:`align_vocab`.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DIVERGENCES",
    "adaptive_kl",
    "align_vocab",
    "forward_kl",
    "generalized_jsd",
    "get_divergence",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "total_variation",
]

_REDUCTIONS = ("mean", "sum", "none")

# A finite stand-in for log(0). Using -inf directly makes expressions such as (-inf) - (-inf) produce
# NaN in the forward pass or in the backward pass (even inside the branch that torch.where discards).
# Any number far below every reachable log-probability works: exp(_LOG_ZERO - x) is exactly 0 for any x
# that a float32 log-softmax can produce, and it is small enough in magnitude that the products it
# enters (always multiplied by an exact 0 probability) stay finite in float32.
_LOG_ZERO = -1.0e20


# --------------------------------------------------------------------------------------------------
# Vocabulary alignment
# --------------------------------------------------------------------------------------------------


def align_vocab(teacher_logits: Tensor, student_vocab_size: int) -> Tensor:
    """Make the teacher's last dim match the student's vocabulary size.

    Args:
        teacher_logits: ``[..., V_t]``.
        student_vocab_size: ``V_s``.

    Returns:
        ``teacher_logits[..., :V_s]`` (a view, no copy) when ``V_t > V_s``; the input unchanged when
        ``V_t == V_s``.

    Raises:
        ValueError: if ``V_t < V_s`` (the teacher cannot score tokens it does not have).

    The slice assumes the extra teacher ids are padding that the shared tokenizer never produces; that
    is the caller's responsibility to check (e.g. ``len(tokenizer) <= V_s``).
    """
    teacher_vocab = teacher_logits.shape[-1]
    if teacher_vocab == student_vocab_size:
        return teacher_logits
    if teacher_vocab < student_vocab_size:
        raise ValueError(
            f"teacher vocab {teacher_vocab} < student vocab {student_vocab_size}: the teacher's logits must "
            "cover every student token id (a larger, padded teacher vocab is sliced; a smaller one cannot be)"
        )
    return teacher_logits[..., :student_vocab_size]


# --------------------------------------------------------------------------------------------------
# Per-token divergences on one float32 chunk.
#
# Each takes temperature-scaled float32 logits t (teacher) and s (student) of shape [n, V] and returns
# the per-token divergence, shape [n]. They are ordinary differentiable torch code: the chunked driver
# below differentiates them with torch.autograd.grad, one chunk at a time, unless the divergence has a
# closed-form gradient (_CLOSED_FORMS, below).
# --------------------------------------------------------------------------------------------------


def _kl_from_log_probs(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``KL(a || b)`` per row, from log-probabilities ``[n, V]``; returns ``[n]``.

    Terms with ``a == 0`` are 0 (including ``0 * log(0 / 0)`` at padded ``-inf`` columns). The log-ratio
    is masked *before* the multiplication so that the discarded branch cannot feed NaN into the backward
    pass: ``torch.where(m, a * r, 0)`` would still back-propagate ``0 * inf`` through ``a * r``.
    """
    a = log_a.exp()
    return (a * _masked_log_ratio(a, log_a, log_b)).sum(dim=-1)


def _masked_log_ratio(a: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """``log a - log b`` where ``a > 0``, exactly 0 elsewhere (see :func:`_kl_from_log_probs`)."""
    return torch.where(a > 0, log_a - log_b, torch.zeros((), dtype=log_a.dtype, device=log_a.device))


def _fkl_tokens(t: Tensor, s: Tensor) -> Tensor:
    """Forward KL ``KL(p || q)`` per token. ``t, s: [n, V]`` -> ``[n]``."""
    return _kl_from_log_probs(F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1))


def _rkl_tokens(t: Tensor, s: Tensor) -> Tensor:
    """Reverse KL ``KL(q || p)`` per token. ``t, s: [n, V]`` -> ``[n]``."""
    return _kl_from_log_probs(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1))


def _tvd_tokens(t: Tensor, s: Tensor) -> Tensor:
    """Total variation ``0.5 * sum_v |p - q|`` per token. ``t, s: [n, V]`` -> ``[n]``."""
    return 0.5 * (F.softmax(t, dim=-1) - F.softmax(s, dim=-1)).abs().sum(dim=-1)


def _safe_log_softmax(x: Tensor) -> Tensor:
    """``log_softmax`` with ``-inf`` (probability exactly 0) replaced by the finite :data:`_LOG_ZERO`."""
    log_probs = F.log_softmax(x, dim=-1)
    return torch.where(torch.isneginf(log_probs), torch.full_like(log_probs, _LOG_ZERO), log_probs)


def _log_ratios_to_mixture(log_p: Tensor, log_q: Tensor, w_p: float) -> tuple[Tensor, Tensor]:
    """Log-ratios of ``p`` and ``q`` to the mixture ``m = w_p p + (1 - w_p) q``, for ``0 < w_p < 1``.

    Args:
        log_p, log_q: ``[n, V]`` finite log-probabilities (see :func:`_safe_log_softmax`).
        w_p: mixture weight of ``p``.

    Returns:
        ``(log p - log m, log q - log m)``, each ``[n, V]``.

    Why not ``log m = logsumexp(log p + log w_p, log q + log w_q)`` followed by ``log p - log m``: for a
    weight near 0 (or 1) ``log m`` is within ~w_p of ``log q`` and the subtraction cancels, which
    amplifies float32 rounding by 1/w_p in the scaled JSD. Written in terms of ``d = log p - log q``,

        log m - log p = logaddexp(log w_p, log w_q - d)
        log m - log q = logaddexp(log w_p + d, log w_q)

    and ``logaddexp(a, b) = max + log1p(exp(-|a - b|))`` keeps the small result accurate.
    """
    log_wp = math.log(w_p)
    log_wq = math.log1p(-w_p)
    d = log_p - log_q
    log_p_minus_log_m = -torch.logaddexp(torch.full_like(d, log_wp), log_wq - d)
    log_q_minus_log_m = -torch.logaddexp(log_wp + d, torch.full_like(d, log_wq))
    return log_p_minus_log_m, log_q_minus_log_m


def _jsd_tokens(t: Tensor, s: Tensor, *, beta: float, scaled: bool) -> Tensor:
    """Generalized JSD per token. ``t, s: [n, V]`` -> ``[n]``. See :func:`generalized_jsd`."""
    if beta == 0.0:
        return _fkl_tokens(t, s)
    if beta == 1.0:
        return _rkl_tokens(t, s)
    log_p, log_q = _safe_log_softmax(t), _safe_log_softmax(s)
    log_p_over_m, log_q_over_m = _log_ratios_to_mixture(log_p, log_q, beta)
    # p = exp(log p) is exactly 0 at _LOG_ZERO entries, and the log-ratios are finite there, so the
    # products are exact zeros: no masking needed.
    kl_p_m = (log_p.exp() * log_p_over_m).sum(dim=-1)
    kl_q_m = (log_q.exp() * log_q_over_m).sum(dim=-1)
    jsd = beta * kl_p_m + (1.0 - beta) * kl_q_m
    if scaled:
        jsd = jsd / (beta * (1.0 - beta))
    return jsd


# Closed-form gradients. For the divergences used most (forward KL: `kd` and the OKD student loss;
# reverse KL; the generalized JSD: `gkd` and the OKD module's default) the chunked driver skips autograd:
# each function below returns the per-token values and the gradients of their sum w.r.t. the
# (temperature-scaled) logits in a few tensor passes, where autograd's backward through the same graph
# takes several times more (benchmarks/results/divergence_speed.md measures both). Both routes are
# tested to agree with the float64 references (tests/test_divergences.py).
#
# With p = softmax(t), q = softmax(s), for any per-token value f(p, q): d f / d s = q * (g - sum(q * g))
# where g = d f / d q (softmax's Jacobian), and the same for t with p.


def _kl_value_and_grads(log_a: Tensor, log_b: Tensor, need_a: bool, need_b: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``KL(a || b)`` per row (terms with ``a == 0`` are 0, as in :func:`_kl_from_log_probs`) and its
    gradients w.r.t. the logits of ``a`` (``a * (r - KL)``, ``r = log a - log b``) and of ``b`` (``b - a``)."""
    a = log_a.exp()
    log_ratio = _masked_log_ratio(a, log_a, log_b)
    value = (a * log_ratio).sum(dim=-1)
    grad_a = a * (log_ratio - value[:, None]) if need_a else None
    grad_b = log_b.exp() - a if need_b else None
    return value, grad_a, grad_b


def _fkl_closed_form(t: Tensor, s: Tensor, need_t: bool, need_s: bool):
    return _kl_value_and_grads(F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1), need_t, need_s)


def _rkl_closed_form(t: Tensor, s: Tensor, need_t: bool, need_s: bool):
    value, grad_s, grad_t = _kl_value_and_grads(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), need_s, need_t)
    return value, grad_t, grad_s


def _jsd_closed_form(t: Tensor, s: Tensor, need_t: bool, need_s: bool, *, beta: float, scaled: bool):
    """``JSD_b`` per token and its gradients: d JSD / d q = (1 - b) log(q / m) and d JSD / d p =
    b log(p / m) (the other terms of the derivative cancel because ``m = b p + (1 - b) q``), so
    ``grad_s = (1 - b) q (log q/m - KL(q || m))`` and ``grad_t = b p (log p/m - KL(p || m))``."""
    if beta == 0.0:
        return _fkl_closed_form(t, s, need_t, need_s)
    if beta == 1.0:
        return _rkl_closed_form(t, s, need_t, need_s)
    log_p, log_q = _safe_log_softmax(t), _safe_log_softmax(s)
    log_p_over_m, log_q_over_m = _log_ratios_to_mixture(log_p, log_q, beta)
    p, q = log_p.exp(), log_q.exp()
    kl_p_m = (p * log_p_over_m).sum(dim=-1)
    kl_q_m = (q * log_q_over_m).sum(dim=-1)
    factor = 1.0 / (beta * (1.0 - beta)) if scaled else 1.0
    value = (beta * kl_p_m + (1.0 - beta) * kl_q_m) * factor
    grad_t = p * (log_p_over_m - kl_p_m[:, None]) * (beta * factor) if need_t else None
    grad_s = q * (log_q_over_m - kl_q_m[:, None]) * ((1.0 - beta) * factor) if need_s else None
    return value, grad_t, grad_s


_CLOSED_FORMS = {_fkl_tokens: _fkl_closed_form, _rkl_tokens: _rkl_closed_form, _jsd_tokens: _jsd_closed_form}


def _closed_form(token_fn: Callable) -> Optional[Callable]:
    """``(t, s, need_t, need_s) -> (values, grad_t, grad_s)`` for ``token_fn`` (a per-token function or a
    ``functools.partial`` of one), or None when it has no closed form (then autograd differentiates it)."""
    base, keywords = (token_fn.func, token_fn.keywords) if isinstance(token_fn, functools.partial) else (token_fn, {})
    closed = _CLOSED_FORMS.get(base)
    return None if closed is None else functools.partial(closed, **keywords)


def _skew_kl_tokens(t: Tensor, s: Tensor, *, alpha: float) -> Tensor:
    """Skew KL ``KL(p || a p + (1 - a) q)`` per token. ``t, s: [n, V]`` -> ``[n]``."""
    if alpha == 0.0:
        return _fkl_tokens(t, s)
    if alpha == 1.0:  # the mixture is p itself
        return torch.zeros(t.shape[0], dtype=t.dtype, device=t.device)
    log_p, log_q = _safe_log_softmax(t), _safe_log_softmax(s)
    log_p_over_m, _ = _log_ratios_to_mixture(log_p, log_q, alpha)
    return (log_p.exp() * log_p_over_m).sum(dim=-1)


def _skew_rkl_tokens(t: Tensor, s: Tensor, *, alpha: float) -> Tensor:
    """Skew reverse KL ``KL(q || (1 - a) p + a q)`` per token. ``t, s: [n, V]`` -> ``[n]``."""
    if alpha == 0.0:
        return _rkl_tokens(t, s)
    if alpha == 1.0:  # the mixture is q itself
        return torch.zeros(t.shape[0], dtype=t.dtype, device=t.device)
    log_p, log_q = _safe_log_softmax(t), _safe_log_softmax(s)
    # The mixture puts weight (1 - alpha) on p; only the q-side log-ratio is needed.
    _, log_q_over_m = _log_ratios_to_mixture(log_p, log_q, 1.0 - alpha)
    return (log_q.exp() * log_q_over_m).sum(dim=-1)


@torch.no_grad()
def _akl_head_weight(p: Tensor, q: Tensor, mu: float) -> Tensor:
    """AKL's weight on forward KL, ``g_head / (g_head + g_tail)``, per row; no gradient.

    Args:
        p, q: ``[n, V]`` teacher and student probabilities.
        mu: head threshold on the teacher's cumulative probability.

    Returns:
        ``[n]``, in ``[0, 1]``; 0.5 where both gaps are 0.

    Head rule: sort the teacher's probabilities in descending order; a token is in the head when the
    teacher mass strictly before it is ``< mu`` (so the top-1 token is always in the head). Ties are
    resolved in favour of the head: a token whose probability equals that of the last head token is
    also head. Equivalently, token ``v`` is head iff ``sum_{u: p_u > p_v} p_u < mu`` (or ``p_v`` is the
    maximum), which does not depend on how ``sort`` orders equal values.
    """
    sorted_p = torch.sort(p, dim=-1, descending=True).values
    mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # exclusive cumulative sum
    # Head size k: number of sorted positions with mass_before < mu, at least 1 (the top-1 token).
    k = (mass_before < mu).sum(dim=-1, keepdim=True).clamp_min(1)
    threshold = sorted_p.gather(-1, k - 1)  # probability of the last head token
    head = p >= threshold
    abs_gap = (p - q).abs()
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    gap_head = torch.where(head, abs_gap, zero).sum(dim=-1)
    gap_tail = torch.where(head, zero, abs_gap).sum(dim=-1)
    total = gap_head + gap_tail
    # p == q exactly gives 0/0: define the split as 0.5/0.5 (both KLs are 0 there anyway).
    return torch.where(total > 0, gap_head / total.clamp_min(torch.finfo(p.dtype).tiny), 0.5)


def _akl_tokens(t: Tensor, s: Tensor, *, mu: float) -> Tensor:
    """Adaptive KL per token. ``t, s: [n, V]`` -> ``[n]``. See :func:`adaptive_kl`."""
    log_p, log_q = F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1)
    w_head = _akl_head_weight(log_p.detach().exp(), log_q.detach().exp(), mu)
    w_tail = 1.0 - w_head
    fkl = _kl_from_log_probs(log_p, log_q)
    rkl = _kl_from_log_probs(log_q, log_p)
    # A zero weight must silence its term even when that KL is +inf (0 * inf would be NaN).
    zero = torch.zeros((), dtype=fkl.dtype, device=fkl.device)
    return torch.where(w_head > 0, w_head * fkl, zero) + torch.where(w_tail > 0, w_tail * rkl, zero)


# --------------------------------------------------------------------------------------------------
# Chunked driver: forward and backward one chunk of tokens at a time.
# --------------------------------------------------------------------------------------------------


def _upcast_chunk(x2d: Tensor, rows: Optional[Tensor], start: int, stop: int, need_grad: bool) -> Tensor:
    """Rows ``[start, stop)`` of the selected tokens as a float32 leaf tensor ``[n, V]``."""
    if rows is None:  # every token counts: a slice is a view, no gather copy needed
        chunk = x2d[start:stop]
    else:
        chunk = x2d.index_select(0, rows[start:stop])
    chunk = chunk.detach().to(torch.float32)
    return chunk.requires_grad_(need_grad)


# False: every divergence is differentiated by autograd, also those with a closed form (for tests and
# benchmarks that compare the two routes).
USE_CLOSED_FORMS = True


def _chunk_values_and_grads(token_fn, closed, t, s, temperature, token_weight, need_t, need_s):
    """One chunk's per-token values ``[n]`` (detached) and the gradients of ``token_weight * sum(values)``
    w.r.t. ``t`` and ``s``: a list with an entry per input that needs one (None where the value does not
    depend on it). By the closed form ``closed`` when there is one, else by autograd through ``token_fn``."""
    if closed is not None:
        scaled_t, scaled_s = (t, s) if temperature == 1.0 else (t / temperature, s / temperature)
        values, grad_t, grad_s = closed(scaled_t, scaled_s, need_t, need_s)
        weight = token_weight / temperature  # d / d logits = (d / d scaled logits) / temperature
        grads = [g if weight == 1.0 else g.mul_(weight) for g, need in ((grad_t, need_t), (grad_s, need_s)) if need]
        return values, grads
    with torch.enable_grad():  # (forward of an autograd.Function runs without grad: the scaling must be recorded)
        scaled_t, scaled_s = (t, s) if temperature == 1.0 else (t / temperature, s / temperature)
        values = token_fn(scaled_t, scaled_s)
        leaves = [x for x, need in ((t, need_t), (s, need_s)) if need]
        if leaves and values.requires_grad:
            # Each token's value depends only on its own row, so one vector-Jacobian product with
            # a constant vector gives every row's gradient of (weighted) value at once.
            grads = list(torch.autograd.grad(values, leaves, grad_outputs=torch.full_like(values, token_weight), allow_unused=True))
        else:  # the value does not depend on the inputs (e.g. skew KL with alpha = 1)
            grads = [None] * len(leaves)
    return values.detach(), grads


class _ChunkedDivergence(torch.autograd.Function):
    """Reduced divergence of ``[N, V]`` logits, computed chunk by chunk in forward and backward.

    forward(teacher2d, student2d, rows, token_fn, temperature, chunk_tokens, reduction, need_t, need_s)
        teacher2d, student2d: ``[N, V]`` logits (any float dtype).
        rows: ``[M]`` int64 indices of the tokens that count, or None for all N.
        token_fn: ``(t, s) -> [n]`` per-token divergence on float32 chunks.
        returns: a float32 scalar for "mean"/"sum", ``[N]`` float32 for "none".

    When an input needs a gradient, each chunk's gradient (of the reduced output, or of each token's
    own value for "none") is computed right away, by the divergence's closed form where it has one
    (``_closed_form``), else with ``torch.autograd.grad``, and copied into a buffer shaped like that input. Only one chunk's float32 temporaries (and autograd graph) exist at a time.
    backward then multiplies the buffer by ``grad_output`` in place and hands it to autograd.
    """

    @staticmethod
    def forward(ctx, teacher2d, student2d, rows, token_fn, temperature, chunk_tokens, reduction, need_t, need_s):
        n_total = teacher2d.shape[0]
        n_selected = n_total if rows is None else rows.numel()
        device = student2d.device
        per_token = torch.zeros(n_selected, dtype=torch.float32, device=device)
        grad_t = torch.zeros_like(teacher2d) if need_t else None
        grad_s = torch.zeros_like(student2d) if need_s else None

        # Weight of each token's value in the output: the gradient of a "mean" is 1/M per token.
        token_weight = 1.0 / n_selected if (reduction == "mean" and n_selected > 0) else 1.0
        closed = _closed_form(token_fn) if USE_CLOSED_FORMS else None
        for start in range(0, n_selected, chunk_tokens):
            stop = min(start + chunk_tokens, n_selected)
            t = _upcast_chunk(teacher2d, rows, start, stop, need_t and closed is None)
            s = _upcast_chunk(student2d, rows, start, stop, need_s and closed is None)
            values, grads = _chunk_values_and_grads(token_fn, closed, t, s, temperature, token_weight, need_t, need_s)
            per_token[start:stop] = values
            for buffer, grad in zip([b for b in (grad_t, grad_s) if b is not None], grads):
                if grad is None:
                    continue
                grad = grad.to(buffer.dtype)
                if rows is None:
                    buffer[start:stop] = grad
                else:
                    buffer.index_copy_(0, rows[start:stop], grad)
            del t, s, values, grads  # free this chunk before the next one

        ctx.reduction = reduction
        ctx.grad_t, ctx.grad_s = grad_t, grad_s
        if reduction == "none":
            if rows is None:
                return per_token
            out = torch.zeros(n_total, dtype=torch.float32, device=device)
            return out.index_copy_(0, rows, per_token)
        total = per_token.sum()
        if reduction == "mean" and n_selected > 0:
            total = total / n_selected
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_t, grad_s = ctx.grad_t, ctx.grad_s
        if ctx.needs_input_grad[0] and grad_t is None or ctx.needs_input_grad[1] and grad_s is None:
            raise RuntimeError(
                "okd.divergences: backward through a chunked divergence can run only once (its gradient "
                "buffers are scaled in place and handed to autograd); recompute the loss instead of "
                "using retain_graph=True"
            )
        # Drop our references so autograd can take ownership of the buffers without copying them.
        ctx.grad_t = ctx.grad_s = None
        if ctx.reduction == "none":
            # Row i of the buffer holds d value_i / d logits_i; scale it by that token's grad_output.
            scale = grad_output.reshape(-1, 1)
        else:
            scale = grad_output.reshape(())
        if not (scale.numel() == 1 and scale.item() == 1.0):  # "mean"/"sum" usually get exactly 1
            for buffer in (grad_t, grad_s):
                if buffer is not None:
                    buffer.mul_(scale)  # computed in float32 for bf16/fp16 buffers, rounded once
        return grad_t, grad_s, None, None, None, None, None, None, None


def _divergence(
    token_fn: Callable[[Tensor, Tensor], Tensor],
    teacher_logits: Tensor,
    student_logits: Tensor,
    mask: Optional[Tensor],
    temperature: float,
    chunk_tokens: int,
    reduction: str,
) -> Tensor:
    """Validate inputs, flatten to ``[N, V]``, select counted tokens, and run the chunked driver."""
    if not (teacher_logits.is_floating_point() and student_logits.is_floating_point()):
        raise TypeError(
            f"logits must be floating point, got teacher {teacher_logits.dtype} and student {student_logits.dtype}"
        )
    if teacher_logits.dim() < 1 or teacher_logits.dim() != student_logits.dim():
        raise ValueError(
            f"teacher and student logits must have the same number of dims (>= 1), got shapes "
            f"{tuple(teacher_logits.shape)} and {tuple(student_logits.shape)}"
        )
    student_vocab = student_logits.shape[-1]
    teacher_logits = align_vocab(teacher_logits, student_vocab)  # raises if the teacher is smaller
    lead_shape = student_logits.shape[:-1]
    if teacher_logits.shape[:-1] != lead_shape:
        raise ValueError(
            f"teacher and student logits must share their leading shape, got {tuple(teacher_logits.shape)} "
            f"and {tuple(student_logits.shape)}"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")

    # reshape keeps a view when it can (also for the vocab-sliced teacher), so nothing is copied here.
    teacher2d = teacher_logits.reshape(-1, student_vocab)
    student2d = student_logits.reshape(-1, student_vocab)
    rows = None
    if mask is not None:
        if tuple(mask.shape) != tuple(lead_shape):
            raise ValueError(
                f"mask must have the logits' leading shape {tuple(lead_shape)}, got {tuple(mask.shape)}"
            )
        flat = mask.reshape(-1)
        if flat.dtype != torch.bool:
            if not bool(((flat == 0) | (flat == 1)).all()):
                raise ValueError("mask must be bool or contain only 0 and 1")
            flat = flat != 0
        flat = flat.to(student2d.device)
        if not bool(flat.all()):
            rows = flat.nonzero().squeeze(1)  # skip tokens that do not count: no compute, no memory

    grad_enabled = torch.is_grad_enabled()
    need_t = grad_enabled and teacher2d.requires_grad
    need_s = grad_enabled and student2d.requires_grad
    out = _ChunkedDivergence.apply(
        teacher2d, student2d, rows, token_fn, float(temperature), chunk_tokens, reduction, need_t, need_s
    )
    return out.reshape(lead_shape) if reduction == "none" else out


def _check_unit_interval(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------------
# Public divergences
# --------------------------------------------------------------------------------------------------


def forward_kl(
    teacher_logits: Tensor,
    student_logits: Tensor,
    mask: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    reduction: str = "mean",
) -> Tensor:
    """Forward KL ``KL(p || q) = sum_v p_v (log p_v - log q_v)``: word-level KD (mean-seeking).

    Args:
        teacher_logits: ``[..., V_t]`` with ``V_t >= V`` (a larger teacher vocab is sliced).
        student_logits: ``[..., V]``.
        mask: ``[...]`` bool or 0/1, True = token counts; None = all count.
        temperature: divides both logits (no ``T**2`` factor).
        chunk_tokens: tokens per chunk (memory/speed trade-off; does not change the result).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (see the module docstring).

    Returns:
        float32 scalar, or ``[...]`` for ``reduction="none"``.
    """
    return _divergence(_fkl_tokens, teacher_logits, student_logits, mask, temperature, chunk_tokens, reduction)


def reverse_kl(
    teacher_logits: Tensor,
    student_logits: Tensor,
    mask: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    reduction: str = "mean",
) -> Tensor:
    """Reverse KL ``KL(q || p) = sum_v q_v (log q_v - log p_v)`` (MiniLLM, GKD; mode-seeking).

    Arguments and return value as in :func:`forward_kl`.
    """
    return _divergence(_rkl_tokens, teacher_logits, student_logits, mask, temperature, chunk_tokens, reduction)


def generalized_jsd(
    teacher_logits: Tensor,
    student_logits: Tensor,
    mask: Optional[Tensor] = None,
    *,
    beta: float = 0.5,
    scaled: bool = False,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    reduction: str = "mean",
) -> Tensor:
    """Generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024).

    ``JSD_b(p || q) = b KL(p || m) + (1 - b) KL(q || m)`` with ``m = b p + (1 - b) q``.

    ``scaled=False`` (default) follows TRL's ``generalized_jsd_loss`` at every ``b``: for ``0 < b < 1``
    it is ``JSD_b`` as written; ``b = 0`` is special-cased as plain forward KL ``KL(p || q)`` and ``b = 1``
    as plain reverse KL ``KL(q || p)``. Note that ``JSD_b`` itself tends to 0 at both ends (about
    ``b KL(p || q)`` near 0 and ``(1 - b) KL(q || p)`` near 1), so this unscaled loss *jumps* at the
    endpoints. Use it to compare with TRL/GKD results.

    ``scaled=True`` returns ``JSD_b / (b (1 - b))`` for ``0 < b < 1``, forward KL at ``b = 0`` and reverse
    KL at ``b = 1``: continuous in ``b`` on ``[0, 1]`` (near 0 it is ``KL(p||q) + O(b)``). ``b = 0.5``
    gives ``4 JSD``.

    The mixture is handled in log space without forming ``log m`` by subtraction (see
    ``_log_ratios_to_mixture``), so small ``b`` or ``1 - b`` stay accurate in float32.

    Args:
        beta: ``b`` in ``[0, 1]``.
        scaled: divide by ``b (1 - b)`` (see above).
        Others as in :func:`forward_kl`.
    """
    beta = _check_unit_interval("beta", beta)
    token_fn = functools.partial(_jsd_tokens, beta=beta, scaled=bool(scaled))
    return _divergence(token_fn, teacher_logits, student_logits, mask, temperature, chunk_tokens, reduction)


def total_variation(
    teacher_logits: Tensor,
    student_logits: Tensor,
    mask: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    reduction: str = "mean",
) -> Tensor:
    """Total variation distance ``0.5 * sum_v |p_v - q_v|`` (in ``[0, 1]``; symmetric).

    Arguments and return value as in :func:`forward_kl`.
    """
    return _divergence(_tvd_tokens, teacher_logits, student_logits, mask, temperature, chunk_tokens, reduction)


def skew_kl(
    teacher_logits: Tensor,
    student_logits: Tensor,
    mask: Optional[Tensor] = None,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    reduction: str = "mean",
) -> Tensor:
    """Skew KL ``KL(p || a p + (1 - a) q)`` (DistiLLM, Ko et al. 2024; ``a = alpha``).

    Mixing a little of ``p`` into the student keeps the divergence finite (at most ``-log a``) and its
    gradients bounded. ``alpha = 0`` is forward KL; ``alpha = 1`` is identically 0.

    Args:
        alpha: skew in ``[0, 1]``.
        Others as in :func:`forward_kl`.
    """
    alpha = _check_unit_interval("alpha", alpha)
    token_fn = functools.partial(_skew_kl_tokens, alpha=alpha)
    return _divergence(token_fn, teacher_logits, student_logits, mask, temperature, chunk_tokens, reduction)


def skew_reverse_kl(
    teacher_logits: Tensor,
    student_logits: Tensor,
    mask: Optional[Tensor] = None,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    reduction: str = "mean",
) -> Tensor:
    """Skew reverse KL ``KL(q || (1 - a) p + a q)`` (DistiLLM, Ko et al. 2024; ``a = alpha``).

    ``alpha = 0`` is reverse KL; ``alpha = 1`` is identically 0.

    Args:
        alpha: skew in ``[0, 1]``.
        Others as in :func:`forward_kl`.
    """
    alpha = _check_unit_interval("alpha", alpha)
    token_fn = functools.partial(_skew_rkl_tokens, alpha=alpha)
    return _divergence(token_fn, teacher_logits, student_logits, mask, temperature, chunk_tokens, reduction)


def adaptive_kl(
    teacher_logits: Tensor,
    student_logits: Tensor,
    mask: Optional[Tensor] = None,
    *,
    mu: float = 0.5,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    reduction: str = "mean",
) -> Tensor:
    """Adaptive KL (AKL; Wu et al. 2024, "Rethinking Kullback-Leibler Divergence in Knowledge
    Distillation for Large Language Models", arXiv 2404.02657).

    Per token: ``AKL = w_head * KL(p || q) + w_tail * KL(q || p)`` with

        w_head = g_head / (g_head + g_tail),  w_tail = g_tail / (g_head + g_tail),
        g_head = sum_{v in head} |p_v - q_v|,   g_tail = sum_{v in tail} |p_v - q_v|.

    The head is read off the teacher: sort ``p`` in descending order; a token is in the head when the
    teacher mass strictly before it is ``< mu`` (the top-1 token is always head; the token that
    crosses ``mu`` is head too); the rest is the tail. Ties with the last head token count as head, so
    the split does not depend on how a sort orders equal probabilities. The rationale (paper): early in
    training forward KL mostly fixes the head and reverse KL the tail, so the part with the larger gap
    gets the divergence that fixes it. Forward KL takes the head weight, as in the paper and the
    authors' code (``wutaiqiang/LLM_KD_AKL``, ``AKL.py``).

    Differences from the authors' code, on purpose: (1) their mask keeps as head the tokens whose
    *inclusive* cumulative probability is ``<= mu`` (plus the top-1), i.e. it leaves out the token that
    crosses ``mu``; we include it, following the "mass before it < mu" rule. (2) They divide by
    ``g_head + g_tail`` unguarded; we define ``w_head = w_tail = 0.5`` when both gaps are 0 (then both
    KLs are 0 too). (3) Both weights are computed without gradient (their teacher is frozen, so that
    only matters when the teacher is being trained, as in OKD's module update).

    Args:
        mu: head threshold in ``[0, 1]`` on the teacher's cumulative probability (paper default 0.5).
        Others as in :func:`forward_kl`.
    """
    mu = _check_unit_interval("mu", mu)
    token_fn = functools.partial(_akl_tokens, mu=mu)
    return _divergence(token_fn, teacher_logits, student_logits, mask, temperature, chunk_tokens, reduction)


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "tvd": total_variation,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "adaptive_kl": adaptive_kl,
}

# Early value checks for get_divergence, so a bad config fails when the loss is built, not mid-training.
_PARAM_CHECKS: dict[str, Callable[[str, object], object]] = {
    "beta": _check_unit_interval,
    "alpha": _check_unit_interval,
    "mu": _check_unit_interval,
}


def get_divergence(name: str, **params) -> Callable[..., Tensor]:
    """Look up a divergence by name and bind its keyword parameters.

    Args:
        name: a key of :data:`DIVERGENCES` (``"forward_kl"``, ``"reverse_kl"``, ``"jsd"``, ``"tvd"``,
            ``"skew_kl"``, ``"skew_reverse_kl"``, ``"adaptive_kl"``).
        **params: keyword-only parameters of that function (e.g. ``beta=0.9`` for ``"jsd"``,
            ``temperature=2.0``, ``chunk_tokens=512``, ``reduction="sum"``).

    Returns:
        ``functools.partial(fn, **params)``, called as ``loss = d(teacher_logits, student_logits, mask)``.

    Raises:
        ValueError: unknown name (the message lists the valid names and the closest match), unknown
            parameter (lists the accepted ones), or an out-of-range ``beta``/``alpha``/``mu``.
    """
    if name not in DIVERGENCES:
        close = difflib.get_close_matches(str(name), list(DIVERGENCES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown divergence {name!r}.{hint} Valid names: {', '.join(sorted(DIVERGENCES))}")
    fn = DIVERGENCES[name]
    accepted = [
        p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    for key, value in params.items():
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"divergence {name!r} has no parameter {key!r}.{hint} Accepted: {', '.join(accepted)}"
            )
        if key in _PARAM_CHECKS:
            _PARAM_CHECKS[key](key, value)
    return functools.partial(fn, **params)
