"""The interface every online module implements, the registry of kinds, the `online` section of a run's
configuration (:class:`OnlineModuleConfig`, whose ``kind`` names a registered kind), and folding a saved module.

An *online module* is the only trainable part of an OKD teacher. It owns the (frozen) teacher model it
modifies, so each kind decides by itself how it changes the teacher's output: the ``adapter`` kind
transforms the final hidden state before the frozen output head, the ``lora`` kind wraps the model with
peft. :class:`okd.teacher.Teacher` only ever calls the methods below, never asks which kind it holds.

Adding a kind: subclass :class:`OnlineModule`, set ``kind``, implement ``forward``, ``save`` and
``fold`` (and ``trainable_parameters`` / the state dict when the parameters are not the model's
``requires_grad`` ones), and decorate the class with :func:`register_online_module`.

The saved directory always holds ``online_module.json`` with at least ``{"kind": ...}``;
:func:`with_online_module` reads that kind to pick the class that folds it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Optional

import torch
from torch import nn

from okd.heads import final_hidden_at, head_on_positions_supported
from okd.sections import DIVERGENCE_NAMES, unknown_choice

META_FILE = "online_module.json"


class OnlineModule(nn.Module):
    """A trainable module on a frozen teacher LM (the interface; a new kind subclasses it).

    Args:
        model: the Hugging Face causal LM, already frozen (``requires_grad_(False)``) and in eval mode.
        config: the ``online`` section of the run's config.

    Attributes:
        kind: the registry name (``online.kind``).
        model: the model the teacher runs: ``model`` itself, or a wrapper of it (peft).
    """

    kind: ClassVar[str] = ""

    def __init__(self, model: nn.Module, config: OnlineModuleConfig | None = None):
        super().__init__()
        self.model = model

    # -- how it changes the teacher's output ------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *, track_grad: bool) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` of the adapted teacher; a graph to the module's parameters
        only when ``track_grad`` (the teacher body itself is never differentiated w.r.t. its weights)."""
        raise NotImplementedError

    def forward_with_frozen(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *, track_grad: bool, need_frozen: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(adapted, frozen)`` logits, both ``[batch, seq, vocab]``: the adapted teacher (as
        :meth:`forward`) and the frozen teacher ``p_0`` without the module (no graph).

        ``frozen`` is computed when ``need_frozen`` and may be None otherwise. Default: :meth:`forward`,
        then :meth:`frozen_forward` when needed (a second teacher forward).
        """
        adapted = self.forward(input_ids, attention_mask, track_grad=track_grad)
        frozen = self.frozen_forward(input_ids, attention_mask) if need_frozen else None
        return adapted, frozen

    def frozen_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits of the frozen teacher with the module switched off (no graph)."""
        raise NotImplementedError(f"online module kind {self.kind!r} cannot switch itself off (frozen_forward)")

    # -- the same at the loss positions only (okd.heads) -------------------------------------------
    def hf_model(self) -> nn.Module:
        """The plain Hugging Face model under any wrapper (what :func:`okd.heads.head_on_positions_supported` checks)."""
        return self.model

    def head(self) -> nn.Module:
        """The frozen output head: ``logits = head(hidden)`` for the hidden states of :meth:`hidden_with_frozen`."""
        return self.hf_model().get_output_embeddings()

    def supports_positions(self) -> bool:
        return head_on_positions_supported(self.hf_model())

    def hidden_with_frozen(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, rows: torch.Tensor, *, track_grad: bool,
        need_frozen: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(adapted, frozen)`` hidden states ``[N, d]`` at the flat positions ``rows``, the inputs of
        :meth:`head`: ``head(adapted)`` and ``head(frozen)`` are :meth:`forward_with_frozen`'s logits at
        those positions. Default: the model's final hidden state (a graph to the module when
        ``track_grad``), and :meth:`frozen_hidden_at` when ``need_frozen``."""
        with torch.set_grad_enabled(track_grad):
            adapted = final_hidden_at(self.model, input_ids, attention_mask, rows)
        return adapted, self.frozen_hidden_at(input_ids, attention_mask, rows) if need_frozen else None

    def frozen_hidden_at(self, input_ids, attention_mask, rows: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's final hidden states at ``rows`` (no graph)."""
        raise NotImplementedError(f"online module kind {self.kind!r} cannot switch itself off (frozen_hidden_at)")

    # -- parameters and state -------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the module's optimizer updates. Default: the model's parameters that require grad."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def module_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's state only (for checkpoints). Default: the trainable parameters by name."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def load_module_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`module_state_dict` (in place, so optimizers keep their parameters)."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen pretrained weights (tests check they never change). Default: the whole model."""
        return dict(self.model.state_dict())

    def train(self, mode: bool = True):
        # The pretrained body always stays in eval mode (no dropout): only the module "trains", and no
        # kind has dropout, so the teacher is deterministic.
        super().train(mode)
        self.model.eval()
        return self

    # -- saving and folding ---------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write the module (never the frozen teacher) and ``online_module.json`` to ``directory``
        (which exists)."""
        raise NotImplementedError

    @classmethod
    def fold(cls, model: nn.Module, directory: Path, meta: dict) -> nn.Module:
        """``model`` (a plain HF causal LM) with the module saved in ``directory`` folded in: a plain HF
        model again, whose ``forward`` and ``generate`` compute what :meth:`forward` computes.
        ``meta`` is the directory's ``online_module.json``."""
        raise NotImplementedError

    def write_meta(self, directory: Path, **extra) -> None:
        """``online_module.json``: the kind, plus what :meth:`fold` needs to rebuild the module."""
        (directory / META_FILE).write_text(json.dumps({"kind": self.kind, **extra}, indent=2) + "\n")


class NoOnlineModule(OnlineModule):
    """No online module: the pretrained teacher, unchanged and never differentiated (plain KD).

    Not a registered kind: it is what :func:`build_online_module` returns for ``config=None``.
    """

    kind = ""

    def forward(self, input_ids, attention_mask, *, track_grad: bool) -> torch.Tensor:
        with torch.no_grad():
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def frozen_forward(self, input_ids, attention_mask) -> torch.Tensor:
        return self.forward(input_ids, attention_mask, track_grad=False)

    def hidden_with_frozen(self, input_ids, attention_mask, rows, *, track_grad: bool, need_frozen: bool):
        with torch.no_grad():
            hidden = final_hidden_at(self.model, input_ids, attention_mask, rows)
        return hidden, hidden if need_frozen else None

    def save(self, directory: Path) -> None:
        pass  # nothing trainable to save


ONLINE_MODULES: dict[str, type[OnlineModule]] = {}
"""``online.kind`` -> the class implementing it. Filled by :func:`register_online_module`."""


def register_online_module(cls: type[OnlineModule]) -> type[OnlineModule]:
    """Class decorator: make ``cls`` available as ``online.kind = cls.kind``."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'kind'")
    ONLINE_MODULES[cls.kind] = cls
    return cls


def online_module_class(kind: str) -> type[OnlineModule]:
    """The registered class of ``kind``; a one-line ``ValueError`` listing the kinds otherwise."""
    try:
        return ONLINE_MODULES[kind]
    except KeyError:
        raise ValueError(f"unknown online module kind {kind!r}; known kinds: {', '.join(sorted(ONLINE_MODULES))}") from None


@dataclass
class OnlineModuleConfig:
    """OKD's online module: the only trainable part of the teacher (used when online_teacher)."""

    kind: str = "adapter"
    """The module kind, a name in okd.online.ONLINE_MODULES. adapter: residual bottleneck on the
    teacher's final hidden state (no backward through the frozen teacher body). lora: LoRA (peft) on
    the attention and MLP projections of the top layers."""
    adapter_bottleneck: int = 64
    """Bottleneck width of the adapter."""
    lora_rank: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / rank)."""
    lora_top_layers: int = 2
    """LoRA goes on this many of the teacher's top transformer layers; 0 puts it on all of them."""
    lora_target_modules: Optional[list[str]] = None
    """Module names LoRA adapts. Default: peft's defaults for the architecture."""
    learning_rate: float = 5e-4
    """Peak learning rate of the online module's own optimizer (AdamW)."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Schedule of the module's learning rate over the student steps after `start_step`, horizon
    train.max_steps (okd.online.objective.module_lr_factor)."""
    warmup_steps: int = 0
    """Linear warm-up of the module's learning rate over this many student steps after `start_step`."""
    weight_decay: float = 0.0
    """Weight decay of the online module's optimizer."""
    update_every: int = 1
    """The module takes one optimizer step every this many student steps."""
    start_step: int = 0
    """Delayed start: no module update on the first `start_step` student steps (the student learns
    from the frozen teacher until then)."""
    ce_weight: float = 1.0
    """Weight of CE(teacher, data) in the module's loss: keeps the adapted teacher accurate."""
    student_weight: float = 1.0
    """Weight of D(student.detach() -> teacher) in the module's loss: moves the teacher toward
    what the student can represent."""
    divergence: str = "jsd"
    """D in the module's loss, with the detached student q as target and the adapted teacher p_phi
    as learner: jsd (the default) the generalized JSD (beta 0.5 unless `divergence_params` says
    otherwise), forward_kl KL(q || p_phi), reverse_kl KL(p_phi || q) (PromptKD), or any other name of
    okd.divergences; same: the method's divergence and parameters with the roles swapped (KL(q || p_phi)
    for the okd preset: the default until the design study, docs/results/okd_design.md, chose jsd,
    which keeps the adapted teacher nearest the frozen one and scored best on validation)."""
    divergence_params: Optional[dict[str, float]] = None
    """Parameters of `divergence` (not of same), e.g. {beta: 0.5} for jsd; empty: the divergence's own defaults."""
    anchor_weight: float = 0.0
    """Weight w of the anchor w * KL(p_0 || p_phi) in the module's loss, p_0 the frozen teacher:
    keeps the adapted teacher near the pretrained one. 0: no anchor. With kind=lora it costs a
    second teacher forward on update steps."""
    anchor_schedule: Literal["constant", "linear"] = "constant"
    """constant: w at every step; linear: w * (1 - step / train.max_steps), PromptKD's decay to 0."""
    teacher_mix: float = 0.0
    """What the student learns from: (1 - m) * p_phi + m * p_0 (mixed in probability space). 0: the
    adapted teacher alone; 1: the frozen teacher alone (the module then only trains). With kind=lora
    m > 0 costs a second teacher forward per step."""

    def __post_init__(self):
        if self.kind not in ONLINE_MODULES:  # the registry of module kinds (a new kind registers there)
            raise ValueError(unknown_choice("online.kind", self.kind, sorted(ONLINE_MODULES)))
        if self.update_every < 1:
            raise ValueError(f"online.update_every must be >= 1, got {self.update_every}")
        for name in ("ce_weight", "student_weight", "anchor_weight", "learning_rate", "start_step", "warmup_steps", "lora_top_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"online.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.teacher_mix <= 1.0:
            raise ValueError(f"online.teacher_mix must be in [0, 1], got {self.teacher_mix}")
        if self.divergence != "same" and self.divergence not in DIVERGENCE_NAMES:
            raise ValueError(unknown_choice("online.divergence", self.divergence, ("same", *DIVERGENCE_NAMES)))
        if self.divergence == "same" and self.divergence_params:
            raise ValueError("online.divergence_params is for a named online.divergence; same takes method.divergence_params")
        if self.lr_scheduler not in ("constant", "linear", "cosine"):
            raise ValueError(unknown_choice("online.lr_scheduler", self.lr_scheduler, ("constant", "linear", "cosine")))
        if self.anchor_schedule not in ("constant", "linear"):
            raise ValueError(unknown_choice("online.anchor_schedule", self.anchor_schedule, ("constant", "linear")))



def build_online_module(model: nn.Module, config: OnlineModuleConfig | None) -> OnlineModule:
    """The online module ``config.kind`` on ``model`` (:class:`NoOnlineModule` when ``config`` is None)."""
    if config is None:
        return NoOnlineModule(model)
    return online_module_class(config.kind)(model, config)


def with_online_module(model: nn.Module, directory: str | Path) -> nn.Module:
    """The teacher ``model`` with a saved online module (``<run>/online_module``) folded in.

    Returns a plain Hugging Face causal LM whose ``forward`` and ``generate`` compute the adapted
    teacher's distribution, e.g. to analyse or evaluate the teacher an OKD student learned from
    (each kind's :meth:`OnlineModule.fold` says how: the ``adapter`` replaces the output head by
    ``Sequential(adapter, head)``; peft merges ``lora`` weights into the base weights).

    Raises:
        FileNotFoundError: ``directory`` holds no ``online_module.json``.
        ValueError: the module does not fit the model (another hidden size, unknown kind).
    """
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"no online module in {directory} (expected {meta_path.name}, written by an okd run)")
    meta = json.loads(meta_path.read_text())
    cls = ONLINE_MODULES.get(meta.get("kind"))
    if cls is None:
        raise ValueError(f"online module in {directory}: unknown kind {meta.get('kind')!r}")
    return cls.fold(model, directory, meta)
