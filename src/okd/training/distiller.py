"""The training loop: one readable loop for every method (its forward and loss path: okd.training.forward).

A method is three independent choices, and the loop shows each in one place:

1. the *source* of the sequences (``okd.sources``): ``batch = source.next_batch()``;
2. the *divergence* the student minimises: ``loss = (1 - kd_ratio) * CE + kd_ratio * D(teacher, student)``
   (``okd.losses.DistillationLoss``);
3. whether the *teacher adapts* (OKD): on update steps the online module takes one optimizer step on
   ``ce_weight * CE(teacher, data) + student_weight * D(student.detach() -> teacher)`` (+ an optional
   anchor to the frozen teacher; the options live in ``okd.online.objective``), reusing the teacher
   forward of the step (no second teacher forward, except LoRA's frozen pass for the anchor/mix).

The student always learns from the current teacher, detached; the module always learns from the
current student, detached. So the two losses touch disjoint parameters and one ``backward()`` serves
both.

Runs on Hugging Face Accelerate: ``accelerate launch --multi_gpu --num_processes N -m okd.cli distill ...`` gives
DDP without code changes (``okd.training.distributed``). The online module is not wrapped by DDP: its
gradients are averaged across processes explicitly before its optimizer step, so it stays identical
on every rank. ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` (or ``zero2.yaml``,
``zero3.yaml``) shards the student through Accelerate and the frozen teacher with it
(``okd.training.distributed.place_teacher``); the loop stays the same. Checkpoints: ``okd.training.checkpoint``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from okd.config import (
    DataConfig,
    DistillConfig,
    EvalConfig,
    MethodConfig,
    ModelConfig,
    OnlineModuleConfig,
    SamplingConfig,
    TrainConfig,
)
from okd.crosstok.training import check_cross_tokenizer_config, prepare_cross_tokenizer
from okd.io import write_json, write_text
from okd.losses import DistillationLoss, StepLosses, first_nonfinite
from okd.minillm import MiniLLMConfig
from okd.objectives import MiniLLMObjective
from okd.online.objective import ModuleSchedule, module_updates_at
from okd.sources import SourceSetup, build_source
from okd.teacher import Teacher

from . import checkpoint as ckpt
from .cached import cache_identity, check_cache_config, open_teacher_cache
from .distributed import (
    Processes, TokenCount, check_sharding_request, local_tokens, make_accelerator, peak_memory_mb, place_teacher, plain_norm,
    reshard_teacher, sharding, whole_state_dicts,
)
from .forward import logs_metrics_at  # when the loop logs (a step's forward reads it too)
from .forward import LossPath, forward_losses
from .setup import check_output_dir, clear_output_dir, load_datasets, load_models, load_run_tokenizer
from .signals import StopOnSignal
from .validation import validation_metrics


@dataclass
class RunResult:
    output_dir: Path
    steps: int
    train_seconds: float
    final_metrics: dict
    interrupted: bool = False  # stopped by a signal: a checkpoint was saved, no final student


def as_config(config: DistillConfig | ModelConfig | None = None, **fields) -> DistillConfig:
    """A ``DistillConfig`` from one, or from its fields as keywords (``model=..., train=...``)."""
    if isinstance(config, ModelConfig):  # the positional ``model`` of earlier versions
        fields["model"], config = config, None
    if config is None:
        return DistillConfig(**fields)
    return dataclasses.replace(config, **fields) if fields else config


def token_weighted(parts: list[StepLosses], tokens: list[torch.Tensor]) -> StepLosses:
    """The step's loss terms from its micro-batches' (detached): each term's mean weighted by the
    micro-batch's loss tokens ``tokens`` (a plain mean when no micro-batch has any)."""
    weights = torch.stack(tokens)
    total = weights.sum()
    weights = torch.where(total > 0, weights / total.clamp(min=1), torch.full_like(weights, 1 / len(parts)))
    terms = {}
    for f in dataclasses.fields(StepLosses):
        values = [getattr(part, f.name) for part in parts]
        if all(isinstance(v, torch.Tensor) for v in values):
            terms[f.name] = sum(w * v.detach().float() for w, v in zip(weights, values))
    return StepLosses(**terms)


class Distiller:
    """One distillation run: setup in ``__init__``, then ``train()``, then ``save()``.

    ``Distiller(config)`` or ``Distiller(model=..., method=..., ...)`` (the fields of ``DistillConfig``).
    ``distill(...)`` below does all three steps; tests and notebooks build a ``Distiller`` to inspect
    the student, the teacher and its online module between the steps.
    """

    def __init__(self, config: DistillConfig | ModelConfig | None = None, **fields):
        from accelerate.utils import set_seed

        from okd.data import Collator

        self.config = config = as_config(config, **fields)
        train = self.train_config = config.train
        self.method, self.sampling = config.resolved()
        self.online_config = config.online if self.method.online_teacher else None
        self.output = Path(config.output_dir)
        check_sharding_request(config)  # FSDP / DeepSpeed: refused in one line before any model loads
        self.accelerator = accelerator = make_accelerator(train, self.output)
        self.sharding = sharding(accelerator)  # "fsdp", "zero3", "zero" or None
        self.processes = Processes(accelerator)
        check_output_dir(self.output, config.overwrite, config.resume)
        check_cache_config(config, self.method)
        check_cross_tokenizer_config(config, self.method)  # okd.crosstok: refused combinations, one line each
        set_seed(train.seed)

        # The tokenizer, then the data (read, validated and tokenised), and only then the models: bad data
        # fails in one line before any weights load.
        self.tokenizer = load_run_tokenizer(config.model, self.method)
        self.train_set, self.validation_set = load_datasets(config.data, self.tokenizer)
        self.tokenizer, student, teacher_model = load_models(
            config.model, self.method, train, config.data.max_length, tokenizer=self.tokenizer
        )
        self.teacher: Teacher | None = None
        if teacher_model is not None and self.method.needs_teacher_logits:
            self.teacher = Teacher(teacher_model, self.online_config, seed=train.seed)  # placed below
        # model.teacher_cache: the teacher's outputs are read from disk (okd.training.cached); every process opens it.
        self.teacher_cache = open_teacher_cache(config, self.method, self.tokenizer, student, self.train_set)
        self.collator = Collator(pad_token_id=self.tokenizer.pad_token_id)
        self.cross_loss = None
        if self.method.cross_tokenizer is not None:  # the teacher's own tokenization next to the student's
            self.train_set, self.collator, self.cross_loss = prepare_cross_tokenizer(
                config, self.method, self.train_set, self.tokenizer, student, teacher_model
            )
        setup = SourceSetup(
            dataset=self.train_set, collator=self.collator, tokenizer=self.tokenizer, student=student,
            teacher=teacher_model.to(accelerator.device) if self.method.source in ("teacher_generated", "teacher_mixed") else teacher_model,
            model=config.model, data=config.data, train=train, sampling=self.sampling, output_dir=self.output,
            rank=accelerator.process_index, world_size=accelerator.num_processes,
            progress=config.progress and accelerator.is_main_process,
            method=self.method, minillm=config.minillm, device=accelerator.device,
        )
        with accelerator.main_process_first():  # SeqKD: the main process generates, the others read its cache
            self.source = build_source(self.method.source, setup)
        del teacher_model, setup  # SeqKD needed the model only to build its cache

        # Everything the run needs has loaded and been checked: only now touch the output directory.
        if accelerator.is_main_process:
            clear_output_dir(self.output, config.overwrite, config.resume)
        accelerator.wait_for_everyone()

        self.run_config = config.run_config(accelerator.num_processes)
        if self.sharding is not None:  # a sharded run's checkpoint resumes only sharded the same way
            self.run_config["sharding"] = self.sharding
        if self.teacher_cache is not None:  # --resume refuses another cache (or a rebuilt one)
            self.run_config["teacher_cache"] = cache_identity(self.teacher_cache)
        # The newest checkpoint whose files match their checksums (a damaged newer one: a warning).
        resume_from = ckpt.resumable_checkpoint(self.output) if config.resume else None
        resume_meta = ckpt.read_meta(resume_from) if resume_from is not None else None
        if resume_meta is not None and "run_config" in resume_meta:  # older checkpoints carry no config
            ckpt.check_same_run(resume_meta["run_config"], ckpt.flatten_run_config(self.run_config), resume_from)
        self.schedule_horizon = ckpt.schedule_horizon(train, resume_meta)

        # Only what trains goes to the optimizer (a LoRA student: its adapters).
        trainable = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=train.learning_rate, weight_decay=train.weight_decay)
        self.student, self.optimizer = accelerator.prepare(student, optimizer)
        self.student_parameters = [p for p in self.student.parameters() if p.requires_grad]
        if self.teacher is not None:  # sharded like the student under FSDP2 / ZeRO-3 (after it: DeepSpeed's config is final)
            self.teacher = place_teacher(accelerator, self.teacher)
        # Not prepared: Accelerate's wrapper would step the schedule once per process per optimizer step.
        self.scheduler = ckpt.learning_rate_schedule(self.optimizer, train, self.schedule_horizon)
        self.module_optimizer = None
        if self.online_config is not None:
            self.module_optimizer = torch.optim.AdamW(
                self.teacher.module_parameters(), lr=self.online_config.learning_rate, weight_decay=self.online_config.weight_decay
            )
            # The module's own learning-rate schedule and delayed start (okd.online.objective).
            self.module_schedule = ModuleSchedule(self.online_config, self.schedule_horizon)
        self.loss_fn = DistillationLoss(self.method, self.online_config, train.divergence_chunk_tokens, self.schedule_horizon)
        self.minillm_loss = MiniLLMObjective(config.minillm) if self.method.objective == "minillm" else None
        self.loss_path = LossPath.choose(self)  # "full" logits, loss "positions" only, or "fused" (okd.training.forward)
        self.step = 0
        self.train_seconds = 0.0  # of finished train() calls; ``elapsed()`` adds the running one
        self._running_since: float | None = None
        self.final_metrics: dict = {}
        self.resumed_from: Path | None = None
        self.nonfinite_steps_skipped = 0
        self.interrupted = False
        if resume_from is not None:
            self.load_checkpoint(resume_from, verified=True)
        elif config.resume and accelerator.is_main_process and (self.output / "metrics.jsonl").exists():
            (self.output / "metrics.jsonl").unlink()  # nothing to resume from: start over

    # -- one step -----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]], update_module: bool) -> StepLosses:
        """One optimizer step on ``batch``: one micro-batch, or a list of them (gradient accumulation).

        Each micro-batch gets one forward of the student and the teacher and one backward; the
        optimizers step once, after the last. The step's loss is the mean over the loss tokens of all
        its micro-batches on all processes (each micro-batch's mean is weighted by its share of those
        tokens), so k micro-batches of b equal one batch of k * b whatever the lengths.

        A NaN/inf loss term or gradient of the accumulated step stops the run with an error naming
        the step, the term and the method (checkpoints already written stay as they are), or, with
        ``train.skip_nonfinite_steps``, skips the update and counts it. The returned losses are the
        token-weighted means over the micro-batches (detached) and carry the step's token counts.
        """
        accelerator, processes = self.accelerator, self.processes
        batches = [batch] if isinstance(batch, dict) else list(batch)
        micro_tokens = [local_tokens(b["labels"]) for b in batches]
        # The global token count must be known before the first backward: one reduction per step.
        tokens = processes.count_tokens(*(b["labels"] for b in batches))
        parts = []
        for index, (micro, count) in enumerate(zip(batches, micro_tokens)):
            last = index == len(batches) - 1
            # DDP all-reduces the gradients only on the last micro-batch; the others accumulate locally.
            with contextlib.nullcontext() if last else accelerator.no_sync(self.student):
                losses = self.forward_losses(micro, update_module)
                # One backward: the student's loss sees the teacher detached and the module's loss sees
                # the student detached, so each gradient lands only where it belongs.
                total = losses.loss if losses.module_loss is None else losses.loss + losses.module_loss
                accelerator.backward(total * processes.token_share(tokens, None if len(batches) == 1 else count))
            parts.append(losses)
        if self.sharding == "fsdp" and self.teacher is not None:  # the backward is done: back to 1/N of the teacher
            reshard_teacher(self.teacher)
        losses = parts[0] if len(parts) == 1 else token_weighted(parts, micro_tokens)
        losses.tokens = tokens
        max_norm = self.train_config.max_grad_norm
        grad_norm = accelerator.clip_grad_norm_(self.student_parameters, max_norm if max_norm is not None else math.inf)
        grad_norm = plain_norm(grad_norm)  # FSDP2: a DTensor; DeepSpeed: a float or None
        if update_module:
            processes.average_gradients(self.teacher.module_parameters())
            grad_norm = grad_norm + torch.nn.utils.clip_grad_norm_(self.teacher.module_parameters(), math.inf)
        # One host sync per step checks every loss term and the gradient norm together; the verdict
        # is agreed on, so all processes skip or stop on the same step.
        values = torch.stack([t.detach().float().reshape(()) for t in losses.tensors()])
        finite = bool(torch.isfinite(values).all() & torch.isfinite(grad_norm))
        bad_term = None if finite else (first_nonfinite(losses) or "gradient")
        if processes.any(bad_term is not None):
            return self._nonfinite(losses, bad_term or "loss on another process")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if update_module:
            self.module_schedule.apply(self.module_optimizer, self.step)
            self.module_optimizer.step()
            self.module_optimizer.zero_grad(set_to_none=True)
        return losses

    def forward_losses(self, batch: dict[str, torch.Tensor], update_module: bool) -> StepLosses:
        """One forward of the student and the teacher on ``batch``, and the step's loss terms (with
        graphs: the student's loss, and on update steps the online module's): ``okd.training.forward``."""
        return forward_losses(self, batch, update_module)

    @property
    def heads(self) -> str:
        """Where the output heads run: ``full``, ``positions`` or ``fused`` (``okd.training.forward.LossPath``)."""
        return self.loss_path.heads

    @property
    def loss_path_batches(self) -> dict[str, int]:
        """Micro-batches that took the fused loss / the dense loss on the loss positions (fused runs)."""
        return self.loss_path.batches

    def _nonfinite(self, losses: StepLosses, term: str) -> StepLosses:
        """Skip (when allowed) or stop on a non-finite loss term or gradient."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.module_optimizer is not None:
            self.module_optimizer.zero_grad(set_to_none=True)
        if not self.train_config.skip_nonfinite_steps:
            checkpoint = ckpt.latest_checkpoint(self.output)
            kept = f"; last good checkpoint: {checkpoint}" if checkpoint else "; no checkpoint was written before it"
            raise FloatingPointError(
                f"non-finite {term} at step {self.step} of method {self.method.name!r}{kept} "
                "(set train.skip_nonfinite_steps=true to skip such steps)"
            )
        self.scheduler.step()  # keep the schedule aligned with the step count; the parameters do not move
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
            write_text(self.output / "run_config.yaml", yaml.safe_dump(self.run_config, sort_keys=False))
        if train.report_to:
            accelerator.init_trackers("okd", config={"method": self.method.name})
        self.student.train()
        bar = tqdm(total=train.max_steps, initial=self.step, desc=f"distill {self.method.name}",
                   disable=not (self.config.progress and accelerator.is_main_process), dynamic_ncols=True)
        metrics_file = open(self.output / "metrics.jsonl", "a") if accelerator.is_main_process else None
        self._running_since = time.perf_counter()
        try:
            with StopOnSignal() as stop:
                self._loop(bar, metrics_file, stop)
        finally:
            bar.close()
            self.train_seconds, self._running_since = self.elapsed(), None
            if metrics_file is not None:
                metrics_file.close()
        if train.report_to:
            accelerator.end_training()
        return self.final_metrics

    def elapsed(self) -> float:
        """Training seconds so far, the running ``train()`` call included."""
        running = time.perf_counter() - self._running_since if self._running_since is not None else 0.0
        return self.train_seconds + running

    def _loop(self, bar, metrics_file, stop: StopOnSignal) -> None:
        train, accelerator = self.train_config, self.accelerator
        tokens_since_log, time_since_log = 0, time.perf_counter()
        first_step, started = self.step, time.perf_counter()
        while self.step < train.max_steps:
            self.step += 1
            step = self.step
            # One optimizer step: the source hands out one micro-batch per call.
            batches = [
                {k: v.to(accelerator.device) for k, v in self.source.next_batch().items()}
                for _ in range(train.gradient_accumulation_steps)
            ]
            update_module = self.module_optimizer is not None and module_updates_at(self.online_config, step)
            losses = self.training_step(batches[0] if len(batches) == 1 else batches, update_module)

            tokens_since_log += sum(int(b["attention_mask"].sum()) for b in batches) * accelerator.num_processes
            bar.update(1)
            stopping = self.processes.any(stop.requested)  # a stop on any process stops all after this step
            if logs_metrics_at(train, step) or losses.skipped or stopping:
                now = time.perf_counter()
                seconds_per_step = (now - started) / (step - first_step)  # of this train() call
                record = self._record(
                    losses, update_module, tokens_since_log / max(now - time_since_log, 1e-9),
                    eta_seconds=seconds_per_step * (train.max_steps - step),
                )
                tokens_since_log, time_since_log = 0, now
                eval_every = self.config.eval.every
                if self.validation_set is not None and ((eval_every and step % eval_every == 0) or step == train.max_steps):
                    record.update(self.validate())
                self.final_metrics = record
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_second']:.0f}",
                    mem=f"{record['peak_memory_mb']:.0f}MB", eta=f"{record['eta_seconds']:.0f}s",
                )
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

    def _record(self, losses: StepLosses, update_module: bool, tokens_per_second: float, eta_seconds: float = 0.0) -> dict:
        """The metrics line of this step (loss terms averaged over processes; throughput over all
        processes since the previous line; peak memory of this process; the time left at the pace
        of this ``train()`` call)."""
        tokens = losses.tokens or TokenCount(torch.tensor(1.0), torch.tensor(1.0))
        record = {
            "step": self.step,
            **self.processes.global_means(losses.as_floats(), tokens),
            "learning_rate": self.scheduler.get_last_lr()[0],
            "module_updated": update_module and not losses.skipped,
            "tokens_per_second": tokens_per_second,
            "peak_memory_mb": peak_memory_mb(self.accelerator.device),
            "elapsed_seconds": self.elapsed(),
            "eta_seconds": eta_seconds,
            "epoch": self.source.epoch,
            "nonfinite_steps_skipped": self.nonfinite_steps_skipped,
            **({"skipped": True} if losses.skipped else {}),
            **{f"source_{k}": v for k, v in self.source.stats().items()},
        }
        if self.module_optimizer is not None:
            record["module_learning_rate"] = self.module_optimizer.param_groups[0]["lr"]
        return record

    def validate(self) -> dict:
        """Held-out metrics; the validation CE also drives DistiLLM's adaptive source."""
        metrics = validation_metrics(
            # The validation split is not in the teacher cache: with one, only validation_ce is logged.
            # Across tokenizers (okd.crosstok) too: the teacher cannot read the student's tokens.
            self.accelerator.unwrap_model(self.student), self.teacher if self.teacher_cache is None and self.cross_loss is None else None,
            self.validation_set, self.collator,
            self.loss_fn, self.config.eval.batch_size, self.accelerator.device,
        )
        self.student.train()
        if self.sharding == "fsdp" and self.teacher is not None:
            reshard_teacher(self.teacher)
        self.source.observe_validation_loss(metrics["validation_ce"])
        return metrics

    # -- checkpoints and the final save -------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write everything needed to continue exactly (format: ``okd.training.checkpoint``)."""
        accelerator = self.accelerator
        if self.sharding in ("zero", "zero3"):  # its partitioned optimizer state is not gathered here yet
            raise RuntimeError(f"okd cannot checkpoint DeepSpeed runs yet (step {self.step}); nothing was written")
        root = self.output / "checkpoints"
        source_states = self.processes.gather_objects(self.source.state_dict())
        whole = whole_state_dicts(self.student, self.optimizer) if self.sharding == "fsdp" else None  # every rank gathers
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = ckpt.training_state(
                accelerator.unwrap_model(self.student), self.optimizer, self.scheduler,
                self.teacher if self.online_config else None, self.module_optimizer, source_states, whole,
            )
            meta = {
                "step": self.step,
                "train_seconds": self.elapsed(),
                "final_metrics": self.final_metrics,
                "nonfinite_steps_skipped": self.nonfinite_steps_skipped,
                "schedule_horizon": self.schedule_horizon,
                "run_config": ckpt.flatten_run_config(self.run_config),  # what --resume compares
            }
            ckpt.write_checkpoint(root, self.step, state, meta, keep=self.train_config.keep_checkpoints)
        accelerator.wait_for_everyone()
        return root / f"step-{self.step:08d}"

    def load_checkpoint(self, path: str | Path, verified: bool = False) -> None:
        """Restore a checkpoint written by ``save_checkpoint`` (on every process). Its files are
        checked against their checksums first, unless ``verified`` says that was just done."""
        path = Path(path)
        state, meta = ckpt.read_state(path, verified=verified), ckpt.read_meta(path)
        if "run_config" in meta:  # checkpoints from before this check carry no config
            ckpt.check_same_run(meta["run_config"], ckpt.flatten_run_config(self.run_config), path)
        ckpt.restore_training_state(
            state, self.accelerator.unwrap_model(self.student), self.optimizer, self.scheduler,
            self.teacher if self.online_config else None, self.module_optimizer, self.source, self.accelerator.process_index,
            sharded=self.sharding == "fsdp",
        )
        self.step = int(meta["step"])
        self.train_seconds = float(meta["train_seconds"])
        self.final_metrics = meta["final_metrics"]
        self.nonfinite_steps_skipped = int(meta.get("nonfinite_steps_skipped", 0))
        self.resumed_from = path
        if self.accelerator.is_main_process:
            ckpt.drop_metrics_after(self.output / "metrics.jsonl", self.step)

    def module_consistent_across_processes(self) -> bool | None:
        """True when the online module is bit-identical on every process (None without a module)."""
        return None if self.online_config is None else self.processes.identical(self.teacher.module_parameters())

    def source_consistent_across_processes(self) -> bool | None:
        """True when every process's source made the same choices (its ``stats()`` agree): the
        on-policy coin flips, DistiLLM's threshold, fresh/replay counts and buffer size. None for
        sources without choices (no stats)."""
        stats = self.processes.gather_objects(self.source.stats())
        return None if not stats[0] else all(s == stats[0] for s in stats)

    def save(self) -> None:
        """Write the student with its model card (README.md, ``okd.model_card``), the online module and
        a summary (main process only)."""
        accelerator = self.accelerator
        consistent = self.module_consistent_across_processes()
        source_consistent = self.source_consistent_across_processes()
        # Sharded (FSDP2 / ZeRO-3): every process takes part in gathering the full weights, rank 0 gets them.
        full_state = accelerator.get_state_dict(self.student) if self.sharding in ("fsdp", "zero3") else None
        if full_state is not None:  # tied weights appear once, as in an unsharded save
            kept = {n for n, _ in self.student.named_parameters()} | {n for n, _ in self.student.named_buffers()}
            full_state = {n: v for n, v in full_state.items() if n in kept}
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            from okd.model_card import distillation_card, render
            from okd.models import merged_lora_model, save_pretrained_atomic

            summary = {
                "method": self.method.name,
                "steps": self.step,
                "train_seconds": self.train_seconds,
                "num_processes": accelerator.num_processes,
                "module_consistent_across_processes": consistent,
                "source_consistent_across_processes": source_consistent,
                "final": self.final_metrics,
            }
            student = accelerator.unwrap_model(self.student)
            if self.config.model.student_lora is not None:
                # The adapter alone (peft's format), and the merged student: a plain transformers model.
                card = render(distillation_card, self.run_config, summary, self.config.output_dir, adapter=True)
                save_pretrained_atomic(student, self.tokenizer, self.output / "student_adapter", readme=card)
                student = merged_lora_model(student)
            card = render(distillation_card, self.run_config, summary, self.config.output_dir)
            save_pretrained_atomic(student, self.tokenizer, self.output / "student", state_dict=full_state, readme=card)
            if self.online_config is not None:
                self.teacher.save_module(self.output / "online_module")
            write_json(self.output / "train_summary.json", summary)
        accelerator.wait_for_everyone()


def distill(
    model: ModelConfig,
    method: MethodConfig = MethodConfig(),
    online: OnlineModuleConfig = OnlineModuleConfig(),
    data: DataConfig = DataConfig(),
    train: TrainConfig = TrainConfig(),
    eval: EvalConfig = EvalConfig(),
    sampling: SamplingConfig = SamplingConfig(),
    minillm: MiniLLMConfig = MiniLLMConfig(),
    output_dir: str = "runs/distill",
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> RunResult:
    """Distil a student from a teacher (any preset, OKD included) and save it.

    The parameters are the fields of ``okd.config.DistillConfig`` (this signature is also the schema
    of ``okd distill``); ``Distiller(config)`` takes the assembled config.

    Writes ``output_dir/student/`` (loadable with ``AutoModelForCausalLM.from_pretrained``; its README.md
    is the model card),
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
        minillm: MiniLLM's objective and teacher-mixed sampler (method minillm, source teacher_mixed).
        output_dir: Directory for the run's outputs.
        overwrite: Replace a previous run in output_dir.
        resume: Continue the run in output_dir from its latest complete checkpoint.
        progress: Show a progress bar.
    """
    distiller = Distiller(DistillConfig(
        model=model, method=method, online=online, data=data, train=train, eval=eval, sampling=sampling,
        minillm=minillm, output_dir=output_dir, overwrite=overwrite, resume=resume, progress=progress,
    ))
    distiller.train()
    if not distiller.interrupted:
        distiller.save()
    return RunResult(
        distiller.output, distiller.step, distiller.train_seconds, distiller.final_metrics, distiller.interrupted
    )
