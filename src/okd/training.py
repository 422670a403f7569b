"""The training loop: one readable loop for every method.

A method is three independent choices, and the loop shows each in one place:

1. the *source* of the sequences (``okd.data.sources``): ``batch = source.next_batch()``;
2. the *divergence* the student minimises: ``loss = (1 - kd_ratio) * CE + kd_ratio * D(teacher, student)``;
3. whether the *teacher adapts* (OKD): on update steps the online module takes one optimizer step on
   ``ce_weight * CE(teacher, data) + student_weight * D(student.detach() -> teacher)`` (+ an optional
   anchor to the frozen teacher; the options live in ``okd.online.objective``), reusing the teacher
   forward of the step (no second teacher forward, except LoRA's frozen pass for the anchor/mix).

The student always learns from the current teacher, detached; the module always learns from the
current student, detached. So the two losses touch disjoint parameters and one ``backward()`` serves
both.

Runs on Hugging Face Accelerate: ``accelerate launch --multi_gpu --num_processes N -m okd.cli distill ...`` gives
DDP without code changes. The online module is not wrapped by DDP: its gradients are averaged across
processes explicitly before its optimizer step, so it stays identical on every rank.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from okd.config import (
    DataConfig,
    EvalConfig,
    MethodConfig,
    ModelConfig,
    OnlineModuleConfig,
    ResolvedMethod,
    SamplingConfig,
    TrainConfig,
    resolve_method,
    resolve_sampling,
)
from okd.divergences import get_divergence
from okd.online.objective import AdaptedTeacherMetrics, ModuleSchedule, OnlineObjective, module_updates_at
from okd.teacher import Teacher

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------
# Losses of one step
# ----------------------------------------------------------------------------------------------
def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align labels with logits: the logits at position t predict the token at t + 1.

    Returns ``(targets, mask)``, both ``[batch, seq]``: ``targets[:, t] = labels[:, t + 1]`` (last
    position ignored) and ``mask = targets != -100``. Shifting the small label tensor instead of the
    ``[batch, seq, vocab]`` logits avoids a copy of the logits.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return targets, targets != IGNORE_INDEX


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy. logits ``[batch, seq, vocab]``, targets ``[batch, seq]`` (-100 ignored)."""
    if not (targets != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


@dataclass
class StepLosses:
    """The loss terms of one step (tensors with graphs; ``as_floats`` for logging)."""

    loss: torch.Tensor  # what the student's gradient comes from
    ce: torch.Tensor
    kd: torch.Tensor | None = None
    module_loss: torch.Tensor | None = None  # the online module's loss (OKD update steps only)
    module_ce: torch.Tensor | None = None
    module_divergence: torch.Tensor | None = None
    module_kl_from_frozen: torch.Tensor | None = None  # KL(p_0 || p_phi), when the frozen logits were at hand
    module_accuracy: torch.Tensor | None = None  # top-1 accuracy of the adapted teacher on the batch
    skipped: bool = False  # set when a non-finite step was skipped

    def as_floats(self) -> dict[str, float]:
        return {
            f.name: float(getattr(self, f.name).detach())
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }


class DistillationLoss:
    """Computes the student's loss and, on update steps, the online module's loss.

    Args:
        method: the resolved method (divergence, kd_ratio, temperature).
        online: the online-module config (weights of its two loss terms), or None.
        chunk_tokens: chunk size of the divergence computation.
    """

    def __init__(self, method: ResolvedMethod, online: OnlineModuleConfig | None, chunk_tokens: int = 1024, total_steps: int = 1):
        self.method = method
        self.online = online
        self.divergence = get_divergence(method.divergence, **method.divergence_params)
        self.chunk_tokens = chunk_tokens
        # The module's loss and the student's target distribution (okd.online.objective).
        self.objective = None if online is None else OnlineObjective(
            online, method.divergence, method.divergence_params, method.temperature, chunk_tokens, total_steps
        )

    def divergence_between(self, target_logits, learner_logits, mask):
        return self.divergence(
            target_logits,
            learner_logits,
            mask,
            temperature=self.method.temperature,
            chunk_tokens=self.chunk_tokens,
        )

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor,
        update_module: bool = False,
        frozen_logits: torch.Tensor | None = None,
        step: int = 0,
    ) -> StepLosses:
        targets, mask = next_token_targets(labels)
        ratio = self.method.kd_ratio
        # With kd_ratio = 1 the student's CE is only logged: compute it without a graph.
        with torch.set_grad_enabled(torch.is_grad_enabled() and (ratio < 1 or teacher_logits is None)):
            ce = cross_entropy(student_logits, targets)
        if teacher_logits is None or ratio == 0:
            losses = StepLosses(loss=ce, ce=ce)
        else:
            target = teacher_logits if self.objective is None else self.objective.student_target(teacher_logits, frozen_logits)
            kd = self.divergence_between(target.detach(), student_logits, mask)
            loss = kd if ratio == 1 else (1 - ratio) * ce + ratio * kd
            losses = StepLosses(loss=loss, ce=ce, kd=kd)
        if update_module:
            # The module moves the teacher toward the (detached) student, while CE on the data (and
            # the optional anchor to the frozen teacher) keeps the adapted teacher accurate.
            module = self.objective(student_logits, teacher_logits, frozen_logits, targets, step)
            losses.module_loss, losses.module_ce, losses.module_divergence = module.loss, module.ce, module.divergence
            losses.module_kl_from_frozen, losses.module_accuracy = module.anchor, module.accuracy
        return losses


# ----------------------------------------------------------------------------------------------
# Setup helpers
# ----------------------------------------------------------------------------------------------
def _load_models(model_cfg: ModelConfig, method: ResolvedMethod, train: TrainConfig, max_length: int):
    """Load tokenizer, student and (when the method needs one) the teacher."""
    from okd.data import ensure_pad_token
    from okd.models import build_model, check_compatible, load_model, load_tokenizer, tokenizer_differences

    tokenizer_source = model_cfg.tokenizer or model_cfg.teacher or model_cfg.student
    if not tokenizer_source:
        raise ValueError("set model.teacher (or model.tokenizer / model.student)")
    tokenizer = load_tokenizer(tokenizer_source)
    ensure_pad_token(tokenizer)

    teacher_model = None
    if method.uses_teacher:
        if not model_cfg.teacher:
            raise ValueError(f"method {method.name!r} needs a teacher: set model.teacher")
        teacher_model = load_model(model_cfg.teacher, dtype=model_cfg.dtype, gguf_file=model_cfg.gguf_file)

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
    for role, source in (("teacher", model_cfg.teacher if teacher_model is not None else None), ("student", model_cfg.student)):
        saved = _saved_tokenizer(source) if source and source != tokenizer_source else None
        problems = tokenizer_differences(tokenizer, saved) if saved is not None else []
        if problems:
            raise ValueError(
                f"the {role}'s tokenizer ({source}) differs from the one used for the data "
                f"({tokenizer_source}): " + "; ".join(problems)
            )
    if teacher_model is not None:
        check_compatible(teacher_model, student, tokenizer, tokenizer)
    return tokenizer, student, teacher_model


def _saved_tokenizer(source: str):
    """The tokenizer stored with a model, or None if there is none to be found."""
    from okd.data import ensure_pad_token
    from okd.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(source)
    except (FileNotFoundError, OSError, ValueError):
        return None
    ensure_pad_token(tokenizer)
    return tokenizer


def _learning_rate_schedule(optimizer, train: TrainConfig):
    from transformers import get_scheduler

    return get_scheduler(
        "constant_with_warmup" if train.lr_scheduler == "constant" else train.lr_scheduler,
        optimizer,
        num_warmup_steps=train.warmup_steps,
        num_training_steps=train.max_steps,
    )


RUN_OUTPUTS = ("metrics.jsonl", "run_config.yaml", "train_summary.json", "student", "online_module", "checkpoints")


def _check_output_dir(output_dir: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to mix two runs in one directory unless asked to overwrite or resume (touches nothing)."""
    existing = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    if existing and not (overwrite or resume):
        raise FileExistsError(
            f"{output_dir} already holds a run ({existing[0]}); pass --overwrite to replace it "
            "or --resume to continue it"
        )


def _clear_output_dir(output_dir: Path, overwrite: bool, resume: bool) -> None:
    """Called once the models and data have loaded: only then is a previous run replaced."""
    if overwrite and not resume:
        for name in RUN_OUTPUTS:
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)


CHECKPOINT_COMPLETE = "checkpoint_complete.json"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``output_dir/checkpoints`` (None if there is none).

    A checkpoint counts only if its completion marker exists: it is written last, after every
    other file, inside a directory that is renamed into place in one step. Incomplete ones are
    skipped with a warning.
    """
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    complete = []
    for path in sorted(root.glob("step-*")):
        if (path / CHECKPOINT_COMPLETE).exists():
            complete.append(path)
        else:
            warnings.warn(f"ignoring incomplete checkpoint {path}")
    return complete[-1] if complete else None


# Settings a resumed run may change: they do not alter the training trajectory.
RESUMABLE_CHANGES = {
    "train.max_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.report_to",
    "eval.batch_size",
}


def _comparable(run_config: dict) -> dict:
    """``run_config`` as plain JSON values (tuples become lists), flattened to ``section.field`` keys."""
    flat = {}
    for section, values in json.loads(json.dumps(run_config, default=str)).items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[section] = values
    return flat


def _check_same_run(saved: dict, current: dict, checkpoint: Path) -> None:
    """Refuse to resume a checkpoint with settings that would change what the run computes."""
    differing = sorted(k for k in set(saved) | set(current) if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if differing:
        shown = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in differing[:3])
        more = f" (and {len(differing) - 3} more)" if len(differing) > 3 else ""
        raise ValueError(
            f"cannot resume from {checkpoint}: the settings differ ({shown}{more}); "
            "resume with the run's own settings, or start a new run with --overwrite or another --output-dir"
        )


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class RunResult:
    output_dir: Path
    steps: int
    train_seconds: float
    final_metrics: dict
    interrupted: bool = False  # stopped by a signal: a checkpoint was saved, no final student


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
class Distiller:
    """One distillation run: ``setup`` in ``__init__``, then ``train()``, then ``save()``.

    ``distill(...)`` below does all three; tests and notebooks can build a ``Distiller`` to inspect
    the student, the teacher and its online module between the steps.
    """

    def __init__(
        self,
        model: ModelConfig,
        method: MethodConfig = MethodConfig(),
        online: OnlineModuleConfig = OnlineModuleConfig(),
        data: DataConfig = DataConfig(),
        train: TrainConfig = TrainConfig(),
        eval: EvalConfig = EvalConfig(),
        output_dir: str = "runs/distill",
        overwrite: bool = False,
        progress: bool = True,
        resume: bool = False,
        sampling: SamplingConfig = SamplingConfig(),
    ):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from okd.data import Collator, InstructionDataset, read_jsonl

        self.method = resolve_method(method)
        self.run_config_model = dataclasses.asdict(model)
        self.online_config = online if self.method.online_teacher else None
        self.train_config, self.eval_config, self.progress = train, eval, progress
        self.output = Path(output_dir)
        self.accelerator = accelerator = Accelerator(
            # Without an accelerator device, say so: Accelerate then runs several processes with gloo
            # (`accelerate launch --multi_gpu --num_processes 2` on a CPU machine) instead of one.
            cpu=not _has_accelerator_device(),
            mixed_precision=train.mixed_precision,
            log_with=list(train.report_to) or None,
            project_dir=str(self.output),
        )
        _check_output_dir(self.output, overwrite, resume)
        set_seed(train.seed)

        self.tokenizer, student, teacher_model = _load_models(model, self.method, train, data.max_length)
        self.teacher: Teacher | None = None
        if teacher_model is not None and (self.method.kd_ratio > 0 or self.method.online_teacher):
            self.teacher = Teacher(teacher_model, self.online_config, seed=train.seed).to(accelerator.device)

        def load_split(path, limit):
            examples = read_jsonl(path, tokenizer=self.tokenizer)
            return InstructionDataset(examples[:limit] if limit is not None else examples, self.tokenizer, data.max_length)

        self.train_set = load_split(data.train_file, data.max_train_examples)
        self.validation_set = (
            load_split(data.validation_file, data.max_validation_examples) if data.validation_file else None
        )
        self.collator = Collator(pad_token_id=self.tokenizer.pad_token_id)
        self.sampling = resolve_sampling(sampling, self.method)
        self.source = self._make_source(student, teacher_model, data.max_length)
        del teacher_model  # SeqKD needed it only to build its cache

        # Everything the run needs has loaded and been checked: only now touch the output directory.
        if accelerator.is_main_process:
            _clear_output_dir(self.output, overwrite, resume)
        accelerator.wait_for_everyone()

        optimizer = torch.optim.AdamW(student.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay)
        scheduler = _learning_rate_schedule(optimizer, train)
        self.student, self.optimizer, self.scheduler = accelerator.prepare(student, optimizer, scheduler)
        self.module_optimizer = None
        if self.online_config is not None:
            self.module_optimizer = torch.optim.AdamW(
                self.teacher.module_parameters(), lr=online.learning_rate, weight_decay=online.weight_decay
            )
            self.module_schedule = ModuleSchedule(online, train.max_steps)
        self.loss_fn = DistillationLoss(self.method, self.online_config, train.divergence_chunk_tokens, train.max_steps)
        self.step = 0
        self.train_seconds = 0.0
        self.final_metrics: dict = {}
        self.resumed_from: Path | None = None
        self.nonfinite_steps_skipped = 0
        self.interrupted = False
        self._local_tokens = self._global_tokens = torch.tensor(1.0)  # set by every training step
        self.run_config = {
            "model": dataclasses.asdict(model),
            "method": dataclasses.asdict(self.method),
            "online": dataclasses.asdict(online) if self.online_config else None,
            "data": dataclasses.asdict(data),
            "train": dataclasses.asdict(train),
            "eval": dataclasses.asdict(eval),
            "sampling": dataclasses.asdict(self.sampling) if self.method.source != "ground_truth" else None,
            "num_processes": accelerator.num_processes,
        }
        if resume:
            checkpoint = latest_checkpoint(self.output)
            if checkpoint is not None:
                self.load_checkpoint(checkpoint)
            elif accelerator.is_main_process and (self.output / "metrics.jsonl").exists():
                (self.output / "metrics.jsonl").unlink()  # nothing to resume from: start over

    def _make_source(self, student, teacher_model, max_length: int):
        """The method's sequence source; every kind walks the data in the same seeded order."""
        from okd.data.sources import GroundTruthSource

        accelerator, train, sampling = self.accelerator, self.train_config, self.sampling
        ground_truth = GroundTruthSource(
            self.train_set,
            self.collator,
            train.batch_size,
            seed=train.seed,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )
        kind = self.method.source
        if kind == "ground_truth":
            return ground_truth
        from okd.data import generated

        tokenizer = self.tokenizer
        common = dict(
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_length=max_length,
            seed=train.seed,
        )
        if kind == "teacher_generated":
            cache = sampling.teacher_generations_file or str(self.output / "teacher_generations.jsonl")
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            # The main process generates and caches; the others then read the cache.
            with accelerator.main_process_first():
                return generated.TeacherGeneratedSource(
                    self.train_set,
                    teacher_model.to(accelerator.device),
                    cache_path=cache,
                    batch_size=train.batch_size,
                    rank=accelerator.process_index,
                    world_size=accelerator.num_processes,
                    teacher_id=str(self.run_config_model.get("teacher")),
                    generation_seed=train.seed,
                    generation_batch_size=sampling.generation_batch_size,
                    progress=self.progress and accelerator.is_main_process,
                    **{k: v for k, v in common.items() if k != "seed"},
                    seed=train.seed,
                )
        if kind == "on_policy":
            return generated.OnPolicySource(ground_truth, student, lambda_=sampling.on_policy_ratio, **common)
        if kind == "adaptive_replay":
            return generated.AdaptiveReplaySource(
                ground_truth,
                student,
                init_threshold=sampling.init_threshold,
                threshold_step=sampling.threshold_step,
                max_threshold=sampling.max_threshold,
                loss_eps=sampling.loss_eps,
                capacity=sampling.replay_capacity,
                replay_ratio=sampling.replay_ratio,
                total_steps=train.max_steps,
                **common,
            )
        raise ValueError(f"unknown method.source {kind!r}")

    # -- one step -----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], update_module: bool) -> StepLosses:
        """Forward student and teacher once, backward once, step the optimizers.

        A NaN/inf loss term or gradient stops the run with an error naming the step, the term and the
        method (checkpoints already written stay as they are), or, with ``train.skip_nonfinite_steps``,
        skips the update and counts it.
        """
        accelerator = self.accelerator
        with accelerator.autocast():
            student_logits = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            teacher_logits = frozen_logits = None
            if self.teacher is not None:
                # The frozen teacher's logits: for the anchor / teacher_mix, and (free for the adapter)
                # for the module's KL-from-frozen diagnostic on update steps.
                need_frozen = self.loss_fn.objective is not None and self.loss_fn.objective.needs_frozen(update_module)
                teacher_logits, frozen_logits = self.teacher.adapted_and_frozen(
                    batch["input_ids"], batch["attention_mask"], track_module_grad=update_module, need_frozen=need_frozen
                )
            losses = self.loss_fn(
                student_logits, teacher_logits, batch["labels"], update_module=update_module,
                frozen_logits=frozen_logits, step=self.step,
            )
        # One backward: the student's loss sees the teacher detached and the module's loss sees the
        # student detached, so each gradient lands only where it belongs.
        total = losses.loss if losses.module_loss is None else losses.loss + losses.module_loss
        accelerator.backward(total * self._token_share(batch["labels"]))
        max_norm = self.train_config.max_grad_norm
        grad_norm = accelerator.clip_grad_norm_(self.student.parameters(), max_norm if max_norm is not None else math.inf)
        if update_module:
            _average_gradients(self.teacher.module_parameters(), accelerator)
            grad_norm = grad_norm + torch.nn.utils.clip_grad_norm_(self.teacher.module_parameters(), math.inf)
        # One host sync per step checks every loss term and the gradient norm together. A NaN loss
        # on one process reaches every process's gradients through DDP's all-reduce, and the verdict
        # is agreed on anyway, so all processes skip or stop on the same step.
        terms = [getattr(losses, f.name) for f in dataclasses.fields(losses)]
        values = torch.stack([t.detach().float().reshape(()) for t in terms if isinstance(t, torch.Tensor)])
        finite = bool(torch.isfinite(values).all() & torch.isfinite(grad_norm))
        bad_term = self._agree_nonfinite(None if finite else (_first_nonfinite(losses) or "gradient"))
        if bad_term is not None:
            return self._nonfinite(losses, bad_term)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if update_module:
            self.module_schedule.apply(self.module_optimizer, self.step)
            self.module_optimizer.step()
            self.module_optimizer.zero_grad(set_to_none=True)
        return losses

    def _token_share(self, labels: torch.Tensor) -> torch.Tensor | float:
        """Loss scale that makes multi-process gradients equal to one process's on the global batch.

        Each loss is a mean over this process's loss tokens; DDP (and the module's explicit
        averaging) then averages over processes. Scaling by ``local_tokens * processes /
        global_tokens`` turns that average of means into the mean over all the global batch's
        tokens, which is what one process with the whole batch computes.
        """
        self._local_tokens = (labels[:, 1:] != IGNORE_INDEX).sum().float()
        if self.accelerator.num_processes == 1:
            self._global_tokens = self._local_tokens
            return 1.0
        self._global_tokens = self.accelerator.reduce(self._local_tokens.clone(), reduction="sum")
        return self._local_tokens * self.accelerator.num_processes / self._global_tokens.clamp(min=1)

    def _global_means(self, values: dict[str, float]) -> dict[str, float]:
        """Token-weighted means of this step's loss terms over all processes (for logging)."""
        if self.accelerator.num_processes == 1 or not values:
            return values
        local = torch.tensor(list(values.values()), dtype=torch.float64, device=self.accelerator.device)
        summed = self.accelerator.reduce(local * float(self._local_tokens), reduction="sum")
        return dict(zip(values, (summed / max(float(self._global_tokens), 1.0)).tolist()))

    def _agree_nonfinite(self, bad_term: str | None) -> str | None:
        if self.accelerator.num_processes == 1:
            return bad_term
        flag = torch.tensor([0.0 if bad_term is None else 1.0], device=self.accelerator.device)
        if float(self.accelerator.reduce(flag, reduction="sum")) == 0:
            return None
        return bad_term or "loss on another process"

    def _nonfinite(self, losses: StepLosses, term: str) -> StepLosses:
        """Skip (when allowed) or stop on a non-finite loss term or gradient."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.module_optimizer is not None:
            self.module_optimizer.zero_grad(set_to_none=True)
        if not self.train_config.skip_nonfinite_steps:
            checkpoint = latest_checkpoint(self.output)
            kept = f"; last good checkpoint: {checkpoint}" if checkpoint else "; no checkpoint was written before it"
            raise FloatingPointError(
                f"non-finite {term} at step {self.step} of method {self.method.name!r}{kept} "
                "(set train.skip_nonfinite_steps=true to skip such steps)"
            )
        # Keep the learning-rate schedule aligned with the step count; the parameters do not move.
        self.scheduler.step()
        self.nonfinite_steps_skipped += 1
        losses.skipped = True
        return losses

    # -- the loop -----------------------------------------------------------------------------
    def train(self) -> dict:
        """Run steps until ``train.max_steps``, or until SIGINT/SIGTERM asks to stop.

        On the first SIGINT or SIGTERM the current step finishes, a checkpoint is written and the
        loop returns with ``self.interrupted = True`` (resume with ``--resume``); a second signal
        stops at once.
        """
        train, accelerator = self.train_config, self.accelerator
        if accelerator.is_main_process:
            _atomic_write_text(self.output / "run_config.yaml", yaml.safe_dump(self.run_config, sort_keys=False))
        if train.report_to:
            accelerator.init_trackers("okd", config={"method": self.method.name})
        self.student.train()
        start = self._segment_start = time.perf_counter()
        bar = tqdm(
            total=train.max_steps,
            initial=self.step,
            desc=f"distill {self.method.name}",
            disable=not (self.progress and accelerator.is_main_process),
            dynamic_ncols=True,
        )
        metrics_file = open(self.output / "metrics.jsonl", "a") if accelerator.is_main_process else None
        try:
            with _StopOnSignal() as stop:
                self._loop(bar, metrics_file, stop)
        finally:
            bar.close()
            self.train_seconds += time.perf_counter() - start
            if metrics_file is not None:
                metrics_file.close()
        if train.report_to:
            accelerator.end_training()
        return self.final_metrics

    def _loop(self, bar, metrics_file, stop: "_StopOnSignal") -> None:
        train, accelerator = self.train_config, self.accelerator
        tokens_since_log, time_since_log = 0, time.perf_counter()
        while self.step < train.max_steps:
            self.step += 1
            step = self.step
            batch = {k: v.to(accelerator.device) for k, v in self.source.next_batch().items()}
            update_module = self.module_optimizer is not None and module_updates_at(self.online_config, step)
            losses = self.training_step(batch, update_module)

            tokens_since_log += int(batch["attention_mask"].sum()) * accelerator.num_processes
            bar.update(1)
            stopping = self._agree_stop(stop.requested)
            if step % train.log_every == 0 or step == train.max_steps or losses.skipped or stopping:
                now = time.perf_counter()
                record = {
                    "step": step,
                    **self._global_means(losses.as_floats()),
                    "learning_rate": self.scheduler.get_last_lr()[0],
                    "module_updated": update_module and not losses.skipped,
                    "tokens_per_second": tokens_since_log / max(now - time_since_log, 1e-9),
                    "elapsed_seconds": self.train_seconds + now - self._segment_start,
                    "epoch": self.source.state.epoch,
                    "nonfinite_steps_skipped": self.nonfinite_steps_skipped,
                }
                if losses.skipped:
                    record["skipped"] = True
                if hasattr(self.source, "stats"):
                    record.update({f"source_{k}": v for k, v in self.source.stats().items()})
                if self.module_optimizer is not None:
                    record["module_learning_rate"] = self.module_optimizer.param_groups[0]["lr"]
                tokens_since_log, time_since_log = 0, now
                eval_every = self.eval_config.every
                if self.validation_set is not None and ((eval_every and step % eval_every == 0) or step == train.max_steps):
                    record.update(self.validate())
                self.final_metrics = record
                bar.set_postfix(loss=f"{record['loss']:.3f}")
                if metrics_file is not None:
                    metrics_file.write(json.dumps(record, allow_nan=True) + "\n")
                    metrics_file.flush()
                if train.report_to:
                    accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
            if stopping and step < train.max_steps:
                path = self.save_checkpoint()
                self.interrupted = True
                if accelerator.is_main_process:
                    tqdm.write(f"okd: stopped by signal after step {step}; checkpoint {path}; continue with --resume", file=sys.stderr)
                return
            if train.checkpoint_every and step % train.checkpoint_every == 0 and step < train.max_steps:
                self.save_checkpoint()

    def _agree_stop(self, requested: bool) -> bool:
        """A stop request on any process stops all of them after the same step."""
        if self.accelerator.num_processes == 1:
            return requested
        flag = torch.tensor([1.0 if requested else 0.0], device=self.accelerator.device)
        return float(self.accelerator.reduce(flag, reduction="sum")) > 0

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write everything needed to continue exactly: weights, optimizer and scheduler states,
        the online module and its optimizer, the data position, the RNG states and the step.

        Written into a temporary directory that is renamed into place, with a completion marker
        written last, so a crash mid-write never leaves a checkpoint that looks complete.
        """
        accelerator = self.accelerator
        root = self.output / "checkpoints"
        final = root / f"step-{self.step:08d}"
        source_states = [self.source.state_dict()]
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            source_states = gather_object(source_states)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            tmp = root / f".tmp-step-{self.step:08d}"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            state = {
                "student": accelerator.unwrap_model(self.student).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "module": self.teacher.module_state_dict() if self.online_config else None,
                "module_optimizer": self.module_optimizer.state_dict() if self.module_optimizer else None,
                # Per process: generation-based sources (e.g. DistiLLM's replay buffer) differ by rank.
                "source": source_states,
                "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            }
            torch.save(state, tmp / "state.pt")
            elapsed = self.train_seconds + time.perf_counter() - getattr(self, "_segment_start", time.perf_counter())
            meta = {
                "step": self.step,
                "train_seconds": elapsed,
                "final_metrics": self.final_metrics,
                "nonfinite_steps_skipped": self.nonfinite_steps_skipped,
                # What made this run, so that --resume can refuse a different one.
                "run_config": _comparable(self.run_config),
            }
            (tmp / CHECKPOINT_COMPLETE).write_text(json.dumps(meta) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            kept = sorted(p for p in root.glob("step-*") if (p / CHECKPOINT_COMPLETE).exists())
            for old in kept[: max(len(kept) - self.train_config.keep_checkpoints, 0)]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a checkpoint written by ``save_checkpoint`` (on every process)."""
        path = Path(path)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        meta = json.loads((path / CHECKPOINT_COMPLETE).read_text())
        if "run_config" in meta:  # checkpoints from before this check carry no config
            _check_same_run(meta["run_config"], _comparable(self.run_config), path)
        self.accelerator.unwrap_model(self.student).load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.online_config is not None:
            self.teacher.load_module_state_dict(state["module"])
            self.module_optimizer.load_state_dict(state["module_optimizer"])
        self.source.load_state_dict(state["source"][self.accelerator.process_index])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = int(meta["step"])
        self.train_seconds = float(meta["train_seconds"])
        self.final_metrics = meta["final_metrics"]
        self.nonfinite_steps_skipped = int(meta.get("nonfinite_steps_skipped", 0))
        self.resumed_from = path
        # Metrics logged after the checkpoint belong to the interrupted attempt: drop them.
        metrics = self.output / "metrics.jsonl"
        if self.accelerator.is_main_process and metrics.exists():
            kept = [line for line in metrics.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
            _atomic_write_text(metrics, "".join(line + "\n" for line in kept))

    def validate(self) -> dict:
        """Held-out metrics; the validation CE also drives DistiLLM's adaptive source."""
        metrics = validation_metrics(
            self.accelerator.unwrap_model(self.student),
            self.teacher,
            self.validation_set,
            self.collator,
            self.loss_fn,
            self.eval_config.batch_size,
            self.accelerator.device,
        )
        self.student.train()
        if hasattr(self.source, "observe_validation_loss"):
            self.source.observe_validation_loss(metrics["validation_ce"])
        return metrics

    def module_consistent_across_processes(self) -> bool | None:
        """True when the online module is bit-identical on every process (None without a module)."""
        if self.online_config is None:
            return None
        flat = torch.cat([p.detach().float().reshape(-1) for p in self.teacher.module_parameters()])
        # Sum and sum of squares of positions-weighted values: equal on all ranks iff (almost surely)
        # the parameters are equal.
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        fingerprint = torch.stack([(flat.double() * weights).sum(), (flat.double() ** 2).sum()]).unsqueeze(0)
        gathered = self.accelerator.gather(fingerprint)
        return bool((gathered == gathered[0]).all())

    def source_consistent_across_processes(self) -> bool | None:
        """True when every process's source made the same choices (its ``stats()`` agree): the
        on-policy coin flips, DistiLLM's threshold, fresh/replay counts and buffer size. None for
        sources without choices."""
        if not hasattr(self.source, "stats"):
            return None
        stats = [self.source.stats()]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            stats = gather_object(stats)
        return all(s == stats[0] for s in stats)

    def save(self) -> None:
        """Write the student, the online module and a summary (main process only)."""
        accelerator = self.accelerator
        consistent = self.module_consistent_across_processes()
        source_consistent = self.source_consistent_across_processes()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            from okd.models import save_pretrained_atomic

            save_pretrained_atomic(accelerator.unwrap_model(self.student), self.tokenizer, self.output / "student")
            if self.online_config is not None:
                self.teacher.save_module(self.output / "online_module")
            summary = {
                "method": self.method.name,
                "steps": self.step,
                "train_seconds": self.train_seconds,
                "num_processes": accelerator.num_processes,
                "module_consistent_across_processes": consistent,
                "source_consistent_across_processes": source_consistent,
                "final": self.final_metrics,
            }
            _atomic_write_text(self.output / "train_summary.json", json.dumps(summary, indent=2) + "\n")
        accelerator.wait_for_everyone()


def distill(
    model: ModelConfig,
    method: MethodConfig = MethodConfig(),
    online: OnlineModuleConfig = OnlineModuleConfig(),
    data: DataConfig = DataConfig(),
    train: TrainConfig = TrainConfig(),
    eval: EvalConfig = EvalConfig(),
    sampling: SamplingConfig = SamplingConfig(),
    output_dir: str = "runs/distill",
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> RunResult:
    """Distil a student from a teacher (any preset, OKD included) and save it.

    Writes ``output_dir/student/`` (loadable with ``AutoModelForCausalLM.from_pretrained``),
    ``output_dir/online_module/`` (OKD), ``output_dir/metrics.jsonl``, ``output_dir/run_config.yaml``
    and ``output_dir/train_summary.json``.

    Args:
        model: Which teacher and student to load or build.
        method: The method: a preset name, optionally with fields overridden.
        online: OKD's online module (used when the method has online_teacher).
        data: Training and validation data.
        train: Optimisation of the student.
        eval: Held-out evaluation during training.
        sampling: How generated training sequences are made (SeqKD, GKD, ImitKD, DistiLLM).
        output_dir: Directory for the run's outputs.
        overwrite: Replace a previous run in output_dir.
        resume: Continue the run in output_dir from its latest complete checkpoint.
        progress: Show a progress bar.
    """
    distiller = Distiller(
        model, method, online, data, train, eval,
        output_dir=output_dir, overwrite=overwrite, progress=progress, resume=resume, sampling=sampling,
    )
    distiller.train()
    if not distiller.interrupted:
        distiller.save()
    return RunResult(
        distiller.output, distiller.step, distiller.train_seconds, distiller.final_metrics, distiller.interrupted
    )


class _StopOnSignal:
    """Within the block, the first SIGINT/SIGTERM sets ``requested``; a second one raises
    KeyboardInterrupt at once. Previous handlers come back on exit. (Handlers can only be set
    from the main thread; elsewhere this does nothing.)"""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.requested:
            self._restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        self.requested = True
        tqdm.write(
            f"okd: {signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
        )

    def _restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        self._restore()
        return False


def _has_accelerator_device() -> bool:
    if torch.cuda.is_available():
        return True
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return True
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def _first_nonfinite(losses: StepLosses) -> str | None:
    """The loss terms that are NaN or inf (e.g. "kd loss (nan)"), or None. The total ("loss") is
    named only when no term it is made of is to blame."""
    bad = {name: value for name, value in losses.as_floats().items() if not math.isfinite(value)}
    if not bad:
        return None
    culprits = [name for name in bad if name != "loss"] or ["loss"]
    return " and ".join(f"{name} loss ({bad[name]})" for name in culprits)


def _average_gradients(parameters, accelerator) -> None:
    """Average the online module's gradients over processes (it is not wrapped by DDP)."""
    if accelerator.num_processes == 1:
        return
    for p in parameters:
        if p.grad is not None:
            p.grad = accelerator.reduce(p.grad, reduction="mean")


@torch.no_grad()
def validation_metrics(student, teacher, dataset, collator, loss_fn: DistillationLoss, batch_size, device) -> dict:
    """Held-out student CE and divergence to the current teacher (token-weighted over the set)."""
    student.eval()
    ce_sum = kd_sum = 0.0
    tokens = 0
    # What the online module does to the teacher (OKD only): adapted CE/accuracy and KL from the frozen one.
    adapted = AdaptedTeacherMetrics() if teacher is not None and loss_fn.objective is not None else None
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        targets, mask = next_token_targets(batch["labels"])
        n = int(mask.sum())
        if n == 0:
            continue
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ce_sum += float(cross_entropy(logits, targets)) * n
        if teacher is not None:
            teacher_logits, frozen_logits = teacher.adapted_and_frozen(
                batch["input_ids"], batch["attention_mask"], need_frozen=adapted is not None
            )
            if adapted is not None:
                adapted.update(teacher_logits, frozen_logits, targets)
                teacher_logits = loss_fn.objective.student_target(teacher_logits, frozen_logits)
            kd_sum += float(loss_fn.divergence_between(teacher_logits, logits, mask)) * n
        tokens += n
    metrics = {"validation_ce": ce_sum / max(tokens, 1)}
    if teacher is not None:
        metrics["validation_divergence"] = kd_sum / max(tokens, 1)
    if adapted is not None:
        metrics.update(adapted.result())
    return metrics
