"""Training: ``distill`` / ``Distiller`` (the loop), checkpoints, multi-process helpers, signals.

* ``distiller``: setup and the loop, top to bottom; ``distill()`` runs it and saves the student;
* ``checkpoint``: the checkpoint format (safetensors and JSON), writing, verifying and reading it, the
  fallback to an intact checkpoint, the resume check and the schedule horizon;
* ``distributed``: token share, global means, agreement on stop/skip, gradient averaging;
* ``setup``: loading models and data, the output directory; ``signals``: SIGINT/SIGTERM handling;
* ``validation``: held-out metrics during training.

The objective lives in ``okd.losses``; its names stay importable from here.
"""

from okd.losses import IGNORE_INDEX, DistillationLoss, StepLosses, cross_entropy, next_token_targets

from .checkpoint import CHECKPOINT_COMPLETE, RESUMABLE_CHANGES, CheckpointError, latest_checkpoint, resumable_checkpoint
from .distiller import Distiller, RunResult, distill
from .setup import RUN_OUTPUTS
from .validation import validation_metrics

__all__ = [
    "CHECKPOINT_COMPLETE",
    "CheckpointError",
    "IGNORE_INDEX",
    "RESUMABLE_CHANGES",
    "RUN_OUTPUTS",
    "DistillationLoss",
    "Distiller",
    "RunResult",
    "StepLosses",
    "cross_entropy",
    "distill",
    "latest_checkpoint",
    "resumable_checkpoint",
    "next_token_targets",
    "validation_metrics",
]
