"""Which features of the teacher's next-token distribution does each student transfer? (``okd analyze``)

The paper's argument (Rao et al. 2024, see ``/work/shared/PAPER.md``) is that reverse KL makes a
student copy the teacher's dominant mode but not the rest of its distribution (secondary modes,
entropy, tail), and that student-generated outputs fight exposure bias. This module measures those
features token by token, on the same positions the training loss uses, so that students trained with
different methods can be compared on them.

Conventions
-----------
* **p is the teacher, q is the student** (as in :mod:`okd.divergences`). Per-token functions take
  ``teacher_logits`` and ``student_logits`` of shape ``[..., V]`` (any float dtype, same shape) and
  return float64 values of shape ``[...]``; all the maths is done in float64, so identities such as
  "identical distributions give KL 0" hold to ~1e-15.
* **Which tokens count.** The positions whose *next* token is a response token: the mask of
  :func:`okd.training.next_token_targets` (labels ``-100`` mark prompt and padding). Aggregates are
  token-weighted means over those positions, over the whole data set.
* **k and n are clamped to V.** ``top-k`` metrics use ``min(k, V)`` tokens and the rank correlation
  ``min(n, V)``; result keys keep the requested number (``top5_overlap`` even when V < 5).
* **Ties.** ``topk`` and ``argmax`` break ties by index (deterministically), so identical inputs always
  give identical top sets; the rank correlation averages the ranks of tied values.

Per-token metrics (:func:`pair_metrics` computes them all at once; most also have their own function):

* ``top1_agreement``: 1 if ``argmax p == argmax q`` else 0;
* ``top{k}_overlap``: ``|topk(q) ∩ topk(p)| / k``;
* ``top{k}_coverage``: ``sum_{v in topk(q)} p_v``, the teacher mass that the student's top-k covers;
* ``student_mass_outside_teacher_top{k}``: ``sum_{v not in topk(p)} q_v``;
* ``teacher_mass_outside_student_top{k}``: ``sum_{v not in topk(q)} p_v`` (= 1 - coverage);
* ``teacher_entropy``, ``student_entropy``: ``H(p)``, ``H(q)`` in nats;
* ``entropy_gap``, ``abs_entropy_gap``: ``H(q) - H(p)`` and its absolute value;
* ``forward_kl``, ``reverse_kl``: ``KL(p || q)``, ``KL(q || p)``;
* ``tvd``: ``0.5 * sum_v |p_v - q_v|``;
* ``spearman_top{n}``: Spearman's rho of teacher vs student logits over the teacher's top-n tokens.

Against the ground-truth next token (:func:`model_metrics`, for either model): ``nll``, ``accuracy``
(argmax correct), ``confidence`` (max probability), ``entropy``; and the expected calibration error
(:func:`expected_calibration_error`) from confidence and accuracy.

Exposure bias (:func:`accumulated_error`, :func:`ex_acc_err`) follows MiniLLM (Gu et al. 2024), which
follows Arora et al. (2022); see :func:`exposure_bias` for the exact estimator.

Public API: the per-token functions above, :func:`masked_mean`, :func:`analyze` (models in memory),
:func:`run_analysis` (paths, what ``okd analyze`` calls), :func:`format_table`, :func:`make_plots`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "DEFAULT_EXPOSURE_LENGTHS",
    "DEFAULT_RANK_TOP",
    "DEFAULT_TOP_KS",
    "ECE_BINS",
    "accumulated_error",
    "analyze",
    "calibration_bins",
    "ece_from_bins",
    "entropy",
    "ex_acc_err",
    "expected_calibration_error",
    "exposure_bias",
    "forward_kl_tokens",
    "format_table",
    "make_plots",
    "masked_mean",
    "model_metrics",
    "pair_metrics",
    "resolve_model_path",
    "reverse_kl_tokens",
    "run_analysis",
    "spearman_top",
    "tail_mass",
    "top1_agreement",
    "topk_coverage",
    "topk_overlap",
    "tvd_tokens",
]

DEFAULT_TOP_KS = (5, 10)
DEFAULT_RANK_TOP = 50
ECE_BINS = 15
DEFAULT_EXPOSURE_LENGTHS = (5, 10, 20, 40)


# --------------------------------------------------------------------------------------------------
# Per-token metrics. The public functions take logits; the private ones take float64 log-probabilities,
# so that pair_metrics() runs the (vocab-sized) log_softmax once per side and reuses it everywhere.
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Exposure bias
# --------------------------------------------------------------------------------------------------


def accumulated_error(errors: Tensor, alive: Tensor) -> Tensor:
    """Accumulated per-step error of ``N`` sequences: ``A(l) = (1/N) sum_i sum_{t <= l, alive} e_{i,t}``.

    Args:
        errors: ``[N, L]`` per-step error of sequence i at generated step t (0-based).
        alive: ``[N, L]`` bool: the sequence has a token at step t (False after it ended at EOS, or past
            ``max_new_tokens``). Steps that are not alive add nothing, whatever ``errors`` holds there.

    Returns:
        float64 ``[L]``: ``A(1), ..., A(L)`` (entry ``l - 1`` is ``A(l)``).

    A sequence that has ended contributes 0 to the later steps but still counts in ``N``: this is the
    Monte-Carlo estimate of ``sum_{t <= l} E_{y_<t}[e_t]`` with ``e_t = 0`` once the sequence has ended
    (no more tokens, no more error), the accumulated regret of Arora et al. (2022).
    """
    if errors.shape != alive.shape or errors.dim() != 2:
        raise ValueError(f"errors and alive must both be [N, L], got {tuple(errors.shape)} and {tuple(alive.shape)}")
    if errors.shape[0] == 0:
        raise ValueError("accumulated_error needs at least one sequence")
    errors = errors.to(torch.float64)
    per_step = torch.where(alive.to(torch.bool), errors, torch.zeros_like(errors)).sum(0)
    return per_step.cumsum(0) / errors.shape[0]


def ex_acc_err(regret: Tensor, oracle_error: Tensor) -> Tensor:
    """``ExAccErr(l) = (R(l) - eps(l)) / eps(l) * 100`` (%), elementwise; NaN where ``eps(l) == 0``.

    ``R(l)`` is :func:`accumulated_error` on the student's own free-running samples, ``eps(l)`` on the
    teacher's (the oracle's) samples. Our ``eps(l)`` is accumulated like ``R(l)``, so it equals
    ``l * epsilon(l)`` of Arora et al. / MiniLLM, whose ``epsilon(l)`` is the per-step average: the
    formula is theirs, ``(R(l) - l epsilon(l)) / (l epsilon(l))``. 0% means no extra error from the
    student's own prefixes.
    """
    regret = regret.to(torch.float64)
    oracle_error = oracle_error.to(torch.float64)
    safe = torch.where(oracle_error != 0, oracle_error, torch.ones_like(oracle_error))
    return torch.where(oracle_error != 0, 100.0 * (regret - oracle_error) / safe, torch.full_like(regret, math.nan))


# --------------------------------------------------------------------------------------------------
# Model plumbing
# --------------------------------------------------------------------------------------------------


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _logits(model, batch: dict[str, Tensor], width: int) -> Tensor:
    """float32 ``[B, T, width]`` logits (padding rows of the output head sliced off)."""
    device = _device(model)
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return out.logits[..., :width].float()


def _chunked(fn, chunk_tokens: int, *tensors: Tensor) -> dict[str, Tensor]:
    """Apply ``fn`` to row chunks of ``[n, ...]`` tensors and concatenate: float64 ``[n, V]`` temporaries
    of a whole batch (8 x 256 tokens x 50k vocab = 800 MB each) would not fit comfortably."""
    parts: dict[str, list[Tensor]] = defaultdict(list)
    for start in range(0, tensors[0].shape[0], chunk_tokens):
        for key, value in fn(*(t[start : start + chunk_tokens] for t in tensors)).items():
            parts[key].append(value.cpu())
    return {key: torch.cat(values) for key, values in parts.items()}


def _position_limit(model) -> int | None:
    """Longest sequence a model accepts (learned position tables fail past it; RoPE degrades)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attribute in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _sample(model, tokenizer, prompts, *, max_new_tokens, seed, batch_size, progress, desc) -> list[list[int]]:
    """Free-running samples at temperature 1 (full distribution), seeded, batched and left-padded."""
    from okd.data.generated import generate_responses

    device = _device(model)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    responses: list[list[int]] = []
    # A forked RNG: the same seed gives the same samples, and the caller's random stream is untouched.
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
            responses.extend(
                generate_responses(
                    model,
                    prompts[start : start + batch_size],
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    max_new_tokens=max_new_tokens,
                    temperature=1.0,
                )
            )
    return responses


@torch.no_grad()
def _fkl_by_step(teacher, student, width, prompts, responses, *, pad_token_id, length, batch_size, chunk_tokens):
    """Teacher-force both models on prompt + response; FKL(p || q) at each response step.

    Returns:
        ``(errors, alive)``: float64 ``[N, length]`` and bool ``[N, length]``; ``errors[i, t]`` is the
        divergence of the two next-token distributions that predict response token t of row i.
    """
    from okd.data.generated import build_batch
    from okd.training import next_token_targets

    n = len(prompts)
    errors = torch.zeros(n, length, dtype=torch.float64)
    alive = torch.zeros(n, length, dtype=torch.bool)
    for start in range(0, n, batch_size):
        rows = range(start, min(start + batch_size, n))
        chunk_p = [list(prompts[i]) for i in rows]
        chunk_r = [list(responses[i])[:length] for i in rows]
        # No truncation: max_length fits the longest row, which the caller keeps within the models' limits.
        batch = build_batch(chunk_p, chunk_r, pad_token_id, max_length=max(len(p) + len(r) for p, r in zip(chunk_p, chunk_r)))
        _, mask = next_token_targets(batch["labels"])
        steps = mask.long().cumsum(-1) - 1  # response step each position predicts
        t_logits, s_logits = _logits(teacher, batch, width), _logits(student, batch, width)
        mask_t = mask.to(t_logits.device)
        fkl = _chunked(
            lambda t, s: {"fkl": _kl(_log_probs(t), _log_probs(s.to(t.device)))},
            chunk_tokens, t_logits[mask_t], s_logits[mask.to(s_logits.device)],
        )["fkl"]
        row_index = torch.arange(len(rows)).unsqueeze(1).expand_as(mask)[mask] + start
        errors[row_index, steps[mask]] = fkl
        alive[row_index, steps[mask]] = True
    return errors, alive


def _response_ids(dataset, index: int) -> list[int]:
    item = dataset[index]
    return list(item["input_ids"][len(item["prompt_ids"]) :])


def _floats(values: Tensor) -> list[float | None]:
    """A JSON-ready list; NaN (undefined) becomes None."""
    return [None if math.isnan(v) else v for v in values.to(torch.float64).tolist()]


def exposure_bias(
    teacher,
    students: dict,
    tokenizer,
    dataset,
    *,
    widths: dict[str, int] | None = None,
    num_examples: int = 32,
    max_new_tokens: int = 64,
    lengths: Sequence[int] = DEFAULT_EXPOSURE_LENGTHS,
    seed: int = 0,
    batch_size: int = 8,
    chunk_tokens: int = 256,
    progress: bool = True,
) -> dict:
    """Exposure bias (MiniLLM's ExAccErr) and free-running ROUGE-L of each student, and the teacher's samples.

    For the first ``num_examples`` prompts of ``dataset``, the teacher and each student sample one
    continuation each (temperature 1, full distribution, ``max_new_tokens`` at most, seed ``seed`` for
    every model, batched and left-padded with the KV cache; a sample ends after its first EOS). Then, per
    student, both models are teacher-forced on three sets of sequences (prompt + continuation) and the
    per-step error is ``e_t = KL(p_t || q_t)`` between their next-token distributions at generated step
    ``t``:

    * the student's own samples give ``R(l)``, the accumulated error of free-running generation;
    * the teacher's samples (oracle prefixes) give ``eps(l)``;
    * the reference responses (cut to ``max_new_tokens``) give the ground-truth-prefix value, for
      comparison with training, which only ever sees those prefixes.

    Each is :func:`accumulated_error`: mean over the N prompts of the error summed over the first l
    steps; a sequence that ended at EOS adds nothing after it (its EOS step counts) but stays in N.
    ``ExAccErr(l) = (R(l) - eps(l)) / eps(l) * 100`` (:func:`ex_acc_err`), for each l of ``lengths``
    capped at ``max_new_tokens`` (duplicates dropped). Step 1 is predicted from the prompt alone, so
    ``R(1) = eps(1)`` exactly. ``mean_fkl_by_step`` averages ``e_t`` over the sequences alive at step t
    (None where none is).

    Args:
        teacher, students: models (``{name: model}``).
        widths: ``{name: common logits width}``; default ``okd.models.check_compatible`` of each pair.
        tokenizer: the shared tokenizer (pad and EOS ids, decoding for ROUGE-L).
        dataset: an ``InstructionDataset``.

    Returns:
        ``{"settings": ..., "teacher": {...}, "students": {name: {...}}}`` (JSON-ready).
    """
    from okd.evaluation import rouge_l
    from okd.models import check_compatible

    if widths is None:
        widths = {name: check_compatible(teacher, s, tokenizer, tokenizer) for name, s in students.items()}
    n = min(num_examples, len(dataset))
    if n < 1:
        raise ValueError(f"exposure_bias needs at least one example, got num_examples={num_examples}")
    prompts = [list(dataset[i]["prompt_ids"]) for i in range(n)]
    references = [dataset.examples[i].response for i in range(n)]
    # Never past the shortest position table of the models involved (GPT-2's learned positions fail).
    limits = [x for x in (_position_limit(m) for m in (teacher, *students.values())) if x]
    room = min(limits) - max(len(p) for p in prompts) if limits else max_new_tokens
    steps = max(1, min(max_new_tokens, room))
    ls = sorted({min(int(l), steps) for l in lengths if int(l) >= 1})
    at_l = torch.tensor([l - 1 for l in ls])
    eos = tokenizer.eos_token_id

    def sample_summary(responses: list[list[int]]) -> dict:
        texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
        return {
            "rouge_l": sum(rouge_l(t, ref) for t, ref in zip(texts, references)) / n,
            "mean_length": sum(len(r) for r in responses) / n,
            "eos_fraction": sum(bool(r) and r[-1] == eos for r in responses) / n,
            "example": {"prompt": dataset.examples[0].prompt, "sample": texts[0], "reference": references[0]},
        }

    teacher_samples = _sample(teacher, tokenizer, prompts, max_new_tokens=steps, seed=seed,
                              batch_size=batch_size, progress=progress, desc="sample teacher")
    ground_truth = [_response_ids(dataset, i) for i in range(n)]
    forcing = dict(pad_token_id=tokenizer.pad_token_id, length=steps, batch_size=batch_size, chunk_tokens=chunk_tokens)
    result: dict = {
        "settings": {"num_examples": n, "max_new_tokens": steps, "requested_max_new_tokens": max_new_tokens,
                     "l": ls, "seed": seed, "temperature": 1.0},
        "teacher": sample_summary(teacher_samples),
        "students": {},
    }
    for name, student in students.items():
        own = _sample(student, tokenizer, prompts, max_new_tokens=steps, seed=seed,
                      batch_size=batch_size, progress=progress, desc=f"sample {name}")
        curves = {}
        for key, responses in (("student", own), ("teacher", teacher_samples), ("ground_truth", ground_truth)):
            errors, alive = _fkl_by_step(teacher, student, widths[name], prompts, responses, **forcing)
            alive_count = alive.sum(0).to(torch.float64)
            curves[key] = {
                "accumulated": accumulated_error(errors, alive),
                "mean_by_step": torch.where(alive, errors, torch.zeros_like(errors)).sum(0)
                / torch.where(alive_count > 0, alive_count, torch.full_like(alive_count, math.nan)),
                "alive": alive_count,
            }
        regret, oracle = curves["student"]["accumulated"], curves["teacher"]["accumulated"]
        result["students"][name] = {
            "l": ls,
            "R": _floats(regret[at_l]),
            "eps": _floats(oracle[at_l]),
            "ex_acc_err_percent": _floats(ex_acc_err(regret[at_l], oracle[at_l])),
            "ground_truth_accumulated_fkl": _floats(curves["ground_truth"]["accumulated"][at_l]),
            "mean_fkl_by_step": {key: _floats(c["mean_by_step"]) for key, c in curves.items()},
            "alive_by_step": {key: [int(v) for v in c["alive"].tolist()] for key, c in curves.items()},
            **sample_summary(own),
        }
    return result


# --------------------------------------------------------------------------------------------------
# Teacher-forced analysis over a data set
# --------------------------------------------------------------------------------------------------


class _Running:
    """Token-weighted running sums of per-token values, plus what the curves and histogram need.

    Only scalars per token are ever kept (never logits): sums per metric, calibration bins, sums per
    response position (first ``n_positions``) and at most ``max_kept`` entropy gaps.
    """

    def __init__(self, n_positions: int, n_bins: int, max_kept: int, calibration_keys=("confidence", "accuracy")):
        self.calibration_keys = calibration_keys
        self.sums: dict[str, float] = defaultdict(float)
        self.tokens = 0
        self.calibration = torch.zeros(3, n_bins, dtype=torch.float64)
        self.n_bins = n_bins
        self.position_sums: dict[str, Tensor] = defaultdict(lambda: torch.zeros(n_positions, dtype=torch.float64))
        self.position_counts = torch.zeros(n_positions, dtype=torch.float64)
        self.max_kept = max_kept
        self.kept: list[Tensor] = []
        self.n_kept = 0

    def add(self, values: dict[str, Tensor], positions: Tensor, curve_keys: Sequence[str] = (), keep: str | None = None):
        self.tokens += int(positions.numel())
        for key, value in values.items():
            self.sums[key] += float(value.sum())
        confidence, correct = self.calibration_keys
        self.calibration += calibration_bins(values[confidence], values[correct], self.n_bins)
        inside = positions < self.position_counts.numel()
        self.position_counts.index_add_(0, positions[inside], torch.ones(int(inside.sum()), dtype=torch.float64))
        for key in curve_keys:
            self.position_sums[key].index_add_(0, positions[inside], values[key][inside])
        if keep is not None and self.n_kept < self.max_kept:
            # The first max_kept tokens in data order: deterministic, and enough for a histogram.
            taken = values[keep][: self.max_kept - self.n_kept]
            self.kept.append(taken)
            self.n_kept += int(taken.numel())

    def means(self) -> dict[str, float]:
        return {key: value / self.tokens for key, value in self.sums.items()}

    def curves(self, keys: Sequence[str]) -> dict:
        count = self.position_counts
        used = int((count > 0).nonzero().max()) + 1 if bool((count > 0).any()) else 0
        safe = torch.where(count > 0, count, torch.ones_like(count))
        out = {"position": list(range(used)), "count": [int(c) for c in count[:used].tolist()]}
        for key in keys:
            out[key] = _floats((self.position_sums[key] / safe)[:used])
        return out


def analyze(
    teacher,
    students: dict,
    tokenizer,
    dataset,
    *,
    batch_size: int = 8,
    top_ks: Sequence[int] = DEFAULT_TOP_KS,
    rank_top: int = DEFAULT_RANK_TOP,
    ece_bins: int = ECE_BINS,
    position_curve_length: int = 64,
    histogram_bins: int = 40,
    max_histogram_tokens: int = 100_000,
    exposure_examples: int = 32,
    max_new_tokens: int = 64,
    exposure_lengths: Sequence[int] = DEFAULT_EXPOSURE_LENGTHS,
    seed: int = 0,
    chunk_tokens: int = 256,
    progress: bool = True,
) -> dict:
    """Teacher-forced distribution metrics, calibration and exposure bias of each student.

    One pass over ``dataset`` in batches (right-padded, ``Collator``): per batch the teacher runs once
    and each student once, under ``no_grad`` in eval mode (modes restored afterwards), and the metrics of
    the positions whose next token is a response token are added to running sums; logits never outlive
    their batch. Then :func:`exposure_bias` on the first ``exposure_examples`` prompts (0 skips it).

    Args:
        teacher: the teacher model (a Hugging Face causal LM).
        students: ``{name: model}``, in table order.
        tokenizer: the tokenizer of the data, shared by every model (checked with
            ``okd.models.check_compatible``; logits are sliced to the common width, dropping padding rows).
        dataset: an ``InstructionDataset``.
        batch_size: sequences per forward pass (and per generation batch).
        top_ks, rank_top, ece_bins: see :func:`pair_metrics` and :func:`calibration_bins`.
        position_curve_length: response positions in the per-position curves.
        histogram_bins, max_histogram_tokens: entropy-gap histogram (bins shared by every student, from
            at most that many tokens per student, the first in data order).
        exposure_examples, max_new_tokens, exposure_lengths, seed: see :func:`exposure_bias`.
        chunk_tokens: tokens per float64 metric chunk (memory only; results do not depend on it).
        progress: show progress bars.

    Returns:
        A JSON-ready dict::

            {"settings": {...},
             "teacher": {"tokens", "metrics": {nll, accuracy, confidence, entropy, ece}, "samples": {...}},
             "students": {name: {"tokens", "metrics": {...}, "per_position": {...},
                                 "entropy_gap_histogram": {"edges", "counts", "tokens"},
                                 "exposure_bias": {...}}}}

        ``metrics`` holds the token-weighted mean of every per-token metric (:func:`pair_metrics`), the
        student's ``student_nll``, ``student_accuracy``, ``student_confidence`` and ``student_ece``.

    Raises:
        ValueError: no students, incompatible tokenizer/logits width (naming the student), or no
            response token in the data.
    """
    from okd.data import Collator
    from okd.models import check_compatible
    from okd.training import next_token_targets

    if not students:
        raise ValueError("analyze needs at least one student")
    for option, value, minimum in (("batch_size", batch_size, 1), ("rank_top", rank_top, 1), ("ece_bins", ece_bins, 1),
                                   ("exposure_examples", exposure_examples, 0), ("max_new_tokens", max_new_tokens, 1),
                                   ("position_curve_length", position_curve_length, 1), ("histogram_bins", histogram_bins, 1)):
        if value < minimum:
            raise ValueError(f"{option} must be >= {minimum}, got {value}")
    if not top_ks or min(top_ks) < 1:
        raise ValueError(f"top_ks must be a non-empty list of ints >= 1, got {list(top_ks)}")
    if len(dataset) == 0:
        raise ValueError("analyze: the data set is empty")
    widths = {}
    for name, student in students.items():
        try:
            widths[name] = check_compatible(teacher, student, tokenizer, tokenizer)
        except ValueError as error:
            raise ValueError(f"student {name!r}: {error}") from None
    models = [teacher, *students.values()]
    modes = [m.training for m in models]
    for m in models:
        m.eval()

    teacher_stats = _Running(position_curve_length, ece_bins, 0)
    stats = {
        name: _Running(position_curve_length, ece_bins, max_histogram_tokens, ("student_confidence", "student_accuracy"))
        for name in students
    }
    curve_keys = ("forward_kl", "top1_agreement")
    collator = Collator(pad_token_id=tokenizer.pad_token_id)
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc="analyze", disable=not progress, leave=False):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            targets, mask = next_token_targets(batch["labels"])
            if not bool(mask.any()):
                continue
            positions = (mask.long().cumsum(-1) - 1)[mask]  # index of the predicted token in its response
            full_teacher = _logits(teacher, batch, max(widths.values()))
            selected_teacher = full_teacher[mask.to(full_teacher.device)]
            del full_teacher  # only the counted rows are needed from here on
            target_ids = targets[mask]
            teacher_stats.add(_chunked(model_metrics, chunk_tokens, selected_teacher, target_ids), positions)
            for name, student in students.items():
                width = widths[name]
                student_logits = _logits(student, batch, width)
                selected_student = student_logits[mask.to(student_logits.device)].to(selected_teacher.device)
                del student_logits

                def both(t: Tensor, s: Tensor, y: Tensor) -> dict[str, Tensor]:
                    values = pair_metrics(t, s, top_ks=top_ks, rank_top=rank_top)
                    # The student against the ground truth; its entropy is already pair_metrics' student_entropy.
                    values.update({f"student_{k}": v for k, v in model_metrics(s, y).items() if k != "entropy"})
                    return values

                values = _chunked(both, chunk_tokens, selected_teacher[:, :width], selected_student, target_ids)
                stats[name].add(values, positions, curve_keys, keep="entropy_gap")
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    if teacher_stats.tokens == 0:
        raise ValueError("analyze: no response tokens in the data (every label is -100)")

    teacher_metrics = teacher_stats.means()
    teacher_metrics["ece"] = ece_from_bins(teacher_stats.calibration)
    result: dict = {
        "settings": {
            "examples": len(dataset),
            "batch_size": batch_size,
            "top_ks": list(top_ks),
            "rank_top": rank_top,
            "ece_bins": ece_bins,
            "position_curve_length": position_curve_length,
            "logits_width": widths,
        },
        "teacher": {"tokens": teacher_stats.tokens, "metrics": teacher_metrics},
        "students": {},
    }

    # One set of histogram bins for every student, so that their histograms can be compared bar by bar.
    kept = {name: torch.cat(s.kept) if s.kept else torch.zeros(0, dtype=torch.float64) for name, s in stats.items()}
    every = torch.cat(list(kept.values()))
    low, high = (float(every.min()), float(every.max())) if every.numel() else (-1.0, 1.0)
    if not (math.isfinite(low) and math.isfinite(high)):
        low, high = -1.0, 1.0
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    edges = torch.linspace(low, high, histogram_bins + 1, dtype=torch.float64)

    for name, s in stats.items():
        metrics = s.means()
        metrics["student_ece"] = ece_from_bins(s.calibration)
        counts = torch.histogram(kept[name].clamp(low, high), bins=edges).hist if kept[name].numel() else torch.zeros(histogram_bins)
        result["students"][name] = {
            "tokens": s.tokens,
            "metrics": dict(sorted(metrics.items())),
            "per_position": s.curves(curve_keys),
            "entropy_gap_histogram": {
                "edges": edges.tolist(),
                "counts": [int(c) for c in counts.tolist()],
                "tokens": s.n_kept,
            },
        }

    if exposure_examples > 0:
        exposure = exposure_bias(
            teacher, students, tokenizer, dataset, widths=widths, num_examples=exposure_examples,
            max_new_tokens=max_new_tokens, lengths=exposure_lengths, seed=seed, batch_size=batch_size,
            chunk_tokens=chunk_tokens, progress=progress,
        )
        result["settings"]["exposure"] = exposure["settings"]
        result["teacher"]["samples"] = exposure["teacher"]
        for name, values in exposure["students"].items():
            values["ground_truth_fkl_per_token"] = result["students"][name]["metrics"]["forward_kl"]
            result["students"][name]["exposure_bias"] = values
    return result


# --------------------------------------------------------------------------------------------------
# From paths (the command line)
# --------------------------------------------------------------------------------------------------


def resolve_model_path(path: str, role: str) -> tuple[str, str]:
    """``(model directory, default name)`` for a run directory (with ``student/``) or a model directory.

    The default name is the run directory's name (for ``runs/kd/student``, ``kd``). A path that does not
    exist locally is passed on as is (a hub id; loading fails with a one-line error when it is not
    cached). Raises ``FileNotFoundError`` naming ``role`` for a directory that holds no model.
    """
    from okd.models import _looks_like_hub_id

    p = Path(path).expanduser()
    if not p.exists():
        if not _looks_like_hub_id(path):
            raise FileNotFoundError(f"{role}: no such file or directory: {path}")
        return path, path.split("/")[-1]
    if (p / "student" / "config.json").is_file():
        return str(p / "student"), p.resolve().name
    if (p / "config.json").is_file() or p.suffix.lower() == ".gguf":
        name = p.resolve().parent.name if p.resolve().name == "student" else p.resolve().name
        return str(p), name
    raise FileNotFoundError(f"{role}: {path} is neither a model directory (config.json) nor a run directory (student/config.json)")


def run_analysis(
    teacher: str,
    students: Sequence[str],
    data: str,
    *,
    names: Sequence[str] | None = None,
    json_out: str | None = None,
    plots_dir: str | None = None,
    max_examples: int | None = None,
    max_length: int = 256,
    device: str | None = None,
    teacher_module: str | None = None,
    **options,
) -> dict:
    """Load the teacher, the students and the data from paths, :func:`analyze`, write JSON and plots.

    Args:
        teacher: teacher model directory, run directory or hub id; its tokenizer is the one used.
        students: student run directories (``student/`` inside) or model directories.
        data: JSONL file (any layout ``okd.data.read_jsonl`` accepts).
        names: one name per student (default: the run directory's name; repeats get ``-2``, ``-3``).
        json_out: write the result there, atomically.
        plots_dir: write the PNG plots there (:func:`make_plots`).
        max_examples: analyse only the first N examples.
        max_length: maximum tokens per example (prompt cut from the left first).
        device: ``"cuda"``, ``"cpu"``, ...; default: CUDA when available. Models run in float32.
        teacher_module: an OKD run's ``online_module`` directory (or the run directory): compare with
            the adapted teacher that run trained, instead of the frozen one
            (:func:`okd.teacher.with_online_module`).
        **options: passed to :func:`analyze`.

    Raises:
        FileNotFoundError, ValueError (``okd.data.DataError`` included): one-line messages naming the
        culprit (missing path, tokenizer or vocabulary mismatch, bad or empty data).
    """
    from okd.data import InstructionDataset, ensure_pad_token, read_jsonl
    from okd.evaluation import write_json_atomic
    from okd.models import load_model, load_tokenizer, tokenizer_differences

    if not students:
        raise ValueError("give at least one --student")
    if names is not None and len(names) != len(students):
        raise ValueError(f"--names has {len(names)} names for {len(students)} students")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"--max-examples must be >= 1, got {max_examples}")
    # Resolve every path before loading anything, so a typo fails in a second, not after a teacher load.
    teacher_dir, _ = resolve_model_path(teacher, "teacher")
    resolved = [resolve_model_path(s, f"student {s}") for s in students]
    chosen = list(names) if names is not None else [default for _, default in resolved]
    unique: list[str] = []
    for name in chosen:
        candidate, i = name, 1
        while candidate in unique:
            i += 1
            candidate = f"{name}-{i}"
        unique.append(candidate)
    if not Path(data).is_file():
        raise FileNotFoundError(f"--data: no such file: {data}")

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    def load(path: str, role: str):
        try:
            return load_model(path, dtype="float32", device=device)
        except FileNotFoundError as error:  # name the culprit: which of several models failed
            raise FileNotFoundError(f"{role}: {error}") from None

    try:
        tokenizer = load_tokenizer(teacher_dir)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"teacher (its tokenizer is the one used): {error}") from None
    ensure_pad_token(tokenizer)
    examples = read_jsonl(data, tokenizer=tokenizer)[:max_examples]
    dataset = InstructionDataset(examples, tokenizer, max_length)
    teacher_model = load(teacher_dir, "teacher")
    if teacher_module is not None:
        from okd.teacher import with_online_module

        module_dir = Path(teacher_module)
        if (module_dir / "online_module").is_dir():  # an OKD run directory
            module_dir = module_dir / "online_module"
        teacher_model = with_online_module(teacher_model, module_dir).eval()
    student_models = {}
    for name, (path, _) in zip(unique, resolved):
        try:
            saved = load_tokenizer(path)
        except (FileNotFoundError, OSError):
            saved = None  # a model directory without a tokenizer: the logits width check still runs
        if saved is not None:
            ensure_pad_token(saved)
            problems = tokenizer_differences(tokenizer, saved)
            if problems:
                raise ValueError(f"student {name!r} ({path}): its tokenizer differs from the teacher's: " + "; ".join(problems))
        student_models[name] = load(path, f"student {name!r}")
    result = analyze(teacher_model, student_models, tokenizer, dataset, **options)
    result["settings"].update(
        {"teacher": str(teacher), "teacher_module": teacher_module, "students": dict(zip(unique, map(str, students))), "data": str(data),
         "max_length": max_length, "max_examples": max_examples, "device": str(device)}
    )
    if plots_dir:
        result["settings"]["plots"] = [str(p) for p in make_plots(result, plots_dir)]
    if json_out:
        write_json_atomic(json_out, result)
    return result


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def format_table(result: dict) -> str:
    """A compact markdown table of :func:`analyze`'s result: one row per student, then the teacher.

    Columns: tokens, top-1 agreement, top-k overlap and coverage (first and last k), entropy gap
    ``H_s - H_t`` and its mean absolute value, FKL, RKL, TVD, Spearman, NLL / accuracy / ECE against the
    ground truth, ExAccErr at the largest l, and free-running ROUGE-L.
    """
    settings = result["settings"]
    ks = settings["top_ks"]
    k_lo, k_hi = ks[0], ks[-1]
    rank = f"spearman_top{settings['rank_top']}"
    exposure = settings.get("exposure")
    l_max = exposure["l"][-1] if exposure and exposure["l"] else None
    header = [
        "model", "tokens", "top-1 agree", f"top-{k_lo} overlap", f"top-{k_lo} cover", f"top-{k_hi} cover",
        "H_s-H_t", "abs gap", "FKL", "RKL", "TVD", f"rho@{settings['rank_top']}", "NLL", "acc", "ECE",
        f"ExAccErr@{l_max} %" if l_max else "ExAccErr %", "ROUGE-L",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, entry in result["students"].items():
        m = entry["metrics"]
        ex = entry.get("exposure_bias")
        row = [
            name, str(entry["tokens"]), _fmt(m["top1_agreement"]), _fmt(m[f"top{k_lo}_overlap"]),
            _fmt(m[f"top{k_lo}_coverage"]), _fmt(m[f"top{k_hi}_coverage"]), _fmt(m["entropy_gap"]),
            _fmt(m["abs_entropy_gap"]), _fmt(m["forward_kl"]), _fmt(m["reverse_kl"]), _fmt(m["tvd"]),
            _fmt(m[rank]), _fmt(m["student_nll"]), _fmt(m["student_accuracy"]), _fmt(m["student_ece"]),
            _fmt(ex["ex_acc_err_percent"][-1], 1) if ex else "–", _fmt(ex["rouge_l"], 2) if ex else "–",
        ]
        lines.append("| " + " | ".join(row) + " |")
    t = result["teacher"]
    tm = t["metrics"]
    samples = t.get("samples")
    row = ["teacher", str(t["tokens"])] + ["–"] * 10 + [
        _fmt(tm["nll"]), _fmt(tm["accuracy"]), _fmt(tm["ece"]), "–", _fmt(samples["rouge_l"], 2) if samples else "–",
    ]
    lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def make_plots(result: dict, out_dir: str | Path) -> list[Path]:
    """PNG plots of :func:`analyze`'s result (matplotlib, Agg backend); returns the files written.

    * ``entropy_gap_hist.png``: histogram of ``H_s - H_t`` per student (shared bins; 0 = same entropy,
      right = student flatter than the teacher);
    * ``topk_coverage.png``: top-1 agreement, top-k overlap and teacher mass covered per student;
    * ``exposure_bias.png``: ExAccErr(l) per student (only when exposure bias was measured).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    students = result["students"]
    names = list(students)
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        hist = students[name]["entropy_gap_histogram"]
        total = max(sum(hist["counts"]), 1)
        ax.stairs([c / total for c in hist["counts"]], hist["edges"], label=name)
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("entropy gap H_student - H_teacher (nats)")
    ax.set_ylabel("fraction of response tokens")
    ax.set_title("Entropy gap per token")
    ax.legend()
    fig.tight_layout()
    written.append(out / "entropy_gap_hist.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    ks = result["settings"]["top_ks"]
    series = [("top-1 agreement", "top1_agreement")]
    series += [(f"top-{k} overlap", f"top{k}_overlap") for k in ks]
    series += [(f"top-{k} teacher mass covered", f"top{k}_coverage") for k in ks]
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(names) + 3), 4))
    width = 0.8 / len(series)
    for j, (label, key) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [students[n]["metrics"][key] for n in names], width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean over response tokens")
    ax.set_title("Does the student cover the teacher's top tokens?")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "topk_coverage.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    if any("exposure_bias" in students[n] for n in names):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in names:
            ex = students[name].get("exposure_bias")
            if ex:
                points = [(l, v) for l, v in zip(ex["l"], ex["ex_acc_err_percent"]) if v is not None]
                ax.plot([l for l, _ in points], [v for _, v in points], marker="o", label=name)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xlabel("generated tokens l")
        ax.set_ylabel("ExAccErr(l) (%)")
        ax.set_title("Excess accumulated error (exposure bias)")
        ax.legend()
        fig.tight_layout()
        written.append(out / "exposure_bias.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
