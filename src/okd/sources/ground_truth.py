"""The ground-truth source: the data set's own responses, in a seeded order that resumes exactly.

Data order is explicit rather than delegated to a DataLoader: epoch ``e`` visits the examples in the
permutation drawn from ``seed + e``; each step takes the next ``batch_size * world_size`` indices and
process ``rank`` keeps its slice. The whole position is two integers (``epoch``, ``position``), which
is what a checkpoint stores to resume mid-epoch exactly. Every other source walks the prompts in this
order (it wraps a ``GroundTruthSource``), so step ``t`` of every method sees the same prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .base import Source, register_source

if TYPE_CHECKING:
    from .base import SourceSetup


@dataclass
class SourceState:
    epoch: int = 0
    position: int = 0


@register_source("ground_truth")
class GroundTruthSource(Source):
    """Batches of dataset examples (prompt + reference response), reshuffled every epoch.

    Args:
        dataset: an indexable dataset whose items are dicts with ``input_ids`` and ``labels``.
        collator: turns a list of items into padded tensors.
        batch_size: examples per step on this process.
        seed: seeds the order of every epoch.
        rank, world_size: this process's slice of each global batch.
    """

    @classmethod
    def from_config(cls, setup: SourceSetup) -> GroundTruthSource:
        return cls(setup.dataset, setup.collator, setup.train.batch_size, setup.train.seed, setup.rank, setup.world_size)

    def __init__(self, dataset, collator, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        global_batch = batch_size * world_size
        if len(dataset) < global_batch:
            raise ValueError(
                f"the training set has {len(dataset)} examples, fewer than one global batch "
                f"({batch_size} x {world_size} processes)"
            )
        self.dataset = dataset
        self.collator = collator
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.state = SourceState()
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.dataset), generator=generator)

    def next_indices(self) -> list[int]:
        """Dataset indices of this process's next batch (drops the incomplete tail of an epoch)."""
        global_batch = self.batch_size * self.world_size
        if self.state.position + global_batch > len(self.dataset):
            self.state = SourceState(epoch=self.state.epoch + 1, position=0)
            self._order = self._permutation(self.state.epoch)
        start = self.state.position + self.rank * self.batch_size
        indices = self._order[start : start + self.batch_size].tolist()
        self.state.position += global_batch
        return indices

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.collator([self.dataset[i] for i in self.next_indices()])

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "position": self.state.position}

    def load_state_dict(self, state: dict) -> None:
        self.state = SourceState(epoch=int(state["epoch"]), position=int(state["position"]))
        self._order = self._permutation(self.state.epoch)
