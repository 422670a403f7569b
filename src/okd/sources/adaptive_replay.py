"""DistiLLM (Ko et al., 2024): adaptive off-policy replay of student samples."""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .base import register_source
from .ground_truth import GroundTruthSource
from .on_policy import StudentGenerationSource, student_sampling

if TYPE_CHECKING:
    from .base import SourceSetup

logger = logging.getLogger(__name__)


class ReplayBuffer:
    """FIFO store of (prompt_ids, response_ids) pairs, kept on the CPU as lists of ints.

    ``add`` appends pairs; once ``capacity`` pairs are held, each new pair evicts the oldest (DistiLLM
    keeps its buffer in a ``deque(maxlen=capacity)`` too). ``sample(n, generator)`` draws ``n``
    distinct pairs uniformly (without replacement, like DistiLLM's ``random.sample``), reproducibly
    from the given ``torch.Generator``. ``state_dict()`` holds every pair, in order.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = int(capacity)
        self._items: deque[tuple[list[int], list[int]]] = deque(maxlen=self.capacity)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> None:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        for prompt, response in zip(prompts, responses):
            self._items.append(([int(t) for t in prompt], [int(t) for t in response]))

    def items(self) -> list[tuple[list[int], list[int]]]:
        """All pairs, oldest first (copies of the lists)."""
        return [(list(p), list(r)) for p, r in self._items]

    def sample(self, n: int, generator: torch.Generator) -> list[tuple[list[int], list[int]]]:
        if n > len(self._items):
            raise ValueError(f"cannot sample {n} pairs from a buffer holding {len(self._items)}")
        picks = torch.randperm(len(self._items), generator=generator)[:n].tolist()
        return [(list(self._items[i][0]), list(self._items[i][1])) for i in picks]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "items": [[list(p), list(r)] for p, r in self._items]}

    def load_state_dict(self, state: dict) -> None:
        if int(state["capacity"]) != self.capacity:
            logger.warning("replay buffer capacity changed from %s to %s on resume", state["capacity"], self.capacity)
        self._items = deque(((list(p), list(r)) for p, r in state["items"]), maxlen=self.capacity)


_REPLAY_SCHEDULES = ("constant", "decreasing", "increasing")


@register_source("adaptive_replay")
class AdaptiveReplaySource(StudentGenerationSource):
    """DistiLLM's adaptive off-policy student-generated outputs (Ko et al., 2024).

    Each step takes the next ground-truth indices and draws ``r ~ U[0, 1)`` from this source's
    generator. With ``threshold`` the current adaptive threshold and ``p`` the replay probability:

    * ``r < threshold * (1 - p)``: FRESH: the student answers this step's prompts; the pairs go into
      the replay buffer and make the batch;
    * ``threshold * (1 - p) <= r < threshold``: REPLAY: ``batch_size`` pairs sampled from the buffer,
      provided it holds at least ``min_replay_size`` pairs; otherwise FRESH as above;
    * ``r >= threshold``: the ground-truth batch (identical to ``GroundTruthSource.next_batch()``).

    This is DistiLLM's rule with its single draw per step (``finetune.py``: fresh if
    ``r < samp_threshold or (r < adaptive_threshold and len(buffer) < capacity)``, replay elif
    ``r < adaptive_threshold``, with ``samp_threshold = adaptive_threshold * (1 - p)``).

    ``p`` is ``replay_ratio``: a number in [0, 1], or one of DistiLLM's schedules, named as DistiLLM
    names them after the share of FRESH samples: ``"decreasing"`` (fresh share ``1 - t/T``, so
    ``p = t/T``; DistiLLM's default), ``"increasing"`` (fresh ``t/T``, ``p = 1 - t/T``) and
    ``"constant"`` (``p = 0.5``), with ``t`` this source's step count (1 on the first batch) and ``T``
    ``total_steps`` (the run's step count; needed by the two time-dependent schedules).

    The threshold starts at ``init_threshold`` and rises by ``threshold_step`` (capped at
    ``max_threshold``) each time ``observe_validation_loss(loss)`` sees ``loss >= reference +
    loss_eps``. With ``threshold_reference="last_rise"`` (DistiLLM's rule, the default) the
    reference is the validation loss at the last rise (the first loss observed until then; DistiLLM
    evaluates once before training for it); with ``"previous"`` it is simply the previous loss
    observed. The comparison is ``>=``, as in DistiLLM. The threshold is computed as
    ``min(init_threshold + rises * threshold_step, max_threshold)`` from an integer count of rises,
    so it carries no accumulated rounding. A non-finite loss is ignored.

    Defaults and where they come from (jongwooko/distillm):

    ==================  ============  ===========================================================
    init_threshold      0.0           ``arguments.py`` ``--init-threshold``; the GPT-2/OPT scripts
    threshold_step      0.1           ``finetune.py``: ``adaptive_threshold += 0.1``
    max_threshold       1.0           ``finetune.py``: ``min(adaptive_threshold, 1.0)``
    loss_eps            0.1           ``arguments.py`` ``--loss-eps``; the scripts
    capacity            1000          ``arguments.py`` ``--capacity``; the scripts
    replay_ratio        "decreasing"  ``arguments.py`` ``--replay-ratio`` (the scripts keep it)
    min_replay_size     capacity      ``finetune.py``: fresh while ``len(buffer) < capacity``
    temperature, top_p  1.0, 1.0      the scripts' ``--temperature 1.0 --gen-top-p 1.0 --top-k 0``
    max_new_tokens      None          fill ``max_length`` (DistiLLM: ``max_length - max_prompt_length``)
    seed                0             okd's choice
    ==================  ============  ===========================================================

    Differences from DistiLLM, on purpose: the EOS a response ends with is kept and carries loss
    (DistiLLM's sampler drops every pad token, which for GPT-2 is the EOS); the buffer, the threshold,
    the reference loss, the generators and the counters are all in ``state_dict()`` (DistiLLM
    checkpoints none of them); draws come from private seeded generators, not NumPy's global one.
    """

    @classmethod
    def from_config(cls, setup: SourceSetup) -> AdaptiveReplaySource:
        sampling = setup.sampling
        return cls(
            GroundTruthSource.from_config(setup),
            setup.student,
            **student_sampling(setup),
            init_threshold=sampling.init_threshold,
            threshold_step=sampling.threshold_step,
            max_threshold=sampling.max_threshold,
            loss_eps=sampling.loss_eps,
            capacity=sampling.replay_capacity,
            replay_ratio=sampling.replay_ratio,
            # The schedule counts micro-batches (one per next_batch call), so its horizon does too.
            total_steps=setup.train.max_steps * setup.train.gradient_accumulation_steps,
        )

    def __init__(
        self,
        ground_truth: GroundTruthSource,
        model,
        *,
        eos_token_id: int | Sequence[int] | None,
        pad_token_id: int | None = None,
        init_threshold: float = 0.0,
        threshold_step: float = 0.1,
        max_threshold: float = 1.0,
        loss_eps: float = 0.1,
        capacity: int = 1000,
        replay_ratio: float | str = "decreasing",
        total_steps: int | None = None,
        min_replay_size: int | None = None,
        threshold_reference: str = "last_rise",
        max_new_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_length: int | None = None,
        seed: int = 0,
    ):
        self._setup_generation(ground_truth, model, pad_token_id, eos_token_id, max_new_tokens, temperature, top_p, max_length)
        if not 0.0 <= init_threshold <= max_threshold <= 1.0:
            raise ValueError(f"need 0 <= init_threshold <= max_threshold <= 1, got {init_threshold} and {max_threshold}")
        if threshold_step < 0 or loss_eps < 0:
            raise ValueError("threshold_step and loss_eps must be >= 0")
        if isinstance(replay_ratio, str):
            if replay_ratio not in _REPLAY_SCHEDULES:
                raise ValueError(f"replay_ratio must be a number in [0, 1] or one of {_REPLAY_SCHEDULES}, got {replay_ratio!r}")
            if replay_ratio != "constant" and not total_steps:
                raise ValueError(
                    f"replay_ratio={replay_ratio!r} depends on the training progress: pass total_steps "
                    "(the run's number of steps), or a number for a constant replay probability"
                )
        elif not 0.0 <= float(replay_ratio) <= 1.0:
            raise ValueError(f"replay_ratio must be in [0, 1], got {replay_ratio}")
        if threshold_reference not in ("last_rise", "previous"):
            raise ValueError(f"threshold_reference must be 'last_rise' or 'previous', got {threshold_reference!r}")
        self.buffer = ReplayBuffer(capacity)
        batch_size = ground_truth.batch_size
        min_replay_size = capacity if min_replay_size is None else int(min_replay_size)
        self.min_replay_size = max(min_replay_size, batch_size)  # a replayed batch needs that many pairs
        if self.min_replay_size > capacity:
            raise ValueError(f"the buffer (capacity {capacity}) can never hold a batch of {batch_size} to replay")
        self.init_threshold = float(init_threshold)
        self.threshold_step = float(threshold_step)
        self.max_threshold = float(max_threshold)
        self.loss_eps = float(loss_eps)
        self.replay_ratio = replay_ratio
        self.total_steps = total_steps
        self.threshold_reference = threshold_reference
        self.seed = seed
        # Two streams: the coin of each step, and the choice of replayed pairs (which is only drawn
        # on replay steps, so keeping it apart leaves the coin sequence independent of the buffer).
        self.generator = torch.Generator().manual_seed(seed)
        self.replay_generator = torch.Generator().manual_seed(seed + 1)
        self.threshold_rises = 0
        self.reference_loss: float | None = None
        self.last_loss: float | None = None
        self.steps = 0
        self.fresh_batches = 0
        self.replay_batches = 0
        self.last_kind = "none"

    # -- threshold ----------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        return min(self.init_threshold + self.threshold_rises * self.threshold_step, self.max_threshold)

    def observe_validation_loss(self, loss: float) -> None:
        """Raise the threshold if the validation loss went up by ``loss_eps`` or more (see the class doc)."""
        loss = float(loss)
        if not math.isfinite(loss):
            return
        if self.reference_loss is None:
            self.reference_loss = loss
        elif loss >= self.reference_loss + self.loss_eps:
            if self.threshold < self.max_threshold:
                self.threshold_rises += 1
            self.reference_loss = loss
        elif self.threshold_reference == "previous":
            self.reference_loss = loss
        self.last_loss = loss

    def replay_probability(self, step: int | None = None) -> float:
        """Probability that a student-generated step replays from the buffer (when it can), at ``step``."""
        if not isinstance(self.replay_ratio, str):
            return float(self.replay_ratio)
        if self.replay_ratio == "constant":
            return 0.5
        progress = min(max((self.steps if step is None else step) / self.total_steps, 0.0), 1.0)
        return progress if self.replay_ratio == "decreasing" else 1.0 - progress

    # -- source interface ---------------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        indices = self.ground_truth.next_indices()
        r = float(torch.rand((), generator=self.generator))
        self.steps += 1
        items = [self.ground_truth.dataset[i] for i in indices]
        threshold = self.threshold
        if r >= threshold:
            self.last_kind = "ground_truth"
            return self.ground_truth.collator(items)
        fresh_below = threshold * (1.0 - self.replay_probability())
        if r >= fresh_below and len(self.buffer) >= self.min_replay_size:
            self.last_kind = "replay"
            self.replay_batches += 1
            pairs = self.buffer.sample(len(indices), self.replay_generator)
            return self._batch([prompt for prompt, _ in pairs], [response for _, response in pairs])
        self.last_kind = "fresh"
        self.fresh_batches += 1
        prompts = [list(item["prompt_ids"]) for item in items]
        responses = self._generate(prompts)
        self.buffer.add(prompts, responses)
        return self._batch(prompts, responses, indices)

    def state_dict(self) -> dict:
        return {
            "ground_truth": self.ground_truth.state_dict(),
            "generator": self.generator.get_state(),
            "replay_generator": self.replay_generator.get_state(),
            "buffer": self.buffer.state_dict(),
            "threshold_rises": self.threshold_rises,
            "threshold": self.threshold,  # informative; recomputed from the rises on load
            "reference_loss": self.reference_loss,
            "last_loss": self.last_loss,
            "steps": self.steps,
            "fresh_batches": self.fresh_batches,
            "replay_batches": self.replay_batches,
            "last_kind": self.last_kind,
        }

    def load_state_dict(self, state: dict) -> None:
        self.ground_truth.load_state_dict(state["ground_truth"])
        self.generator.set_state(state["generator"])
        self.replay_generator.set_state(state["replay_generator"])
        self.buffer.load_state_dict(state["buffer"])
        self.threshold_rises = int(state["threshold_rises"])
        self.reference_loss = None if state["reference_loss"] is None else float(state["reference_loss"])
        self.last_loss = None if state["last_loss"] is None else float(state["last_loss"])
        self.steps = int(state["steps"])
        self.fresh_batches = int(state["fresh_batches"])
        self.replay_batches = int(state["replay_batches"])
        self.last_kind = str(state.get("last_kind", "none"))

    def stats(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        return {
            "student_fraction": (self.fresh_batches + self.replay_batches) / steps if self.steps else 0.0,
            "fresh_fraction": self.fresh_batches / steps if self.steps else 0.0,
            "replay_fraction": self.replay_batches / steps if self.steps else 0.0,
            "replay_buffer_size": float(len(self.buffer)),
            "adaptive_threshold": self.threshold,
        }
