"""The teacher: a frozen pretrained LM, optionally with an online module (OKD).

In Online Knowledge Distillation the teacher's pretrained weights never change. A small *online
module* sits on it and is trained together with the student, so that the teacher's distribution
adapts to what the student can represent. Two module kinds:

* ``adapter``: a residual bottleneck on the teacher's final hidden state,
  ``h + W_up(gelu(W_down(h)))``, followed by the teacher's own (frozen) output head. The teacher body
  runs under ``no_grad``, so updating the module costs one small MLP and the output-head backward.
* ``lora``: LoRA (via peft) on the projections of the top ``lora_top_layers`` transformer layers.
  Backward runs through those top layers (more cost, more capacity).

Both start as the identity (the up-projection, resp. LoRA's B matrix, is zero), so at step 0 the
teacher's logits equal the pretrained teacher's exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from okd.config import OnlineModuleConfig


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


def _check_adapter_supported(model: nn.Module) -> None:
    """The adapter recomputes logits as ``lm_head(last_hidden_state)``; refuse models that post-process."""
    config = model.config
    for attribute in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, attribute, None) not in (None, 1, 1.0):
            raise ValueError(
                f"online module kind 'adapter' does not support {type(model).__name__} "
                f"({attribute}={getattr(config, attribute)}); use online.kind=lora"
            )


class Teacher(nn.Module):
    """A frozen teacher with an optional online module.

    Args:
        model: a Hugging Face causal LM. Its parameters are frozen here.
        online: the online-module config, or None for a plain frozen teacher.
        seed: seeds the module's initialisation (the same on every process).

    Call ``teacher(input_ids, attention_mask, track_module_grad=...)`` to get logits
    ``[batch, seq, vocab]``. With ``track_module_grad=False`` (plain KD, or an OKD step on which the
    module does not update) everything runs under ``no_grad``.
    """

    def __init__(self, model: nn.Module, online: OnlineModuleConfig | None = None, seed: int = 0):
        super().__init__()
        model.requires_grad_(False)
        model.eval()
        self.online = online
        self.kind = online.kind if online is not None else None
        self.adapter: ResidualAdapter | None = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.kind == "adapter":
                _check_adapter_supported(model)
                self.adapter = ResidualAdapter(model.config.hidden_size, online.adapter_bottleneck)
            elif self.kind == "lora":
                model = _add_lora(model, online)
        self.model = model

    # -- module bookkeeping -------------------------------------------------------------------
    def module_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of the online module (empty for a plain teacher)."""
        if self.adapter is not None:
            return list(self.adapter.parameters())
        return [p for p in self.model.parameters() if p.requires_grad]

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen pretrained weights (used by tests to check they never change)."""
        return {
            name: tensor
            for name, tensor in self.model.state_dict().items()
            if "lora_" not in name
        }

    def train(self, mode: bool = True):
        # The pretrained body always stays in eval mode (no dropout): only the module "trains",
        # and neither kind has dropout, so the teacher is deterministic.
        super().train(mode)
        self.model.eval()
        return self

    # -- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        track_module_grad: bool = False,
    ) -> torch.Tensor:
        if self.adapter is not None:
            # Frozen body without a graph; only adapter + output head are differentiated.
            with torch.no_grad():
                body = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask)
                hidden = body.last_hidden_state
            with torch.set_grad_enabled(track_module_grad):
                hidden = self.adapter(hidden)
                return self.model.get_output_embeddings()(hidden)
        with torch.set_grad_enabled(track_module_grad and self.kind == "lora"):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    # -- saving -------------------------------------------------------------------------------
    def save_module(self, directory: str | Path) -> None:
        """Write the online module (not the frozen teacher) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.adapter is not None:
            from safetensors.torch import save_file

            save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.adapter.state_dict().items()},
                str(directory / "adapter.safetensors"),
            )
            meta = {
                "kind": "adapter",
                "hidden_size": self.adapter.down.in_features,
                "bottleneck": self.adapter.down.out_features,
            }
            (directory / "online_module.json").write_text(json.dumps(meta, indent=2) + "\n")
        elif self.kind == "lora":
            self.model.save_pretrained(str(directory))
            (directory / "online_module.json").write_text(json.dumps({"kind": "lora"}, indent=2) + "\n")

    def module_state_dict(self) -> dict[str, torch.Tensor]:
        """State of the online module only (for checkpoints)."""
        if self.adapter is not None:
            return self.adapter.state_dict()
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def load_module_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.adapter is not None:
            self.adapter.load_state_dict(state)
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)


def _add_lora(model: nn.Module, online: OnlineModuleConfig) -> nn.Module:
    """Wrap ``model`` with peft LoRA on its top ``online.lora_top_layers`` layers."""
    from peft import LoraConfig, get_peft_model

    n_layers = model.config.num_hidden_layers
    if not 1 <= online.lora_top_layers <= n_layers:
        raise ValueError(
            f"online.lora_top_layers={online.lora_top_layers} but the teacher has {n_layers} layers"
        )
    lora = LoraConfig(
        r=online.lora_rank,
        lora_alpha=online.lora_alpha,
        lora_dropout=0.0,
        target_modules=online.lora_target_modules,
        layers_to_transform=list(range(n_layers - online.lora_top_layers, n_layers)),
        bias="none",
    )
    # peft freezes every base parameter and zero-initialises LoRA's B: the wrapped model starts
    # out computing exactly what the pretrained teacher computes.
    return get_peft_model(model, lora)


def with_online_module(model: nn.Module, directory: str | Path) -> nn.Module:
    """The teacher ``model`` with a saved online module (``<run>/online_module``) folded in.

    Returns a plain Hugging Face causal LM whose ``forward`` and ``generate`` compute the adapted
    teacher's distribution, e.g. to analyse or evaluate the teacher an OKD student learned from:

    * ``adapter``: the output head becomes ``Sequential(adapter, head)``: the same
      ``head(adapter(last_hidden_state))`` that :class:`Teacher` computes;
    * ``lora``: peft loads the LoRA weights and merges them into the base weights.

    Raises:
        FileNotFoundError: ``directory`` holds no ``online_module.json``.
        ValueError: the module does not fit the model (another hidden size, unknown kind).
    """
    directory = Path(directory)
    meta_path = directory / "online_module.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no online module in {directory} (expected {meta_path.name}, written by an okd run)")
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") == "adapter":
        from safetensors.torch import load_file

        _check_adapter_supported(model)
        if meta["hidden_size"] != model.config.hidden_size:
            raise ValueError(
                f"online module in {directory} was trained on a teacher with hidden size {meta['hidden_size']}, "
                f"this teacher has {model.config.hidden_size}"
            )
        adapter = ResidualAdapter(meta["hidden_size"], meta["bottleneck"])
        adapter.load_state_dict(load_file(str(directory / "adapter.safetensors")))
        head = model.get_output_embeddings()
        adapter.to(device=head.weight.device)
        model.set_output_embeddings(nn.Sequential(adapter, head))
        return model
    if meta.get("kind") == "lora":
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(directory)).merge_and_unload()
    raise ValueError(f"online module in {directory}: unknown kind {meta.get('kind')!r}")

