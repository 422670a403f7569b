"""Before the first step: the models, the data, and the output directory of a run."""

from __future__ import annotations

import shutil
from pathlib import Path

from okd.config import DataConfig, ModelConfig, ResolvedMethod, TrainConfig

# What a run writes into its output directory.
RUN_OUTPUTS = (
    "metrics.jsonl", "run_config.yaml", "train_summary.json", "student", "student_adapter", "online_module", "checkpoints",
)


def tokenizer_source(model_cfg: ModelConfig, method: ResolvedMethod) -> str:
    """Where the tokenizer the data is tokenised with comes from."""
    cross = method.cross_tokenizer is not None  # okd.crosstok: the data is the student's tokenization
    source = model_cfg.tokenizer or (model_cfg.student if cross else None) or model_cfg.teacher or model_cfg.student
    if not source:
        raise ValueError("set model.teacher (or model.tokenizer / model.student)")
    return source


def load_run_tokenizer(model_cfg: ModelConfig, method: ResolvedMethod):
    """The run's tokenizer (cheap: loaded before the data, which is checked before any model loads)."""
    from okd.data import ensure_pad_token
    from okd.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_source(model_cfg, method))
    ensure_pad_token(tokenizer)
    return tokenizer


def load_models(model_cfg: ModelConfig, method: ResolvedMethod, train: TrainConfig, max_length: int, tokenizer=None):
    """Tokenizer (``tokenizer`` when already loaded), student and (when the method needs one) the
    teacher model, checked to agree."""
    from okd.models import (
        apply_student_lora,
        build_model,
        check_compatible,
        check_same_tokenizer,
        enable_gradient_checkpointing,
        load_model,
        saved_tokenizer,
    )

    from .cached import HeadOnlyTeacher, cache_store

    cross = method.cross_tokenizer is not None  # okd.crosstok: the data is the student's tokenization
    source_of_tokenizer = tokenizer_source(model_cfg, method)
    if tokenizer is None:
        tokenizer = load_run_tokenizer(model_cfg, method)

    teacher_model = None
    # A top-k teacher cache replaces the teacher (okd.training.cached): its weights are never loaded.
    if method.uses_teacher and not (model_cfg.teacher_cache and cache_store(model_cfg.teacher_cache) == "topk"):
        if not model_cfg.teacher:
            raise ValueError(f"method {method.name!r} needs a teacher: set model.teacher")
        teacher_dtype = model_cfg.teacher_dtype or model_cfg.dtype
        teacher_model = load_model(model_cfg.teacher, dtype=teacher_dtype, gguf_file=model_cfg.gguf_file)

    if model_cfg.student:
        student = load_model(model_cfg.student, dtype=model_cfg.dtype)
    else:
        student = build_model(
            model_cfg.student_architecture,
            model_cfg.student_size,
            vocab_size=len(tokenizer),
            max_positions=max_length,
            seed=train.seed,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    # The tokenizers saved with the teacher and the student (when they have one) must be the one
    # the data is tokenised with: distillation compares distributions token id by token id.
    for role, source in (("teacher", model_cfg.teacher if teacher_model is not None and not cross else None), ("student", model_cfg.student)):
        saved = saved_tokenizer(source) if source and source != source_of_tokenizer else None
        if saved is not None:
            try:
                check_same_tokenizer(
                    tokenizer, saved, f"the {role}'s tokenizer ({source}) differs from the one used for the data ({source_of_tokenizer})"
                )
            except ValueError as error:
                from okd.crosstok.training import CROSS_TOKENIZER_HINT

                raise ValueError(f"{error}; {CROSS_TOKENIZER_HINT}" if not cross else str(error)) from None
    if teacher_model is not None and not cross:
        check_compatible(teacher_model, student, tokenizer, tokenizer)
        if model_cfg.teacher_cache:  # a hidden-state cache: keep the output head, drop the body
            teacher_model = HeadOnlyTeacher(teacher_model)
    if train.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    if model_cfg.student_lora is not None:
        student = apply_student_lora(student, model_cfg.student_lora)
    return tokenizer, student, teacher_model


def load_datasets(data: DataConfig, tokenizer):
    """The training set and the validation set (None without ``data.validation_file``)."""
    from okd.data import InstructionDataset
    from okd.data.loading import read_examples

    def load_split(path, limit):
        examples = read_examples(path, tokenizer, fields=data.fields)
        return InstructionDataset(examples[:limit] if limit is not None else examples, tokenizer, data.max_length)

    train_set = load_split(data.train_file, data.max_train_examples)
    validation_set = load_split(data.validation_file, data.max_validation_examples) if data.validation_file else None
    return train_set, validation_set


def check_output_dir(output_dir: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to mix two runs in one directory unless asked to overwrite or resume (touches nothing)."""
    existing = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    if existing and not (overwrite or resume):
        raise FileExistsError(
            f"{output_dir} already holds a run ({existing[0]}); pass --overwrite to replace it "
            "or --resume to continue it"
        )


def clear_output_dir(output_dir: Path, overwrite: bool, resume: bool) -> None:
    """Called once the models and data have loaded: only then is a previous run replaced."""
    if overwrite and not resume:
        for name in RUN_OUTPUTS:
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
