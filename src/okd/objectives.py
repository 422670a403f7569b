"""Objectives other than the divergence mix of ``okd.losses``: MiniLLM's, on teacher-mixed rollouts.

``method.objective = "minillm"`` makes ``Distiller.forward_losses`` hand the step to
:class:`MiniLLMObjective`: one forward of the student and the teacher on the rollout minibatch (from
``okd.sources.teacher_mixed``), and, with ``minillm.lm_coef > 0``, one on the ground-truth batch the
source put under ``lm_*``; the loss is :class:`okd.minillm.MiniLLMLoss` (policy gradient + single-step
reverse KL + ``lm_coef`` * LM loss). Shapes: logits ``[B, L, V]``, everything else ``[B, L]`` in the
shifted training layout (position i holds the value of the token at i + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from okd.losses import StepLosses, cross_entropy
from okd.minillm import MiniLLMConfig, MiniLLMLoss
from okd.targets import next_token_targets

__all__ = ["MiniLLMObjective", "MiniLLMStepLosses"]

ROLLOUT_KEYS = ("response_mask", "old_logprobs", "teacher_logprobs", "log_weights")


@dataclass
class MiniLLMStepLosses(StepLosses):
    """``StepLosses`` with MiniLLM's parts (all logged; ``kd`` is the single-step reverse KL).

    ``ce`` is the student's cross-entropy on the sampled responses (logged only, no graph);
    ``sequence_reward`` is the mean over the minibatch of ``sum_t log p(y_t) - log q_old(y_t)`` (unscaled,
    unclipped): minus the sampled sequences' log-ratio, which rises as the student nears the teacher.
    """

    pg: torch.Tensor | None = None
    lm: torch.Tensor | None = None
    sequence_reward: torch.Tensor | None = None
    clipped_fraction: torch.Tensor | None = None


class MiniLLMObjective:
    """The student's loss on a teacher-mixed rollout minibatch (no online module: see ``okd.config``)."""

    def __init__(self, config: MiniLLMConfig):
        self.config = config
        self.loss = MiniLLMLoss(config)

    def __call__(self, student, teacher, batch: dict[str, torch.Tensor]) -> MiniLLMStepLosses:
        missing = [k for k in ROLLOUT_KEYS if k not in batch]
        if missing:
            raise ValueError(f"method.objective=minillm needs rollout batches (method.source=teacher_mixed); missing {missing}")
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with torch.no_grad():
            teacher_logits = teacher(batch["input_ids"], batch["attention_mask"])
        targets, _ = next_token_targets(batch["labels"])
        lm = {}
        if "lm_input_ids" in batch:
            lm["lm_logits"] = student(input_ids=batch["lm_input_ids"], attention_mask=batch["lm_attention_mask"]).logits
            lm["lm_targets"] = next_token_targets(batch["lm_labels"])[0]
            if self.config.lm_kd_ratio:
                with torch.no_grad():
                    lm["lm_teacher_logits"] = teacher(batch["lm_input_ids"], batch["lm_attention_mask"])
        out = self.loss(
            student_logits, teacher_logits, targets.clamp(min=0), batch["response_mask"],
            batch["old_logprobs"], batch["teacher_logprobs"], batch["log_weights"], **lm,
        )
        mask = batch["response_mask"]
        with torch.no_grad():
            ce = cross_entropy(student_logits, targets)
            reward = ((batch["teacher_logprobs"] - batch["old_logprobs"]) * mask).sum() / mask.shape[0]
        return MiniLLMStepLosses(
            loss=out.loss, ce=ce, kd=out.single_step.detach(), pg=out.policy_gradient.detach(),
            lm=out.lm.detach(), sequence_reward=reward, clipped_fraction=torch.tensor(out.stats["clipped_fraction"]),
        )
