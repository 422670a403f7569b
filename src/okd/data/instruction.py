"""Instruction data: reading JSONL files, tokenising prompt/response pairs, batching.

The pipeline, end to end::

    examples = read_jsonl("train.jsonl", tokenizer)          # list[Example] (text)
    dataset = InstructionDataset(examples, tokenizer, 512)   # token ids + loss labels
    loader = DataLoader(dataset, batch_size=8, collate_fn=Collator(tokenizer.pad_token_id))

The accepted record layouts and how a record becomes prompt and response text (chat templates
included) are ``okd.data.records``'s: ``format_record`` is the one place to change them.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from okd.data.loading import is_loader_source, read_examples
from okd.data.records import (  # noqa: F401  (re-exported: okd.data.instruction.DataError, ...)
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_NO_INPUT,
    DataError,
    Example,
    format_record,
    json_lines,
    read_bytes,
    read_json_lines,
)
from okd.io import write_jsonl  # noqa: F401  (re-exported: okd.data.write_jsonl)
from okd.targets import IGNORE_INDEX  # label value without loss (prompt, padding)

logger = logging.getLogger(__name__)

# Datasets at least this large get a progress bar while tokenising.
_PROGRESS_BAR_MIN_EXAMPLES = 2000


def read_jsonl(path: str | os.PathLike, tokenizer=None) -> list[Example]:
    """Read a JSONL file of records (see the module docstring) into ``Example``s.

    Blank lines are skipped. Every problem raises ``DataError`` with a one-line message
    naming the file and line, e.g. ``data.jsonl, line 3: missing field 'response'``.
    ``tokenizer`` is only used to render chat records with its chat template.
    Other sources (.json, .parquet, .arrow, a save_to_disk folder, ``hub:NAME``) go to
    ``okd.data.loading.read_examples``.
    """
    if is_loader_source(path):
        return read_examples(path, tokenizer)
    return read_json_lines(path, tokenizer)


# ----------------------------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------------------------


def ensure_pad_token(tokenizer, source: str | None = None, strict: bool = True, log: logging.Logger | None = None):
    """Give a tokenizer without a pad token the EOS token as pad token; returns the tokenizer.

    Padding positions are masked out (attention mask 0, label -100), so which token fills
    them does not matter; EOS is the token every causal LM tokenizer has. With neither, raise
    DataError (``strict``) or log a warning (``okd.models.load_tokenizer``: batching will fail later).
    ``log``: the logger that reports the fallback (default: this module's).
    """
    log = log or logger
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            if strict:
                raise DataError("the tokenizer has neither a pad token nor an EOS token to use as one")
            log.warning("tokenizer %s has neither a pad nor an eos token", source)
            return tokenizer
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer %s has no pad token; using its eos token %r (id %d) as pad", source, tokenizer.eos_token, tokenizer.eos_token_id)
    return tokenizer


def _bos_prefix(tokenizer) -> list[int]:
    """``[bos_token_id]`` if the tokenizer adds a BOS token to plain text, else ``[]``.

    Found by trying: some tokenizers (Llama, Gemma) prepend BOS, most (GPT-2, Qwen) add nothing.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def tokenize_example(
    tokenizer,
    example: Example,
    max_length: int,
    eos: bool = True,
    min_response_tokens: int = 8,
    index: int | None = None,
) -> dict[str, Any]:
    """Tokenise one example for training.

    Returns a dict with

    * ``input_ids``: prompt tokens + response tokens (+ EOS if ``eos``), at most ``max_length``;
    * ``labels``: ``-100`` on the prompt tokens, the token ids on the response and EOS, so the
      loss is computed on the response only;
    * ``prompt_ids``: the prompt tokens (truncated the same way), for generation;
    * ``truncated``: whether anything was cut.

    Prompt and response are tokenised separately, without special tokens, so the boundary
    between them is exact. A BOS token is put in front of the prompt only when the tokenizer
    adds one to plain text (see ``_bos_prefix``) and the prompt does not already start with it
    (chat templates often write it).

    Truncation never drops the whole response. When prompt + response do not fit:

    1. the response is guaranteed ``min_response_tokens`` tokens (or all of it, if shorter);
    2. the prompt is cut from the LEFT to fit next to that guarantee: its end, nearest to the
       response, is what matters most (a BOS token stays in front);
    3. the response is cut from the RIGHT to fill what is left (its EOS goes first).

    ``DataError`` (naming ``index``) if ``max_length`` cannot hold that guarantee plus one
    prompt token.
    """
    where = example.source or (f"example {index}" if index is not None else "example")
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    prompt_ids = list(tokenizer(example.prompt, add_special_tokens=False)["input_ids"])
    response_ids = list(tokenizer(example.response, add_special_tokens=False)["input_ids"])
    if eos:
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token; pass eos=False")
        response_ids.append(tokenizer.eos_token_id)

    prefix = _bos_prefix(tokenizer)
    if prefix and prompt_ids[:1] == prefix:
        prefix = []
    body = prompt_ids  # the part of the prompt that may be cut
    truncated = len(prefix) + len(body) + len(response_ids) > max_length
    if truncated:
        # At least one response token, whatever min_response_tokens says: a training example
        # without a response would teach nothing and hide the problem.
        guaranteed = min(len(response_ids), max(1, min_response_tokens))
        body_budget = max_length - guaranteed - len(prefix)
        if body_budget < 1:
            raise DataError(
                f"{where}: max_length={max_length} cannot hold one prompt token and "
                f"{guaranteed} response tokens (min_response_tokens={min_response_tokens})"
            )
        body = body[-body_budget:] if len(body) > body_budget else body
        response_ids = response_ids[: max_length - len(prefix) - len(body)]

    prompt_ids = prefix + body
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
        "prompt_ids": prompt_ids,
        "truncated": truncated,
    }


class InstructionDataset(Dataset):
    """Examples tokenised for training, with the text kept for generation and evaluation.

    Tokenises everything up front (a progress bar appears for large datasets), so errors
    surface at construction rather than mid-training. ``dataset[i]`` is a dict with
    ``input_ids``, ``labels``, ``prompt_ids`` (lists of ints, see ``tokenize_example``) and
    ``index`` (= i, to find ``dataset.examples[i]``). Batch with ``Collator``.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer,
        max_length: int,
        eos: bool = True,
        min_response_tokens: int = 8,
    ):
        if len(examples) == 0:
            raise DataError("no examples: the dataset is empty")
        self.examples = list(examples)
        self.max_length = max_length
        self.features = []
        self._num_truncated = 0
        progress = tqdm(
            self.examples,
            desc="Tokenising",
            unit="ex",
            disable=len(self.examples) < _PROGRESS_BAR_MIN_EXAMPLES or not sys.stderr.isatty(),
        )
        for i, example in enumerate(progress):
            features = tokenize_example(
                tokenizer, example, max_length, eos=eos,
                min_response_tokens=min_response_tokens, index=i,
            )
            self._num_truncated += features.pop("truncated")
            self.features.append(features)

    @property
    def num_truncated(self) -> int:
        """How many examples were cut to fit ``max_length``."""
        return self._num_truncated

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        features = self.features[index]
        return {
            "input_ids": features["input_ids"],
            "labels": features["labels"],
            "prompt_ids": features["prompt_ids"],
            "index": index,
        }


def load_dataset_file(
    path: str | os.PathLike, tokenizer, max_length: int, **kwargs: Any
) -> InstructionDataset:
    """``read_jsonl`` + ``InstructionDataset`` in one call; ``kwargs`` go to the dataset."""
    return InstructionDataset(read_jsonl(path, tokenizer), tokenizer, max_length, **kwargs)


# ----------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------


def _round_up(length: int, multiple: int | None) -> int:
    if not multiple:
        return length
    return -(-length // multiple) * multiple


@dataclass
class Collator:
    """Batch ``InstructionDataset`` items for training (use as a DataLoader ``collate_fn``).

    Right-pads ``input_ids`` with ``pad_token_id`` and ``labels`` with ``label_pad``, builds
    ``attention_mask`` (1 on real tokens), and passes ``index`` through. Returns LongTensors.
    Right padding suits training: positions line up from the start, and the padded tail is
    both masked out of attention and ignored by the loss. ``pad_to_multiple_of`` rounds the
    batch length up (e.g. 8, for tensor cores).
    """

    pad_token_id: int
    label_pad: int = IGNORE_INDEX
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = _round_up(max(len(f["input_ids"]) for f in features), self.pad_to_multiple_of)
        input_ids, labels, attention_mask = [], [], []
        for f in features:
            ids, labs = list(f["input_ids"]), list(f["labels"])
            pad = length - len(ids)
            input_ids.append(ids + [self.pad_token_id] * pad)
            labels.append(labs + [self.label_pad] * pad)
            attention_mask.append([1] * len(ids) + [0] * pad)
        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        if all("index" in f for f in features):
            batch["index"] = torch.tensor([int(f["index"]) for f in features], dtype=torch.long)
        return batch


def collate_prompts(prompt_ids_list: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """LEFT-pad prompts for batched generation: ``{"input_ids", "attention_mask"}`` LongTensors.

    Left padding puts every prompt's last token in the last column, so ``generate`` appends
    new tokens right after each prompt instead of after padding.
    """
    if len(prompt_ids_list) == 0:
        raise DataError("collate_prompts needs at least one prompt")
    length = max(len(ids) for ids in prompt_ids_list)
    input_ids, attention_mask = [], []
    for ids in prompt_ids_list:
        pad = length - len(ids)
        input_ids.append([pad_token_id] * pad + list(ids))
        attention_mask.append([0] * pad + [1] * len(ids))
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
    }


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
