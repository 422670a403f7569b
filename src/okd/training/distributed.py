"""What the loop needs from the other processes of a multi-process run (and nothing when alone).

Every micro-batch's loss is a mean over its own loss tokens; ``token_share`` rescales it so that the
sum over the step's micro-batches, averaged over processes (DDP's average, and the online module's
explicit one), is the mean over all the tokens of the global batch: one process with the whole batch
in one micro-batch computes the same. The decisions that
must be the same on every rank (stop, skip a non-finite step) are agreed on with one reduction.

Sharded runs (``accelerate launch --config_file configs/accelerate/{fsdp,zero2,zero3}.yaml``): what
okd refuses before any model loads (``check_sharding_request``), FSDP2 on CPU processes
(``enable_fsdp2_on_cpu``), where the frozen teacher lives (``place_teacher``) and the whole state
dicts a FSDP2 checkpoint holds (``whole_state_dicts``).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from okd.targets import IGNORE_INDEX


def has_accelerator_device() -> bool:
    """True when a GPU (CUDA), Apple (MPS) or Intel (XPU) device is there to train on."""
    if torch.cuda.is_available():
        return True
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return True
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def requested_sharding() -> str | None:
    """``"fsdp"`` or ``"deepspeed"`` when the launch asks for one (``accelerate launch --config_file
    configs/accelerate/fsdp.yaml`` sets ``ACCELERATE_USE_FSDP=true``, a DeepSpeed config
    ``ACCELERATE_USE_DEEPSPEED=true``), else None (one process, or DDP)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    return None


def check_sharding_request(config) -> None:
    """Refuse, in one line and before any model loads, a sharded run okd cannot do (``config``: the
    DistillConfig). In one process there is nothing to shard over (and on a CPU Accelerate would
    silently ignore the FSDP config)."""
    kind = requested_sharding()
    if kind is None:
        return
    flag = "ACCELERATE_USE_FSDP=true" if kind == "fsdp" else "ACCELERATE_USE_DEEPSPEED=true"
    asked = f"{'FSDP' if kind == 'fsdp' else 'DeepSpeed'} was asked for (distributed_type in the accelerate config, {flag})"

    def refuse(why: str):
        raise ValueError(f"{asked} {why}")

    train, method = config.train, config.resolved()[0]
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        refuse("in one process: launch 2 or more (accelerate launch --num_processes N) or drop that config")
    if kind == "fsdp" and os.environ.get("FSDP_VERSION", "1") != "2":
        refuse(f"with fsdp_version {os.environ.get('FSDP_VERSION', '1')}: okd supports FSDP2 only (fsdp_version: 2)")
    if kind == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            refuse("but the deepspeed package is not installed (pip install deepspeed)")
        if not has_accelerator_device():
            refuse("on a machine without a GPU: DeepSpeed needs one (use configs/accelerate/fsdp.yaml or ddp.yaml)")
        # DeepSpeed steps inside each backward: okd can neither accumulate around it nor skip a step.
        if train.gradient_accumulation_steps > 1:
            refuse(f"with train.gradient_accumulation_steps={train.gradient_accumulation_steps}: not supported there; use 1")
        if train.skip_nonfinite_steps:
            refuse("with train.skip_nonfinite_steps: DeepSpeed has stepped before okd sees the gradients; use false")
        if train.checkpoint_every:
            refuse(f"with train.checkpoint_every={train.checkpoint_every}: okd cannot checkpoint DeepSpeed runs yet; use 0")
    if method.source != "ground_truth":
        # Sharded generation needs every rank in every forward (synced generation): not wired yet.
        refuse(f"with method {method.name!r} (source {method.source}): sharded runs support ground_truth sources only")
    if config.model.teacher_cache:
        refuse("with model.teacher_cache: a cached teacher is not supported sharded yet; drop one of them")
    if config.model.student_lora is not None:
        refuse("with model.student_lora: a LoRA student is not supported sharded yet; drop one of them")
    if method.online_teacher and config.online.kind != "adapter":
        refuse(f"with online.kind={config.online.kind!r}: its weights live inside the sharded teacher; use online.kind=adapter")


def make_accelerator(train, output_dir):
    """The run's ``accelerate.Accelerator`` (``train``: the TrainConfig)."""
    from accelerate import Accelerator

    accelerator = Accelerator(
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
    if requested_sharding() == "fsdp" and not accelerator.is_fsdp2:
        enable_fsdp2_on_cpu(accelerator)
    if sharding(accelerator) in ("zero", "zero3"):
        # okd hands Accelerate no data loader to read the micro-batch size from: DeepSpeed gets it here.
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            config["train_micro_batch_size_per_gpu"] = train.batch_size
    return accelerator


def enable_fsdp2_on_cpu(accelerator) -> None:
    """Switch Accelerate's FSDP2 on for CPU processes (gloo), where Accelerate leaves it off: torch's
    ``fully_shard`` runs there, and the CPU run then takes the very code path of a GPU run (the
    tests' 2-process FSDP runs)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = AcceleratorState()
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the FSDP_* variables accelerate launch set
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    assert accelerator.is_fsdp2, "could not switch FSDP2 on"


def sharding(accelerator) -> str | None:
    """``"fsdp"`` (FSDP2), ``"zero3"``, ``"zero"`` (DeepSpeed stage 1/2) or None for ``accelerator``."""
    from accelerate.utils import DistributedType

    if accelerator.is_fsdp2:
        return "fsdp"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "zero3" if accelerator.state.deepspeed_plugin.zero_stage == 3 else "zero"
    return None


def place_teacher(accelerator, teacher):
    """Put the frozen ``teacher`` (an ``okd.teacher.Teacher``) where the run needs it.

    FSDP2: its HF model is sharded like the student (Accelerate's ``fsdp2_prepare_model``: one group
    per transformer layer; no optimizer), so each process holds 1/N of it. ZeRO-3: a DeepSpeed engine
    without optimizer partitions it (:func:`deepspeed_inference_engine`). Otherwise (one process, DDP,
    ZeRO-1/2, which partition only training state) it is whole on every device. OKD's online adapter
    is not inside the HF model: it stays whole on every process, and its gradients are averaged
    explicitly (``Processes.average_gradients``), as under DDP.
    """
    kind = sharding(accelerator)
    if kind == "fsdp":
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        fsdp2_prepare_model(accelerator, teacher.module.model)  # in place
    teacher.to(accelerator.device)  # FSDP2: the adapter (the shards are there already)
    if kind == "zero3":
        teacher.engine = deepspeed_inference_engine(accelerator, teacher.module.model)
    return teacher


def reshard_teacher(teacher) -> None:
    """FSDP2: free the whole weights the teacher's last forward left gathered. Accelerate keeps the
    root and the embedding / final norm / head group gathered after a forward, for the backward of a
    trained model; the frozen teacher has none, so without this each process would keep those whole."""
    from torch.distributed.fsdp import FSDPModule

    for module in teacher.model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def deepspeed_inference_engine(accelerator, model):
    """A ZeRO-3 engine around the frozen ``model`` with no optimizer, in eval mode (as TRL prepares its
    reference and teacher models): DeepSpeed partitions the weights and gathers each layer's for its
    forward. Called after the student was prepared, so the plugin's config has no "auto" left. Its
    hooks sit on ``model``'s own modules: okd keeps calling ``model``."""
    import copy

    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    hidden = getattr(model.config, "hidden_size", None)
    if hidden is not None:  # buckets sized for the teacher, not the student
        config["zero_optimization"].update(
            reduce_bucket_size=hidden * hidden, stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
            stage3_param_persistence_threshold=10 * hidden,
        )
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def whole_state_dicts(model, optimizer) -> tuple[dict, dict]:
    """The FSDP2-sharded ``model``'s and ``optimizer``'s whole state dicts, gathered on rank 0 (on the
    CPU; the other ranks get empty ones). A collective: every process calls it. The optimizer state
    is keyed by parameter names (``torch.distributed.checkpoint``'s format)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=options)


def load_whole_state_dicts(model, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Inverse of :func:`whole_state_dicts`: every process reads the whole states and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model, getattr(optimizer, "optimizer", optimizer), model_state_dict=model_state, optim_state_dict=optimizer_state,
        options=StateDictOptions(full_state_dict=True),
    )


def plain_norm(norm) -> torch.Tensor:
    """A gradient norm from ``accelerator.clip_grad_norm_`` as a plain tensor: FSDP2 returns a
    replicated DTensor, DeepSpeed (which clips inside its own step) may return None (then 0)."""
    if norm is None:
        return torch.zeros(())
    if hasattr(norm, "full_tensor"):
        return norm.full_tensor()
    return torch.as_tensor(norm, dtype=torch.float32)


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
