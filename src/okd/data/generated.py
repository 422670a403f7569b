"""Sources of *generated* sequences: teacher-generated (SeqKD), student-generated (GKD / ImitKD) and
DistiLLM's adaptive off-policy replay.

They share ``GroundTruthSource``'s interface (``name``, ``next_batch()``, ``state_dict()``,
``load_state_dict()``, plus ``state`` for the epoch counter), so the training loop and every divergence
work with them unchanged. Each wraps a ``GroundTruthSource`` for the *order of the prompts*: step ``t``
of every source uses the same dataset indices as step ``t`` of a ground-truth run with the same seed,
whatever was generated. Only the responses differ.

Building blocks, usable on their own:

* ``generate_responses``: batched, left-padded, KV-cached generation that returns each prompt's new
  tokens cut right after the first EOS (the EOS is kept: it is a token the student must learn to emit).
* ``build_batch``: prompt + response rows in the training layout (right padding, ``-100`` labels on the
  prompt and the padding), the same tensors ``Collator`` makes.
* ``ReplayBuffer``: a FIFO store of (prompt, response) pairs with seeded sampling.

Randomness, and what makes resume exact:

* The coin flips (which kind of batch a step gets) and the replay sampling use each source's OWN
  ``torch.Generator``; their states are in ``state_dict()``. They are seeded identically on every
  process (no rank offset), so in multi-process training all processes take the same branch at every
  step: with sharded models (FSDP / ZeRO-3) ``generate`` is a collective, and ranks disagreeing on
  whether to generate would hang.
* Sampling inside ``model.generate`` uses the global torch RNG, which the training loop saves and
  restores with its checkpoints. The teacher's one-off generation for SeqKD runs under its own seed
  (``generation_seed``) inside ``torch.random.fork_rng``, so it neither depends on nor disturbs the
  global stream.
* Generation uses the model object it was given (a reference, not a copy), so on-policy samples always
  come from the current student weights. Unwrapping (DDP, Accelerate) is the caller's business: pass a
  model with HF's ``generate``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .instruction import IGNORE_INDEX, Collator, collate_prompts, write_jsonl
from .sources import GroundTruthSource

logger = logging.getLogger(__name__)

__all__ = [
    "AdaptiveReplaySource",
    "OnPolicySource",
    "ReplayBuffer",
    "TeacherGeneratedSource",
    "build_batch",
    "generate_responses",
]


# ----------------------------------------------------------------------------------------------
# Generation and batch building
# ----------------------------------------------------------------------------------------------


def _eos_set(eos_token_id: int | Sequence[int] | None) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(t) for t in eos_token_id}


def _cut_after_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """``tokens`` up to and including the first EOS; all of them if there is none."""
    for position, token in enumerate(tokens):
        if token in eos:
            return tokens[: position + 1]
    return tokens


def generate_responses(
    model,
    prompt_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    eos_token_id: int | Sequence[int] | None,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
) -> list[list[int]]:
    """Generate one response per prompt, in one batch. Returns the new token ids of each prompt.

    Prompts are left-padded (``collate_prompts``) so that every row's last prompt token sits in the
    last column; ``generate`` runs with the KV cache, under ``torch.no_grad()``, with the model in eval
    mode (its previous mode is restored afterwards, even on error). Each response is cut right AFTER its
    first EOS token (the EOS stays: it carries the loss that teaches the model to stop); what
    ``generate`` wrote after it is padding and is dropped. A response that never emits EOS keeps all
    ``max_new_tokens`` tokens and gets no EOS appended. ``eos_token_id`` may be a list (several stop
    tokens, as in Llama 3); ``None`` means the model's ``generation_config.eos_token_id``.

    Sampling draws from the full distribution at ``temperature`` with nucleus ``top_p``: ``top_k=0``
    is passed explicitly, because Hugging Face's default generation config would otherwise apply
    ``top_k=50`` (DistiLLM and TRL both sample with ``top_k=0``). ``do_sample=False`` or
    ``temperature == 0`` is greedy decoding. Sampling uses the global torch RNG.
    """
    if len(prompt_ids) == 0:
        return []
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if eos_token_id is None:  # cut where generate stops: at the model's own EOS
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    sample = do_sample and temperature > 0
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_prompts(prompt_ids, pad_token_id).items()}
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        use_cache=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
    )
    if sample:
        kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            generated = model.generate(**batch, **kwargs)
    finally:
        model.train(was_training)
    new_tokens = generated[:, batch["input_ids"].shape[1] :].tolist()
    eos = _eos_set(eos_token_id)
    return [_cut_after_eos(row, eos) for row in new_tokens]


def _fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Truncate one prompt/response pair to ``max_length`` tokens (see ``build_batch``)."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    if response:
        # Cut the response's end first, but always keep at least one response token.
        response = response[: max(1, max_length - len(prompt))]
    room = max_length - len(response)
    if len(prompt) > room:
        prompt = prompt[len(prompt) - room :] if room > 0 else []
    return prompt, response


def build_batch(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_token_id: int,
    max_length: int,
    indices: Sequence[int] | None = None,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Training batch from prompt and response token ids: ``input_ids``, ``attention_mask``, ``labels``.

    Each row is prompt + response, right-padded with ``pad_token_id``; ``labels`` are ``-100`` on the
    prompt and the padding and the token ids on the response (its EOS included, when it has one);
    ``attention_mask`` is 1 on real tokens. The tensors are exactly what ``Collator`` makes from the
    same rows (it builds them), so generated and ground-truth batches look alike to the loop.

    Truncation to ``max_length`` cuts the END of the response, but never the whole response: if the
    prompt leaves no room, the prompt is cut from the LEFT (its end, next to the response, matters most)
    so that at least one response token remains. A row with an empty response (generation produced
    nothing) keeps its prompt and gets no loss token at all; the loss code handles zero-token batches.
    ``indices`` (dataset indices), if given, are passed through as ``index`` like ``Collator`` does;
    ``pad_to_multiple_of`` rounds the padded length up, as ``Collator``'s option does.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if len(prompts) == 0:
        raise ValueError("build_batch needs at least one row")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    features = []
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        prompt, response = _fit(list(prompt), list(response), max_length)
        feature = {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response}
        if indices is not None:
            feature["index"] = int(indices[row])
        features.append(feature)
    return Collator(pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)(features)


def _generation_budget(prompts: Sequence[Sequence[int]], max_new_tokens: int | None, max_length: int) -> int:
    """``max_new_tokens`` capped to what fits ``max_length`` after the longest prompt (at least 1);
    when None, all of that room.

    The None default is okd's choice modelled on DistiLLM, which generates up to
    ``max_length - max_prompt_length`` new tokens so that prompt + response fit the training length:
    tokens past ``max_length`` would be truncated by ``build_batch`` anyway.
    """
    room = max(1, max_length - max(len(p) for p in prompts))
    # Never past max_length: those tokens would be cut by build_batch anyway, and a model with
    # learned positions sized to max_length (GPT-2 built by okd.models) cannot go past it.
    return room if max_new_tokens is None else min(int(max_new_tokens), room)


def _dataset_max_length(dataset, max_length: int | None) -> int:
    if max_length is not None:
        return int(max_length)
    value = getattr(dataset, "max_length", None)
    if value is None:
        raise ValueError("pass max_length: the dataset has no max_length attribute")
    return int(value)


# ----------------------------------------------------------------------------------------------
# SeqKD: teacher-generated responses, generated once and cached
# ----------------------------------------------------------------------------------------------

_CACHE_FORMAT = 1


def _teacher_files_signature(teacher_id: str) -> list:
    """Size and modification time of a local teacher directory's weight and config files.

    Cheap (no hashing of weights) and enough to notice a teacher retrained into the same directory.
    An id that is not a local directory (a hub id) contributes nothing beyond itself.
    """
    path = Path(teacher_id)
    if not path.is_dir():
        return []
    signature = []
    for file in sorted(path.iterdir()):
        if file.is_file() and (file.suffix in {".safetensors", ".bin", ".gguf", ".pt"} or file.name == "config.json"):
            stat = file.stat()
            signature.append([file.name, stat.st_size, stat.st_mtime_ns])
    return signature


def _prompts_digest(prompts: Sequence[Sequence[int]]) -> str:
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(json.dumps(list(prompt)).encode())
        digest.update(b"\n")
    return digest.hexdigest()


class TeacherGeneratedSource:
    """SeqKD: the student trains on the teacher's responses to the training prompts.

    On construction (eagerly, so that a long generation happens before training starts and its errors
    surface at once) the teacher answers every training prompt, in batches of
    ``generation_batch_size`` with a progress bar, and the answers are cached as JSONL at
    ``cache_path``. The file's first line is a header ``{"okd_teacher_generations": 1, "key": ...,
    "fingerprint": {...}}``; every other line is ``{"index", "prompt_ids", "response_ids"}``. The key
    hashes the fingerprint: ``teacher_id`` (with the size and mtime of a local teacher directory's
    weight files), a hash of all prompt token ids (the dataset content generation depends on) and every
    generation setting (``max_new_tokens``, ``temperature``, ``top_p``, ``do_sample``,
    ``generation_seed``, ``generation_batch_size``, ``max_length``). A cache with the same key (and the
    same prompts) is reused without touching the teacher; anything else is regenerated and the file
    replaced atomically (temporary file + ``os.replace``).

    ``teacher`` may be a model or a zero-argument callable returning one: with a callable the teacher
    is only loaded when the cache has to be (re)built. Generation runs under ``generation_seed`` in a
    forked RNG (the global torch RNG is left as it was). Prompts are generated longest first, which
    keeps padding low; the order is deterministic and part of the cache key via the batch size.

    Batches then follow a ``GroundTruthSource`` with the same ``batch_size``/``seed``/``rank``/
    ``world_size``: same indices at every step, teacher responses instead of the references.
    Multi-process: build it on the main process first (``accelerator.main_process_first()``) so the
    other processes find the cache.

    Args:
        dataset: an ``InstructionDataset`` (items with ``prompt_ids``).
        teacher: the teacher model, or a callable that loads it.
        cache_path: the JSONL cache file.
        pad_token_id, eos_token_id: the tokenizer's pad and EOS ids.
        batch_size, seed, rank, world_size: as for ``GroundTruthSource``.
        teacher_id: identifies the teacher in the cache key (its path); default: the model's
            ``config._name_or_path`` (only available when ``teacher`` is a model).
        max_new_tokens: per response; ``None`` fills ``max_length`` after the longest prompt of each
            generation batch (okd's choice; DistiLLM generates ``max_length - max_prompt_length``).
        temperature, top_p, do_sample: DistiLLM's SeqKD data generation samples at temperature 1.0,
            top_p 1.0, top_k 0 (``scripts/*/tools/generate_data_seqkd.sh``): those are the defaults.
        generation_seed: seed of the teacher's sampling (okd's choice: 0).
        generation_batch_size: prompts per ``generate`` call (okd's choice: 32).
        max_length: longest training sequence; default ``dataset.max_length``.
        pad_to_multiple_of: as ``Collator``'s.
        progress: show the generation progress bar.
    """

    name = "teacher_generated"

    def __init__(
        self,
        dataset,
        teacher,
        *,
        cache_path: str | os.PathLike,
        pad_token_id: int,
        eos_token_id: int | Sequence[int] | None,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        teacher_id: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        do_sample: bool = True,
        generation_seed: int = 0,
        generation_batch_size: int = 32,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        progress: bool = True,
    ):
        if generation_batch_size < 1:
            raise ValueError(f"generation_batch_size must be at least 1, got {generation_batch_size}")
        self.dataset = dataset
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.max_length = _dataset_max_length(dataset, max_length)
        self.cache_path = Path(cache_path)
        self.pad_to_multiple_of = pad_to_multiple_of
        collator = Collator(pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
        self.ground_truth = GroundTruthSource(dataset, collator, batch_size, seed=seed, rank=rank, world_size=world_size)
        if teacher_id is None:
            if callable(teacher) and not hasattr(teacher, "generate"):
                raise ValueError("pass teacher_id when teacher is a loader callable: it identifies the cache")
            teacher_id = str(getattr(teacher.config, "_name_or_path", "") or type(teacher).__name__)
        self.settings = {
            "max_new_tokens": max_new_tokens,
            "temperature": float(temperature),
            "top_p": float(top_p),
            "do_sample": bool(do_sample),
            "generation_seed": int(generation_seed),
            "generation_batch_size": int(generation_batch_size),
            "max_length": self.max_length,
        }
        self._prompts = [list(dataset[i]["prompt_ids"]) for i in range(len(dataset))]
        self.fingerprint = {
            "teacher_id": teacher_id,
            "teacher_files": _teacher_files_signature(teacher_id),
            "num_prompts": len(self._prompts),
            "prompts_sha256": _prompts_digest(self._prompts),
            **self.settings,
        }
        self.key = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()
        cached = self._read_cache()
        self.cache_hit = cached is not None
        if cached is None:
            model = teacher if hasattr(teacher, "generate") else teacher()
            cached = self._generate_all(model, progress)
            self._write_cache(cached)
        self.responses: list[list[int]] = cached

    # -- cache --------------------------------------------------------------------------------
    def _read_cache(self) -> list[list[int]] | None:
        if not self.cache_path.exists():
            return None
        try:
            with open(self.cache_path, encoding="utf-8") as f:
                header = json.loads(f.readline())
                if header.get("okd_teacher_generations") != _CACHE_FORMAT or header.get("key") != self.key:
                    logger.info("teacher generations at %s were made with other settings: regenerating", self.cache_path)
                    return None
                responses: list[list[int] | None] = [None] * len(self._prompts)
                for line in f:
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    index = int(record["index"])
                    if record["prompt_ids"] != self._prompts[index]:
                        return None
                    responses[index] = [int(t) for t in record["response_ids"]]
        except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
            logger.warning("unreadable teacher-generation cache %s (%s): regenerating", self.cache_path, err)
            return None
        if any(r is None for r in responses):
            logger.warning("incomplete teacher-generation cache %s: regenerating", self.cache_path)
            return None
        logger.info("reusing teacher generations from %s", self.cache_path)
        return responses  # type: ignore[return-value]

    def _write_cache(self, responses: list[list[int]]) -> None:
        header = {"okd_teacher_generations": _CACHE_FORMAT, "key": self.key, "fingerprint": self.fingerprint}
        records = [header] + [
            {"index": i, "prompt_ids": prompt, "response_ids": response}
            for i, (prompt, response) in enumerate(zip(self._prompts, responses))
        ]
        write_jsonl(self.cache_path, records)  # atomic: temporary file + os.replace

    def _generate_all(self, model, progress: bool) -> list[list[int]]:
        # Longest prompts first: rows of similar length share a batch, so less padding is generated over.
        order = sorted(range(len(self._prompts)), key=lambda i: -len(self._prompts[i]))
        chunk = self.settings["generation_batch_size"]
        responses: list[list[int]] = [[] for _ in self._prompts]
        device = next(model.parameters()).device
        devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.settings["generation_seed"])
            for start in tqdm(range(0, len(order), chunk), desc="teacher generation", unit="batch", disable=not progress):
                rows = order[start : start + chunk]
                prompts = [self._prompts[i] for i in rows]
                outputs = generate_responses(
                    model,
                    prompts,
                    pad_token_id=self.pad_token_id,
                    eos_token_id=self.eos_token_id,
                    max_new_tokens=_generation_budget(prompts, self.settings["max_new_tokens"], self.max_length),
                    temperature=self.settings["temperature"],
                    top_p=self.settings["top_p"],
                    do_sample=self.settings["do_sample"],
                )
                for i, response in zip(rows, outputs):
                    responses[i] = response
        return responses

    # -- source interface ---------------------------------------------------------------------
    @property
    def state(self):
        """The ground-truth order's position (``epoch``, ``position``), as the loop reads it."""
        return self.ground_truth.state

    def next_batch(self) -> dict[str, torch.Tensor]:
        indices = self.ground_truth.next_indices()
        return build_batch(
            [self._prompts[i] for i in indices],
            [self.responses[i] for i in indices],
            self.pad_token_id,
            self.max_length,
            indices=indices,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )

    def state_dict(self) -> dict:
        return {"ground_truth": self.ground_truth.state_dict(), "cache_key": self.key}

    def load_state_dict(self, state: dict) -> None:
        if state.get("cache_key") not in (None, self.key):
            logger.warning("resuming SeqKD with teacher generations that differ from the checkpoint's")
        self.ground_truth.load_state_dict(state["ground_truth"])

    def stats(self) -> dict[str, float]:
        lengths = [len(r) for r in self.responses]
        return {
            "teacher_cache_hit": float(self.cache_hit),
            "teacher_response_tokens_mean": sum(lengths) / max(len(lengths), 1),
            "teacher_empty_responses": float(sum(n == 0 for n in lengths)),
        }


# ----------------------------------------------------------------------------------------------
# GKD / ImitKD: on-policy student samples with probability lambda
# ----------------------------------------------------------------------------------------------


class _StudentGeneration:
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
        self.max_length = _dataset_max_length(ground_truth.dataset, max_length)
        # Generated batches are padded like the ground-truth ones.
        self.pad_to_multiple_of = getattr(ground_truth.collator, "pad_to_multiple_of", None)

    def _batch(self, prompts, responses, indices=None) -> dict[str, torch.Tensor]:
        return build_batch(prompts, responses, self.pad_token_id, self.max_length, indices, self.pad_to_multiple_of)

    @property
    def state(self):
        """The ground-truth order's position (``epoch``, ``position``), as the loop reads it."""
        return self.ground_truth.state

    def _generate(self, prompts: list[list[int]]) -> list[list[int]]:
        return generate_responses(
            self.model,
            prompts,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            max_new_tokens=_generation_budget(prompts, self.max_new_tokens, self.max_length),
            temperature=self.temperature,
            top_p=self.top_p,
            do_sample=True,
        )


class OnPolicySource(_StudentGeneration):
    """GKD / ImitKD: with probability ``lambda_`` a step's prompts get responses sampled from the student.

    Each step takes the next indices of ``ground_truth`` (so the prompt order is the ground-truth
    order, whatever happens) and draws ``u ~ U[0, 1)`` from this source's own generator: if
    ``u < lambda_`` the batch is the prompts + the current student's samples, else it is the
    ground-truth batch, exactly the tensors ``GroundTruthSource.next_batch()`` would return. So
    ``lambda_ = 0`` reproduces a ground-truth run bit for bit and ``lambda_ = 1`` never uses a reference.
    (TRL's ``GKDTrainer`` makes the same per-step choice with Python's global ``random``; a private
    generator makes it reproducible and checkpointable.)

    Defaults follow TRL's ``GKDConfig`` (GKD): ``lambda_ = 0.5``, ``temperature = 0.9``, full
    nucleus (``top_p = 1.0``, ``top_k = 0``). ImitKD as DistiLLM runs it is ``lambda_ = 1`` at
    temperature 1.0 (``scripts/gpt2/imitkd/*.sh``: ``--mixed-alpha 1.0``). ``max_new_tokens = None``
    fills ``max_length`` after the batch's longest prompt (okd's choice; TRL's default is 128).

    Args:
        ground_truth: the ``GroundTruthSource`` giving the prompt order (its state is part of ours).
        model: the student, with HF ``generate`` (unwrapped).
        eos_token_id: where generation stops; pad_token_id: default, the collator's.
        lambda_: probability of an on-policy batch.
        seed: seeds the coin flips (same on every process, see the module docstring).
    """

    name = "on_policy"

    def __init__(
        self,
        ground_truth: GroundTruthSource,
        model,
        *,
        eos_token_id: int | Sequence[int] | None,
        pad_token_id: int | None = None,
        lambda_: float = 0.5,
        max_new_tokens: int | None = None,
        temperature: float = 0.9,
        top_p: float = 1.0,
        max_length: int | None = None,
        seed: int = 0,
    ):
        if not 0.0 <= lambda_ <= 1.0:
            raise ValueError(f"lambda_ must be in [0, 1], got {lambda_}")
        self._setup_generation(ground_truth, model, pad_token_id, eos_token_id, max_new_tokens, temperature, top_p, max_length)
        self.lambda_ = float(lambda_)
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
        self.last_on_policy = u < self.lambda_
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


# ----------------------------------------------------------------------------------------------
# DistiLLM: adaptive off-policy replay
# ----------------------------------------------------------------------------------------------


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


class AdaptiveReplaySource(_StudentGeneration):
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

    name = "adaptive_replay"

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
