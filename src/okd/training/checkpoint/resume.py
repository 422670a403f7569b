"""What a checkpoint holds and the checks that a resume is the same run.

``training_state`` gathers the state of a run (the dict that ``files.write_checkpoint`` stores),
``restore_training_state`` puts it back; ``check_same_run`` refuses a resume with changed settings
and ``schedule_horizon`` keeps the learning-rate schedule of the run that wrote the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from okd.config import TrainConfig
from okd.io import write_text

# Settings a resumed run may change: they do not alter the training trajectory (a changed
# train.max_steps keeps the schedule's horizon, see ``schedule_horizon``).
RESUMABLE_CHANGES = {
    "train.max_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.report_to",
    "train.gradient_checkpointing",  # trades memory for compute; the gradients stay the same
    "train.fused_min_logits_mib",  # picks the fused or the dense loss per micro-batch; the same losses
    "eval.batch_size",
}

# Settings added after the first checkpoints were written: a checkpoint without one ran with this
# value (every earlier run used the divergence objective, had no minillm section, no accumulation...).
ADDED_FIELD_DEFAULTS = {
    "train.gradient_accumulation_steps": 1, "model.teacher_dtype": None, "model.student_lora": None,
    "method.objective": "distillation", "minillm": None,
    "model.teacher_tokenizer": None, "method.cross_tokenizer": None,
}


def training_state(student, optimizer, scheduler, teacher, module_optimizer, source_states: list, whole=None) -> dict:
    """The state a checkpoint stores (``teacher``: the Teacher whose online module is saved, or None;
    ``whole``: the student's and optimizer's states gathered from a sharded run, see
    ``okd.training.distributed.whole_state_dicts``)."""
    student_state, optimizer_state = whole or (student.state_dict(), optimizer.state_dict())
    return {
        "student": student_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "module": teacher.module_state_dict() if teacher is not None else None,
        "module_optimizer": module_optimizer.state_dict() if module_optimizer is not None else None,
        "source": source_states,  # one per process: generation-based sources differ by rank
        "rng": rng_state(),
    }


def restore_training_state(
    state: dict, student, optimizer, scheduler, teacher, module_optimizer, source, rank: int, sharded: bool = False
) -> None:
    """Load a ``training_state`` dict back into the run's objects (this process's source state;
    ``sharded``: a FSDP2 run, whose whole states each process cuts into its shards)."""
    if sharded:
        from ..distributed import load_whole_state_dicts

        load_whole_state_dicts(student, optimizer, state["student"], state["optimizer"])
    else:
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if teacher is not None:
        teacher.load_module_state_dict(state["module"])
        module_optimizer.load_state_dict(state["module_optimizer"])
    source.load_state_dict(state["source"][rank])
    restore_rng(state["rng"])


def rng_state() -> dict:
    """The global RNG states: ``{"torch": uint8 tensor, "cuda": [uint8 tensor per device] or None}``."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(state: dict) -> None:
    """Inverse of :func:`rng_state` (the CUDA states only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def flatten_run_config(run_config: dict) -> dict:
    """``run_config`` as plain JSON values (tuples become lists), flattened to ``section.field`` keys."""
    flat = {}
    for section, values in json.loads(json.dumps(run_config, default=str)).items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[section] = values
    return flat


def check_same_run(saved: dict, current: dict, checkpoint: Path) -> None:
    """Refuse to resume a checkpoint with settings that would change what the run computes.

    ``saved`` and ``current`` are flattened run configs (``flatten_run_config``).
    """
    saved = {**{k: v for k, v in ADDED_FIELD_DEFAULTS.items() if k in current}, **saved}
    differing = sorted(k for k in set(saved) | set(current) if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if differing:
        shown = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in differing[:3])
        more = f" (and {len(differing) - 3} more)" if len(differing) > 3 else ""
        raise ValueError(
            f"cannot resume from {checkpoint}: the settings differ ({shown}{more}); "
            "resume with the run's own settings, or start a new run with --overwrite or another --output-dir"
        )


def schedule_horizon(train: TrainConfig, checkpoint_meta: dict | None) -> int:
    """Steps the learning-rate schedule spans: ``train.max_steps`` for a new run; for a resumed one,
    the horizon of the run that wrote the checkpoint, so that a changed step budget does not bend
    the schedule (cosine and linear are functions of it). A budget past that horizon is refused for
    those schedules: their rate has decayed to its end value there."""
    if checkpoint_meta is None:
        return train.max_steps
    horizon = checkpoint_meta.get("schedule_horizon")
    if horizon is None:  # checkpoints written before the horizon was stored
        horizon = checkpoint_meta.get("run_config", {}).get("train.max_steps", train.max_steps)
    horizon = int(horizon)
    if train.lr_scheduler != "constant" and train.max_steps > horizon:
        raise ValueError(
            f"cannot resume with train.max_steps {train.max_steps}: the checkpoint's {train.lr_scheduler} "
            f"schedule ends at step {horizon}; resume with train.max_steps <= {horizon}, or start a new run"
        )
    return horizon


def learning_rate_schedule(optimizer, train: TrainConfig, horizon: int):
    """The student's schedule over ``horizon`` steps (warm-up, then constant, linear or cosine)."""
    from transformers import get_scheduler

    return get_scheduler(
        "constant_with_warmup" if train.lr_scheduler == "constant" else train.lr_scheduler,
        optimizer,
        num_warmup_steps=train.warmup_steps,
        num_training_steps=horizon,
    )


def drop_metrics_after(metrics: Path, step: int) -> None:
    """Metrics logged after the checkpoint belong to the interrupted attempt: drop them (atomically)."""
    if metrics.exists():
        kept = [line for line in metrics.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_text(metrics, "".join(line + "\n" for line in kept))
