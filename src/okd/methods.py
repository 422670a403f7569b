"""Methods: the `method` section, its named presets, and their resolution against the registries.

A *method* is three independent choices (see `MethodConfig`):
  where the training sequences come from (`source`, a name in the `okd.sources` registry), which
  divergence the student minimises (`divergence`, a name in `okd.divergences.DIVERGENCES`), and
  whether the teacher adapts (`online_teacher`, i.e. OKD).
Named presets (`METHOD_PRESETS`: sft, kd, rkl, jsd, tvd, skl, srkl, akl, okd, seqkd, imitkd, gkd,
distillm, minillm) fill those choices; any field set explicitly wins over the preset. MiniLLM adds a
fourth choice, the `objective` (its policy-gradient loss instead of the divergence).

This module sits above the registries it checks names against (sources, divergences); they import the
plain sections (``okd.sections``), never this module. Every name here
is also importable from ``okd.config``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional

from okd.sections import DIVERGENCE_NAMES, ResolvedMethod, SamplingConfig, unknown_choice
from okd.sources import SOURCES, source_names

# The source names come from their registry: a new source needs no edit here.
SourceName = Literal[source_names()]  # type: ignore[valid-type]
OBJECTIVES = ("distillation", "minillm")


@dataclass
class MethodConfig:
    """What the student learns from. Empty fields take the value of the preset named by `name`."""

    name: str = "kd"
    """Preset: sft, kd, rkl, jsd, tvd, skl, srkl, akl, okd, seqkd, imitkd, gkd, distillm or minillm
    (see okd.config.METHOD_PRESETS)."""
    source: Optional[SourceName] = None
    """Where training sequences come from. ground_truth: the dataset's responses; teacher_generated:
    the teacher's responses to the training prompts, generated once and cached (SeqKD); on_policy:
    the student's own samples with probability `sampling.on_policy_ratio` per batch (GKD, ImitKD);
    adaptive_replay: DistiLLM's adaptive off-policy replay of student samples; teacher_mixed: MiniLLM's
    rollouts sampled from (1 - a) * student + a * teacher (the `minillm` section), reused for
    minillm.ppo_epochs passes (works with any divergence too)."""
    divergence: Optional[str] = None
    """Token-level divergence the student minimises: forward_kl, reverse_kl, jsd, tvd, skew_kl,
    skew_reverse_kl, adaptive_kl."""
    divergence_params: Optional[dict[str, float]] = None
    """Extra divergence parameters, e.g. {beta: 0.5} for jsd, {alpha: 0.1} for skew_kl, {mu: 0.5}
    for adaptive_kl."""
    kd_ratio: Optional[float] = None
    """Loss = (1 - kd_ratio) * CE(student, data) + kd_ratio * divergence. 0 is plain fine-tuning."""
    temperature: Optional[float] = None
    """Softmax temperature applied to both teacher and student logits inside the divergence."""
    online_teacher: Optional[bool] = None
    """OKD: train a small online module on the frozen teacher together with the student."""
    objective: Optional[Literal["distillation", "minillm"]] = None
    """distillation: the kd_ratio mix of CE and the divergence above (every preset but minillm);
    minillm: MiniLLM's policy gradient on sequence-level reverse KL (the `minillm` section; needs
    source teacher_mixed). The divergence is then only the validation metric."""
    cross_tokenizer: Optional[Literal["uld", "align"]] = None
    """Distil across tokenizers (okd.crosstok; ground-truth data): uld, the Universal Logit
    Distillation loss on positions aligned by index (the divergence is not used); align, the method's
    divergence on text spans aligned by character offsets. Empty: both models must share one tokenizer."""


def _preset(divergence: str = "forward_kl", kd_ratio: float = 1.0, online: bool = False, source: str = "ground_truth",
            objective: str = "distillation", **params):
    return {
        "objective": objective,
        "source": source,
        "divergence": divergence,
        "divergence_params": params,
        "kd_ratio": kd_ratio,
        "temperature": 1.0,
        "online_teacher": online,
    }


METHOD_PRESETS: dict[str, dict[str, Any]] = {
    # Plain fine-tuning on the data: cross-entropy only, no teacher.
    "sft": _preset(kd_ratio=0.0),
    # Word-level KD (Hinton et al.; Kim & Rush): forward KL on ground-truth sequences.
    "kd": _preset("forward_kl"),
    "rkl": _preset("reverse_kl"),
    # Generalized JSD as in GKD/TRL (beta 0.5), here on ground truth.
    "jsd": _preset("jsd", beta=0.5),
    "tvd": _preset("tvd"),
    # DistiLLM's skew divergences, alpha = 0.1.
    "skl": _preset("skew_kl", alpha=0.1),
    "srkl": _preset("skew_reverse_kl", alpha=0.1),
    "akl": _preset("adaptive_kl", mu=0.5),
    # Online KD: forward KL from a teacher whose online module adapts to the student.
    "okd": _preset("forward_kl", online=True),
    # Sequence-level KD (Kim & Rush): cross-entropy on the teacher's own responses.
    "seqkd": _preset(kd_ratio=0.0, source="teacher_generated"),
    # ImitKD (Lin et al.): forward KL on the student's own samples.
    "imitkd": _preset("forward_kl", source="on_policy"),
    # GKD (Agarwal et al.; TRL's defaults): generalized JSD, beta 0.5, on-policy half of the time
    # (sampling.on_policy_ratio = 0.5).
    "gkd": _preset("jsd", source="on_policy", beta=0.5),
    # DistiLLM (Ko et al.): skew reverse KL (alpha 0.1) with the adaptive off-policy replay.
    "distillm": _preset("skew_reverse_kl", source="adaptive_replay", alpha=0.1),
    # MiniLLM (Gu et al.): sequence-level reverse KL by policy gradient on teacher-mixed rollouts; its
    # settings are the `minillm` section (okd.minillm.MiniLLMConfig); reverse KL is the validation metric.
    "minillm": _preset("reverse_kl", source="teacher_mixed", objective="minillm"),
}

# Per-preset defaults of the sampling section (applied where the user left a field empty).
SAMPLING_PRESETS: dict[str, dict[str, float]] = {
    "imitkd": {"on_policy_ratio": 1.0, "temperature": 1.0},
    "gkd": {"on_policy_ratio": 0.5, "temperature": 0.9},
}


def resolve_method(method: MethodConfig) -> ResolvedMethod:
    """Fill the empty fields of `method` from its preset; check the result."""
    if method.name not in METHOD_PRESETS:
        raise ValueError(unknown_choice("method preset", method.name, METHOD_PRESETS))
    values = dict(METHOD_PRESETS[method.name])
    for f in dataclasses.fields(MethodConfig):
        value = getattr(method, f.name)
        if f.name != "name" and value is not None:
            values[f.name] = value
    if values["divergence"] not in DIVERGENCE_NAMES:
        raise ValueError(unknown_choice("divergence", values["divergence"], DIVERGENCE_NAMES))
    if values["source"] not in SOURCES:  # the live registry: a source registered later counts too
        raise ValueError(unknown_choice("method.source", values["source"], SOURCES))
    if not 0.0 <= values["kd_ratio"] <= 1.0:
        raise ValueError(f"method.kd_ratio must be in [0, 1], got {values['kd_ratio']}")
    if values["temperature"] <= 0:
        raise ValueError(f"method.temperature must be > 0, got {values['temperature']}")
    if values["objective"] not in OBJECTIVES:
        raise ValueError(unknown_choice("method.objective", values["objective"], OBJECTIVES))
    if values["objective"] == "minillm" and values["source"] != "teacher_mixed":
        raise ValueError(
            f"method.objective=minillm needs method.source=teacher_mixed (its rollouts), got {values['source']!r}"
        )
    if values["online_teacher"] and values["source"] == "teacher_mixed":
        raise ValueError("method.online_teacher is not supported with method.source=teacher_mixed (it samples from the frozen teacher)")
    return ResolvedMethod(name=method.name, **values)


def resolve_sampling(sampling: "SamplingConfig", method: ResolvedMethod) -> "SamplingConfig":
    """Fill the empty sampling fields from the method's preset, then from the defaults."""
    preset = SAMPLING_PRESETS.get(method.name, {})
    values = dataclasses.asdict(sampling)
    for name, default in (("temperature", 1.0), ("on_policy_ratio", 0.5)):
        if values[name] is None:
            values[name] = preset.get(name, default)
    if not 0.0 <= values["on_policy_ratio"] <= 1.0:
        raise ValueError(f"sampling.on_policy_ratio must be in [0, 1], got {values['on_policy_ratio']}")
    if values["temperature"] <= 0:
        raise ValueError(f"sampling.temperature must be > 0, got {values['temperature']}")
    ratio = values["replay_ratio"]
    if ratio not in ("decreasing", "increasing", "constant"):
        try:
            values["replay_ratio"] = float(ratio)
        except ValueError:
            raise ValueError(
                f"sampling.replay_ratio must be a number or decreasing/increasing/constant, got {ratio!r}"
            ) from None
    return SamplingConfig(**values)
