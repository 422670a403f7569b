"""What the online module optimises, when it updates, how fast, and what the student learns from.

Notation (per token, every distribution a softmax over the vocabulary):

* ``q``: the student, always **detached** here (the module never moves the student);
* ``p_phi``: the adapted teacher (the frozen teacher plus the online module, parameters ``phi``);
* ``p_0``: the frozen teacher (the same model with the module switched off).

The module's loss on an update step ``t`` (of ``T = train.max_steps`` student steps) is::

    ce_weight * CE(p_phi, data)
  + student_weight * D(q -> p_phi)          # online.divergence, q the target, p_phi the learner
  + anchor_weight(t) * KL(p_0 || p_phi)     # online.anchor_weight / online.anchor_schedule

``D(q -> p_phi)`` is a registered divergence (:mod:`okd.divergences`) called with the detached student
in the *teacher* slot and the adapted teacher in the *student* slot, so
``online.divergence=forward_kl`` is ``KL(q || p_phi)`` (mass-covering: p_phi spreads over everything
q covers), ``reverse_kl`` is ``KL(p_phi || q)`` (mode-seeking, PromptKD's choice) and ``jsd`` is the
generalized JSD with ``online.divergence_params={beta: ...}`` (the default, beta 0.5: the design
study's choice, ``docs/results/okd_design.md``). ``same`` is the method's own divergence and
parameters, roles swapped: with the ``okd`` preset (forward KL) that is ``KL(q || p_phi)``, okd's
original design and its default until that study.

The student learns from ``p_phi`` (``online.teacher_mix = 0``) or from the probability-space mixture
``(1 - m) p_phi + m p_0`` (:meth:`OnlineObjective.student_target`).

Everything here is a function of the student step, so checkpoints need no extra state: the module's
learning rate (:class:`ModuleSchedule`), the anchor's weight (:func:`anchor_weight_at`) and whether
the module updates (:func:`module_updates_at`) are recomputed from the step on resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from okd.divergences import forward_kl, get_divergence
from okd.targets import IGNORE_INDEX

if TYPE_CHECKING:
    from okd.online.base import OnlineModuleConfig

MODULE_LR_SCHEDULES = ("constant", "linear", "cosine")
ANCHOR_SCHEDULES = ("constant", "linear")


# ----------------------------------------------------------------------------------------------
# When and how fast the module updates
# ----------------------------------------------------------------------------------------------
def module_updates_at(config: OnlineModuleConfig, step: int) -> bool:
    """Does the module take an optimizer step at student step ``step`` (1-based)?

    Yes when ``step > online.start_step`` and ``step % online.update_every == 0``: with
    ``start_step=N`` the module stays the identity for the first N student steps (the student first
    learns from the frozen teacher), then adapts every ``update_every`` steps.
    """
    return step > config.start_step and step % config.update_every == 0


def module_lr_factor(config: OnlineModuleConfig, step: int, total_steps: int) -> float:
    """Multiplier of ``online.learning_rate`` at student step ``step``.

    The schedule runs over the student steps after ``start_step``: ``u = step - start_step - 1``
    (0 on the first step the module may update), horizon ``H = total_steps - start_step - warmup``.

    * warm-up (``u < warmup_steps``): ``(u + 1) / warmup_steps`` (the first update is not wasted at 0);
    * then, with ``progress = clamp((u - warmup) / H, 0, 1)``: ``constant`` 1, ``linear``
      ``1 - progress``, ``cosine`` ``(1 + cos(pi * progress)) / 2``.
    """
    u = step - config.start_step - 1
    if u < config.warmup_steps:
        return (max(u, 0) + 1) / config.warmup_steps
    if config.lr_scheduler == "constant":
        return 1.0
    horizon = max(total_steps - config.start_step - config.warmup_steps, 1)
    progress = min(max((u - config.warmup_steps) / horizon, 0.0), 1.0)
    if config.lr_scheduler == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class ModuleSchedule:
    """Sets the module optimizer's learning rate from the student step before each module update.

    Args:
        config: the ``online`` section (``learning_rate``, ``lr_scheduler``, ``warmup_steps``,
            ``start_step``).
        total_steps: the schedule's horizon, ``train.max_steps``.
    """

    def __init__(self, config: OnlineModuleConfig, total_steps: int):
        self.config, self.total_steps = config, total_steps

    def learning_rate(self, step: int) -> float:
        return self.config.learning_rate * module_lr_factor(self.config, step, self.total_steps)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self.learning_rate(step)


def anchor_weight_at(config: OnlineModuleConfig, step: int, total_steps: int) -> float:
    """The anchor's weight at student step ``step``: ``anchor_weight`` (``constant``), or
    ``anchor_weight * (1 - step / total_steps)`` (``linear``, PromptKD's decay to 0 at the last step)."""
    if config.anchor_schedule == "constant":
        return config.anchor_weight
    return config.anchor_weight * max(1.0 - step / max(total_steps, 1), 0.0)


# ----------------------------------------------------------------------------------------------
# The module's loss and the student's target
# ----------------------------------------------------------------------------------------------
def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE over the counted tokens. logits ``[B, T, V]``, targets ``[B, T]`` (-100 ignored);
    a graph-connected 0 when no token counts."""
    if not (targets != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def token_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy over the counted tokens (a float32 scalar; 0 when no token counts).
    logits ``[B, T, V]``, targets ``[B, T]`` (-100 ignored)."""
    mask = targets != IGNORE_INDEX
    hits = (logits.detach().argmax(-1) == targets) & mask
    return hits.sum().float() / mask.sum().clamp(min=1).float()


def mix_logits(adapted_logits: torch.Tensor, frozen_logits: torch.Tensor, mix: float) -> torch.Tensor:
    """Log-probabilities of ``(1 - mix) * softmax(adapted) + mix * softmax(frozen)``, float32.

    Shapes: both inputs ``[..., V]``, output ``[..., V]``. Used as logits (a log-probability vector
    is its own softmax's logits). ``mix = 0`` gives ``log_softmax(adapted)``, ``mix = 1``
    ``log_softmax(frozen)``.
    """
    log_a = F.log_softmax(adapted_logits.float(), dim=-1)
    if mix == 0:
        return log_a
    log_f = F.log_softmax(frozen_logits.float(), dim=-1)
    if mix == 1:
        return log_f
    return torch.logaddexp(log_a + math.log1p(-mix), log_f + math.log(mix))


@dataclass
class ModuleLosses:
    """The module's loss (with a graph to the module) and its terms and diagnostics (detached)."""

    loss: torch.Tensor
    ce: torch.Tensor  # CE(p_phi, data) on the batch
    divergence: torch.Tensor  # D(q -> p_phi)
    accuracy: torch.Tensor  # top-1 accuracy of p_phi on the batch's targets
    anchor: Optional[torch.Tensor] = None  # KL(p_0 || p_phi), when p_0's logits were given
    anchor_weight: float = 0.0


class OnlineObjective:
    """The online module's loss (module docstring) and the student's target distribution.

    Args:
        config: the ``online`` section.
        method_divergence: the method's divergence name (used by ``online.divergence=same``).
        method_params: the method's divergence parameters (likewise).
        temperature: the method's temperature, applied inside ``D`` (not in CE or the anchor).
        chunk_tokens: chunk size of the divergence computations.
        total_steps: ``train.max_steps`` (the horizon of the ``linear`` anchor schedule).

    Call ``objective(student_logits, teacher_logits, frozen_logits, targets, step)``:

    * ``student_logits`` ``[B, T, V]``: detached here;
    * ``teacher_logits`` ``[B, T, V]``: the adapted teacher, with a graph to the module;
    * ``frozen_logits`` ``[B, T, V]`` or None: the frozen teacher (needed when the anchor weight > 0);
    * ``targets`` ``[B, T]``: next-token ids, -100 where no loss;
    * ``step``: the student step (1-based), for the anchor's schedule.
    """

    def __init__(
        self,
        config: OnlineModuleConfig,
        method_divergence: str,
        method_params: dict | None = None,
        temperature: float = 1.0,
        chunk_tokens: int = 1024,
        total_steps: int = 1,
    ):
        self.config = config
        if config.divergence == "same":
            name, params = method_divergence, dict(method_params or {})
        else:
            name, params = config.divergence, dict(config.divergence_params or {})
        try:
            self.divergence = get_divergence(name, **params)
        except ValueError as error:
            raise ValueError(f"online.divergence: {error}") from None
        self.divergence_name = name
        self.temperature, self.chunk_tokens, self.total_steps = temperature, chunk_tokens, total_steps

    def needs_frozen(self, update_module: bool) -> bool:
        """Whether this step needs the frozen teacher's logits ``p_0`` (the mix always; the anchor on
        update steps)."""
        return self.config.teacher_mix > 0 or (update_module and self.config.anchor_weight > 0)

    def student_target(self, teacher_logits: torch.Tensor, frozen_logits: torch.Tensor | None) -> torch.Tensor:
        """What the student's divergence compares it to: the adapted teacher's logits unchanged
        (``teacher_mix = 0``), else the log-probabilities of ``(1 - m) p_phi + m p_0`` (both at
        temperature 1; the method's temperature is then applied to the mixture). ``[B, T, V]``."""
        mix = self.config.teacher_mix
        if mix == 0:
            return teacher_logits
        if frozen_logits is None:
            raise ValueError("online.teacher_mix > 0 needs the frozen teacher's logits")
        return mix_logits(teacher_logits, frozen_logits, mix)

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        frozen_logits: torch.Tensor | None,
        targets: torch.Tensor,
        step: int,
    ) -> ModuleLosses:
        config = self.config
        mask = targets != IGNORE_INDEX
        ce = token_cross_entropy(teacher_logits, targets)
        div = self.divergence(
            student_logits.detach(), teacher_logits, mask, temperature=self.temperature, chunk_tokens=self.chunk_tokens
        )
        loss = config.ce_weight * ce + config.student_weight * div
        weight = anchor_weight_at(config, step, self.total_steps)
        anchor = None
        if frozen_logits is not None:
            # KL(p_0 || p_phi) at temperature 1: p_0 in the target slot, detached.
            anchor = forward_kl(frozen_logits.detach(), teacher_logits, mask, chunk_tokens=self.chunk_tokens)
            if weight > 0:
                loss = loss + weight * anchor
            else:
                anchor = anchor.detach()
        elif weight > 0:
            raise ValueError("online.anchor_weight > 0 needs the frozen teacher's logits")
        return ModuleLosses(
            loss=loss, ce=ce, divergence=div, accuracy=token_accuracy(teacher_logits, targets),
            anchor=anchor, anchor_weight=weight,
        )


# ----------------------------------------------------------------------------------------------
# What the module does to the teacher, on held-out data
# ----------------------------------------------------------------------------------------------
class AdaptedTeacherMetrics:
    """Token-weighted held-out metrics of the adapted teacher, accumulated over batches.

    ``update(adapted_logits, frozen_logits, targets)`` per batch (``[B, T, V]``, ``[B, T, V]``,
    ``[B, T]``); ``result()`` gives ``validation_teacher_ce`` (CE of p_phi on the data),
    ``validation_teacher_accuracy`` (its top-1 accuracy), ``validation_teacher_kl_from_frozen``
    (``KL(p_0 || p_phi)``, token mean, temperature 1) and ``validation_frozen_teacher_ce``
    (CE of p_0, the reference the first one is read against).
    """

    def __init__(self):
        self.sums = {"teacher_ce": 0.0, "teacher_accuracy": 0.0, "teacher_kl_from_frozen": 0.0, "frozen_teacher_ce": 0.0}
        self.tokens = 0

    @torch.no_grad()
    def update(self, adapted_logits: torch.Tensor, frozen_logits: torch.Tensor, targets: torch.Tensor) -> None:
        mask = targets != IGNORE_INDEX
        n = int(mask.sum())
        if n == 0:
            return
        self.sums["teacher_ce"] += float(token_cross_entropy(adapted_logits, targets)) * n
        self.sums["teacher_accuracy"] += float(token_accuracy(adapted_logits, targets)) * n
        self.sums["teacher_kl_from_frozen"] += float(forward_kl(frozen_logits, adapted_logits, mask)) * n
        self.sums["frozen_teacher_ce"] += float(token_cross_entropy(frozen_logits, targets)) * n
        self.tokens += n

    def result(self, prefix: str = "validation_") -> dict[str, float]:
        return {prefix + name: value / max(self.tokens, 1) for name, value in self.sums.items()}
