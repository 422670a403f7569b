"""Typed configuration for `okd distill`: one dataclass per concern, and `DistillConfig` of them all.

A run is described by eight sections: model, method, online, data, train, eval, sampling and minillm (plus
`output_dir`, `overwrite`, `resume`, `progress`); `DistillConfig` holds them. Every field has a
docstring, which is also its `--help` text: the command line is generated from these classes by
jsonargparse, so `okd distill --config configs/demo.yaml --train.max_steps 50` loads the YAML file and
then overrides one field.

The sections live where the code that reads them can import them without a circle:

* ``okd.sections``: the plain sections (model, data, train, sampling, eval) and the resolved method;
  below the registry of sources, which reads them;
* ``okd.methods``: the `method` section, the named presets (``METHOD_PRESETS``) and their resolution
  against the registries (``resolve_method``); above those registries;
* ``okd.online.base``: the `online` section (``OnlineModuleConfig``), beside the registry of module
  kinds that ``online.kind`` names;
* ``okd.minillm``: the `minillm` section (``MiniLLMConfig``).

Every name of those is importable from here too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from okd.methods import (
    METHOD_PRESETS,
    OBJECTIVES,
    SAMPLING_PRESETS,
    MethodConfig,
    SourceName,
    resolve_method,
    resolve_sampling,
)
from okd.minillm import MiniLLMConfig
from okd.online.base import OnlineModuleConfig
from okd.sections import (
    DIVERGENCE_NAMES,
    DataConfig,
    EvalConfig,
    LoraStudentConfig,
    ModelConfig,
    ResolvedMethod,
    SamplingConfig,
    TrainConfig,
    closest,
    unknown_choice,
)

__all__ = [
    "DIVERGENCE_NAMES",
    "METHOD_PRESETS",
    "OBJECTIVES",
    "SAMPLING_PRESETS",
    "SECTIONS",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "LoraStudentConfig",
    "MethodConfig",
    "MiniLLMConfig",
    "ModelConfig",
    "OnlineModuleConfig",
    "ResolvedMethod",
    "SamplingConfig",
    "SourceName",
    "TrainConfig",
    "closest",
    "resolve_method",
    "resolve_sampling",
    "unknown_choice",
]


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
