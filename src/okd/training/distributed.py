"""What the loop needs from the other processes of a multi-process run (and nothing when alone).

Every process computes its loss as a mean over its own loss tokens; ``token_share`` rescales it so
that the average over processes (DDP's, and the online module's explicit one) is the mean over all
the global batch's tokens: one process with the whole batch computes the same. The decisions that
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

    def count_tokens(self, labels: torch.Tensor) -> TokenCount:
        local = (labels[:, 1:] != IGNORE_INDEX).sum().float()
        if self.count == 1:
            return TokenCount(local, local)
        return TokenCount(local, self.accelerator.reduce(local.clone(), reduction="sum"))

    def token_share(self, tokens: TokenCount) -> torch.Tensor | float:
        """Loss scale ``local_tokens * processes / global_tokens`` (1 for one process)."""
        if self.count == 1:
            return 1.0
        return tokens.local * self.count / tokens.total.clamp(min=1)

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
