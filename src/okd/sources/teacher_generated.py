"""SeqKD (Kim & Rush): the student trains on the teacher's responses, generated once and cached."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from okd.data.instruction import Collator, build_batch
from okd.generation import generate_batched
from okd.io import write_jsonl

from .base import Source, dataset_max_length, register_source
from .ground_truth import GroundTruthSource

if TYPE_CHECKING:
    from .base import SourceSetup

logger = logging.getLogger(__name__)


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


@register_source("teacher_generated")
class TeacherGeneratedSource(Source):
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

    @classmethod
    def from_config(cls, setup: SourceSetup) -> TeacherGeneratedSource:
        sampling, train = setup.sampling, setup.train
        cache = Path(sampling.teacher_generations_file or setup.output_dir / "teacher_generations.jsonl")
        cache.parent.mkdir(parents=True, exist_ok=True)
        return cls(
            setup.dataset,
            setup.teacher,
            cache_path=cache,
            pad_token_id=setup.tokenizer.pad_token_id,
            eos_token_id=setup.tokenizer.eos_token_id,
            batch_size=train.batch_size,
            seed=train.seed,
            rank=setup.rank,
            world_size=setup.world_size,
            teacher_id=str(setup.model.teacher),
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            generation_seed=train.seed,
            generation_batch_size=sampling.generation_batch_size,
            max_length=setup.data.max_length,
            progress=setup.progress,
        )

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
        self.max_length = dataset_max_length(dataset, max_length)
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
        outputs = generate_batched(
            model,
            [self._prompts[i] for i in order],
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            max_new_tokens=self.settings["max_new_tokens"],
            max_length=self.max_length,  # caps each batch's budget to the room after its longest prompt
            temperature=self.settings["temperature"],
            top_p=self.settings["top_p"],
            do_sample=self.settings["do_sample"],
            batch_size=chunk,
            seed=self.settings["generation_seed"],
            progress=progress,
            desc="teacher generation",
        )
        responses: list[list[int]] = [[] for _ in self._prompts]
        for i, response in zip(order, outputs):
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


