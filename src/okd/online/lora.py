"""``online.kind=lora``: LoRA (via peft) on the projections of the teacher's top layers (or all of them).

Backward runs through those top layers (more cost than the adapter, more capacity). peft freezes
every base parameter and zero-initialises LoRA's B matrices, so the wrapped model starts out computing
exactly what the pretrained teacher computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from okd.heads import final_hidden_at
from okd.online.base import OnlineModule, register_online_module

if TYPE_CHECKING:
    from okd.online.base import OnlineModuleConfig


@register_online_module
class LoraModule(OnlineModule):
    """The teacher wrapped by peft (``self.model`` is the ``PeftModel``); its trainable parameters are
    the LoRA matrices, named as in the peft model (the checkpoint keys)."""

    kind = "lora"

    def __init__(self, model: nn.Module, config: OnlineModuleConfig):
        from peft import LoraConfig, get_peft_model

        n_layers = model.config.num_hidden_layers
        if not 0 <= config.lora_top_layers <= n_layers:
            raise ValueError(f"online.lora_top_layers={config.lora_top_layers} but the teacher has {n_layers} layers")
        # 0 means every layer.
        top = config.lora_top_layers or n_layers
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=0.0,
            target_modules=config.lora_target_modules,
            layers_to_transform=list(range(n_layers - top, n_layers)),
            bias="none",
        )
        super().__init__(get_peft_model(model, lora), config)

    def forward(self, input_ids, attention_mask, *, track_grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(track_grad):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    @torch.no_grad()
    def frozen_forward(self, input_ids, attention_mask) -> torch.Tensor:
        """The teacher without the LoRA delta (peft's ``disable_adapter``): a second full teacher
        forward, so the anchor and ``teacher_mix`` cost one extra teacher forward (no backward) per
        step that needs them with this kind."""
        with self.model.disable_adapter():
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def hf_model(self) -> nn.Module:
        return self.model.get_base_model()

    @torch.no_grad()
    def frozen_hidden_at(self, input_ids, attention_mask, rows):
        with self.model.disable_adapter():
            return final_hidden_at(self.model, input_ids, attention_mask, rows)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor for name, tensor in self.model.state_dict().items() if "lora_" not in name}

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(str(directory))
        self.write_meta(directory)

    @classmethod
    def fold(cls, model: nn.Module, directory: Path, meta: dict) -> nn.Module:
        """peft loads the LoRA weights and merges them into the base weights."""
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(directory)).merge_and_unload()
