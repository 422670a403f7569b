"""What several benchmarks share: the built-in data and a BPE tokenizer, built once and cached."""

from __future__ import annotations

from pathlib import Path

CACHE = Path(__file__).resolve().parent / "results" / ".cache"


def builtin_data_and_tokenizer(vocab_size: int):
    """``(split paths, tokenizer directory, tokenizer)``, built under ``benchmarks/results/.cache``
    on first use and reused afterwards (the data is deterministic, the tokenizer keyed by size)."""
    from okd.data.builtin import build_builtin_dataset, builtin_texts
    from okd.models import load_tokenizer, train_tokenizer

    data_dir = CACHE / "data"
    paths = build_builtin_dataset(data_dir)
    tokenizer_dir = CACHE / f"tokenizer-{vocab_size}"
    if not (tokenizer_dir / "tokenizer.json").exists():
        train_tokenizer(builtin_texts(data_dir), vocab_size=vocab_size).save_pretrained(str(tokenizer_dir))
    return paths, tokenizer_dir, load_tokenizer(str(tokenizer_dir))
