"""MiniLLM's rollouts: responses sampled from a mixture of student and teacher, reused for PPO epochs.

Each *round* takes the next ``ceil(num_rollouts / (batch_size * world_size))`` global batches of prompts
from the seeded ground-truth order (so the prompts are those every other source would see), samples a
response to each from ``(1 - alpha) * q_student + alpha * p_teacher`` with
:class:`okd.minillm.TeacherMixedSampler`, and stores the samples with their sampling-time log-probs
(:meth:`okd.minillm.MixedSamples.training_batch`). The round is then served as minibatches of
``train.batch_size`` for ``ppo_epochs`` passes, each pass in a fresh order drawn from this source's
shuffle generator (the reference's rollout loader is shuffled too: LMOps ``minillm/minillm/storages.py``),
after which the next round is sampled from the updated student.

A batch has ``input_ids``, ``attention_mask``, ``labels`` (the sampled response, prompt and padding
-100) like every source, plus ``response_mask``, ``old_logprobs``, ``teacher_logprobs`` and
``log_weights`` aligned with the shifted targets. A plain divergence reads the first three only, so
``method.source=teacher_mixed`` works with any divergence (distillation on teacher-mixed samples); the
MiniLLM objective (``okd.objectives``) reads the rest. When that objective has an LM term
(``minillm.lm_coef > 0``) each batch also carries a ground-truth batch under ``lm_input_ids``,
``lm_attention_mask``, ``lm_labels``, drawn from a second seeded ground-truth order (the reference's
separate pre-training corpus iterator; here the training set).

Resume is exact: ``state_dict()`` holds both orders, the sampler's generator, the shuffle generator, the
stored rollouts (on the CPU) and the pass / position counters. Seeding across processes is as in the
other sources: the same seeds on every rank, each rank with its own prompts; every rank stores the same
number of samples, so all ranks take the same number of steps per round.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from okd.minillm import MiniLLMConfig, TeacherMixedSampler
from okd.targets import IGNORE_INDEX

from .base import Source, dataset_max_length, register_source
from .ground_truth import GroundTruthSource

if TYPE_CHECKING:
    from .base import SourceSetup

# What a stored sample holds, and the padding of each when minibatches are put together again.
_PADDING = {"input_ids": None, "attention_mask": 0, "labels": IGNORE_INDEX, "response_mask": False,
            "old_logprobs": 0.0, "teacher_logprobs": 0.0, "log_weights": 0.0}


def _collate(rows: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad 1-D per-sample tensors to the longest row (the training layout)."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {}
    for key, pad in _PADDING.items():
        value = pad_token_id if pad is None else pad
        out[key] = torch.stack(
            [torch.cat([r[key], torch.full((width - len(r[key]),), value, dtype=r[key].dtype)]) for r in rows]
        )
    return out


@register_source("teacher_mixed")
class TeacherMixedSource(Source):
    """MiniLLM's teacher-mixed rollouts, served for ``ppo_epochs`` shuffled passes (see the module doc).

    Args:
        ground_truth: the prompt order (its state is part of ours).
        student, teacher: the unwrapped student (current weights) and the frozen teacher model, on one device.
        config: ``MiniLLMConfig`` (teacher_mix_ratio, temperature, num_rollouts, ppo_epochs).
        eos_token_id, pad_token_id: of the tokenizer.
        max_new_tokens: the most tokens per response; None fills ``max_length`` after the round's longest
            prompt (and a number is capped there too, so no sequence outgrows the student's positions).
        lm_source: a second ground-truth order for the LM batches, or None for none.
        seed: the sampler's seed; the shuffle generator uses ``seed + 1``.
        device: where the models run at sampling time (default: the student's device now).
    """

    @classmethod
    def from_config(cls, setup: SourceSetup) -> TeacherMixedSource:
        if setup.teacher is None:
            raise ValueError("method.source=teacher_mixed samples from the teacher: set model.teacher")
        config = setup.minillm if setup.minillm is not None else MiniLLMConfig()
        lm_source = None
        if setup.method is not None and setup.method.objective == "minillm" and config.lm_coef > 0:
            lm_source = GroundTruthSource(setup.dataset, setup.collator, setup.train.batch_size,
                                          setup.train.seed + 1, setup.rank, setup.world_size)
        return cls(
            GroundTruthSource.from_config(setup), setup.student, setup.teacher, config,
            eos_token_id=setup.tokenizer.eos_token_id, pad_token_id=setup.tokenizer.pad_token_id,
            max_new_tokens=setup.sampling.max_new_tokens, max_length=setup.data.max_length,
            lm_source=lm_source, seed=setup.train.seed, device=setup.device,
        )

    def __init__(
        self,
        ground_truth: GroundTruthSource,
        student,
        teacher,
        config: MiniLLMConfig,
        *,
        eos_token_id,
        pad_token_id: int,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        lm_source: GroundTruthSource | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
    ):
        self.ground_truth = ground_truth
        self.lm_source = lm_source
        self.config = config
        self.pad_token_id = int(pad_token_id)
        self.max_length = dataset_max_length(ground_truth.dataset, max_length)
        self.max_new_tokens = max_new_tokens
        # The loop places the student after building the sources: sample where it will be.
        device = device if device is not None else next(student.parameters()).device
        self.sampler = TeacherMixedSampler(
            student, teacher, eos_token_id=eos_token_id, pad_token_id=self.pad_token_id,
            max_new_tokens=1, config=config, seed=seed, device=device,
        )
        self.shuffle_generator = torch.Generator().manual_seed(seed + 1)
        global_batch = ground_truth.batch_size * ground_truth.world_size
        self.batches_per_round = max(1, math.ceil(config.num_rollouts / global_batch))
        self.rollouts: list[dict[str, torch.Tensor]] = []  # this round's samples, one dict of 1-D tensors each
        self.order: list[int] = []  # this pass's order of the samples
        self.rounds = 0
        self.passes = 0  # passes over this round done or under way
        self.position = 0  # samples of this pass served
        self.steps = 0
        self.round_reward = 0.0  # informative: this rank's mean sequence reward of the round
        self.round_length = 0.0

    @property
    def epoch(self) -> int:
        return self.ground_truth.state.epoch

    @property
    def state(self):
        return self.ground_truth.state

    # -- rollouts -------------------------------------------------------------------------------
    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        return ids, mask

    def _sample_round(self) -> None:
        """Sample this round's responses (one ground-truth batch of prompts at a time) and store them."""
        rows, rewards, lengths = [], [], []
        device = self.sampler.generator.device
        for _ in range(self.batches_per_round):
            prompts = [list(self.ground_truth.dataset[i]["prompt_ids"]) for i in self.ground_truth.next_indices()]
            room = self.max_length - max(len(p) for p in prompts)
            self.sampler.max_new_tokens = max(1, min(room, self.max_new_tokens or room))
            ids, mask = self._left_padded(prompts)
            samples = self.sampler.sample(ids.to(device), mask.to(device))
            batch = {k: v.cpu() for k, v in samples.training_batch(self.pad_token_id).items()}
            batch["attention_mask"] = batch["attention_mask"].long()
            for b in range(len(prompts)):
                n = int(batch["attention_mask"][b].sum())
                rows.append({k: batch[k][b, :n].clone() for k in _PADDING})
            sequence_rewards = ((samples.teacher_logprobs - samples.student_logprobs) * samples.mask).sum(-1)
            rewards.extend(sequence_rewards.tolist())
            lengths.extend(samples.lengths.tolist())
        self.rollouts = rows
        self.rounds += 1
        self.passes = 0
        self.round_reward = sum(rewards) / len(rewards)
        self.round_length = sum(lengths) / len(lengths)

    # -- source interface -----------------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        batch_size = self.ground_truth.batch_size
        if not self.rollouts or (self.position + batch_size > len(self.rollouts) and self.passes >= self.config.ppo_epochs):
            self._sample_round()
        if self.passes == 0 or self.position + batch_size > len(self.rollouts):
            self.order = torch.randperm(len(self.rollouts), generator=self.shuffle_generator).tolist()
            self.passes += 1
            self.position = 0
        picks = self.order[self.position : self.position + batch_size]
        self.position += batch_size
        self.steps += 1
        batch = _collate([self.rollouts[i] for i in picks], self.pad_token_id)
        if self.lm_source is not None:
            batch.update({f"lm_{k}": v for k, v in self.lm_source.next_batch().items() if k in ("input_ids", "attention_mask", "labels")})
        return batch

    def state_dict(self) -> dict:
        return {
            "ground_truth": self.ground_truth.state_dict(),
            "lm_source": self.lm_source.state_dict() if self.lm_source is not None else None,
            "sampler": self.sampler.state_dict(),
            "shuffle_generator": self.shuffle_generator.get_state(),
            "rollouts": [{k: v.clone() for k, v in row.items()} for row in self.rollouts],
            "order": list(self.order),
            "rounds": self.rounds,
            "passes": self.passes,
            "position": self.position,
            "steps": self.steps,
            "round_reward": self.round_reward,
            "round_length": self.round_length,
        }

    def load_state_dict(self, state: dict) -> None:
        self.ground_truth.load_state_dict(state["ground_truth"])
        if self.lm_source is not None and state["lm_source"] is not None:
            self.lm_source.load_state_dict(state["lm_source"])
        self.sampler.load_state_dict(state["sampler"])
        self.shuffle_generator.set_state(state["shuffle_generator"])
        self.rollouts = [{k: v.clone() for k, v in row.items()} for row in state["rollouts"]]
        self.order = [int(i) for i in state["order"]]
        for name in ("rounds", "passes", "position", "steps"):
            setattr(self, name, int(state[name]))
        self.round_reward, self.round_length = float(state["round_reward"]), float(state["round_length"])

    def stats(self) -> dict[str, float]:
        # Compared across processes (Distiller.source_consistent_across_processes): only counters that
        # every rank shares. The per-rank rewards are logged by the objective, averaged over processes.
        return {"rollout_round": float(self.rounds), "ppo_pass": float(self.passes), "rollout_size": float(len(self.rollouts))}
