"""The teacher's own tokenization of each example next to the student's, and their alignment in a batch.

:class:`CrossTokenizerDataset` wraps the student's ``okd.data.InstructionDataset``: each item also
holds the teacher's ``teacher_input_ids`` / ``teacher_labels`` (the same prompt and response text
tokenised by the teacher's tokenizer, with the same rules: ``okd.data.tokenize_example``) and the
alignment of the two responses:

* ``uld``: response token ``i`` of the teacher with response token ``i`` of the student, for
  ``i < min(teacher length, student length)`` (the responses are truncated to the shorter);
* ``align``: the spans of :func:`okd.crosstok.alignment.align_spans`, plus one last span pairing the
  two EOS tokens when both responses end with theirs.

:class:`CrossTokenizerCollator` pads both tokenizations and turns the alignment into flat row indices
into the ``[batch * seq, vocab]`` logits of each model (the row at position ``p`` predicts token
``p + 1``). Batch keys added to the student's (``input_ids``, ``attention_mask``, ``labels``):

* ``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_labels``: ``[B, T_t]``;
* ``xtok_student_rows``, ``xtok_teacher_rows``: ``[P]``, the one-token pairs (``uld``: every aligned
  position; ``align``: the spans with one token on each side);
* ``xtok_span_student_rows`` / ``xtok_span_student_ids`` (``[M_s]``) and ``xtok_span_teacher_rows`` /
  ``xtok_span_teacher_ids`` (``[M_t]``): for the ``align`` spans with more than one token on a side,
  every row predicting one of the span's tokens and the span's number (``0..S-1`` in the batch);
  ``xtok_num_spans``: ``[1]``, ``S``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from okd.data.instruction import IGNORE_INDEX, Collator, tokenize_example

from .alignment import align_spans, response_offsets

__all__ = ["CROSS_TOKENIZER_MODES", "CrossTokenizerCollator", "CrossTokenizerDataset", "example_alignment"]

CROSS_TOKENIZER_MODES = ("uld", "align")


def _response(features: dict) -> list[int]:
    return list(features["input_ids"][len(features["prompt_ids"]):])


def example_alignment(
    mode: str, example, student_tokenizer, teacher_tokenizer, student_features: dict, teacher_features: dict
) -> list[tuple[int, int, int, int]]:
    """The aligned spans ``(t_start, t_end, s_start, s_end)`` of one example, in response-token indices
    (token 0 is the first response token) of the kept (possibly truncated) responses."""
    student_kept, teacher_kept = _response(student_features), _response(teacher_features)
    if mode == "uld":
        return [(i, i + 1, i, i + 1) for i in range(min(len(student_kept), len(teacher_kept)))]
    if mode != "align":
        raise ValueError(f"unknown method.cross_tokenizer {mode!r} (valid: {', '.join(CROSS_TOKENIZER_MODES)})")
    text = example.response
    t_ids, t_offsets, t_tokens = response_offsets(teacher_tokenizer, text)
    s_ids, s_offsets, s_tokens = response_offsets(student_tokenizer, text)
    for role, ids, kept in (("teacher", t_ids, teacher_kept), ("student", s_ids, student_kept)):
        if ids[: len(kept)] != kept[: len(ids)]:
            raise ValueError(f"{example.source or 'an example'}: the {role}'s response tokens differ from its training tokens")
    spans = [
        s for s in align_spans(t_offsets, s_offsets, len(text), t_tokens, s_tokens)
        if s[1] <= len(teacher_kept) and s[3] <= len(student_kept)
    ]
    # Both responses kept in full, EOS included: the two EOS tokens are one more span.
    if len(teacher_kept) == len(t_ids) + 1 and len(student_kept) == len(s_ids) + 1:
        complete = not spans or (spans[-1][1] == len(t_ids) and spans[-1][3] == len(s_ids))
        if complete:
            spans.append((len(t_ids), len(t_ids) + 1, len(s_ids), len(s_ids) + 1))
    return spans


class CrossTokenizerDataset(Dataset):
    """``base`` (the student's ``InstructionDataset``) with the teacher's tokenization and the alignment.

    Tokenises and aligns every example up front, so bad input fails at construction. Items: the base
    item plus ``teacher_input_ids``, ``teacher_labels``, ``teacher_prompt_length`` and ``xtok_spans``.
    """

    def __init__(self, base, student_tokenizer, teacher_tokenizer, mode: str, eos: bool = True):
        self.base = base
        self.examples = base.examples
        self.max_length = base.max_length
        self.mode = mode
        self.teacher_features: list[dict[str, Any]] = []
        self.spans: list[list[tuple[int, int, int, int]]] = []
        for i, example in enumerate(base.examples):
            teacher = tokenize_example(teacher_tokenizer, example, base.max_length, eos=eos, index=i)
            teacher.pop("truncated")
            self.teacher_features.append(teacher)
            self.spans.append(
                example_alignment(mode, example, student_tokenizer, teacher_tokenizer, base.features[i], teacher)
            )

    @property
    def num_truncated(self) -> int:
        return self.base.num_truncated

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.base[index])
        teacher = self.teacher_features[index]
        item.update(
            teacher_input_ids=teacher["input_ids"], teacher_labels=teacher["labels"],
            teacher_prompt_length=len(teacher["prompt_ids"]), xtok_spans=self.spans[index],
        )
        return item


@dataclass
class CrossTokenizerCollator:
    """Pads both tokenizations and indexes the alignment (module docstring). Items without teacher
    fields (the validation set) are collated as ``okd.data.Collator`` does."""

    pad_token_id: int
    teacher_pad_token_id: int

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = Collator(pad_token_id=self.pad_token_id)(features)
        if not all("teacher_input_ids" in f for f in features):
            return batch
        teacher = Collator(pad_token_id=self.teacher_pad_token_id)(
            [{"input_ids": f["teacher_input_ids"], "labels": f["teacher_labels"]} for f in features]
        )
        batch.update(teacher_input_ids=teacher["input_ids"], teacher_attention_mask=teacher["attention_mask"],
                     teacher_labels=teacher["labels"])
        s_len, t_len = batch["input_ids"].shape[1], teacher["input_ids"].shape[1]
        pair_s, pair_t, span_s, span_s_id, span_t, span_t_id = [], [], [], [], [], []
        n_spans = 0
        for row, f in enumerate(features):
            # The logits at position p predict token p + 1: response token k is predicted at prompt + k - 1.
            s_base = row * s_len + len(f["prompt_ids"]) - 1
            t_base = row * t_len + f["teacher_prompt_length"] - 1
            for t0, t1, s0, s1 in f["xtok_spans"]:
                if t1 - t0 == 1 and s1 - s0 == 1:
                    pair_s.append(s_base + s0)
                    pair_t.append(t_base + t0)
                else:
                    span_s.extend(range(s_base + s0, s_base + s1))
                    span_s_id.extend([n_spans] * (s1 - s0))
                    span_t.extend(range(t_base + t0, t_base + t1))
                    span_t_id.extend([n_spans] * (t1 - t0))
                    n_spans += 1
        as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
        batch.update(
            xtok_student_rows=as_long(pair_s), xtok_teacher_rows=as_long(pair_t),
            xtok_span_student_rows=as_long(span_s), xtok_span_student_ids=as_long(span_s_id),
            xtok_span_teacher_rows=as_long(span_t), xtok_span_teacher_ids=as_long(span_t_id),
            xtok_num_spans=as_long([n_spans]),
        )
        return batch


def check_rows(batch: dict[str, torch.Tensor]) -> None:
    """Every aligned row predicts a response token on its side (a consistency check for tests)."""
    for side, labels in (("student", batch["labels"]), ("teacher", batch["teacher_labels"])):
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
        for key in (f"xtok_{side}_rows", f"xtok_span_{side}_rows"):
            if bool((targets[batch[key]] == IGNORE_INDEX).any()):
                raise AssertionError(f"{key} points at a position without a target")
