"""Which positions take a loss, and how the student's two loss terms mix: the floor of okd.

Labels are the input ids with ``IGNORE_INDEX`` (-100) where no loss is taken (prompt and padding).
The logits at position ``t`` predict the token at ``t + 1``, so position ``t`` takes a loss exactly when
``labels[t + 1] != IGNORE_INDEX``. Every view of that one rule is computed here:

* :func:`next_token_targets`: ``(targets, mask)``, both ``[batch, seq]`` (full logits);
* :func:`loss_positions`: ``(rows, targets)``, flat indices ``[N]`` into ``batch * seq`` and the
  targets there (heads applied on the loss positions only, ``okd.heads``, ``okd.fused``);
* :func:`example_loss_positions`: the positions of one unpadded example as a list (the teacher
  cache's entries, ``okd.teacher_cache``).

:func:`mix_losses` is the student's distillation loss ``(1 - r) * CE + r * D``, written once.

This module imports nothing from okd, so any module may import it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Label value of a position without loss (prompt, padding), everywhere in okd."""

__all__ = ["IGNORE_INDEX", "example_loss_positions", "loss_positions", "mix_losses", "next_token_targets"]


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align labels with logits: the logits at position t predict the token at t + 1.

    Returns ``(targets, mask)``, both ``[batch, seq]``: ``targets[:, t] = labels[:, t + 1]`` (last
    position ignored) and ``mask = targets != -100``. Shifting the small label tensor instead of the
    ``[batch, seq, vocab]`` logits avoids a copy of the logits.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return targets, targets != IGNORE_INDEX


def loss_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, targets)``: flat indices ``[N]`` into ``batch * seq`` of the positions whose next-token
    target is not -100, and those targets ``[N]`` (the positions :func:`next_token_targets` counts)."""
    targets, mask = next_token_targets(labels)
    rows = mask.reshape(-1).nonzero().squeeze(1)
    return rows, targets.reshape(-1).index_select(0, rows)


def example_loss_positions(labels: Sequence[int] | torch.Tensor) -> list[int]:
    """Positions ``t`` of one unpadded example whose logits predict a label: ``labels[t + 1] != -100``
    (ascending; :func:`loss_positions` of the example as a batch of one)."""
    labels = torch.as_tensor(labels if isinstance(labels, torch.Tensor) else list(labels), dtype=torch.long)
    rows, _ = loss_positions(labels.reshape(1, -1))
    return rows.tolist()


def mix_losses(ce, kd, kd_ratio: float):
    """The student's loss ``(1 - kd_ratio) * ce + kd_ratio * kd`` (tensors or numbers).

    ``kd_ratio == 1`` gives ``kd`` alone: the CE is then only logged, and adds no term to the loss.
    """
    return kd if kd_ratio == 1 else (1 - kd_ratio) * ce + kd_ratio * kd
