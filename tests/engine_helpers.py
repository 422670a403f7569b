"""A tiny, fast distillation setting shared by the engine tests.

Task: copy a short list of words in reverse order. Vocabulary of a few hundred BPE tokens; the
teacher is a `tiny` Llama trained for a few dozen steps with cross-entropy (enough to make its
distribution peaked and different from a fresh student's), the student is `nano`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from okd.config import DataConfig, EvalConfig, MethodConfig, ModelConfig, OnlineModuleConfig, TrainConfig
from okd.minillm import MiniLLMConfig

WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()


def make_examples(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(2, 5))
        rows.append({"prompt": "Reverse: " + " ".join(words) + "\nAnswer:", "response": " " + " ".join(reversed(words))})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_setting(root: Path) -> dict:
    """Write data, tokenizer and a trained teacher under ``root``; return their paths."""
    from okd.models import train_tokenizer
    from okd.training import distill

    train = write_jsonl(root / "train.jsonl", make_examples(256, seed=1))
    validation = write_jsonl(root / "validation.jsonl", make_examples(32, seed=2))
    texts = [r["prompt"] + r["response"] for r in make_examples(256, seed=1)]
    tokenizer = train_tokenizer(texts, vocab_size=320)
    tokenizer.save_pretrained(str(root / "tokenizer"))
    distill(
        model=ModelConfig(tokenizer=str(root / "tokenizer"), student_size="tiny"),
        method=MethodConfig(name="sft"),
        data=DataConfig(train_file=str(train), validation_file=None, max_length=48),
        train=TrainConfig(max_steps=60, batch_size=16, learning_rate=3e-3, lr_scheduler="constant", log_every=20),
        output_dir=str(root / "teacher_run"),
        progress=False,
    )
    return {
        "train": str(train),
        "validation": str(validation),
        "tokenizer": str(root / "tokenizer"),
        "teacher": str(root / "teacher_run" / "student"),
    }


def configs(setting: dict, method: str = "kd", steps: int = 20, online: OnlineModuleConfig | None = None, **method_fields):
    """Keyword arguments for ``distill`` / ``Distiller`` in the tiny setting."""
    return dict(
        model=ModelConfig(teacher=setting["teacher"], tokenizer=setting["tokenizer"], student_size="nano"),
        method=MethodConfig(name=method, **method_fields),
        online=online or OnlineModuleConfig(),
        data=DataConfig(
            train_file=setting["train"], validation_file=setting["validation"], max_length=48, max_validation_examples=32
        ),
        train=TrainConfig(max_steps=steps, batch_size=8, learning_rate=3e-3, lr_scheduler="constant", log_every=1),
        eval=EvalConfig(batch_size=16),
        # MiniLLM (and source teacher_mixed): rounds of 2 batches, served twice (4 steps a round).
        minillm=MiniLLMConfig(num_rollouts=16, ppo_epochs=2),
        progress=False,
    )
