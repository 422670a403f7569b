"""Losses between a teacher and a student with different tokenizers (``method.cross_tokenizer``).

``p`` is the teacher, ``q`` the student, both at temperature ``T`` (``softmax(logits / T)``, no ``T**2``
factor, as in ``okd.divergences``). Logits are ``[rows, V]`` with each model's own ``V``; the rows to
compare come from ``okd.crosstok.data.CrossTokenizerCollator``.

``uld`` (:func:`uld_loss`): Boizard et al. (2024), "Towards Cross-Tokenizer Distillation: the Universal
Logit Distillation Loss". At each aligned pair of positions (response token ``i`` of each model,
responses truncated to the shorter), both probability vectors are sorted in decreasing order, the
shorter one is padded with zeros to the longer vocabulary, and the loss is
``sum_k |p_sorted[k] - q_sorted[k]|``, the paper's closed form of the Wasserstein-1 distance between
the two distributions (taken over ranks, which is what makes it independent of the vocabularies),
averaged over the aligned pairs. The paper trains on ``CE + lambda * ULD``; here the student's loss is
``(1 - kd_ratio) * CE + kd_ratio * ULD``, i.e. ``lambda = kd_ratio / (1 - kd_ratio)`` up to the overall
scale of the step. ``method.divergence`` is not used.

``align`` (:func:`aligned_loss`): on the spans of ``okd.crosstok.alignment`` (minimal text spans whose
ends are token boundaries of both tokenizations):

* a span of one token on each side compares the two next-token distributions at that position,
  projected on the shared vocabulary (``SharedVocabulary``): one outcome per shared token plus, when
  both models have other tokens, one outcome "another token" holding the rest of each model's mass
  (where one model has none, the other's non-shared mass is dropped and its shared part renormalised).
  The loss is the method's divergence ``D`` (any of ``okd.divergences``) between the projections;
* a span of more tokens on either side compares the probability of the span's text under each model,
  by the chain rule over its own tokens (``P = prod_k p(token_k | prefix)``), as the two-outcome
  distributions ``(P, 1 - P)``, with the same ``D``.

The loss is the mean of these terms over the spans. With identical tokenizers every span is one token on
each side and the projection is the identity, so it equals the ordinary token-level ``D`` exactly;
where the vocabularies agree on a span's token the term is ``D`` on the shared tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from okd.losses import StepLosses, cross_entropy, next_token_targets

from .alignment import SharedVocabulary

__all__ = ["CrossTokenizerLoss", "aligned_loss", "chain_rule_log_probs", "project_logits", "uld_loss"]


def _float(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def uld_loss(teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """ULD between rows of logits: ``sum_k |sort(p)[k] - sort(q)[k]|`` per row (module docstring).

    ``teacher_logits`` ``[N, V_t]``, ``student_logits`` ``[N, V_s]``. Returns the mean over the ``N`` rows
    (``"mean"``; a zero with a graph when ``N = 0``), their sum (``"sum"``) or the ``[N]`` values
    (``"none"``). float32 maths (float64 inputs stay float64).
    """
    if teacher_logits.shape[0] != student_logits.shape[0]:
        raise ValueError(f"uld_loss: {teacher_logits.shape[0]} teacher rows but {student_logits.shape[0]} student rows")
    p = torch.softmax(_float(teacher_logits) / temperature, dim=-1).sort(dim=-1, descending=True).values
    q = torch.softmax(_float(student_logits) / temperature, dim=-1).sort(dim=-1, descending=True).values
    width = max(p.shape[-1], q.shape[-1])
    p, q = F.pad(p, (0, width - p.shape[-1])), F.pad(q, (0, width - q.shape[-1]))
    values = (p - q).abs().sum(dim=-1)
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    return values.sum() / max(values.shape[0], 1)


def project_logits(logits: Tensor, shared: Tensor, other: Tensor, bucket: bool, temperature: float = 1.0) -> Tensor:
    """``[N, V]`` logits -> ``[N, K (+1)]`` logits of the projection on the shared tokens ``shared`` ``[K]``
    (plus one outcome for the rows ``other`` when ``bucket``): ``softmax(projected / temperature)`` is the
    distribution ``softmax(logits / temperature)`` gives the shared tokens and "another token". The
    extra logit is ``temperature * logsumexp(logits[other] / temperature)``; without it the shared logits
    are returned as they are (the identity map returns the logits, bit for bit)."""
    projected = logits.index_select(-1, shared)
    if not bucket:
        return projected
    rest = torch.logsumexp(_float(logits.index_select(-1, other)) / temperature, dim=-1, keepdim=True) * temperature
    return torch.cat([_float(projected), rest], dim=-1)


def chain_rule_log_probs(logits: Tensor, targets: Tensor, rows: Tensor, span_ids: Tensor, n_spans: int) -> Tensor:
    """``[S]`` log-probabilities of each span's token sequence: the sum over its rows (``rows`` ``[M]``
    into ``logits`` ``[R, V]``, ``span_ids`` ``[M]``) of ``log softmax(logits[row])[targets[row]]``."""
    log_probs = torch.log_softmax(logits.index_select(0, rows), dim=-1)
    picked = log_probs.gather(-1, targets.index_select(0, rows).unsqueeze(-1)).squeeze(-1)
    return picked.new_zeros(n_spans).index_add(0, span_ids, picked)


def _two_outcomes(log_p: Tensor) -> Tensor:
    """``[S]`` log P -> ``[S, 2]`` logits of ``(P, 1 - P)`` (``log(1 - P)`` computed stably)."""
    log_p = log_p.clamp(max=-1e-12)  # P = 1 exactly would make log(1 - P) = -inf
    log_not = torch.where(log_p > -math.log(2), torch.log(-torch.expm1(log_p)), torch.log1p(-torch.exp(log_p)))
    return torch.stack([log_p, log_not], dim=-1)


def aligned_loss(
    teacher_logits: Tensor,
    student_logits: Tensor,
    batch: dict[str, Tensor],
    vocab: SharedVocabulary,
    divergence,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
) -> Tensor:
    """The ``align`` loss (module docstring), mean over the batch's spans.

    ``teacher_logits`` ``[B, T_t, V_t]``, ``student_logits`` ``[B, T_s, V_s]``; ``batch``: the
    ``CrossTokenizerCollator`` keys; ``divergence``: ``okd.divergences`` function ``d(teacher, student,
    mask, temperature=, chunk_tokens=, reduction=)``. A zero with a graph when there is no span.
    """
    zt = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    zs = student_logits.reshape(-1, student_logits.shape[-1])
    rows_s, rows_t = batch["xtok_student_rows"], batch["xtok_teacher_rows"]
    n_spans = int(batch["xtok_num_spans"].reshape(-1)[0]) if "xtok_num_spans" in batch else 0
    total = (zs.sum() * 0.0).float()
    if rows_s.numel():
        bucket = bool(vocab.student_other.numel() and vocab.teacher_other.numel())
        t = project_logits(zt.index_select(0, rows_t), vocab.teacher_ids, vocab.teacher_other, bucket, temperature)
        s = project_logits(zs.index_select(0, rows_s), vocab.student_ids, vocab.student_other, bucket, temperature)
        if not n_spans:  # one-token spans only: the divergence's own mean (as the token-level loss takes it)
            return divergence(t, s, None, temperature=temperature, chunk_tokens=chunk_tokens, reduction="mean")
        total = total + divergence(t, s, None, temperature=temperature, chunk_tokens=chunk_tokens, reduction="sum")
    if n_spans:
        t_targets = next_token_targets(batch["teacher_labels"])[0].reshape(-1)
        s_targets = next_token_targets(batch["labels"])[0].reshape(-1)
        log_pt = chain_rule_log_probs(
            _float(zt) / temperature, t_targets, batch["xtok_span_teacher_rows"], batch["xtok_span_teacher_ids"], n_spans
        )
        log_ps = chain_rule_log_probs(
            _float(zs) / temperature, s_targets, batch["xtok_span_student_rows"], batch["xtok_span_student_ids"], n_spans
        )
        total = total + divergence(
            _two_outcomes(log_pt), _two_outcomes(log_ps), None, temperature=1.0, chunk_tokens=chunk_tokens, reduction="sum"
        )
    return total / max(rows_s.numel() + n_spans, 1)


class CrossTokenizerLoss:
    """The student's loss ``(1 - kd_ratio) * CE + kd_ratio * L``, ``L`` the ``uld`` or ``align`` loss.

    Args:
        method: the resolved method (``cross_tokenizer``, ``kd_ratio``, ``temperature``, the divergence
            for ``align``).
        vocab: the shared vocabulary (``align``; None for ``uld``).
        chunk_tokens: chunk size of the divergence (``align``).
    """

    def __init__(self, method, vocab: SharedVocabulary | None, chunk_tokens: int = 1024):
        from okd.divergences import get_divergence

        self.method, self.vocab, self.chunk_tokens = method, vocab, chunk_tokens
        self.divergence = get_divergence(method.divergence, **method.divergence_params)

    def kd(self, teacher_logits: Tensor, student_logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """The cross-tokenizer term ``L`` alone (teacher logits detached by the caller)."""
        if self.method.cross_tokenizer == "uld":
            t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).index_select(0, batch["xtok_teacher_rows"])
            s = student_logits.reshape(-1, student_logits.shape[-1]).index_select(0, batch["xtok_student_rows"])
            return uld_loss(t, s, self.method.temperature)
        if self.vocab.student_ids.device != student_logits.device:
            self.vocab = self.vocab.to(student_logits.device)
        return aligned_loss(
            teacher_logits, student_logits, batch, self.vocab, self.divergence, self.method.temperature, self.chunk_tokens
        )

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor | None, batch: dict[str, Tensor]) -> StepLosses:
        """``student_logits`` ``[B, T_s, V_s]`` on ``batch["input_ids"]``, ``teacher_logits`` ``[B, T_t, V_t]``
        on ``batch["teacher_input_ids"]`` (None: CE only)."""
        targets, _ = next_token_targets(batch["labels"])
        ratio = self.method.kd_ratio
        with torch.set_grad_enabled(torch.is_grad_enabled() and (ratio < 1 or teacher_logits is None)):
            ce = cross_entropy(student_logits, targets)
        if teacher_logits is None or ratio == 0:
            return StepLosses(loss=ce, ce=ce)
        kd = self.kd(teacher_logits.detach(), student_logits, batch)
        return StepLosses(loss=kd if ratio == 1 else (1 - ratio) * ce + ratio * kd, ce=ce, kd=kd)

