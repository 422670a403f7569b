"""Aligning two tokenizations of the same response text, and the vocabulary the two tokenizers share.

Both tokenizers are fast (``tokenizers``-backed) ones: they report, for every token, the character
span ``(start, end)`` of the text it covers (its *offsets*). Everything here works on those offsets and
on token strings, never on token ids, so any two tokenizer families can be aligned.

Spans (:func:`align_spans`)
---------------------------
A *boundary* is the gap after a token: the characters from the end of the text covered so far to the
start of the next token, ``[end, next_start]`` (one point when the two touch; an interval when the
tokenizer leaves whitespace out of its offsets, as ``trim_offsets`` does). There is no boundary after a
token when the next one starts before it ends: byte-level tokenizers split one multi-byte character
(``"日"``) into several tokens that all report the same character span, and a cut between them is not
a cut of the text. Two boundaries, one per tokenizer, *coincide* when their intervals share a point.
The response is cut at every coinciding boundary: this gives the minimal spans whose two ends are
boundaries of both tokenizations. Each span holds ``a >= 1`` teacher tokens and ``b >= 1`` student
tokens covering the same text. A span whose two token sequences are the same strings (same count,
same strings one by one) is split into ``a`` one-token spans: the two tokenizers agree there, token by
token. With identical tokenizers every span is therefore one token on each side.

Shared vocabulary (:class:`SharedVocabulary`)
---------------------------------------------
Pairs ``(student id, teacher id)`` of tokens with the same string in both vocabularies (a one-to-one
map: a vocabulary maps each string to one id), plus the pair of the two end-of-sequence tokens, which
are matched whatever their strings (``<|endoftext|>`` and ``<|im_end|>`` both end the response; any
other pair involving either EOS is dropped to keep the map one-to-one). Rows of an output head that are
not in the map (tokens of one vocabulary only, and rows past the tokenizer that pad the head) are the
model's *other* tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["SharedVocabulary", "align_spans", "boundaries", "response_offsets"]

Offsets = Sequence[tuple[int, int]]


def boundaries(offsets: Offsets, text_length: int) -> list[tuple[int, int, int]]:
    """The boundaries of one tokenization: ``(k, lo, hi)`` for each token ``k`` that is followed by a
    cut, ``[lo, hi]`` the characters of the gap after it (``hi = text_length`` after the last token).

    ``offsets``: ``[(start, end)]`` per token, as a fast tokenizer's ``offset_mapping`` reports them.
    """
    cuts = []
    covered = 0  # the end of the text covered by tokens 0..k
    n = len(offsets)
    next_start = [text_length] * (n + 1)  # the smallest start of the tokens after k
    for k in range(n - 1, -1, -1):
        next_start[k] = min(offsets[k][0], next_start[k + 1])
    for k, (_, end) in enumerate(offsets):
        covered = max(covered, end)
        following = next_start[k + 1]
        if covered <= following:
            cuts.append((k, covered, following))
    return cuts


def align_spans(
    teacher_offsets: Offsets,
    student_offsets: Offsets,
    text_length: int,
    teacher_tokens: Sequence[str] | None = None,
    student_tokens: Sequence[str] | None = None,
) -> list[tuple[int, int, int, int]]:
    """The aligned spans of two tokenizations of one text (see the module docstring).

    Returns ``[(t_start, t_end, s_start, s_end)]``: teacher tokens ``t_start:t_end`` and student tokens
    ``s_start:s_end`` cover the same characters. Spans are in text order and never empty on either
    side; tokens after the last common boundary (text that one side does not cover) are left out.
    ``teacher_tokens`` / ``student_tokens`` (token strings) allow splitting spans where the two agree
    token by token; without them no span is split.
    """
    spans = []
    t_cuts, s_cuts = boundaries(teacher_offsets, text_length), boundaries(student_offsets, text_length)
    a = b = t_start = s_start = 0
    while a < len(t_cuts) and b < len(s_cuts):
        kt, lo_t, hi_t = t_cuts[a]
        ks, lo_s, hi_s = s_cuts[b]
        if hi_t < lo_s:
            a += 1
        elif hi_s < lo_t:
            b += 1
        else:
            spans.append((t_start, kt + 1, s_start, ks + 1))
            t_start, s_start = kt + 1, ks + 1
            a += 1
            b += 1
    if teacher_tokens is None or student_tokens is None:
        return spans
    split = []
    for t0, t1, s0, s1 in spans:
        if t1 - t0 > 1 and t1 - t0 == s1 - s0 and list(teacher_tokens[t0:t1]) == list(student_tokens[s0:s1]):
            split.extend((t0 + i, t0 + i + 1, s0 + i, s0 + i + 1) for i in range(t1 - t0))
        else:
            split.append((t0, t1, s0, s1))
    return split


def response_offsets(tokenizer, response: str) -> tuple[list[int], list[tuple[int, int]], list[str]]:
    """``(ids, offsets, token strings)`` of ``response`` tokenised alone, without special tokens (as
    ``okd.data.tokenize_example`` tokenises it). Needs a fast tokenizer (offsets)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"method.cross_tokenizer=align needs fast tokenizers (character offsets); {type(tokenizer).__name__} is not one")
    encoding = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    return ids, [tuple(o) for o in encoding["offset_mapping"]], tokenizer.convert_ids_to_tokens(ids)


@dataclass
class SharedVocabulary:
    """The tokens two vocabularies share, and each head's other rows.

    ``student_ids`` / ``teacher_ids``: ``[K]`` LongTensors, pair ``i`` is one token (same string, or the
    two EOS tokens); ``student_other`` / ``teacher_other``: the head rows outside the map (``[V_s - K]``,
    ``[V_t - K']``, possibly empty).
    """

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    student_other: torch.Tensor
    teacher_other: torch.Tensor

    @classmethod
    def build(cls, student_tokenizer, teacher_tokenizer, student_width: int, teacher_width: int) -> "SharedVocabulary":
        """The map of ``student_tokenizer`` and ``teacher_tokenizer``; ``*_width``: rows of each output head
        (a tokenizer id at or past its head's width is left out)."""
        s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        s_eos, t_eos = student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
        pairs = {}
        for token, s_id in s_vocab.items():
            t_id = t_vocab.get(token)
            if t_id is not None and s_id not in (s_eos,) and t_id not in (t_eos,):
                pairs[s_id] = t_id
        if s_eos is not None and t_eos is not None:
            pairs[s_eos] = t_eos
        pairs = {s: t for s, t in pairs.items() if s < student_width and t < teacher_width}
        student_ids = torch.tensor(sorted(pairs), dtype=torch.long)
        teacher_ids = torch.tensor([pairs[s] for s in sorted(pairs)], dtype=torch.long)
        return cls(student_ids, teacher_ids, _complement(student_ids, student_width), _complement(teacher_ids, teacher_width))

    @classmethod
    def identity(cls, width: int) -> "SharedVocabulary":
        """The map of a vocabulary with itself (every row shared, no other rows)."""
        ids = torch.arange(width)
        return cls(ids, ids.clone(), ids[:0], ids[:0])

    def __len__(self) -> int:
        return int(self.student_ids.numel())

    def to(self, device) -> "SharedVocabulary":
        return SharedVocabulary(*(t.to(device) for t in (self.student_ids, self.teacher_ids, self.student_other, self.teacher_other)))


def _complement(ids: torch.Tensor, width: int) -> torch.Tensor:
    keep = torch.ones(width, dtype=torch.bool)
    keep[ids] = False
    return keep.nonzero().squeeze(1)
