"""Exposure bias: MiniLLM's ExAccErr (Gu et al. 2024, after Arora et al. 2022) and free-running ROUGE-L.

:func:`accumulated_error` and :func:`ex_acc_err` are the estimator on given per-step errors;
:func:`exposure_bias` samples from each model and measures them (see its docstring for the exact recipe).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from okd.analysis.config import DEFAULT_EXPOSURE_LENGTHS
from okd.analysis.metrics import _kl, _log_probs
from okd.analysis.passes import _chunked, _floats, _logits, _position_limit, _sample
from okd.targets import next_token_targets


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


@torch.no_grad()
def _fkl_by_step(teacher, student, width, prompts, responses, *, pad_token_id, length, batch_size, chunk_tokens):
    """Teacher-force both models on prompt + response; FKL(p || q) at each response step.

    Returns:
        ``(errors, alive)``: float64 ``[N, length]`` and bool ``[N, length]``; ``errors[i, t]`` is the
        divergence of the two next-token distributions that predict response token t of row i.
    """
    from okd.data.instruction import build_batch

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


def _error_curve(errors: Tensor, alive: Tensor) -> dict[str, Tensor]:
    """Accumulated error, mean error over the sequences alive at each step (NaN where none is), alive count."""
    alive_count = alive.sum(0).to(torch.float64)
    return {
        "accumulated": accumulated_error(errors, alive),
        "mean_by_step": torch.where(alive, errors, torch.zeros_like(errors)).sum(0)
        / torch.where(alive_count > 0, alive_count, torch.full_like(alive_count, math.nan)),
        "alive": alive_count,
    }


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
    from okd.models import check_compatible

    if widths is None:
        widths = {name: check_compatible(teacher, s, tokenizer, tokenizer) for name, s in students.items()}
    n = min(num_examples, len(dataset))
    if n < 1:
        raise ValueError(f"exposure_bias needs at least one example, got num_examples={num_examples}")
    prompts = [list(dataset[i]["prompt_ids"]) for i in range(n)]
    steps = _generation_steps((teacher, *students.values()), prompts, max_new_tokens)
    ls = sorted({min(int(l), steps) for l in lengths if int(l) >= 1})
    sampling = dict(max_new_tokens=steps, seed=seed, batch_size=batch_size, progress=progress)
    teacher_samples = _sample(teacher, tokenizer, prompts, **sampling, desc="sample teacher")
    ground_truth = [_response_ids(dataset, i) for i in range(n)]
    forcing = dict(pad_token_id=tokenizer.pad_token_id, length=steps, batch_size=batch_size, chunk_tokens=chunk_tokens)
    result: dict = {
        "settings": {"num_examples": n, "max_new_tokens": steps, "requested_max_new_tokens": max_new_tokens,
                     "l": ls, "seed": seed, "temperature": 1.0},
        "teacher": _sample_summary(tokenizer, dataset, teacher_samples),
        "students": {},
    }
    for name, student in students.items():
        own = _sample(student, tokenizer, prompts, **sampling, desc=f"sample {name}")
        curves = {
            key: _error_curve(*_fkl_by_step(teacher, student, widths[name], prompts, responses, **forcing))
            for key, responses in (("student", own), ("teacher", teacher_samples), ("ground_truth", ground_truth))
        }
        result["students"][name] = {**_exposure_entry(curves, ls), **_sample_summary(tokenizer, dataset, own)}
    return result


def _generation_steps(models, prompts: list[list[int]], max_new_tokens: int) -> int:
    """``max_new_tokens``, but never past the shortest position table of the models involved (GPT-2's
    learned positions fail past theirs); at least 1."""
    limits = [x for x in (_position_limit(m) for m in models) if x]
    room = min(limits) - max(len(p) for p in prompts) if limits else max_new_tokens
    return max(1, min(max_new_tokens, room))


def _exposure_entry(curves: dict[str, dict[str, Tensor]], ls: list[int]) -> dict:
    """R(l), eps(l), ExAccErr(l) and the ground-truth-prefix value at each l, plus the per-step curves."""
    at_l = torch.tensor([l - 1 for l in ls])
    regret, oracle = curves["student"]["accumulated"], curves["teacher"]["accumulated"]
    return {
        "l": ls,
        "R": _floats(regret[at_l]),
        "eps": _floats(oracle[at_l]),
        "ex_acc_err_percent": _floats(ex_acc_err(regret[at_l], oracle[at_l])),
        "ground_truth_accumulated_fkl": _floats(curves["ground_truth"]["accumulated"][at_l]),
        "mean_fkl_by_step": {key: _floats(c["mean_by_step"]) for key, c in curves.items()},
        "alive_by_step": {key: [int(v) for v in c["alive"].tolist()] for key, c in curves.items()},
    }


def _sample_summary(tokenizer, dataset, responses: list[list[int]]) -> dict:
    """ROUGE-L against the references of the first ``len(responses)`` examples, mean length, the
    fraction that ended at EOS, and the first example."""
    from okd.evaluation import rouge_l

    n = len(responses)
    references = [dataset.examples[i].response for i in range(n)]
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
    eos = tokenizer.eos_token_id
    return {
        "rouge_l": sum(rouge_l(t, ref) for t, ref in zip(texts, references)) / n,
        "mean_length": sum(len(r) for r in responses) / n,
        "eos_fraction": sum(bool(r) and r[-1] == eos for r in responses) / n,
        "example": {"prompt": dataset.examples[0].prompt, "sample": texts[0], "reference": references[0]},
    }
