"""Held-out metrics during training: the student's CE, its divergence to the current teacher and, for
OKD, what the online module does to the teacher (adapted CE/accuracy, KL from the frozen teacher)."""

from __future__ import annotations

import torch

from okd.losses import DistillationLoss, cross_entropy
from okd.online.objective import AdaptedTeacherMetrics
from okd.targets import next_token_targets


@torch.no_grad()
def validation_metrics(student, teacher, dataset, collator, loss_fn: DistillationLoss, batch_size, device) -> dict:
    """Held-out student CE and divergence to the current teacher (token-weighted over the set)."""
    student.eval()
    ce_sum = kd_sum = 0.0
    tokens = 0
    # What the online module does to the teacher (OKD only): adapted CE/accuracy and KL from the frozen one.
    adapted = AdaptedTeacherMetrics() if teacher is not None and loss_fn.objective is not None else None
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        targets, mask = next_token_targets(batch["labels"])
        n = int(mask.sum())
        if n == 0:
            continue
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ce_sum += float(cross_entropy(logits, targets)) * n
        if teacher is not None:
            teacher_logits, frozen_logits = teacher.adapted_and_frozen(
                batch["input_ids"], batch["attention_mask"], need_frozen=adapted is not None
            )
            if adapted is not None:
                adapted.update(teacher_logits, frozen_logits, targets)
                teacher_logits = loss_fn.objective.student_target(teacher_logits, frozen_logits)
            kd_sum += float(loss_fn.divergence_between(teacher_logits, logits, mask)) * n
        tokens += n
    metrics = {"validation_ce": ce_sum / max(tokens, 1)}
    if teacher is not None:
        metrics["validation_divergence"] = kd_sum / max(tokens, 1)
    if adapted is not None:
        metrics.update(adapted.result())
    return metrics
