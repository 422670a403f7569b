"""The interface every online module implements, the registry of kinds, and folding a saved module.

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
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from okd.heads import final_hidden_at, head_on_positions_supported

if TYPE_CHECKING:  # okd.config may import this package to validate online.kind: no runtime import back
    from okd.config import OnlineModuleConfig

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

        ``frozen`` is computed when ``need_frozen`` and may be None otherwise; a kind that gets it
        almost for free (the adapter) also returns it on update steps (``track_grad``). Default: :meth:`forward`, then
        :meth:`frozen_forward` when needed (a second teacher forward).
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
