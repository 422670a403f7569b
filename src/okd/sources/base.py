"""What a sequence source is, and the registry that ``method.source`` names.

A source hands the training loop one micro-batch per ``next_batch()`` call (with
``train.gradient_accumulation_steps = k``, k calls make one optimizer step): a dict of ``input_ids``,
``attention_mask`` and ``labels`` (``-100`` where no loss is taken: prompt and padding). The loop
does not care how the sequences were made, so every source combines with every divergence and with
OKD. A new source is one class: subclass ``Source``, decorate it with ``@register_source("name")``
and give it a ``from_config(setup)``; ``method.source: name`` then selects it.

Randomness, and what makes resume exact: a source's own choices (coin flips, replay sampling) come
from its own ``torch.Generator``, seeded alike on every process (so with sharded models, where
``generate`` is a collective, all ranks take the same branch), and their states are in
``state_dict()``. Sampling inside ``generate`` uses the global torch RNG, which the training loop's
checkpoints save and restore.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from okd.sections import unknown_choice

if TYPE_CHECKING:
    from okd.minillm import MiniLLMConfig
    from okd.sections import DataConfig, ModelConfig, ResolvedMethod, SamplingConfig, TrainConfig

__all__ = ["SOURCES", "Source", "SourceSetup", "build_source", "register_source", "source_names"]


@dataclass
class SourceSetup:
    """Everything a source may be built from; each source's ``from_config`` takes what it needs.

    ``teacher`` is the loaded teacher model (None when the method has none); ``student`` the
    unwrapped student, whose current weights on-policy samples come from.
    """

    dataset: Any  # an InstructionDataset: items with input_ids, labels, prompt_ids
    collator: Any  # okd.data.Collator: padding of ground-truth batches
    tokenizer: Any
    student: Any
    teacher: Any
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    sampling: SamplingConfig  # resolved (okd.methods.resolve_sampling)
    output_dir: Path
    rank: int = 0
    world_size: int = 1
    progress: bool = False
    method: ResolvedMethod | None = None  # the resolved method (teacher_mixed: is the objective MiniLLM's?)
    minillm: MiniLLMConfig | None = None  # teacher_mixed: the sampler's settings
    device: Any = "cpu"  # where the models run once the loop has placed them (teacher_mixed samples there)


class Source:
    """The interface the training loop relies on (and nothing else).

    Required: ``next_batch()``, ``state_dict()``, ``load_state_dict(state)`` and ``epoch`` (which
    pass over the prompts the order is in, for the logs). ``stats()`` (numbers logged as
    ``source_<key>``, and compared across processes) and ``observe_validation_loss(loss)`` (DistiLLM's
    threshold) default to doing nothing.
    """

    name: ClassVar[str] = ""

    @classmethod
    def from_config(cls, setup: SourceSetup) -> Source:
        raise NotImplementedError(f"{cls.__name__} has no from_config")

    def next_batch(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    @property
    def epoch(self) -> int:
        return self.state.epoch

    def stats(self) -> dict[str, float]:
        return {}

    def observe_validation_loss(self, loss: float) -> None:
        return None


SOURCES: dict[str, type[Source]] = {}


def register_source(name: str):
    """Class decorator: make a ``Source`` subclass selectable as ``method.source: name``."""

    def register(cls: type[Source]) -> type[Source]:
        if name in SOURCES and SOURCES[name] is not cls:
            raise ValueError(f"source {name!r} is already registered ({SOURCES[name].__name__})")
        cls.name = name
        SOURCES[name] = cls
        return cls

    return register


def source_names() -> tuple[str, ...]:
    return tuple(SOURCES)


def build_source(name: str, setup: SourceSetup) -> Source:
    """The registered source ``name``, built from ``setup``."""
    if name not in SOURCES:
        raise ValueError(unknown_choice("method.source", name, SOURCES))
    return SOURCES[name].from_config(setup)


def dataset_max_length(dataset, max_length: int | None) -> int:
    if max_length is not None:
        return int(max_length)
    value = getattr(dataset, "max_length", None)
    if value is None:
        raise ValueError("pass max_length: the dataset has no max_length attribute")
    return int(value)
