"""The hooks of ``method.cross_tokenizer`` in a run: checks, the teacher's tokenizer, data, the step's loss.

``okd.training`` calls :func:`check_cross_tokenizer_config` before any model loads,
:func:`prepare_cross_tokenizer` once the models and the student's data have loaded, and
:func:`cross_forward_losses` for each micro-batch. The run takes the full-logits path (``train.fused_loss``
and ``train.loss_positions_only`` do not apply); validation logs ``validation_ce`` only.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Protocol

import torch

from okd.losses import StepLosses

from .alignment import SharedVocabulary
from .data import CrossTokenizerCollator, CrossTokenizerDataset
from .losses import CrossTokenizerLoss

if TYPE_CHECKING:
    from okd.config import DistillConfig, ModelConfig, ResolvedMethod


class CrossStep(Protocol):
    """What the cross-tokenizer forward reads of the training loop (``okd.training.Distiller`` is one)."""

    accelerator: Any  # accelerate.Accelerator
    student: Any  # the (wrapped) student model
    teacher: Any  # okd.teacher.Teacher
    cross_loss: CrossTokenizerLoss

__all__ = [
    "CROSS_TOKENIZER_HINT", "check_cross_tokenizer_config", "cross_forward_losses", "load_teacher_tokenizer",
    "prepare_cross_tokenizer",
]

CROSS_TOKENIZER_HINT = "to distil across tokenizers set method.cross_tokenizer to uld or align (and model.teacher_tokenizer)"


def check_cross_tokenizer_config(config: DistillConfig, method: ResolvedMethod) -> None:
    """Refuse, in one line each, what cannot run across tokenizers (before any model loads)."""
    mode, model = method.cross_tokenizer, config.model
    if mode is None:
        if model.teacher_tokenizer:
            raise ValueError("model.teacher_tokenizer is set but method.cross_tokenizer is not: set it to uld or align")
        return
    what = f"method.cross_tokenizer={mode}"
    if not model.teacher:
        raise ValueError(f"{what} needs a teacher: set model.teacher")
    if not (method.kd_ratio > 0):
        raise ValueError(f"{what} needs method.kd_ratio > 0 (method {method.name!r} learns nothing from the teacher)")
    if method.online_teacher:
        raise ValueError(f"{what} does not work with OKD's online module (method.online_teacher): its loss compares the models token id by token id")
    if method.source != "ground_truth":
        raise ValueError(f"{what} needs method.source=ground_truth (method.source={method.source} makes sequences in one tokenizer only)")
    if model.teacher_cache:
        raise ValueError(f"{what} does not work with model.teacher_cache (the cache holds the teacher's outputs on one tokenization)")


def load_teacher_tokenizer(model: ModelConfig):
    """The teacher's tokenizer: ``model.teacher_tokenizer``, or the one saved with ``model.teacher``."""
    from okd.models import load_tokenizer

    return load_tokenizer(model.teacher_tokenizer or model.teacher)


def _width(model) -> int:
    from okd.models import logits_width

    return logits_width(model)


def prepare_cross_tokenizer(config: DistillConfig, method: ResolvedMethod, train_set, tokenizer, student, teacher_model):
    """``(dataset, collator, loss)``: ``train_set`` with the teacher's tokenization and the alignment,
    the collator of both, and the student's loss. ``tokenizer``: the student's (the data's)."""
    teacher_tokenizer = load_teacher_tokenizer(config.model)
    if teacher_model is not None and len(teacher_tokenizer) > _width(teacher_model):
        raise ValueError(
            f"model.teacher_tokenizer has {len(teacher_tokenizer)} tokens but the teacher has {_width(teacher_model)} logits"
        )
    dataset = CrossTokenizerDataset(train_set, tokenizer, teacher_tokenizer, method.cross_tokenizer)
    pad = teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id is not None else 0
    collator = CrossTokenizerCollator(pad_token_id=tokenizer.pad_token_id, teacher_pad_token_id=pad)
    vocab = None
    if method.cross_tokenizer == "align":
        vocab = SharedVocabulary.build(tokenizer, teacher_tokenizer, _width(student), _width(teacher_model))
        if len(vocab) == 0:
            print("okd: method.cross_tokenizer=align: the two vocabularies share no token string", file=sys.stderr)
    return dataset, collator, CrossTokenizerLoss(method, vocab, config.train.divergence_chunk_tokens)


def cross_forward_losses(distiller: CrossStep, batch: dict[str, torch.Tensor], update_module: bool = False) -> StepLosses:
    """One forward of the student on its tokens and of the teacher on its own, and the step's loss
    (``okd.crosstok.losses.CrossTokenizerLoss``)."""
    accelerator, teacher = distiller.accelerator, distiller.teacher
    with accelerator.autocast():
        student_logits = distiller.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(batch["teacher_input_ids"], batch["teacher_attention_mask"])
        return distiller.cross_loss(student_logits, teacher_logits, batch)
