"""The objective of a distillation step, in one place.

``loss = (1 - kd_ratio) * CE(student, data) + kd_ratio * D(teacher -> student)`` for the student and,
on OKD's update steps, ``ce_weight * CE(teacher, data) + student_weight * D(student -> teacher)`` for
the online module. Shapes: logits ``[batch, seq, vocab]``, labels / targets / mask ``[batch, seq]``.
``IGNORE_INDEX`` (-100, ``okd.targets``) marks label positions without loss (prompt and padding) everywhere in okd.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from okd.divergences import get_divergence
from okd.heads import head_on_positions_supported
from okd.online.objective import OnlineObjective
from okd.targets import IGNORE_INDEX, mix_losses, next_token_targets

if TYPE_CHECKING:
    from okd.online.base import OnlineModuleConfig
    from okd.sections import ResolvedMethod

__all__ = ["IGNORE_INDEX", "DistillationLoss", "StepLosses", "cross_entropy", "first_nonfinite", "fused_step_losses", "fused_unsupported", "next_token_targets"]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy. logits ``[batch, seq, vocab]``, targets ``[batch, seq]`` (-100 ignored)."""
    if not (targets != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


@dataclass
class StepLosses:
    """The loss terms of one step (tensors with graphs; ``as_floats`` for logging)."""

    loss: torch.Tensor  # what the student's gradient comes from
    ce: torch.Tensor
    kd: torch.Tensor | None = None
    module_loss: torch.Tensor | None = None  # the online module's loss (OKD update steps only)
    module_ce: torch.Tensor | None = None
    module_divergence: torch.Tensor | None = None
    module_kl_from_frozen: torch.Tensor | None = None  # KL(p_0 || p_phi), when the frozen logits were at hand
    module_accuracy: torch.Tensor | None = None  # top-1 accuracy of the adapted teacher on the batch
    skipped: bool = False  # set when a non-finite step was skipped
    tokens: Any = None  # the step's loss-token counts (okd.training.distributed.TokenCount), set by the loop

    def tensors(self) -> list[torch.Tensor]:
        """The loss terms that were computed this step."""
        return [value for f in dataclasses.fields(self) if isinstance(value := getattr(self, f.name), torch.Tensor)]

    def as_floats(self) -> dict[str, float]:
        return {
            f.name: float(getattr(self, f.name).detach())
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }


class DistillationLoss:
    """Computes the student's loss and, on update steps, the online module's loss.

    Args:
        method: the resolved method (divergence, kd_ratio, temperature).
        online: the online-module config (weights of its two loss terms), or None.
        chunk_tokens: chunk size of the divergence computation.
        total_steps: the run's length (the horizon of the module's anchor schedule).
    """

    def __init__(self, method: ResolvedMethod, online: OnlineModuleConfig | None, chunk_tokens: int = 1024, total_steps: int = 1):
        self.method = method
        self.online = online
        self.divergence = get_divergence(method.divergence, **method.divergence_params)
        self.chunk_tokens = chunk_tokens
        # The module's loss and the student's target distribution (okd.online.objective).
        self.objective = None if online is None else OnlineObjective(
            online, method.divergence, method.divergence_params, method.temperature, chunk_tokens, total_steps
        )

    def divergence_between(self, target_logits, learner_logits, mask):
        return self.divergence(
            target_logits,
            learner_logits,
            mask,
            temperature=self.method.temperature,
            chunk_tokens=self.chunk_tokens,
        )

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor | None,
        update_module: bool = False,
        frozen_logits: torch.Tensor | None = None,
        step: int = 0,
        *,
        targets: torch.Tensor | None = None,
    ) -> StepLosses:
        """Logits ``[B, T, V]`` with ``labels`` ``[B, T]``, or logits at the loss positions only,
        ``[N, V]``, with their next-token ``targets`` ``[N]`` (``labels=None``; ``okd.heads``)."""
        if targets is None:
            targets, mask = next_token_targets(labels)
        else:
            mask = targets != IGNORE_INDEX
        ratio = self.method.kd_ratio
        # With kd_ratio = 1 the student's CE is only logged: compute it without a graph.
        with torch.set_grad_enabled(torch.is_grad_enabled() and (ratio < 1 or teacher_logits is None)):
            ce = cross_entropy(student_logits, targets)
        if teacher_logits is None or ratio == 0:
            losses = StepLosses(loss=ce, ce=ce)
        else:
            target = teacher_logits if self.objective is None else self.objective.student_target(teacher_logits, frozen_logits)
            kd = self.divergence_between(target.detach(), student_logits, mask)
            loss = mix_losses(ce, kd, ratio)
            losses = StepLosses(loss=loss, ce=ce, kd=kd)
        if update_module:
            # The module moves the teacher toward the (detached) student, while CE on the data (and
            # the optional anchor to the frozen teacher) keeps the adapted teacher accurate.
            module = self.objective(student_logits, teacher_logits, frozen_logits, targets, step)
            losses.module_loss, losses.module_ce, losses.module_divergence = module.loss, module.ce, module.divergence
            losses.module_kl_from_frozen, losses.module_accuracy = module.anchor, module.accuracy
        return losses


def fused_unsupported(method: ResolvedMethod, online: OnlineModuleConfig | None, student, teacher) -> str | None:
    """Why ``train.fused_loss`` falls back to the dense path for this run (None: it does not).

    The fused loss (``okd.fused``) covers the student's ``(1 - kd_ratio) CE + kd_ratio D`` and OKD's
    module loss ``ce_weight CE + student_weight D(student -> teacher)`` (``online.divergence``: the
    method's own or any other), through the adapter or with no module; both models must have plain heads
    (``okd.heads.head_on_positions_supported``).
    """
    if not head_on_positions_supported(student):
        return "the student's logits are not head(hidden) (not a Hugging Face causal LM, or post-processed)"
    if teacher is not None and not teacher.supports_positions:
        return "the teacher's logits are post-processed (soft-capping, logit scale)"
    if online is not None:
        if online.kind != "adapter":
            return f"online.kind={online.kind} (the fused loss takes the module's gradient through the adapter only)"
        if online.anchor_weight > 0 or online.teacher_mix > 0:
            return "online.anchor_weight / online.teacher_mix need the frozen teacher's logits"
    return None


def fused_step_losses(fused) -> StepLosses:
    """``okd.fused.FusedLosses`` as the loop's ``StepLosses``."""
    return StepLosses(
        loss=fused.loss, ce=fused.ce, kd=fused.kd, module_loss=fused.module_loss, module_ce=fused.module_ce,
        module_divergence=fused.module_divergence, module_kl_from_frozen=fused.module_kl_from_frozen,
        module_accuracy=fused.module_accuracy,
    )


def first_nonfinite(losses: StepLosses) -> str | None:
    """The loss terms that are NaN or inf (e.g. "kd loss (nan)"), or None. The total ("loss") is
    named only when no term it is made of is to blame."""
    bad = {name: value for name, value in losses.as_floats().items() if not math.isfinite(value)}
    if not bad:
        return None
    culprits = [name for name in bad if name != "loss"] or ["loss"]
    return " and ".join(f"{name} loss ({bad[name]})" for name in culprits)
