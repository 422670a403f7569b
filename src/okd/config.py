"""Typed configuration for `okd distill`: one dataclass per concern, and `DistillConfig` of them all.

A run is described by eight sections: model, method, online, data, train, eval, sampling and minillm (plus
`output_dir`, `overwrite`, `resume`, `progress`); `DistillConfig` holds them. Every field has a
docstring, which is also its `--help` text: the command line is generated from these classes by
jsonargparse, so `okd distill --config configs/demo.yaml --train.max_steps 50` loads the YAML file and
then overrides one field.

A *method* is three independent choices (see `MethodConfig`):
  where the training sequences come from (`source`, a name in the `okd.sources` registry), which
  divergence the student minimises (`divergence`, a name in `okd.divergences.DIVERGENCES`), and
  whether the teacher adapts (`online_teacher`, i.e. OKD).
Named presets (`METHOD_PRESETS`: sft, kd, rkl, jsd, tvd, skl, srkl, akl, okd, seqkd, imitkd, gkd,
distillm, minillm) fill those choices; any field set explicitly wins over the preset. MiniLLM adds a
fourth choice, the `objective` (its policy-gradient loss instead of the divergence).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from okd.divergences import DIVERGENCES
from okd.minillm import MiniLLMConfig
from okd.sources import SOURCES, source_names

# Both lists come from their registries: a new source or divergence needs no edit here.
SourceName = Literal[source_names()]  # type: ignore[valid-type]
DIVERGENCE_NAMES = tuple(DIVERGENCES)
OBJECTIVES = ("distillation", "minillm")


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


@dataclass
class MethodConfig:
    """What the student learns from. Empty fields take the value of the preset named by `name`."""

    name: str = "kd"
    """Preset: sft, kd, rkl, jsd, tvd, skl, srkl, akl, okd, seqkd, imitkd, gkd, distillm or minillm
    (see okd.config.METHOD_PRESETS)."""
    source: Optional[SourceName] = None
    """Where training sequences come from. ground_truth: the dataset's responses; teacher_generated:
    the teacher's responses to the training prompts, generated once and cached (SeqKD); on_policy:
    the student's own samples with probability `sampling.on_policy_ratio` per batch (GKD, ImitKD);
    adaptive_replay: DistiLLM's adaptive off-policy replay of student samples; teacher_mixed: MiniLLM's
    rollouts sampled from (1 - a) * student + a * teacher (the `minillm` section), reused for
    minillm.ppo_epochs passes (works with any divergence too)."""
    divergence: Optional[str] = None
    """Token-level divergence the student minimises: forward_kl, reverse_kl, jsd, tvd, skew_kl,
    skew_reverse_kl, adaptive_kl."""
    divergence_params: Optional[dict[str, float]] = None
    """Extra divergence parameters, e.g. {beta: 0.5} for jsd, {alpha: 0.1} for skew_kl, {mu: 0.5}
    for adaptive_kl."""
    kd_ratio: Optional[float] = None
    """Loss = (1 - kd_ratio) * CE(student, data) + kd_ratio * divergence. 0 is plain fine-tuning."""
    temperature: Optional[float] = None
    """Softmax temperature applied to both teacher and student logits inside the divergence."""
    online_teacher: Optional[bool] = None
    """OKD: train a small online module on the frozen teacher together with the student."""
    objective: Optional[Literal["distillation", "minillm"]] = None
    """distillation: the kd_ratio mix of CE and the divergence above (every preset but minillm);
    minillm: MiniLLM's policy gradient on sequence-level reverse KL (the `minillm` section; needs
    source teacher_mixed). The divergence is then only the validation metric."""
    cross_tokenizer: Optional[Literal["uld", "align"]] = None
    """Distil across tokenizers (okd.crosstok; ground-truth data): uld, the Universal Logit
    Distillation loss on positions aligned by index (the divergence is not used); align, the method's
    divergence on text spans aligned by character offsets. Empty: both models must share one tokenizer."""


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


def _preset(divergence: str = "forward_kl", kd_ratio: float = 1.0, online: bool = False, source: str = "ground_truth",
            objective: str = "distillation", **params):
    return {
        "objective": objective,
        "source": source,
        "divergence": divergence,
        "divergence_params": params,
        "kd_ratio": kd_ratio,
        "temperature": 1.0,
        "online_teacher": online,
    }


METHOD_PRESETS: dict[str, dict[str, Any]] = {
    # Plain fine-tuning on the data: cross-entropy only, no teacher.
    "sft": _preset(kd_ratio=0.0),
    # Word-level KD (Hinton et al.; Kim & Rush): forward KL on ground-truth sequences.
    "kd": _preset("forward_kl"),
    "rkl": _preset("reverse_kl"),
    # Generalized JSD as in GKD/TRL (beta 0.5), here on ground truth.
    "jsd": _preset("jsd", beta=0.5),
    "tvd": _preset("tvd"),
    # DistiLLM's skew divergences, alpha = 0.1.
    "skl": _preset("skew_kl", alpha=0.1),
    "srkl": _preset("skew_reverse_kl", alpha=0.1),
    "akl": _preset("adaptive_kl", mu=0.5),
    # Online KD: forward KL from a teacher whose online module adapts to the student.
    "okd": _preset("forward_kl", online=True),
    # Sequence-level KD (Kim & Rush): cross-entropy on the teacher's own responses.
    "seqkd": _preset(kd_ratio=0.0, source="teacher_generated"),
    # ImitKD (Lin et al.): forward KL on the student's own samples.
    "imitkd": _preset("forward_kl", source="on_policy"),
    # GKD (Agarwal et al.; TRL's defaults): generalized JSD, beta 0.5, on-policy half of the time
    # (sampling.on_policy_ratio = 0.5).
    "gkd": _preset("jsd", source="on_policy", beta=0.5),
    # DistiLLM (Ko et al.): skew reverse KL (alpha 0.1) with the adaptive off-policy replay.
    "distillm": _preset("skew_reverse_kl", source="adaptive_replay", alpha=0.1),
    # MiniLLM (Gu et al.): sequence-level reverse KL by policy gradient on teacher-mixed rollouts; its
    # settings are the `minillm` section (okd.minillm.MiniLLMConfig); reverse KL is the validation metric.
    "minillm": _preset("reverse_kl", source="teacher_mixed", objective="minillm"),
}

# Per-preset defaults of the sampling section (applied where the user left a field empty).
SAMPLING_PRESETS: dict[str, dict[str, float]] = {
    "imitkd": {"on_policy_ratio": 1.0, "temperature": 1.0},
    "gkd": {"on_policy_ratio": 0.5, "temperature": 0.9},
}


def resolve_method(method: MethodConfig) -> ResolvedMethod:
    """Fill the empty fields of `method` from its preset; check the result."""
    if method.name not in METHOD_PRESETS:
        raise ValueError(unknown_choice("method preset", method.name, METHOD_PRESETS))
    values = dict(METHOD_PRESETS[method.name])
    for f in dataclasses.fields(MethodConfig):
        value = getattr(method, f.name)
        if f.name != "name" and value is not None:
            values[f.name] = value
    if values["divergence"] not in DIVERGENCE_NAMES:
        raise ValueError(unknown_choice("divergence", values["divergence"], DIVERGENCE_NAMES))
    if values["source"] not in SOURCES:  # the live registry: a source registered later counts too
        raise ValueError(unknown_choice("method.source", values["source"], SOURCES))
    if not 0.0 <= values["kd_ratio"] <= 1.0:
        raise ValueError(f"method.kd_ratio must be in [0, 1], got {values['kd_ratio']}")
    if values["temperature"] <= 0:
        raise ValueError(f"method.temperature must be > 0, got {values['temperature']}")
    if values["objective"] not in OBJECTIVES:
        raise ValueError(unknown_choice("method.objective", values["objective"], OBJECTIVES))
    if values["objective"] == "minillm" and values["source"] != "teacher_mixed":
        raise ValueError(
            f"method.objective=minillm needs method.source=teacher_mixed (its rollouts), got {values['source']!r}"
        )
    if values["online_teacher"] and values["source"] == "teacher_mixed":
        raise ValueError("method.online_teacher is not supported with method.source=teacher_mixed (it samples from the frozen teacher)")
    return ResolvedMethod(name=method.name, **values)


@dataclass
class OnlineModuleConfig:
    """OKD's online module: the only trainable part of the teacher (used when online_teacher)."""

    kind: str = "adapter"
    """The module kind, a name in okd.online.ONLINE_MODULES. adapter: residual bottleneck on the
    teacher's final hidden state (no backward through the frozen teacher body). lora: LoRA (peft) on
    the attention and MLP projections of the top layers."""
    adapter_bottleneck: int = 64
    """Bottleneck width of the adapter."""
    lora_rank: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / rank)."""
    lora_top_layers: int = 2
    """LoRA goes on this many of the teacher's top transformer layers; 0 puts it on all of them."""
    lora_target_modules: Optional[list[str]] = None
    """Module names LoRA adapts. Default: peft's defaults for the architecture."""
    learning_rate: float = 5e-4
    """Peak learning rate of the online module's own optimizer (AdamW)."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Schedule of the module's learning rate over the student steps after `start_step`, horizon
    train.max_steps (okd.online.objective.module_lr_factor)."""
    warmup_steps: int = 0
    """Linear warm-up of the module's learning rate over this many student steps after `start_step`."""
    weight_decay: float = 0.0
    """Weight decay of the online module's optimizer."""
    update_every: int = 1
    """The module takes one optimizer step every this many student steps."""
    start_step: int = 0
    """Delayed start: no module update on the first `start_step` student steps (the student learns
    from the frozen teacher until then)."""
    ce_weight: float = 1.0
    """Weight of CE(teacher, data) in the module's loss: keeps the adapted teacher accurate."""
    student_weight: float = 1.0
    """Weight of D(student.detach() -> teacher) in the module's loss: moves the teacher toward
    what the student can represent."""
    divergence: str = "jsd"
    """D in the module's loss, with the detached student q as target and the adapted teacher p_phi
    as learner: jsd (the default) the generalized JSD (beta 0.5 unless `divergence_params` says
    otherwise), forward_kl KL(q || p_phi), reverse_kl KL(p_phi || q) (PromptKD), or any other name of
    okd.divergences; same: the method's divergence and parameters with the roles swapped (KL(q || p_phi)
    for the okd preset: the default until the design study, docs/results/okd_design.md, chose jsd,
    which keeps the adapted teacher nearest the frozen one and scored best on validation)."""
    divergence_params: Optional[dict[str, float]] = None
    """Parameters of `divergence` (not of same), e.g. {beta: 0.5} for jsd; empty: the divergence's own defaults."""
    anchor_weight: float = 0.0
    """Weight w of the anchor w * KL(p_0 || p_phi) in the module's loss, p_0 the frozen teacher:
    keeps the adapted teacher near the pretrained one. 0: no anchor. With kind=lora it costs a
    second teacher forward on update steps."""
    anchor_schedule: Literal["constant", "linear"] = "constant"
    """constant: w at every step; linear: w * (1 - step / train.max_steps), PromptKD's decay to 0."""
    teacher_mix: float = 0.0
    """What the student learns from: (1 - m) * p_phi + m * p_0 (mixed in probability space). 0: the
    adapted teacher alone; 1: the frozen teacher alone (the module then only trains). With kind=lora
    m > 0 costs a second teacher forward per step."""

    def __post_init__(self):
        from okd.online import ONLINE_MODULES  # the registry of module kinds (a new kind registers there)

        if self.kind not in ONLINE_MODULES:
            raise ValueError(unknown_choice("online.kind", self.kind, sorted(ONLINE_MODULES)))
        if self.update_every < 1:
            raise ValueError(f"online.update_every must be >= 1, got {self.update_every}")
        for name in ("ce_weight", "student_weight", "anchor_weight", "learning_rate", "start_step", "warmup_steps", "lora_top_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"online.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.teacher_mix <= 1.0:
            raise ValueError(f"online.teacher_mix must be in [0, 1], got {self.teacher_mix}")
        if self.divergence != "same" and self.divergence not in DIVERGENCE_NAMES:
            raise ValueError(unknown_choice("online.divergence", self.divergence, ("same", *DIVERGENCE_NAMES)))
        if self.divergence == "same" and self.divergence_params:
            raise ValueError("online.divergence_params is for a named online.divergence; same takes method.divergence_params")
        if self.lr_scheduler not in ("constant", "linear", "cosine"):
            raise ValueError(unknown_choice("online.lr_scheduler", self.lr_scheduler, ("constant", "linear", "cosine")))
        if self.anchor_schedule not in ("constant", "linear"):
            raise ValueError(unknown_choice("online.anchor_schedule", self.anchor_schedule, ("constant", "linear")))


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


def resolve_sampling(sampling: "SamplingConfig", method: ResolvedMethod) -> "SamplingConfig":
    """Fill the empty sampling fields from the method's preset, then from the defaults."""
    preset = SAMPLING_PRESETS.get(method.name, {})
    values = dataclasses.asdict(sampling)
    for name, default in (("temperature", 1.0), ("on_policy_ratio", 0.5)):
        if values[name] is None:
            values[name] = preset.get(name, default)
    if not 0.0 <= values["on_policy_ratio"] <= 1.0:
        raise ValueError(f"sampling.on_policy_ratio must be in [0, 1], got {values['on_policy_ratio']}")
    if values["temperature"] <= 0:
        raise ValueError(f"sampling.temperature must be > 0, got {values['temperature']}")
    ratio = values["replay_ratio"]
    if ratio not in ("decreasing", "increasing", "constant"):
        try:
            values["replay_ratio"] = float(ratio)
        except ValueError:
            raise ValueError(
                f"sampling.replay_ratio must be a number or decreasing/increasing/constant, got {ratio!r}"
            ) from None
    return SamplingConfig(**values)


@dataclass
class EvalConfig:
    """Held-out evaluation during training."""

    every: int = 0
    """Compute validation loss and divergence every this many steps (0: only at the end)."""
    batch_size: int = 16
    """Batch size for validation."""


# The sections of a run, in the order the saved run_config.yaml lists them.
SECTIONS = ("model", "method", "online", "data", "train", "eval", "sampling", "minillm")


@dataclass
class DistillConfig:
    """A whole distillation run: the eight sections, where its outputs go, and how to start.

    ``distill(**fields)``, ``Distiller(config)``, ``okd distill`` (whose options are these fields),
    the saved ``run_config.yaml`` and the resume check all use this one description.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    online: OnlineModuleConfig = field(default_factory=OnlineModuleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    minillm: MiniLLMConfig = field(default_factory=MiniLLMConfig)
    output_dir: str = "runs/distill"
    """Directory for the run's outputs."""
    overwrite: bool = False
    """Replace a previous run in output_dir."""
    resume: bool = False
    """Continue the run in output_dir from its latest complete checkpoint."""
    progress: bool = True
    """Show a progress bar."""

    def resolved(self) -> tuple[ResolvedMethod, SamplingConfig]:
        """The method and sampling sections with every empty field filled from the preset."""
        method = resolve_method(self.method)
        return method, resolve_sampling(self.sampling, method)

    def run_config(self, num_processes: int) -> dict:
        """What the run computes, as saved in ``run_config.yaml`` and checked on ``--resume``: every
        section with the method and sampling resolved; a section the method does not use (online
        without OKD, sampling with ground-truth data) is None, so changing it never blocks a resume."""
        method, sampling = self.resolved()
        used = {
            "online": method.online_teacher,
            "sampling": method.source != "ground_truth",
            "minillm": method.source == "teacher_mixed" or method.objective == "minillm",
        }
        values = {"method": method, "sampling": sampling}
        record = {
            name: dataclasses.asdict(values.get(name, getattr(self, name))) if used.get(name, True) else None
            for name in SECTIONS
        }
        record["num_processes"] = num_processes
        return record


# Keys of a saved run_config.yaml that record the run rather than configure it (checked on --resume).
RUN_RECORD_KEYS = ("num_processes", "sharding", "teacher_cache")


def replayable_run_config(record: dict) -> dict:
    """A saved ``run_config.yaml`` (``DistillConfig.run_config``) as a config ``okd distill --config``
    takes: without its record-only keys (``RUN_RECORD_KEYS``) and the sections the method did not use
    (saved as None)."""
    return {k: v for k, v in record.items() if k not in RUN_RECORD_KEYS and v is not None}
