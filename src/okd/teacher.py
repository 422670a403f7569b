"""The teacher: a frozen pretrained LM, optionally with an online module (OKD).

In Online Knowledge Distillation the teacher's pretrained weights never change. A small *online
module* sits on it and is trained together with the student, so that the teacher's distribution
adapts to what the student can represent. The module kinds (``adapter``, ``lora``, ...) live in
:mod:`okd.online`, one class each behind one interface; :class:`Teacher` holds one and delegates to it,
whatever its kind. ``ResidualAdapter`` and ``with_online_module`` are re-exported from there.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from okd.online import OnlineModule, ResidualAdapter, build_online_module, with_online_module

if TYPE_CHECKING:
    from okd.online.base import OnlineModuleConfig

__all__ = ["ResidualAdapter", "Teacher", "with_online_module"]


class Teacher(nn.Module):
    """A frozen teacher with an optional online module.

    Args:
        model: a Hugging Face causal LM. Its parameters are frozen here.
        online: the online-module config, or None for a plain frozen teacher.
        seed: seeds the module's initialisation (the same on every process).

    Call ``teacher(input_ids, attention_mask, track_module_grad=...)`` to get logits
    ``[batch, seq, vocab]``. With ``track_module_grad=False`` (plain KD, or an OKD step on which the
    module does not update) everything runs under ``no_grad``. The pretrained body stays in eval mode
    (no dropout) even while the module trains.
    """

    def __init__(self, model: nn.Module, online: OnlineModuleConfig | None = None, seed: int = 0):
        super().__init__()
        model.requires_grad_(False)
        model.eval()
        self.online = online
        self.kind = online.kind if online is not None else None
        # A forked RNG: the module's initialisation depends on `seed` only, and the caller's stream is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module: OnlineModule = build_online_module(model, online)

    @property
    def model(self) -> nn.Module:
        """The model the teacher runs (the pretrained LM, or its peft wrapper for ``lora``)."""
        return self.module.model

    @property
    def adapter(self) -> ResidualAdapter | None:
        """The ``adapter`` kind's :class:`ResidualAdapter` (None for other kinds); kept for older callers."""
        return getattr(self.module, "adapter", None)

    # -- module bookkeeping -------------------------------------------------------------------
    def module_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of the online module (empty for a plain teacher)."""
        return self.module.trainable_parameters()

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen pretrained weights (used by tests to check they never change)."""
        return self.module.base_state_dict()

    def module_state_dict(self) -> dict[str, torch.Tensor]:
        """State of the online module only (for checkpoints)."""
        return self.module.module_state_dict()

    def load_module_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_module_state_dict(state)

    # -- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        track_module_grad: bool = False,
    ) -> torch.Tensor:
        return self.module(input_ids, attention_mask, track_grad=track_module_grad)

    def adapted_and_frozen(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        track_module_grad: bool = False,
        need_frozen: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(adapted, frozen)`` logits ``[batch, seq, vocab]``: the teacher as :meth:`forward` and the
        frozen pretrained teacher without its module (None unless ``need_frozen``; the adapter gets it
        from the same body pass for one more head matmul, LoRA needs a second forward)."""
        return self.module.forward_with_frozen(
            input_ids, attention_mask, track_grad=track_module_grad, need_frozen=need_frozen
        )

    # -- the same at the loss positions only (okd.heads) ---------------------------------------
    @property
    def head(self) -> nn.Module:
        """The frozen output head (its input: the hidden states of :meth:`hidden_and_frozen`)."""
        return self.module.head()

    @property
    def supports_positions(self) -> bool:
        """Whether the teacher's logits are ``head(hidden)`` (``okd.heads.head_on_positions_supported``)."""
        return self.module.supports_positions()

    def hidden_and_frozen(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        rows: torch.Tensor,
        *,
        track_module_grad: bool = False,
        need_frozen: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(adapted, frozen)`` hidden states ``[N, d]`` at the flat positions ``rows`` (into
        ``batch * seq``): ``self.head`` of them are :meth:`adapted_and_frozen`'s logits there. For the
        adapter, ``adapted`` is the hidden state after the adapter (what the fused loss takes)."""
        return self.module.hidden_with_frozen(
            input_ids, attention_mask, rows, track_grad=track_module_grad, need_frozen=need_frozen
        )

    # -- saving -------------------------------------------------------------------------------
    def save_module(self, directory: str | Path) -> None:
        """Write the online module (not the frozen teacher) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.module.save(directory)
