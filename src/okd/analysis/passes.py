"""Running the models: logits of a batch, metric chunks, free-running samples, and the teacher-forced
pass over a data set that accumulates every per-token metric (:func:`teacher_forced_pass`)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
import torch
from torch import Tensor
from tqdm.auto import tqdm

from okd.analysis.config import AnalysisConfig
from okd.analysis.metrics import calibration_bins, model_metrics, pair_metrics
from okd.targets import next_token_targets


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
    """Free-running samples at temperature 1 (full distribution), seeded, batched and left-padded.

    The seed makes them repeatable, and the caller's random streams are left untouched."""
    from okd.generation import generate_batched

    return generate_batched(
        model,
        prompts,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        desc=desc,
    )


def _floats(values: Tensor) -> list[float | None]:
    """A JSON-ready list; NaN (undefined) becomes None."""
    return [None if math.isnan(v) else v for v in values.to(torch.float64).tolist()]


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


CURVE_KEYS = ("forward_kl", "top1_agreement")
"""The per-token metrics that get a per-position curve."""


def teacher_forced_pass(teacher, students: dict, widths: dict[str, int], tokenizer, dataset, config: AnalysisConfig):
    """One pass over ``dataset`` in batches (right-padded, ``Collator``); returns ``(teacher_stats, {name: stats})``.

    Per batch the teacher runs once and each student once, under ``no_grad`` in eval mode (modes
    restored afterwards), and the metrics of the positions whose next token is a response token are
    added to running sums (:class:`_Running`); logits never outlive their batch.
    """
    from okd.data import Collator

    models = [teacher, *students.values()]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    teacher_stats = _Running(config.position_curve_length, config.ece_bins, 0)
    stats = {
        name: _Running(config.position_curve_length, config.ece_bins, config.max_histogram_tokens,
                       ("student_confidence", "student_accuracy"))
        for name in students
    }
    collator = Collator(pad_token_id=tokenizer.pad_token_id)
    chunk = config.chunk_tokens
    try:
        for start in tqdm(range(0, len(dataset), config.batch_size), desc="analyze", disable=not config.progress, leave=False):
            batch = collator([dataset[i] for i in range(start, min(start + config.batch_size, len(dataset)))])
            targets, mask = next_token_targets(batch["labels"])
            if not bool(mask.any()):
                continue
            positions = (mask.long().cumsum(-1) - 1)[mask]  # index of the predicted token in its response
            full_teacher = _logits(teacher, batch, max(widths.values()))
            selected_teacher = full_teacher[mask.to(full_teacher.device)]
            del full_teacher  # only the counted rows are needed from here on
            target_ids = targets[mask]
            teacher_stats.add(_chunked(model_metrics, chunk, selected_teacher, target_ids), positions)
            for name, student in students.items():
                width = widths[name]
                student_logits = _logits(student, batch, width)
                selected_student = student_logits[mask.to(student_logits.device)].to(selected_teacher.device)
                del student_logits

                def both(t: Tensor, s: Tensor, y: Tensor) -> dict[str, Tensor]:
                    values = pair_metrics(t, s, top_ks=config.top_ks, rank_top=config.rank_top)
                    # The student against the ground truth; its entropy is already pair_metrics' student_entropy.
                    values.update({f"student_{k}": v for k, v in model_metrics(s, y).items() if k != "entropy"})
                    return values

                values = _chunked(both, chunk, selected_teacher[:, :width], selected_student, target_ids)
                stats[name].add(values, positions, CURVE_KEYS, keep="entropy_gap")
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return teacher_stats, stats
