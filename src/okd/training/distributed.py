"""What the loop needs from the other processes of a multi-process run (and nothing when alone).

Every micro-batch's loss is a mean over its own loss tokens; ``token_share`` rescales it so that the
sum over the step's micro-batches, averaged over processes (DDP's average, and the online module's
explicit one), is the mean over all the tokens of the global batch: one process with the whole batch
in one micro-batch computes the same. The decisions that
must be the same on every rank (stop, skip a non-finite step) are agreed on with one reduction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from okd.losses import IGNORE_INDEX


def has_accelerator_device() -> bool:
    """True when a GPU (CUDA), Apple (MPS) or Intel (XPU) device is there to train on."""
    if torch.cuda.is_available():
        return True
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return True
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def make_accelerator(train, output_dir):
    """The run's ``accelerate.Accelerator`` (``train``: the TrainConfig)."""
    from accelerate import Accelerator

    return Accelerator(
        # Without an accelerator device, say so: Accelerate then runs several processes with gloo
        # (`accelerate launch --multi_gpu --num_processes 2` on a CPU machine) instead of one.
        cpu=not has_accelerator_device(),
        mixed_precision=train.mixed_precision,
        log_with=list(train.report_to) or None,
        project_dir=str(output_dir),
        # The loop does not hand its schedule to Accelerate, whose wrapper would step it once per
        # process per optimizer step; this keeps a prepared one right too.
        step_scheduler_with_optimizer=False,
    )


def local_tokens(labels: torch.Tensor) -> torch.Tensor:
    """The loss tokens of one batch (its positions with a next-token target), as a float scalar."""
    return (labels[:, 1:] != IGNORE_INDEX).sum().float()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far, in MiB: allocated CUDA memory on a CUDA device, else the
    process's maximum resident set size (which includes the Python runtime and the libraries)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


@dataclass
class TokenCount:
    """Loss tokens of one step: on this process and over all processes."""

    local: torch.Tensor
    total: torch.Tensor


class Processes:
    """The collective operations of the loop, over an ``accelerate.Accelerator``."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.count = accelerator.num_processes

    def count_tokens(self, *labels: torch.Tensor) -> TokenCount:
        """Loss tokens of the step's micro-batches (their ``labels``): here, and over all processes."""
        local = sum(local_tokens(x) for x in labels)
        if self.count == 1:
            return TokenCount(local, local)
        return TokenCount(local, self.accelerator.reduce(local.clone(), reduction="sum"))

    def token_share(self, tokens: TokenCount, micro_batch_tokens: torch.Tensor | None = None) -> torch.Tensor | float:
        """Loss scale of one micro-batch: ``its_tokens * processes / global_tokens`` (its tokens:
        ``micro_batch_tokens``, default the whole step's on this process; 1 for one process and one
        micro-batch)."""
        local = tokens.local if micro_batch_tokens is None else micro_batch_tokens
        if self.count == 1 and local is tokens.total:
            return 1.0
        return local * self.count / tokens.total.clamp(min=1)

    def global_means(self, values: dict[str, float], tokens: TokenCount) -> dict[str, float]:
        """Token-weighted means of one step's loss terms over all processes (for logging)."""
        if self.count == 1 or not values:
            return values
        local = torch.tensor(list(values.values()), dtype=torch.float64, device=self.accelerator.device)
        summed = self.accelerator.reduce(local * float(tokens.local), reduction="sum")
        return dict(zip(values, (summed / max(float(tokens.total), 1.0)).tolist()))

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on at least one."""
        if self.count == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return float(self.accelerator.reduce(value, reduction="sum")) > 0

    def average_gradients(self, parameters) -> None:
        """Average gradients over processes (for the online module, which DDP does not wrap)."""
        if self.count == 1:
            return
        for p in parameters:
            if p.grad is not None:
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    def gather_objects(self, value) -> list:
        """``[value of rank 0, value of rank 1, ...]`` on every process."""
        if self.count == 1:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])

    def identical(self, parameters) -> bool:
        """True when the parameters are bit-identical on every process (compared by fingerprint:
        a position-weighted sum and a sum of squares, equal on all ranks iff, almost surely, the
        parameters are)."""
        flat = torch.cat([p.detach().float().reshape(-1) for p in parameters])
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        fingerprint = torch.stack([(flat.double() * weights).sum(), (flat.double() ** 2).sum()]).unsqueeze(0)
        gathered = self.accelerator.gather(fingerprint)
        return bool((gathered == gathered[0]).all())
