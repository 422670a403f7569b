"""Per-token metrics of a teacher/student pair, of one model against the data, and calibration.

Conventions (see :mod:`okd.analysis`): p is the teacher, q the student; inputs ``[..., V]`` logits,
outputs float64 ``[...]``. The public functions take logits; the private ones take float64
log-probabilities, so that :func:`pair_metrics` runs the (vocab-sized) ``log_softmax`` once per side and
reuses it everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_TOP_KS = (5, 10)
DEFAULT_RANK_TOP = 50
ECE_BINS = 15


def _check_pair(teacher_logits: Tensor, student_logits: Tensor) -> None:
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher and student logits must have the same shape [..., V], got {tuple(teacher_logits.shape)} "
            f"and {tuple(student_logits.shape)} (slice both to the common logits width first)"
        )
    if teacher_logits.dim() < 1 or teacher_logits.shape[-1] < 1:
        raise ValueError(f"logits need a non-empty last (vocabulary) dim, got shape {tuple(teacher_logits.shape)}")


def _log_probs(logits: Tensor) -> Tensor:
    """float64 ``log_softmax`` over the last dim (``-inf`` logits give probability exactly 0)."""
    return F.log_softmax(logits.to(torch.float64), dim=-1)


def _entropy(log_p: Tensor) -> Tensor:
    p = log_p.exp()
    # 0 * log 0 = 0: torch.where keeps the NaN of 0 * -inf out of the sum.
    return -torch.where(p > 0, p * log_p, torch.zeros((), dtype=p.dtype, device=p.device)).sum(-1)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``KL(a || b)`` per row. Terms with ``a_v = 0`` are 0; ``a_v > 0 = b_v`` gives ``+inf``."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros((), dtype=a.dtype, device=a.device)).sum(-1)


def _in_topk(log_p: Tensor, k: int) -> Tensor:
    """Boolean ``[..., V]`` membership of each token in the top ``min(k, V)`` of ``log_p``."""
    k = min(k, log_p.shape[-1])
    indices = log_p.topk(k, dim=-1).indices
    return torch.zeros_like(log_p, dtype=torch.bool).scatter_(-1, indices, True)


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks along the last dim, tied values sharing the average of their ranks. ``[..., m]``.

    rank_i = #{j: x_j < x_i} + (#{j: x_j == x_i} + 1) / 2. Quadratic in m, which is fine for the
    m <= ~100 tokens it is used on and, unlike a sort, handles ties exactly.
    """
    below = (x.unsqueeze(-2) < x.unsqueeze(-1)).sum(-1)
    equal = (x.unsqueeze(-2) == x.unsqueeze(-1)).sum(-1)
    return below.to(torch.float64) + (equal.to(torch.float64) + 1.0) / 2.0


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation along the last dim; 0 where either side is constant (no defined value)."""
    da = a - a.mean(-1, keepdim=True)
    db = b - b.mean(-1, keepdim=True)
    denominator = ((da * da).sum(-1) * (db * db).sum(-1)).sqrt()
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, (da * db).sum(-1) / safe, torch.zeros_like(denominator))


def top1_agreement(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """1.0 where the two argmax tokens are equal, else 0.0.

    Args:
        teacher_logits, student_logits: ``[..., V]``.

    Returns:
        float64 ``[...]``.
    """
    _check_pair(teacher_logits, student_logits)
    return (teacher_logits.argmax(-1) == student_logits.argmax(-1)).to(torch.float64)


def topk_overlap(teacher_logits: Tensor, student_logits: Tensor, k: int = 5) -> Tensor:
    """``|topk(student) ∩ topk(teacher)| / k`` with ``k`` clamped to ``V``.

    Args:
        teacher_logits, student_logits: ``[..., V]``.
        k: size of the top sets.

    Returns:
        float64 ``[...]`` in ``[0, 1]``.
    """
    _check_pair(teacher_logits, student_logits)
    k = min(k, teacher_logits.shape[-1])
    both = _in_topk(teacher_logits.to(torch.float64), k) & _in_topk(student_logits.to(torch.float64), k)
    return both.sum(-1).to(torch.float64) / k


def topk_coverage(teacher_logits: Tensor, student_logits: Tensor, k: int = 5) -> Tensor:
    """Teacher probability mass on the student's top-k tokens, ``sum_{v in topk(q)} p_v``.

    Identical distributions give the teacher's own top-k mass. Args as in :func:`topk_overlap`.

    Returns:
        float64 ``[...]`` in ``[0, 1]``.
    """
    _check_pair(teacher_logits, student_logits)
    p = _log_probs(teacher_logits).exp()
    return torch.where(_in_topk(student_logits.to(torch.float64), k), p, torch.zeros_like(p)).sum(-1)


def tail_mass(teacher_logits: Tensor, student_logits: Tensor, k: int = 5) -> tuple[Tensor, Tensor]:
    """Mass each model puts outside the other's top-k.

    Args:
        teacher_logits, student_logits: ``[..., V]``.
        k: size of the top sets (clamped to ``V``).

    Returns:
        ``(student_outside, teacher_outside)``, float64 ``[...]`` each:
        ``sum_{v not in topk(p)} q_v`` (student mass outside the teacher's top-k) and
        ``sum_{v not in topk(q)} p_v`` (teacher mass outside the student's top-k).
    """
    _check_pair(teacher_logits, student_logits)
    log_p, log_q = _log_probs(teacher_logits), _log_probs(student_logits)
    return _outside(log_q.exp(), _in_topk(log_p, k)), _outside(log_p.exp(), _in_topk(log_q, k))


def _outside(probs: Tensor, in_top: Tensor) -> Tensor:
    return torch.where(in_top, torch.zeros_like(probs), probs).sum(-1)


def entropy(logits: Tensor) -> Tensor:
    """Entropy ``H = -sum_v p_v log p_v`` (nats) of ``softmax(logits)``. ``[..., V]`` -> float64 ``[...]``."""
    return _entropy(_log_probs(logits))


def forward_kl_tokens(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """``KL(p || q)`` per token, float64 ``[...]``. Equals ``okd.divergences.forward_kl(..., reduction="none")``
    up to that function's float32 rounding; ``+inf`` where the teacher gives mass to a token the student
    gives exactly 0 (a ``-inf`` logit)."""
    _check_pair(teacher_logits, student_logits)
    return _kl(_log_probs(teacher_logits), _log_probs(student_logits))


def reverse_kl_tokens(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """``KL(q || p)`` per token, float64 ``[...]`` (see :func:`forward_kl_tokens`)."""
    _check_pair(teacher_logits, student_logits)
    return _kl(_log_probs(student_logits), _log_probs(teacher_logits))


def tvd_tokens(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Total variation ``0.5 * sum_v |p_v - q_v|`` per token, float64 ``[...]`` in ``[0, 1]``."""
    _check_pair(teacher_logits, student_logits)
    return 0.5 * (_log_probs(teacher_logits).exp() - _log_probs(student_logits).exp()).abs().sum(-1)


def spearman_top(teacher_logits: Tensor, student_logits: Tensor, n: int = DEFAULT_RANK_TOP) -> Tensor:
    """Spearman's rank correlation of teacher and student logits over the teacher's top-n tokens.

    Does the student order the teacher's candidates the way the teacher does (secondary modes
    included), whatever their absolute probabilities? Computed as the Pearson correlation of the
    average ranks (ties share the mean of their ranks), so it is exact with ties. If either side is
    constant over those tokens (all tied, or ``n`` clamps to 1) the correlation is undefined; it is
    defined as 0 (no evidence of agreement either way).

    Args:
        teacher_logits, student_logits: ``[..., V]``.
        n: number of teacher top tokens, clamped to ``V``.

    Returns:
        float64 ``[...]`` in ``[-1, 1]``.
    """
    _check_pair(teacher_logits, student_logits)
    t = teacher_logits.to(torch.float64)
    s = student_logits.to(torch.float64)
    indices = t.topk(min(n, t.shape[-1]), dim=-1).indices
    return _pearson(_average_ranks(t.gather(-1, indices)), _average_ranks(s.gather(-1, indices)))


def pair_metrics(
    teacher_logits: Tensor,
    student_logits: Tensor,
    *,
    top_ks: Sequence[int] = DEFAULT_TOP_KS,
    rank_top: int = DEFAULT_RANK_TOP,
) -> dict[str, Tensor]:
    """Every teacher-vs-student per-token metric (the table in the module docstring) in one pass.

    Args:
        teacher_logits, student_logits: ``[..., V]``.
        top_ks: the k of the top-k metrics (clamped to ``V``; keys keep the requested k).
        rank_top: n of the rank correlation (clamped to ``V``).

    Returns:
        ``{name: float64 [...]}``; identical, value for value, to the individual functions.
    """
    _check_pair(teacher_logits, student_logits)
    log_p, log_q = _log_probs(teacher_logits), _log_probs(student_logits)
    p, q = log_p.exp(), log_q.exp()
    h_p, h_q = _entropy(log_p), _entropy(log_q)
    out = {
        "top1_agreement": top1_agreement(teacher_logits, student_logits),
        "teacher_entropy": h_p,
        "student_entropy": h_q,
        "entropy_gap": h_q - h_p,
        "abs_entropy_gap": (h_q - h_p).abs(),
        "forward_kl": _kl(log_p, log_q),
        "reverse_kl": _kl(log_q, log_p),
        "tvd": 0.5 * (p - q).abs().sum(-1),
        f"spearman_top{rank_top}": spearman_top(teacher_logits, student_logits, rank_top),
    }
    for k in top_ks:
        in_p, in_q = _in_topk(log_p, k), _in_topk(log_q, k)
        out[f"top{k}_overlap"] = (in_p & in_q).sum(-1).to(torch.float64) / min(k, p.shape[-1])
        out[f"top{k}_coverage"] = torch.where(in_q, p, torch.zeros_like(p)).sum(-1)
        out[f"student_mass_outside_teacher_top{k}"] = _outside(q, in_p)
        out[f"teacher_mass_outside_student_top{k}"] = _outside(p, in_q)
    return out


def model_metrics(logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """One model against the ground-truth next tokens.

    Args:
        logits: ``[..., V]``.
        targets: ``[...]`` token ids (``0 <= id < V``; select the counted positions first).

    Returns:
        float64 ``[...]`` each: ``nll`` (``-log p(target)``), ``accuracy`` (argmax == target, 0/1),
        ``confidence`` (max probability, the confidence of the ECE) and ``entropy``.
    """
    log_p = _log_probs(logits)
    targets = targets.to(log_p.device).long()
    best_log_p, best = log_p.max(-1)
    return {
        "nll": -log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
        "accuracy": (best == targets).to(torch.float64),
        "confidence": best_log_p.exp(),
        "entropy": _entropy(log_p),
    }


def masked_mean(values: Tensor, mask: Tensor | None = None) -> float:
    """Mean of ``values[mask]`` (all values when ``mask`` is None); NaN when nothing counts.

    Selection, not multiplication, so values at masked-out positions (NaN from garbage logits of padding,
    say) cannot leak into the mean.

    Args:
        values: ``[...]``.
        mask: ``[...]`` bool (True = counts), e.g. the second output of ``next_token_targets``.
    """
    selected = values if mask is None else values[mask.to(torch.bool)]
    return float(selected.to(torch.float64).mean()) if selected.numel() else math.nan


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------


def calibration_bins(confidence: Tensor, correct: Tensor, n_bins: int = ECE_BINS) -> Tensor:
    """Per-bin sums for the expected calibration error; sums of several batches add up.

    Bins are ``n_bins`` equal-width intervals ``(i/n, (i+1)/n]`` of the confidence (the first also takes
    0), as in Guo et al. (2017).

    Args:
        confidence: ``[N]`` max probabilities in ``[0, 1]``.
        correct: ``[N]`` 1/0 (or bool): the argmax was the right token.
        n_bins: number of bins.

    Returns:
        float64 ``[3, n_bins]``: token count, sum of confidences and sum of correct per bin.
    """
    confidence = confidence.reshape(-1).to(torch.float64).cpu()
    correct = correct.reshape(-1).to(torch.float64).cpu()
    interior = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)[1:-1]
    index = torch.bucketize(confidence, interior, right=False)  # edges[i] < c <= edges[i + 1]
    bins = torch.zeros(3, n_bins, dtype=torch.float64)
    bins[0].index_add_(0, index, torch.ones_like(confidence))
    bins[1].index_add_(0, index, confidence)
    bins[2].index_add_(0, index, correct)
    return bins


def ece_from_bins(bins: Tensor) -> float:
    """``ECE = sum_b (n_b / N) |acc_b - conf_b| = sum_b |correct_b - confidence_b| / N``; NaN when N = 0."""
    total = float(bins[0].sum())
    return float((bins[2] - bins[1]).abs().sum()) / total if total > 0 else math.nan


def expected_calibration_error(confidence: Tensor, correct: Tensor, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error (fraction in [0, 1]) of ``[N]`` confidences and 0/1 correctness."""
    return ece_from_bins(calibration_bins(confidence, correct, n_bins))
