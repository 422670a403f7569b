"""The sections of a run's configuration as plain dataclasses: fields, help text, range checks.

``okd.config`` assembles them into ``DistillConfig`` (and re-exports every name here). The modules
that read a section (the sources, the losses) import it from here, so it imports no registry of okd
but the divergences' (``okd.divergences``, which imports nothing from okd; ``DIVERGENCE_NAMES``). A
section that names another registry lives beside it or above it: `online` (``OnlineModuleConfig``) in
``okd.online.base``, with the registry of module kinds that ``online.kind`` names; `method`
(``MethodConfig``) in ``okd.methods``, above the sources.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from okd.divergences import DIVERGENCES

DIVERGENCE_NAMES = tuple(DIVERGENCES)  # from the registry: a new divergence needs no edit here


def closest(value: str, valid) -> str | None:
    """The entry of ``valid`` closest to a misspelled ``value`` (None if nothing is close)."""
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1)
    return close[0] if close else None


def unknown_choice(kind: str, value: str, valid) -> str:
    """One-line message for a name that is not among ``valid``, with a suggestion when one is close."""
    suggestion = closest(value, valid)
    hint = f"; did you mean {suggestion!r}?" if suggestion else ""
    return f"unknown {kind} {value!r}{hint} (valid: {', '.join(valid)})"


@dataclass
class LoraStudentConfig:
    """A LoRA student (peft): low-rank adapters on the student's linear layers, the rest frozen."""

    rank: int = 16
    """LoRA rank r."""
    alpha: float = 32.0
    """LoRA scaling numerator (scale = alpha / rank)."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: Union[str, list[str]] = "all-linear"
    """Module names (or name suffixes) to adapt, e.g. [q_proj, v_proj]; "all-linear": every linear
    layer but the output head (peft's shorthand)."""

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"model.student_lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.student_lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class ModelConfig:
    """Which teacher and student to load or build."""

    teacher: str = ""
    """Teacher: a local directory or a Hugging Face hub id (e.g. gpt2-xl)."""
    student: Optional[str] = None
    """Student initialisation: a local directory or hub id. Leave empty to build a new student of
    `student_size` from scratch with the teacher's tokenizer."""
    student_architecture: Literal["llama", "gpt2"] = "llama"
    """Architecture of a student built from scratch."""
    student_size: str = "small"
    """Size preset of a student built from scratch (see okd.models.MODEL_SIZES)."""
    tokenizer: Optional[str] = None
    """Tokenizer directory or hub id. Default: the teacher's."""
    gguf_file: Optional[str] = None
    """GGUF file name inside the teacher directory, for teachers shipped as GGUF."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision the models are loaded in. fp32 is fastest on CPUs; use bfloat16 on recent GPUs."""
    teacher_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    """Precision of the frozen teacher, set apart from the student's (e.g. a bfloat16 teacher beside
    a float32 student halves the teacher's memory). Empty: `dtype`. The divergences upcast each
    chunk to float32, so mixed dtypes give the same losses up to the teacher's rounding."""
    student_lora: Optional[LoraStudentConfig] = None
    """Train the student as a LoRA adapter (peft) instead of in full; only the adapter's parameters
    train. The run saves the adapter (student_adapter/) and the merged student (student/). Empty:
    full fine-tuning."""
    teacher_cache: Optional[str] = None
    """Train from cached teacher outputs (a directory written by `okd teacher cache`) instead of running
    the teacher. store=topk: the teacher is never loaded; store=hidden: only its output head (OKD with
    online.kind=adapter). Ground-truth data only; validation then logs validation_ce only."""
    teacher_tokenizer: Optional[str] = None
    """The teacher's own tokenizer (directory or hub id) when it differs from the student's; needs
    method.cross_tokenizer. Empty: the tokenizer saved with the teacher. The data is then tokenised by
    model.tokenizer or the student's (okd.crosstok)."""


@dataclass(frozen=True)
class ResolvedMethod:
    """A method with every choice filled in (what the training loop reads)."""

    name: str
    source: str
    divergence: str
    divergence_params: dict[str, float]
    kd_ratio: float
    temperature: float
    online_teacher: bool
    objective: str = "distillation"
    cross_tokenizer: Optional[str] = None

    @property
    def uses_teacher(self) -> bool:
        return self.needs_teacher_logits or self.source in ("teacher_generated", "teacher_mixed")

    @property
    def needs_teacher_logits(self) -> bool:
        """Whether each step runs the teacher (its logits enter the student's loss)."""
        return self.kd_ratio > 0 or self.online_teacher or self.objective == "minillm"



@dataclass
class DataConfig:
    """Training and validation data: records with prompt/response, instruction/input/output or messages
    fields, from JSONL, JSON, Parquet or Arrow files, a ``save_to_disk`` folder or the hub (see
    ``okd.data.loading``)."""

    train_file: str = "runs/data/builtin/train.jsonl"
    """Training data: a .jsonl, .json, .parquet or .arrow file, a save_to_disk folder (FOLDER@SPLIT for a
    DatasetDict), or `hub:NAME[:CONFIG][@SPLIT]` (read from the local cache when offline). The default
    is the built-in data set (`okd data build`)."""
    validation_file: Optional[str] = "runs/data/builtin/validation.jsonl"
    """Validation data for held-out loss and divergence (same kinds as train_file); empty to skip."""
    fields: Optional[Union[str, dict[str, str]]] = None
    """How the data set's columns map to okd's fields (prompt, response, instruction, input, output,
    messages), e.g. {"prompt": "question", "response": "answer"}; or a preset: "dolly"
    (instruction/context/response) or "prompt_output" (DistiLLM's prompt/output). Empty: the columns
    already carry okd's names."""
    max_length: int = 256
    """Maximum tokens per example (prompt + response). Prompts are cut from the left first."""
    max_train_examples: Optional[int] = None
    """Use only the first N training examples (quick experiments)."""
    max_validation_examples: Optional[int] = 256
    """Use only the first N validation examples."""


    def __post_init__(self):
        for name in ("max_train_examples", "max_validation_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"data.{name}={value} leaves no examples; use >= 1, or leave it empty for all")
        if self.max_length < 2:
            raise ValueError(f"data.max_length must be >= 2, got {self.max_length}")


@dataclass
class TrainConfig:
    """Optimisation of the student."""

    max_steps: int = 1000
    """Number of student optimizer steps."""
    batch_size: int = 8
    """Examples per micro-batch on each process. The global batch of one optimizer step is
    batch_size * gradient_accumulation_steps * processes."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step on each process. The step's loss is the mean over the loss
    tokens of all its micro-batches on all processes, so k micro-batches of b give the same update
    as one batch of k * b."""
    gradient_checkpointing: bool = False
    """Recompute the student's activations in the backward instead of keeping them (less memory,
    about a third more compute). Generation (on-policy sources) still uses the KV cache."""
    learning_rate: float = 5e-4
    """Peak learning rate of the student's AdamW."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps before the schedule."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    """Learning-rate schedule after warm-up."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the student's gradient norm to this value; empty for no clipping."""
    divergence_chunk_tokens: int = 1024
    """Tokens per chunk when computing divergences (bounds the memory of vocab-sized temporaries)."""
    loss_positions_only: bool = True
    """Run both output heads only where a loss is taken (positions whose next-token target is not -100):
    the base models' final hidden states are gathered there and the heads applied to those. Same losses
    and gradients; much less head compute on instruction data. Models whose logits are not
    head(hidden) (non-HF, soft-capped or scaled logits) take full logits (okd.heads)."""
    fused_loss: bool = True
    """Compute the loss from hidden states and head weights chunk by chunk (okd.fused): no [tokens, vocab]
    logits tensor ever exists. Used when loss_positions_only is on and the run fits it: Hugging Face
    heads without logit post-processing, and no online module or the adapter without anchor_weight /
    teacher_mix; otherwise the dense path runs (one info line says why). Per micro-batch, only where
    the logits would be large: see fused_min_logits_mib."""
    fused_min_logits_mib: float = 256.0
    """The fused loss takes a micro-batch only when its loss positions' logits (N positions x the larger
    vocabulary, float32) would exceed this many MiB; a smaller one takes the dense loss on those positions,
    which is faster there (one head matmul per model instead of a chunk loop that reads each head weight
    several times) and whose memory is small at that size. Same losses either way. 0: always fused."""
    fused_chunk_tokens: Optional[int] = None
    """Loss tokens per chunk of the fused loss; empty: the largest chunk within 0.15x of one fp32
    [8192, vocab] logits tensor (okd.fused.budget_chunk_tokens: 21 for hidden size 576)."""
    seed: int = 0
    """Seed for initialisation, data order and sampling."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast the forward passes to bf16 or fp16 (Accelerate) while the weights and the optimizer
    stay in model.dtype; for GPUs (bf16 needs Ampere or newer). fp16 adds loss scaling. On a CPU keep "no"."""
    log_every: int = 10
    """Write a metrics line every this many steps."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every this many steps (0: none; an interrupted run (SIGINT or
    SIGTERM) still saves one before it exits)."""
    keep_checkpoints: int = 2
    """How many periodic checkpoints to keep."""
    skip_nonfinite_steps: bool = False
    """On a NaN/inf loss or gradient, skip that step (counted in metrics as nonfinite_steps_skipped)
    instead of stopping the run."""
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    """Extra experiment trackers (metrics.jsonl is always written)."""

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.fused_min_logits_mib) and self.fused_min_logits_mib >= 0):
            raise ValueError(f"train.fused_min_logits_mib must be a finite number >= 0, got {self.fused_min_logits_mib}")


@dataclass
class SamplingConfig:
    """How generated training sequences are made (sources teacher_generated, on_policy, adaptive_replay).

    Empty fields take the preset's value (gkd: on-policy ratio 0.5 at temperature 0.9, as TRL's
    GKDConfig; imitkd: ratio 1.0 at temperature 1.0), else the default named in the field's help.
    """

    max_new_tokens: Optional[int] = None
    """Tokens generated per response. Empty: fill data.max_length after the batch's longest prompt."""
    temperature: Optional[float] = None
    """Sampling temperature (empty: the preset's, else 1.0)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (top-k is off)."""
    on_policy_ratio: Optional[float] = None
    """on_policy: probability that a batch is the student's own samples (GKD's lambda; empty: the
    preset's, else 0.5). 0 is ground truth only, 1 never uses ground truth."""
    teacher_generations_file: Optional[str] = None
    """teacher_generated: JSONL cache of the teacher's responses, reused while teacher, prompts and
    settings are unchanged. Empty: <output_dir>/teacher_generations.jsonl."""
    generation_batch_size: int = 32
    """teacher_generated: prompts per generate call when building the cache."""
    replay_capacity: int = 1000
    """adaptive_replay: replay buffer capacity in (prompt, response) pairs (DistiLLM: 1000)."""
    replay_ratio: str = "decreasing"
    """adaptive_replay: probability of replaying from the buffer instead of sampling afresh: a number
    in [0, 1], or DistiLLM's schedules decreasing (default), increasing, constant."""
    init_threshold: float = 0.0
    """adaptive_replay: initial probability of a student-generated batch (DistiLLM: 0.0)."""
    threshold_step: float = 0.1
    """adaptive_replay: rise of that probability when the validation loss rises (DistiLLM: 0.1)."""
    max_threshold: float = 1.0
    """adaptive_replay: cap of that probability."""
    loss_eps: float = 0.1
    """adaptive_replay: validation-loss rise that counts (DistiLLM: 0.1). Needs eval.every > 0."""


@dataclass
class EvalConfig:
    """Held-out evaluation during training."""

    every: int = 0
    """Compute validation loss and divergence every this many steps (0: only at the end)."""
    batch_size: int = 16
    """Batch size for validation."""
