"""Cross-tokenizer losses (okd.crosstok.losses) against float64 references written here: ULD's values and
gradients (by hand, in plain Python), its rows in a padded batch, the span losses, and, with identical
tokenizers, equality with the ordinary token-level losses (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from okd.config import MethodConfig, resolve_method
from okd.crosstok.alignment import SharedVocabulary
from okd.crosstok.data import CrossTokenizerCollator, CrossTokenizerDataset
from okd.crosstok.losses import CrossTokenizerLoss, aligned_loss, uld_loss
from okd.data import Example, InstructionDataset
from okd.divergences import get_divergence
from okd.losses import DistillationLoss, next_token_targets
from okd.models import train_tokenizer


def _softmax(row, temperature):
    top = max(row)
    e = [math.exp((x - top) / temperature) for x in row]
    return [x / sum(e) for x in e]


def uld_reference(teacher_rows, student_rows, temperature=1.0):
    """Value and gradient w.r.t. the student's logits, by hand: L = mean_n sum_k |sort(p)_k - sort(q)_k|;
    dL/dq_j = sign(q_j - sort(p)_rank(j)) / N, then through the softmax at temperature T."""
    n = len(teacher_rows)
    value, grads = 0.0, []
    for t_row, s_row in zip(teacher_rows, student_rows):
        p = sorted(_softmax(t_row, temperature), reverse=True)
        q = _softmax(s_row, temperature)
        width = max(len(p), len(q))
        p = p + [0.0] * (width - len(p))
        order = sorted(range(len(q)), key=lambda j: -q[j])
        q_sorted = [q[j] for j in order] + [0.0] * (width - len(q))
        value += sum(abs(a - b) for a, b in zip(p, q_sorted)) / n
        g = [0.0] * len(q)
        for rank, j in enumerate(order):
            g[j] = math.copysign(1.0, q[j] - p[rank]) / n
        mean_g = sum(qj * gj for qj, gj in zip(q, g))
        grads.append([qj * (gj - mean_g) / temperature for qj, gj in zip(q, g)])
    return value, grads


@pytest.mark.parametrize("vt,vs,temperature", [(7, 7, 1.0), (5, 9, 1.0), (11, 4, 2.0)])
def test_uld_value_and_gradient_match_the_reference(vt, vs, temperature):
    teacher = torch.randn(6, vt, dtype=torch.float64) * 2
    student = (torch.randn(6, vs, dtype=torch.float64) * 2).requires_grad_(True)
    value = uld_loss(teacher, student, temperature)
    value.backward()
    ref_value, ref_grad = uld_reference(teacher.tolist(), student.tolist(), temperature)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(ref_value, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(student.grad, torch.tensor(ref_grad, dtype=torch.float64), rtol=1e-10, atol=1e-13)


def test_uld_edge_cases():
    teacher = torch.randn(3, 5, dtype=torch.float64)
    # Same distribution up to a permutation of the vocabulary: ULD is zero (it compares sorted vectors).
    assert uld_loss(teacher, teacher[:, torch.randperm(5)]).item() == pytest.approx(0.0, abs=1e-15)
    assert uld_loss(teacher, teacher, reduction="none").shape == (3,)
    empty = torch.zeros(0, 4, requires_grad=True)
    zero = uld_loss(torch.zeros(0, 6), empty)
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(empty.grad, torch.zeros(0, 4))
    with pytest.raises(ValueError, match="3 teacher rows but 2 student rows"):
        uld_loss(teacher, teacher[:2])


def _method(name="kd", mode="align", **fields):
    return resolve_method(MethodConfig(name=name, cross_tokenizer=mode, **fields))


def test_uld_in_a_padded_batch_takes_the_aligned_rows_only():
    # Two examples by hand: student prompt 2 + response 3, teacher prompt 3 + response 2, and the reverse.
    features = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9], "prompt_ids": [5, 6],
         "teacher_input_ids": [1, 2, 3, 4, 0], "teacher_labels": [-100, -100, -100, 4, 0], "teacher_prompt_length": 3,
         "xtok_spans": [(0, 1, 0, 1), (1, 2, 1, 2)]},
        {"input_ids": [5, 9], "labels": [-100, 9], "prompt_ids": [5],
         "teacher_input_ids": [1, 4, 4, 0], "teacher_labels": [-100, 4, 4, 0], "teacher_prompt_length": 1,
         "xtok_spans": [(0, 1, 0, 1)]},
    ]
    batch = CrossTokenizerCollator(pad_token_id=0, teacher_pad_token_id=3)(features)
    assert batch["input_ids"].shape == (2, 5) and batch["teacher_input_ids"].shape == (2, 5)
    student = torch.randn(2, 5, 10, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 6, dtype=torch.float64)
    kd = CrossTokenizerLoss(_method(mode="uld"), None).kd(teacher, student, batch)
    kd.backward()
    # Rows predicting the aligned response tokens: student (0, 1), (0, 2), (1, 0); teacher (0, 2), (0, 3), (1, 0).
    s_at, t_at = [(0, 1), (0, 2), (1, 0)], [(0, 2), (0, 3), (1, 0)]
    ref_value, ref_grad = uld_reference([teacher[b, t].tolist() for b, t in t_at], [student[b, t].tolist() for b, t in s_at])
    assert kd.item() == pytest.approx(ref_value, rel=1e-12)
    expected = torch.zeros_like(student)
    for (b, t), g in zip(s_at, ref_grad):
        expected[b, t] = torch.tensor(g, dtype=torch.float64)
    torch.testing.assert_close(student.grad, expected, rtol=1e-10, atol=1e-13)  # zero off the aligned rows


def test_align_spans_by_hand():
    # One one-token pair and one span (teacher 1 token, student 2), vocabularies of 4 and 5 sharing 3 strings.
    vocab = SharedVocabulary(torch.tensor([0, 1, 4]), torch.tensor([2, 0, 1]), torch.tensor([2, 3]), torch.tensor([3]))
    batch = {
        "labels": torch.tensor([[-100, 1, 3, 2]]), "teacher_labels": torch.tensor([[-100, 0, 3, -100]]),
        "xtok_student_rows": torch.tensor([0]), "xtok_teacher_rows": torch.tensor([0]),
        "xtok_span_student_rows": torch.tensor([1, 2]), "xtok_span_student_ids": torch.tensor([0, 0]),
        "xtok_span_teacher_rows": torch.tensor([1]), "xtok_span_teacher_ids": torch.tensor([0]),
        "xtok_num_spans": torch.tensor([1]),
    }
    teacher = torch.randn(1, 4, 4, dtype=torch.float64)
    student = torch.randn(1, 4, 5, dtype=torch.float64)
    loss = aligned_loss(teacher, student, batch, vocab, get_divergence("forward_kl"))
    p, q = torch.softmax(teacher[0], -1), torch.softmax(student[0], -1)
    # The pair: shared tokens in map order, then "another token" (both sides have others).
    pp = torch.stack([p[0, 2], p[0, 0], p[0, 1], p[0, 3]])
    qq = torch.stack([q[0, 0], q[0, 1], q[0, 4], q[0, 2] + q[0, 3]])
    pair = (pp * (pp / qq).log()).sum()
    # The span: teacher P = p[1, 3]; student P = q[1, 3] * q[2, 2] (its two tokens, chain rule).
    big_p, big_q = p[1, 3], q[1, 3] * q[2, 2]
    span = big_p * (big_p / big_q).log() + (1 - big_p) * ((1 - big_p) / (1 - big_q)).log()
    # okd.divergences does its maths in float32 whatever the input dtype.
    assert loss.item() == pytest.approx(((pair + span) / 2).item(), rel=1e-6)


def _identical_batch(tokenizer, mode):
    examples = [Example("Reverse: alpha bravo\nAnswer:", " bravo alpha"), Example("Q: naïve 日本?\nA:", " naïve 日本 ok"),
                Example("x", " y z w v u t s")]
    base = InstructionDataset(examples, tokenizer, max_length=24)
    data = CrossTokenizerDataset(base, tokenizer, tokenizer, mode)
    batch = CrossTokenizerCollator(tokenizer.pad_token_id, tokenizer.pad_token_id)([data[i] for i in range(3)])
    assert torch.equal(batch["input_ids"], batch["teacher_input_ids"])
    return batch


@pytest.fixture(scope="module")
def small_tokenizer():
    texts = ["Reverse: alpha bravo charlie\nAnswer: charlie bravo alpha", "naïve café 日本語 ok"] * 30
    return train_tokenizer(texts, vocab_size=300)


@pytest.mark.parametrize("name,fields", [
    ("kd", {}), ("rkl", {}), ("jsd", {}), ("akl", {}), ("kd", {"temperature": 2.0}), ("kd", {"kd_ratio": 0.5}),
])
def test_align_with_identical_tokenizers_equals_the_ordinary_loss(small_tokenizer, name, fields):
    batch = _identical_batch(small_tokenizer, "align")
    assert int(batch["xtok_num_spans"]) == 0  # every span is one token on each side
    method = _method(name, **fields)
    width = len(small_tokenizer)
    teacher = torch.randn(*batch["input_ids"].shape, width, dtype=torch.float64) * 3
    student_a = (torch.randn(*batch["input_ids"].shape, width, dtype=torch.float64) * 3).requires_grad_(True)
    student_b = student_a.detach().clone().requires_grad_(True)
    cross = CrossTokenizerLoss(method, SharedVocabulary.build(small_tokenizer, small_tokenizer, width, width))(student_a, teacher, batch)
    plain = DistillationLoss(method, None)(student_b, teacher, batch["labels"])
    assert int(next_token_targets(batch["labels"])[1].sum()) == batch["xtok_student_rows"].numel()
    # Equal, not merely close: the same divergence runs on the same rows.
    assert torch.equal(cross.kd, plain.kd) and torch.equal(cross.loss, plain.loss) and torch.equal(cross.ce, plain.ce)
    cross.loss.backward()
    plain.loss.backward()
    assert torch.equal(student_a.grad, student_b.grad)


def test_uld_with_identical_tokenizers_is_uld_on_the_ordinary_positions(small_tokenizer):
    batch = _identical_batch(small_tokenizer, "uld")
    width = len(small_tokenizer)
    teacher = torch.randn(*batch["input_ids"].shape, width, dtype=torch.float64)
    student = torch.randn(*batch["input_ids"].shape, width, dtype=torch.float64, requires_grad=True)
    kd = CrossTokenizerLoss(_method(mode="uld"), None).kd(teacher, student, batch)
    kd.backward()
    mask = next_token_targets(batch["labels"])[1]
    ref_value, ref_grad = uld_reference(teacher[mask].tolist(), student[mask].tolist())
    assert kd.item() == pytest.approx(ref_value, rel=1e-12)
    expected = torch.zeros_like(student)
    expected[mask] = torch.tensor(ref_grad, dtype=torch.float64)
    torch.testing.assert_close(student.grad, expected, rtol=1e-10, atol=1e-13)
