"""One forward of the student and the teacher, and the step's loss terms, on one of three head paths.

Where the output heads run never changes what is computed (``tests/test_heads.py``), only its cost:

* ``full``: both models' logits over every position, ``[batch, seq, V]`` (the reference);
* ``positions``: the base models' final hidden states gathered at the N loss positions (``okd.heads``)
  and the heads applied to those only, ``[N, V]``;
* ``fused``: those hidden states and the head weights go to ``okd.fused``, which computes loss and
  gradients chunk by chunk, so no logits tensor exists at all. A fused run takes the fused loss only for
  micro-batches whose ``[N, V]`` float32 logits would exceed ``train.fused_min_logits_mib``; smaller
  ones take the ``positions`` loss, which is faster there (one matmul per head instead of a chunk loop).

:class:`LossPath` chooses once per run (``train.loss_positions_only``, ``train.fused_loss``, what the
models and the method support); :func:`forward_losses` runs one micro-batch on it. Runs with a teacher
cache (``okd.training.cached``) or MiniLLM's objective (``okd.objectives``) compute their own losses.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Protocol

import torch

from okd.crosstok.training import cross_forward_losses
from okd.fused import FusedLinearDistillationLoss, budget_chunk_tokens
from okd.heads import apply_head, final_hidden_at, head_on_positions_supported
from okd.losses import DistillationLoss, StepLosses, fused_step_losses, fused_unsupported
from okd.targets import loss_positions

from .cached import cached_forward_losses

if TYPE_CHECKING:
    from okd.config import DistillConfig, OnlineModuleConfig, ResolvedMethod, TrainConfig


class StepState(Protocol):
    """What a step's forward reads of the training loop (``okd.training.Distiller`` is one)."""

    config: DistillConfig
    train_config: TrainConfig
    method: ResolvedMethod
    online_config: Optional[OnlineModuleConfig]
    accelerator: Any  # accelerate.Accelerator
    student: Any  # the (wrapped) student model
    teacher: Any  # okd.teacher.Teacher, or None
    teacher_cache: Any  # okd.teacher_cache.TeacherCache, or None
    minillm_loss: Any  # okd.objectives.MiniLLMObjective, or None
    loss_fn: DistillationLoss
    loss_path: LossPath
    sharding: Optional[str]
    step: int


@dataclass
class LossPath:
    """The run's head path and, for ``fused``, the fused loss and its per-micro-batch choice."""

    heads: str  # "full", "positions" or "fused"
    fused_fn: Optional[FusedLinearDistillationLoss] = None
    logits_row_bytes: int = 0  # one float32 logits row at the larger of the two vocabularies
    min_fused_bytes: float = 0.0  # train.fused_min_logits_mib in bytes
    batches: dict[str, int] = field(default_factory=lambda: {"fused": 0, "positions": 0})

    @classmethod
    def choose(cls, distiller: StepState) -> "LossPath":
        """The rule (``train.loss_positions_only``, ``train.fused_loss`` help; ``okd.heads``,
        ``okd.losses.fused_unsupported``); the fused loss's reason for not running is printed once."""
        train, student = distiller.train_config, distiller.accelerator.unwrap_model(distiller.student)
        teacher = distiller.teacher
        if distiller.minillm_loss is not None:
            return cls("full")  # MiniLLM computes its own losses (okd.objectives)
        if getattr(distiller, "cross_loss", None) is not None:  # okd.crosstok compares full logits
            if train.fused_loss and distiller.accelerator.is_main_process and distiller.config.progress:
                print("okd: train.fused_loss: dense loss instead (method.cross_tokenizer takes full logits)", file=sys.stderr)
            return cls("full")
        if distiller.teacher_cache is not None:
            # okd.training.cached: a hidden-state cache takes the student's head on the loss positions
            # (the teacher's rows come from disk); a top-k cache's bucketed divergence takes full logits.
            positions = (
                train.loss_positions_only and distiller.teacher_cache.store == "hidden" and head_on_positions_supported(student)
            )
            return cls("positions" if positions else "full")
        if distiller.sharding == "zero3":
            # ZeRO-3 gathers a weight only inside its module's call; the fused loss reads the head weights directly.
            train = dataclasses.replace(train, fused_loss=False)
        if not train.loss_positions_only or not head_on_positions_supported(student) or (
            teacher is not None and not teacher.supports_positions
        ):
            return cls("full")
        if not train.fused_loss:
            return cls("positions")
        reason = fused_unsupported(distiller.method, distiller.online_config, student, teacher)
        if reason is not None:
            if distiller.accelerator.is_main_process and distiller.config.progress:
                print(f"okd: train.fused_loss: dense loss instead ({reason})", file=sys.stderr)
            return cls("positions")
        chunk = train.fused_chunk_tokens if train.fused_chunk_tokens is not None else budget_chunk_tokens(student.config.hidden_size)
        if chunk < 1:
            raise ValueError(f"train.fused_chunk_tokens must be >= 1, got {train.fused_chunk_tokens}")
        vocab = student.get_output_embeddings().weight.shape[0]
        if teacher is not None:
            vocab = max(vocab, teacher.head.weight.shape[0])
        return cls(
            "fused", FusedLinearDistillationLoss.from_method(distiller.method, distiller.online_config, chunk),
            logits_row_bytes=4 * vocab, min_fused_bytes=train.fused_min_logits_mib * 2**20,
        )

    def fused_pays(self, positions: int) -> bool:
        """Whether a micro-batch with ``positions`` loss positions takes the fused loss (counted in ``batches``)."""
        fused = positions * self.logits_row_bytes > self.min_fused_bytes
        self.batches["fused" if fused else "positions"] += 1
        return fused


def logs_metrics_at(train: TrainConfig, step: int) -> bool:
    """Whether the loop logs the metrics of step ``step`` (1-based) on schedule: every
    ``train.log_every`` steps and the last. (It also logs a skipped step and the step a signal stops at,
    which are only known after the step.)"""
    return step % train.log_every == 0 or step == train.max_steps


def frozen_needed(distiller: StepState, update_module: bool) -> bool:
    """Whether this step computes the frozen teacher ``p_0``: always where the loss uses it (the anchor,
    ``teacher_mix``: ``OnlineObjective.needs_frozen``), and for the module's ``module_kl_from_frozen``
    metric on update steps whose metrics are logged (:func:`logs_metrics_at`) when it costs only one
    more output-head matmul (the adapter: same body pass, or cached hidden states). Other steps skip
    that matmul; no loss or gradient depends on it."""
    objective = distiller.loss_fn.objective
    if objective is None:
        return False
    if objective.needs_frozen(update_module):
        return True
    teacher = distiller.teacher
    return (
        update_module and teacher is not None and teacher.adapter is not None
        and logs_metrics_at(distiller.train_config, distiller.step)
    )


def forward_losses(distiller: StepState, batch: dict[str, torch.Tensor], update_module: bool) -> StepLosses:
    """One forward of the student and the teacher on ``batch``, and the step's loss terms (with graphs:
    the student's loss, and on update steps the online module's), on ``distiller.loss_path``."""
    if distiller.teacher_cache is not None:  # the teacher's outputs come from disk (okd.training.cached)
        return cached_forward_losses(distiller, batch, update_module, need_frozen=frozen_needed(distiller, update_module))
    if getattr(distiller, "cross_loss", None) is not None:  # teacher and student tokenise apart (okd.crosstok)
        return cross_forward_losses(distiller, batch)
    accelerator, student, teacher, loss_fn = distiller.accelerator, distiller.student, distiller.teacher, distiller.loss_fn
    if distiller.minillm_loss is not None:  # MiniLLM's policy-gradient objective (okd.objectives)
        with accelerator.autocast():
            return distiller.minillm_loss(student, teacher, batch)
    path = distiller.loss_path
    ids, attention = batch["input_ids"], batch["attention_mask"]
    need_frozen = frozen_needed(distiller, update_module)
    with accelerator.autocast():
        if path.heads == "full":
            student_logits = student(input_ids=ids, attention_mask=attention).logits
            teacher_logits = frozen_logits = None
            if teacher is not None:
                teacher_logits, frozen_logits = teacher.adapted_and_frozen(
                    ids, attention, track_module_grad=update_module, need_frozen=need_frozen
                )
            return loss_fn(student_logits, teacher_logits, batch["labels"], update_module, frozen_logits, distiller.step)

        rows, targets = loss_positions(batch["labels"])  # [N] flat positions, their next tokens
        student_hidden = final_hidden_at(student, ids, attention, rows)  # [N, d_s]
        student_head = accelerator.unwrap_model(student).get_output_embeddings()
        teacher_hidden = frozen_hidden = None
        if teacher is not None:
            teacher_hidden, frozen_hidden = teacher.hidden_and_frozen(
                ids, attention, rows, track_module_grad=update_module, need_frozen=need_frozen
            )
        if path.heads == "fused" and path.fused_pays(rows.numel()):
            teacher_head = teacher.head if teacher is not None else None
            return fused_step_losses(path.fused_fn(
                student_hidden, student_head.weight, teacher_hidden, getattr(teacher_head, "weight", None),
                targets, student_bias=student_head.bias, teacher_bias=getattr(teacher_head, "bias", None),
                teacher_frozen_hidden=frozen_hidden, update_module=update_module,
            ))
        teacher_logits = apply_head(teacher.head, teacher_hidden) if teacher is not None else None
        with torch.no_grad():
            frozen_logits = apply_head(teacher.head, frozen_hidden) if frozen_hidden is not None else None
        return loss_fn(
            apply_head(student_head, student_hidden), teacher_logits, None, update_module, frozen_logits, distiller.step,
            targets=targets,
        )
