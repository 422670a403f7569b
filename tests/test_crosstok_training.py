"""Distillation across tokenizers in a run (okd.crosstok.training and its hooks in okd.training).

The toy tier's task (tests/engine_helpers.py: reverse a list of words) with a tiny teacher that uses
SmolLM2's tokenizer and a nano student that uses GPT-2's: the one-line refusals, the equality with the
ordinary run when the tokenizers are the same, and learning from the teacher alone (kd_ratio 1)."""

from __future__ import annotations

import math

import pytest
import torch
from crosstok_helpers import gpt2_tokenizer, save, smollm2_tokenizer
from engine_helpers import configs, make_examples, write_jsonl

from okd.config import DataConfig, DistillConfig, EvalConfig, MethodConfig, ModelConfig, TrainConfig, resolve_method
from okd.crosstok.training import check_cross_tokenizer_config
from okd.data import InstructionDataset
from okd.data.loading import read_examples
from okd.crosstok.data import CrossTokenizerDataset
from okd.training import Distiller, distill


def _check(method: MethodConfig, **model):
    config = DistillConfig(model=ModelConfig(teacher="t", **model), method=method)
    check_cross_tokenizer_config(config, resolve_method(method))


@pytest.mark.parametrize("method,model,message", [
    (MethodConfig(), {"teacher_tokenizer": "x"}, "model.teacher_tokenizer is set but method.cross_tokenizer is not"),
    (MethodConfig(name="okd", cross_tokenizer="align"), {}, "does not work with OKD's online module"),
    (MethodConfig(name="imitkd", cross_tokenizer="uld"), {}, "needs method.source=ground_truth"),
    (MethodConfig(cross_tokenizer="uld"), {"teacher_cache": "cache"}, "does not work with model.teacher_cache"),
    (MethodConfig(name="sft", cross_tokenizer="align"), {}, "needs method.kd_ratio > 0"),
])
def test_refusals_are_one_line(method, model, message):
    with pytest.raises(ValueError, match=message) as info:
        _check(method, **model)
    assert "\n" not in str(info.value)
    _check(MethodConfig(cross_tokenizer="align"))  # the plain case passes


# -------------------------------------------------------------------- identical tokenizers: the ordinary run

def test_identical_tokenizers_give_the_ordinary_step(tiny_setting, tmp_path):
    fields = configs(tiny_setting, "kd")
    fields["train"].loss_positions_only = False  # full logits, as the cross-tokenizer path takes them
    plain = Distiller(**fields, output_dir=str(tmp_path / "plain"))
    fields = configs(tiny_setting, "kd", cross_tokenizer="align")
    fields["model"].teacher_tokenizer = tiny_setting["tokenizer"]
    cross = Distiller(**fields, output_dir=str(tmp_path / "cross"))
    assert cross.loss_path.heads == "full" and cross.cross_loss is not None
    grads = []
    for distiller in (plain, cross):
        batch = distiller.source.next_batch()
        losses = distiller.forward_losses(batch, update_module=False)
        losses.loss.backward()
        grads.append((losses, [p.grad.clone() for p in distiller.student.parameters()]))
    (a, ga), (b, gb) = grads
    assert torch.equal(batch["input_ids"], batch["teacher_input_ids"])
    assert torch.equal(a.kd, b.kd) and torch.equal(a.ce, b.ce) and torch.equal(a.loss, b.loss)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


# -------------------------------------------------------------------- SmolLM2's tokenizer -> GPT-2's

@pytest.fixture(scope="module")
def cross_setting(tmp_path_factory):
    """Data, both tokenizers and a tiny teacher trained (CE, 60 steps) with SmolLM2's tokenizer."""
    root = tmp_path_factory.mktemp("cross_setting")
    train = write_jsonl(root / "train.jsonl", make_examples(256, seed=1))
    validation = write_jsonl(root / "validation.jsonl", make_examples(32, seed=2))
    teacher_tokenizer = save(smollm2_tokenizer(), root / "smollm2_tokenizer")
    student_tokenizer = save(gpt2_tokenizer(), root / "gpt2_tokenizer")
    distill(
        model=ModelConfig(tokenizer=teacher_tokenizer, student_size="tiny"),
        method=MethodConfig(name="sft"),
        data=DataConfig(train_file=str(train), validation_file=None, max_length=48),
        train=TrainConfig(max_steps=60, batch_size=16, learning_rate=3e-3, lr_scheduler="constant", log_every=20),
        output_dir=str(root / "teacher_run"), progress=False,
    )
    return {"train": str(train), "validation": str(validation), "teacher": str(root / "teacher_run" / "student"),
            "teacher_tokenizer": teacher_tokenizer, "student_tokenizer": student_tokenizer}


def _cross_config(setting, tmp_path, mode: str, steps: int, kd_ratio: float = 1.0, teacher_tokenizer=True,
                  size: str = "nano", learning_rate: float = 5e-3):
    return dict(
        model=ModelConfig(teacher=setting["teacher"], tokenizer=setting["student_tokenizer"], student_size=size,
                          teacher_tokenizer=setting["teacher_tokenizer"] if teacher_tokenizer else None),
        method=MethodConfig(name="kd", cross_tokenizer=mode, kd_ratio=kd_ratio),
        data=DataConfig(train_file=setting["train"], validation_file=setting["validation"], max_length=48),
        train=TrainConfig(max_steps=steps, batch_size=8, learning_rate=learning_rate, lr_scheduler="constant", log_every=steps),
        eval=EvalConfig(batch_size=32), output_dir=str(tmp_path / f"run_{mode}"), progress=False,
    )


def test_a_different_tokenizer_is_refused_with_a_hint(cross_setting, tmp_path):
    config = _cross_config(cross_setting, tmp_path, "align", 1)
    config["method"] = MethodConfig(name="kd")
    config["model"].teacher_tokenizer = None
    config["model"].student = None
    config["model"].tokenizer = None
    student = tmp_path / "student"
    torch.manual_seed(0)
    from okd.models import build_model

    tokenizer = gpt2_tokenizer()
    build_model("llama", "nano", vocab_size=len(tokenizer), max_positions=64).save_pretrained(student)
    tokenizer.save_pretrained(student)
    config["model"].student = str(student)
    with pytest.raises(ValueError, match=r"the student's tokenizer .* differs .*; to distil across tokenizers set method.cross_tokenizer to uld or align") as info:
        distill(**config)
    assert "\n" not in str(info.value)


@torch.no_grad()
def _held_out(distiller, setting) -> dict:
    """On the validation set: the student's CE (its own tokenization), the cross-tokenizer loss to the
    teacher, and, on the spans of one token on each side (``align``'s alignment whatever the mode), how
    often the teacher's top token among the shared ones is the student's label (``teacher_accuracy``)
    and how often the student's top token is the teacher's (``agreement``)."""
    from okd.crosstok.alignment import SharedVocabulary
    from okd.crosstok.training import load_teacher_tokenizer

    student = distiller.accelerator.unwrap_model(distiller.student).eval()
    tokenizer, teacher_tokenizer = distiller.tokenizer, load_teacher_tokenizer(distiller.config.model)
    base = InstructionDataset(read_examples(setting["validation"], tokenizer), tokenizer, 48)
    logits = teacher_logits = None
    results = {}
    for mode in (distiller.method.cross_tokenizer, "align"):
        data = CrossTokenizerDataset(base, tokenizer, teacher_tokenizer, mode)
        batch = distiller.collator([data[i] for i in range(len(data))])
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher_logits = distiller.teacher(batch["teacher_input_ids"], batch["teacher_attention_mask"])
        if mode == distiller.method.cross_tokenizer:
            losses = distiller.cross_loss(logits, teacher_logits, batch)
            results.update(ce=float(losses.ce), kd=float(losses.kd))
    vocab = SharedVocabulary.build(tokenizer, teacher_tokenizer, logits.shape[-1], teacher_logits.shape[-1])
    to_student = torch.full((teacher_logits.shape[-1],), -1, dtype=torch.long)
    to_student[vocab.teacher_ids] = vocab.student_ids
    t_rows = teacher_logits.reshape(-1, teacher_logits.shape[-1])[batch["xtok_teacher_rows"]]
    teacher_top = vocab.student_ids[t_rows[:, vocab.teacher_ids].argmax(-1)]  # as a student id
    student_top = logits.reshape(-1, logits.shape[-1])[batch["xtok_student_rows"]].argmax(-1)
    labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100).reshape(-1)[batch["xtok_student_rows"]]
    results.update(teacher_accuracy=float((teacher_top == labels).float().mean()),
                   agreement=float((student_top == teacher_top).float().mean()),
                   student_accuracy=float((student_top == labels).float().mean()),
                   # what a student that always predicts the most frequent label would score
                   majority=float(labels.unique(return_counts=True)[1].max() / labels.numel()))
    student.train()
    return results


def test_the_student_learns_from_the_teacher_alone_with_align(cross_setting, tmp_path):
    # kd_ratio 1: the student never sees a label, only the teacher's distributions through the alignment.
    distiller = Distiller(**_cross_config(cross_setting, tmp_path, "align", steps=60, size="tiny", learning_rate=3e-3))
    assert len(distiller.tokenizer) == 50257 and distiller.teacher.model.config.vocab_size == 49152
    before = _held_out(distiller, cross_setting)
    # Through the alignment and the shared vocabulary, the teacher's top token is mostly the student's label.
    assert before["teacher_accuracy"] > 0.4
    distiller.train()
    after = _held_out(distiller, cross_setting)
    print("align", before, after)
    assert after["kd"] < 0.7 * before["kd"] and after["ce"] < before["ce"] - 3.0
    assert after["agreement"] > before["agreement"] + 0.3
    # Better than predicting the most frequent token everywhere: it learned which token, not only how often.
    assert after["student_accuracy"] > after["majority"] + 0.05


def test_the_student_learns_with_uld(cross_setting, tmp_path):
    # ULD compares sorted probabilities only, so it runs next to CE (kd_ratio 0.5), as in the paper.
    distiller = Distiller(**_cross_config(cross_setting, tmp_path, "uld", steps=30, kd_ratio=0.5))
    before = _held_out(distiller, cross_setting)
    distiller.train()
    after = _held_out(distiller, cross_setting)
    print("uld", before, after)
    assert math.isfinite(after["kd"]) and after["kd"] < 0.7 * before["kd"]
    assert after["ce"] < before["ce"] - 3.0
    assert after["agreement"] > before["agreement"] + 0.2


def test_resume_across_tokenizers_reproduces_the_uninterrupted_run(cross_setting, tmp_path):
    import shutil

    from safetensors.torch import load_file

    config = _cross_config(cross_setting, tmp_path, "align", steps=4)
    config["train"].checkpoint_every = 2
    distill(**config)  # checkpoint at step 2, student after step 4
    run = tmp_path / "run_align"
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "student")
    config["output_dir"] = str(resumed)
    distiller = Distiller(**config, resume=True)
    assert distiller.step == 2
    distiller.train()
    distiller.save()
    a, b = load_file(run / "student" / "model.safetensors"), load_file(resumed / "student" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_runs_across_tokenizers(cross_setting, tmp_path):
    config = _cross_config(cross_setting, tmp_path, "uld", steps=2, kd_ratio=0.5)
    config["train"].gradient_accumulation_steps = 2
    metrics = distill(**config).final_metrics
    assert metrics["step"] == 2 and math.isfinite(metrics["loss"]) and math.isfinite(metrics["kd"])
