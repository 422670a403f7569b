"""Checkpoints: their format, writing, verifying and reading them, and the check that a resume is the same run.

A checkpoint is a directory ``output_dir/checkpoints/step-NNNNNNNN/`` holding

* ``student.safetensors``: the student's state dict (the whole one, gathered, for a sharded run);
* ``optimizer.safetensors``: the tensors of the optimizer's state dict, keyed by their path in it
  (``state/<parameter id or name>/exp_avg``...);
* ``module.safetensors``, ``module_optimizer.safetensors``: the online module and its optimizer
  (OKD only);
* ``source.safetensors``: the tensors of the sources' states, one state per process (random
  generators, rollouts, replay buffers' token ids), keyed ``<rank>/<path>``;
* ``rng.safetensors``: the global RNG states (uint8 tensors: ``torch``, ``cuda/<device>``);
* ``state.json``: everything else, as a tree in which each tensor is a reference to its file and
  key (the schedule's state, the optimizer's hyperparameters, the sources' counters...), see
  ``okd.training.checkpoint.codec``;
* ``checkpoint_complete.json``, written last: ``{"step", "train_seconds", "final_metrics",
  "nonfinite_steps_skipped", "schedule_horizon", "run_config", "format", "files", "sha256"}``, where
  ``files`` maps every other file to its size and sha256 and ``sha256`` is the checksum of the
  marker's own content. A checkpoint counts only if it exists.

Loading runs no code from the files: tensors are read with safetensors, the rest with ``json``. A
checkpoint of the old format (a ``state.pt``, which could run code when loaded) is refused. The directory is filled under a
hidden name and renamed into place (``okd.io.atomic_directory``), so a crash mid-write never leaves
a checkpoint that looks complete, nor harms the previous one; pruned checkpoints are renamed away
before they are deleted. ``--resume`` verifies every file against its checksum and falls back to
the newest intact checkpoint (``resumable_checkpoint``).
"""

from .codec import CheckpointError, decode, encode
from .files import (
    CHECKPOINT_COMPLETE,
    FORMAT,
    STATE_JSON,
    CheckpointDamaged,
    complete_checkpoints,
    latest_checkpoint,
    read_meta,
    read_state,
    resumable_checkpoint,
    verify_checkpoint,
    write_checkpoint,
)
from .resume import (
    ADDED_FIELD_DEFAULTS,
    RESUMABLE_CHANGES,
    check_same_run,
    drop_metrics_after,
    flatten_run_config,
    learning_rate_schedule,
    restore_rng,
    restore_training_state,
    rng_state,
    schedule_horizon,
    training_state,
)

__all__ = [
    "ADDED_FIELD_DEFAULTS", "CHECKPOINT_COMPLETE", "FORMAT", "RESUMABLE_CHANGES", "STATE_JSON", "CheckpointDamaged",
    "CheckpointError", "check_same_run", "complete_checkpoints", "decode", "drop_metrics_after", "encode",
    "flatten_run_config", "latest_checkpoint", "learning_rate_schedule", "read_meta", "read_state",
    "restore_rng", "restore_training_state", "resumable_checkpoint", "rng_state", "schedule_horizon",
    "training_state", "verify_checkpoint", "write_checkpoint",
]
