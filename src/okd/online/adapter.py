"""``online.kind=adapter``: a residual bottleneck on the teacher's final hidden state.

``logits = head(h + W_up(gelu(W_down(h))))`` with ``h`` the last hidden state of the frozen body and
``head`` the teacher's own frozen output head. The body runs under ``no_grad``, so updating the module
costs one small MLP and the output-head backward.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from okd.heads import apply_head, final_hidden, final_hidden_at, logit_postprocessing
from okd.online.base import OnlineModule, register_online_module

if TYPE_CHECKING:
    from okd.online.base import OnlineModuleConfig

WEIGHTS_FILE = "adapter.safetensors"


class ResidualAdapter(nn.Module):
    """Residual bottleneck MLP: ``h -> h + up(gelu(down(h)))``.

    Shapes: input and output ``[batch, seq, hidden_size]``. ``up`` is zero-initialised so that a fresh
    adapter is exactly the identity.
    """

    def __init__(self, hidden_size: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Compute in the adapter's dtype (fp32) whatever the teacher's dtype, then cast back.
        x = hidden.to(self.down.weight.dtype)
        return (x + self.up(nn.functional.gelu(self.down(x)))).to(hidden.dtype)


def check_adapter_supported(model: nn.Module) -> None:
    """The adapter recomputes logits as ``lm_head(last_hidden_state)``; refuse models that post-process."""
    postprocessing = logit_postprocessing(model)
    if postprocessing is not None:
        raise ValueError(
            f"online module kind 'adapter' does not support {type(model).__name__} ({postprocessing}); use online.kind=lora"
        )


@register_online_module
class AdapterModule(OnlineModule):
    """A :class:`ResidualAdapter` (``self.adapter``, fp32) between the frozen body and the frozen head."""

    kind = "adapter"

    def __init__(self, model: nn.Module, config: OnlineModuleConfig):
        super().__init__(model, config)
        check_adapter_supported(model)
        self.adapter = ResidualAdapter(model.config.hidden_size, config.adapter_bottleneck)

    def forward(self, input_ids, attention_mask, *, track_grad: bool) -> torch.Tensor:
        # Frozen body without a graph; only adapter + output head are differentiated. The body runs
        # through the model's own forward, which FSDP's and DeepSpeed's hooks expect.
        with torch.no_grad():
            hidden = final_hidden(self.model, input_ids, attention_mask)
        with torch.set_grad_enabled(track_grad):
            return apply_head(self.model.get_output_embeddings(), self.adapter(hidden))

    def forward_with_frozen(self, input_ids, attention_mask, *, track_grad: bool, need_frozen: bool):
        """One body pass for both: ``head(adapter(h))`` and the frozen ``head(h)``. The frozen logits
        cost one extra output-head matmul (no second body pass) and are computed only when
        ``need_frozen``."""
        with torch.no_grad():
            hidden = final_hidden(self.model, input_ids, attention_mask)
            head = self.model.get_output_embeddings()
            frozen = apply_head(head, hidden) if need_frozen else None
        with torch.set_grad_enabled(track_grad):
            return apply_head(head, self.adapter(hidden)), frozen

    def hidden_with_frozen(self, input_ids, attention_mask, rows, *, track_grad: bool, need_frozen: bool):
        """The same at ``rows`` (the adapter acts per token, so gathering first changes nothing)."""
        with torch.no_grad():
            hidden = final_hidden_at(self.model, input_ids, attention_mask, rows)
        with torch.set_grad_enabled(track_grad):
            adapted = self.adapter(hidden)
        return adapted, hidden if need_frozen else None

    @torch.no_grad()
    def frozen_forward(self, input_ids, attention_mask) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.adapter.parameters())

    def module_state_dict(self) -> dict[str, torch.Tensor]:
        return self.adapter.state_dict()

    def load_module_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.adapter.load_state_dict(state)

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        weights = {k: v.detach().cpu().contiguous() for k, v in self.adapter.state_dict().items()}
        save_file(weights, str(directory / WEIGHTS_FILE))
        self.write_meta(directory, hidden_size=self.adapter.down.in_features, bottleneck=self.adapter.down.out_features)

    @classmethod
    def fold(cls, model: nn.Module, directory: Path, meta: dict) -> nn.Module:
        """The output head becomes ``Sequential(adapter, head)``: the same ``head(adapter(h))`` as
        :meth:`forward`, now inside a plain HF model (``generate`` included)."""
        from safetensors.torch import load_file

        check_adapter_supported(model)
        if meta["hidden_size"] != model.config.hidden_size:
            raise ValueError(
                f"online module in {directory} was trained on a teacher with hidden size {meta['hidden_size']}, "
                f"this teacher has {model.config.hidden_size}"
            )
        adapter = ResidualAdapter(meta["hidden_size"], meta["bottleneck"])
        adapter.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        head = model.get_output_embeddings()
        adapter.to(device=head.weight.device)
        model.set_output_embeddings(nn.Sequential(adapter, head))
        return model
