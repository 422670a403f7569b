"""Cross-tokenizer alignment (okd.crosstok.alignment, okd.crosstok.data): spans on hand-made offsets and on
two real tokenizers (GPT-2's and SmolLM2's), the shared vocabulary, and the batch's row indices with padding."""

from __future__ import annotations

import pytest
import torch
from crosstok_helpers import gpt2_tokenizer, smollm2_tokenizer

from okd.crosstok.alignment import SharedVocabulary, align_spans, boundaries, response_offsets
from okd.crosstok.data import CrossTokenizerCollator, CrossTokenizerDataset, check_rows
from okd.data import Example, InstructionDataset


def _offsets(pieces):
    """Offsets of the tokens ``pieces`` laid end to end."""
    out, at = [], 0
    for piece in pieces:
        out.append((at, at + len(piece)))
        at += len(piece)
    return out


def test_a_word_split_differently_is_one_span():
    text = "an unbelievable day"
    teacher = ["an", " un", "believ", "able", " day"]
    student = ["an", " unbel", "ievable", " day"]
    spans = align_spans(_offsets(teacher), _offsets(student), len(text), teacher, student)
    assert spans == [(0, 1, 0, 1), (1, 4, 1, 3), (4, 5, 3, 4)]
    # A boundary inside the word that both have (" un|believ" and " unbel|iev" both end at "unbeliev").
    student = ["an", " unbel", "iev", "able", " day"]
    spans = align_spans(_offsets(teacher), _offsets(student), len(text), teacher, student)
    assert spans == [(0, 1, 0, 1), (1, 3, 1, 3), (3, 4, 3, 4), (4, 5, 4, 5)]


def test_identical_tokens_give_one_token_spans():
    pieces = ["Hello", " w", "ör", "ld"]
    spans = align_spans(_offsets(pieces), _offsets(pieces), 11, pieces, pieces)
    assert spans == [(i, i + 1, i, i + 1) for i in range(4)]


def test_trimmed_whitespace_offsets_still_align():
    # The teacher's offsets leave the spaces out (trim_offsets); the student's cover them.
    text = "ab  cd e"
    teacher = [(0, 2), (4, 6), (7, 8)]
    student = _offsets(["ab", "  cd", " e"])
    assert boundaries(teacher, len(text)) == [(0, 2, 4), (1, 6, 7), (2, 8, 8)]
    assert align_spans(teacher, student, len(text)) == [(0, 1, 0, 1), (1, 2, 1, 2), (2, 3, 2, 3)]
    # A student that makes the spaces a token of their own: they join the next span.
    student = _offsets(["ab", "  ", "cd", " e"])
    assert align_spans(teacher, student, len(text)) == [(0, 1, 0, 1), (1, 2, 1, 3), (2, 3, 3, 4)]


def test_bytes_of_one_character_are_never_cut():
    # "日" split into three byte tokens that all report the character's span: no boundary between them.
    text = "x日y"
    teacher = [(0, 1), (1, 2), (1, 2), (1, 2), (2, 3)]
    student = [(0, 1), (1, 2), (1, 2), (2, 3)]
    assert [k for k, _, _ in boundaries(teacher, len(text))] == [0, 3, 4]
    assert align_spans(teacher, student, len(text)) == [(0, 1, 0, 1), (1, 4, 1, 3), (4, 5, 3, 4)]


def test_uncovered_tail_is_left_out():
    # The student's tokens stop before the end of the text (truncated): the last teacher token has no partner.
    assert align_spans([(0, 2), (2, 4)], [(0, 2)], 4) == [(0, 1, 0, 1)]


@pytest.fixture(scope="module")
def tokenizers():
    return gpt2_tokenizer(), smollm2_tokenizer()


@pytest.mark.parametrize("text", [
    " unbelievably tokenized", "  two  spaces\n\nnew lines\t", "naïve café 日本語 — ok!", " bravo alpha zulu",
])
def test_real_tokenizers_spans_cover_the_same_text(tokenizers, text):
    student, teacher = tokenizers
    s_ids, s_off, s_tok = response_offsets(student, text)
    t_ids, t_off, t_tok = response_offsets(teacher, text)
    spans = align_spans(t_off, s_off, len(text), t_tok, s_tok)
    # Every token is in exactly one span, in order, and each span decodes to the same text on both sides.
    assert [i for t0, t1, _, _ in spans for i in range(t0, t1)] == list(range(len(t_ids)))
    assert [i for _, _, s0, s1 in spans for i in range(s0, s1)] == list(range(len(s_ids)))
    for t0, t1, s0, s1 in spans:
        assert teacher.decode(t_ids[t0:t1]) == student.decode(s_ids[s0:s1])


def test_real_tokenizers_known_split(tokenizers):
    student, teacher = tokenizers  # GPT-2: " unbelievably"; SmolLM2: " unbelie" + "v" + "ably"
    text = " unbelievably"
    _, s_off, s_tok = response_offsets(student, text)
    _, t_off, t_tok = response_offsets(teacher, text)
    assert s_tok == ["Ġunbelievably"] and t_tok == ["Ġunbelie", "v", "ably"]
    assert align_spans(t_off, s_off, len(text), t_tok, s_tok) == [(0, 3, 0, 1)]


def test_shared_vocabulary_maps_strings_and_eos(tokenizers):
    student, teacher = tokenizers
    vocab = SharedVocabulary.build(student, teacher, len(student), len(teacher))
    pairs = dict(zip(vocab.student_ids.tolist(), vocab.teacher_ids.tolist()))
    assert pairs[student.eos_token_id] == teacher.eos_token_id  # <|endoftext|> <-> <|im_end|>
    assert len(set(pairs.values())) == len(pairs)  # one to one
    s_tok, t_tok = student.convert_ids_to_tokens, teacher.convert_ids_to_tokens
    for s, t in list(pairs.items())[:500]:
        if s != student.eos_token_id:
            assert s_tok(s) == t_tok(t)
    assert len(vocab) + vocab.student_other.numel() == len(student)
    assert len(vocab) + vocab.teacher_other.numel() == len(teacher)
    same = SharedVocabulary.build(student, student, len(student) + 3, len(student))  # a padded head
    assert torch.equal(same.student_ids, torch.arange(len(student))) and same.student_other.tolist() == [len(student) + i for i in range(3)]


@pytest.mark.parametrize("mode", ["align", "uld"])
def test_batch_rows_point_at_the_aligned_tokens_with_padding(tokenizers, mode):
    student, teacher = tokenizers
    examples = [
        Example("Reverse: alpha bravo\nAnswer:", " bravo alpha"),
        Example("Q: naïve?\nA:", " unbelievably naïve 日本"),
        Example("Long prompt " * 3, " x"),
    ]
    base = InstructionDataset(examples, student, max_length=64)
    data = CrossTokenizerDataset(base, student, teacher, mode)
    batch = CrossTokenizerCollator(student.pad_token_id, teacher.pad_token_id)([data[i] for i in range(3)])
    assert batch["teacher_input_ids"].shape[0] == 3 and batch["teacher_attention_mask"].sum() < batch["teacher_input_ids"].numel()
    check_rows(batch)
    s_next = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100).reshape(-1)
    t_next = torch.nn.functional.pad(batch["teacher_labels"][:, 1:], (0, 1), value=-100).reshape(-1)
    pairs = list(zip(s_next[batch["xtok_student_rows"]].tolist(), t_next[batch["xtok_teacher_rows"]].tolist()))
    if mode == "uld":  # position i with position i: min(response lengths) pairs per example
        lengths = [min(len(data[i]["input_ids"]) - len(data[i]["prompt_ids"]),
                       len(data[i]["teacher_input_ids"]) - data[i]["teacher_prompt_length"]) for i in range(3)]
        assert len(pairs) == sum(lengths) and int(batch["xtok_num_spans"]) == 0
        return
    # align: every one-token pair is the same text (EOS with EOS), every longer span too.
    for s, t in pairs:
        if s == student.eos_token_id:
            assert t == teacher.eos_token_id
        else:
            assert student.decode([s]) == teacher.decode([t])
    n = int(batch["xtok_num_spans"])
    assert n >= 2  # " unbelievably" and "日本" are split differently
    for span in range(n):
        s_ids = s_next[batch["xtok_span_student_rows"][batch["xtok_span_student_ids"] == span]].tolist()
        t_ids = t_next[batch["xtok_span_teacher_rows"][batch["xtok_span_teacher_ids"] == span]].tolist()
        assert student.decode(s_ids) == teacher.decode(t_ids)
    # The three EOS pairs close the three responses.
    assert sum(s == student.eos_token_id for s, _ in pairs) == 3


def test_validation_items_collate_as_before(tokenizers):
    student, teacher = tokenizers
    base = InstructionDataset([Example("a", " b"), Example("cc", " d e")], student, max_length=16)
    batch = CrossTokenizerCollator(student.pad_token_id, teacher.pad_token_id)([base[0], base[1]])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "index"}
