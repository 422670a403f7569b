"""Student-generated sequences: GKD / ImitKD's on-policy batches with probability ``on_policy_ratio``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from okd.data.instruction import build_batch
from okd.generation import generate_batched

from .base import Source, dataset_max_length, register_source
from .ground_truth import GroundTruthSource

if TYPE_CHECKING:
    from .base import SourceSetup


def student_sampling(setup: SourceSetup) -> dict:
    """The keyword arguments every student-generating source takes from the config."""
    return dict(
        eos_token_id=setup.tokenizer.eos_token_id,
        pad_token_id=setup.tokenizer.pad_token_id,
        max_new_tokens=setup.sampling.max_new_tokens,
        temperature=setup.sampling.temperature,
        top_p=setup.sampling.top_p,
        max_length=setup.data.max_length,
        seed=setup.train.seed,
    )


class StudentGenerationSource(Source):
    """What the student-generating sources share: the wrapped order, the model and sampling settings."""

    def _setup_generation(self, ground_truth, model, pad_token_id, eos_token_id, max_new_tokens, temperature, top_p, max_length):
        self.ground_truth = ground_truth
        self.model = model  # a reference: samples always come from the current weights
        if pad_token_id is None:
            pad_token_id = getattr(ground_truth.collator, "pad_token_id", None)
            if pad_token_id is None:
                raise ValueError("pass pad_token_id: the ground-truth source's collator has none")
        self.pad_token_id = int(pad_token_id)
        self.eos_token_id = eos_token_id
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.max_length = dataset_max_length(ground_truth.dataset, max_length)
        # Generated batches are padded like the ground-truth ones.
        self.pad_to_multiple_of = getattr(ground_truth.collator, "pad_to_multiple_of", None)

    def _batch(self, prompts, responses, indices=None) -> dict[str, torch.Tensor]:
        return build_batch(prompts, responses, self.pad_token_id, self.max_length, indices, self.pad_to_multiple_of)

    @property
    def state(self):
        """The ground-truth order's position (``epoch``, ``position``), as the loop reads it."""
        return self.ground_truth.state

    def _generate(self, prompts: list[list[int]]) -> list[list[int]]:
        return generate_batched(
            self.model,
            prompts,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            max_new_tokens=self.max_new_tokens,
            max_length=self.max_length,
            temperature=self.temperature,
            top_p=self.top_p,
            do_sample=True,
        )


@register_source("on_policy")
class OnPolicySource(StudentGenerationSource):
    """GKD / ImitKD: with probability ``on_policy_ratio`` a step's prompts get responses sampled from the student.

    Each step takes the next indices of ``ground_truth`` (so the prompt order is the ground-truth
    order, whatever happens) and draws ``u ~ U[0, 1)`` from this source's own generator: if
    ``u < on_policy_ratio`` the batch is the prompts + the current student's samples, else it is the
    ground-truth batch, exactly the tensors ``GroundTruthSource.next_batch()`` would return. So
    ``on_policy_ratio = 0`` reproduces a ground-truth run bit for bit and ``1`` never uses a reference
    (GKD's paper and TRL call it ``lambda``; ``lambda_=`` is still accepted here).
    (TRL's ``GKDTrainer`` makes the same per-step choice with Python's global ``random``; a private
    generator makes it reproducible and checkpointable.)

    Defaults follow TRL's ``GKDConfig`` (GKD): ``on_policy_ratio = 0.5``, ``temperature = 0.9``, full
    nucleus (``top_p = 1.0``, ``top_k = 0``). ImitKD as DistiLLM runs it is ratio 1 at
    temperature 1.0 (``scripts/gpt2/imitkd/*.sh``: ``--mixed-alpha 1.0``). ``max_new_tokens = None``
    fills ``max_length`` after the batch's longest prompt (okd's choice; TRL's default is 128).

    Args:
        ground_truth: the ``GroundTruthSource`` giving the prompt order (its state is part of ours).
        model: the student, with HF ``generate`` (unwrapped).
        eos_token_id: where generation stops; pad_token_id: default, the collator's.
        on_policy_ratio: probability of an on-policy batch (``sampling.on_policy_ratio``).
        seed: seeds the coin flips (same on every process, see the module docstring).
    """

    @classmethod
    def from_config(cls, setup: SourceSetup) -> OnPolicySource:
        return cls(GroundTruthSource.from_config(setup), setup.student, **student_sampling(setup),
                   on_policy_ratio=setup.sampling.on_policy_ratio)

    def __init__(
        self,
        ground_truth: GroundTruthSource,
        model,
        *,
        eos_token_id: int | Sequence[int] | None,
        pad_token_id: int | None = None,
        on_policy_ratio: float = 0.5,
        max_new_tokens: int | None = None,
        temperature: float = 0.9,
        top_p: float = 1.0,
        max_length: int | None = None,
        seed: int = 0,
        lambda_: float | None = None,
    ):
        if lambda_ is not None:  # the name of earlier versions (GKD's lambda)
            on_policy_ratio = lambda_
        if not 0.0 <= on_policy_ratio <= 1.0:
            raise ValueError(f"on_policy_ratio must be in [0, 1], got {on_policy_ratio}")
        self._setup_generation(ground_truth, model, pad_token_id, eos_token_id, max_new_tokens, temperature, top_p, max_length)
        self.on_policy_ratio = float(on_policy_ratio)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.on_policy_batches = 0
        self.last_on_policy = False

    def next_batch(self) -> dict[str, torch.Tensor]:
        indices = self.ground_truth.next_indices()
        u = float(torch.rand((), generator=self.generator))
        self.steps += 1
        items = [self.ground_truth.dataset[i] for i in indices]
        self.last_on_policy = u < self.on_policy_ratio
        if not self.last_on_policy:
            return self.ground_truth.collator(items)
        self.on_policy_batches += 1
        prompts = [list(item["prompt_ids"]) for item in items]
        return self._batch(prompts, self._generate(prompts), indices)

    def state_dict(self) -> dict:
        return {
            "ground_truth": self.ground_truth.state_dict(),
            "generator": self.generator.get_state(),
            "steps": self.steps,
            "on_policy_batches": self.on_policy_batches,
            "last_on_policy": self.last_on_policy,
        }

    def load_state_dict(self, state: dict) -> None:
        self.ground_truth.load_state_dict(state["ground_truth"])
        self.generator.set_state(state["generator"])
        self.steps = int(state["steps"])
        self.on_policy_batches = int(state["on_policy_batches"])
        self.last_on_policy = bool(state.get("last_on_policy", False))

    def stats(self) -> dict[str, float]:
        return {
            "on_policy_fraction": self.on_policy_batches / self.steps if self.steps else 0.0,
            "on_policy_batches": float(self.on_policy_batches),
            "on_policy_last": float(self.last_on_policy),
        }


