"""Output heads on the loss positions only: logits ``[N, V]`` instead of ``[batch, seq, V]``.

On instruction data most positions are prompt or padding and take no loss (their next-token target is
-100), yet a model's forward runs the output head over every position. Here the base model runs once,
its final hidden states are gathered at the loss positions (``[N, d]``) and the head is applied to
those only (the dense path), or handed with the head weight to :mod:`okd.fused` (the fused path).

The rule (:func:`head_on_positions_supported`): a Hugging Face causal LM whose output head is a plain
``nn.Linear`` and whose config post-processes no logits (soft-capping, logit scales). Anything else
(non-HF students, Gemma-2's soft-capped logits, Cohere's ``logit_scale``...) takes the full logits.
"""

from __future__ import annotations

import torch
from torch import nn

from okd.targets import loss_positions  # noqa: F401  (re-exported: okd.heads.loss_positions)

# Config attributes by which transformers models change the logits after the head; a model with any of
# them set (to other than None / 1) is not ``head(hidden)`` and keeps its full logits.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")

_NO_LOGITS = torch.empty(0, dtype=torch.long)


def logit_postprocessing(model: nn.Module) -> str | None:
    """``"attribute=value"`` of the first logit post-processing ``model``'s config sets, else None."""
    config = getattr(model, "config", None)
    for attribute in LOGIT_POSTPROCESSING:
        if getattr(config, attribute, None) not in (None, 1, 1.0):
            return f"{attribute}={getattr(config, attribute)}"
    return None


def head_on_positions_supported(model: nn.Module) -> bool:
    """Whether ``model``'s logits are ``get_output_embeddings()(last hidden state)`` exactly (the rule above)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or not isinstance(model.get_output_embeddings(), nn.Linear):
        return False
    return logit_postprocessing(model) is None


def apply_head(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """``head(hidden)``: ``[..., d] -> [..., V]``.

    A FSDP2-sharded head is applied without calling the module, with its weights as the model's
    forward left them: it belongs to one group with the embedding and the final norm, which stays
    gathered after that forward, and a module call would run the group's hooks once more, out of turn
    (a teacher's group could not reshard; a student's backward would read freed weights). Any other
    head is called (DeepSpeed ZeRO-3 gathers a weight only inside its module's call).
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(head, FSDPModule):
        return nn.functional.linear(hidden, head.weight, head.bias)
    return head(hidden)


def decoder_of(model: nn.Module) -> nn.Module | None:
    """The base model (the decoder stack ending in the final norm) inside ``model`` and any wrapper around
    it (DDP's or DeepSpeed's ``.module``, peft's base model), or None when there is none to find."""
    from transformers import PreTrainedModel

    for _ in range(4):  # DDP(peft(model)) at most, in practice
        if isinstance(model, PreTrainedModel):
            break
        if hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP, DeepSpeed
            model = model.module
        else:
            return None
    if not isinstance(model, PreTrainedModel):
        return None
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    return decoder if isinstance(decoder, nn.Module) and decoder is not model else None


def final_hidden(model: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """The final hidden states (after the final norm): ``[batch, seq, d]``.

    Called through the model's own ``forward`` (so wrappers such as DDP or peft, and FSDP's or
    DeepSpeed's hooks, see the call) with ``logits_to_keep`` empty: the head computes nothing. The
    base model's ``last_hidden_state`` (what the head reads) is taken by a forward hook on it, so the
    other layers' hidden states are never collected (``output_hidden_states=True`` would keep all of
    them alive: under ``no_grad`` that is the teacher's whole stack of activations). A model whose base
    model cannot be found falls back to ``output_hidden_states=True``.
    """
    no_logits = _NO_LOGITS.to(input_ids.device)
    decoder = decoder_of(model)
    if decoder is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=no_logits)
        return out.hidden_states[-1]
    captured = []

    def keep_last_hidden_state(module, args, output):
        captured.append(getattr(output, "last_hidden_state", None))

    handle = decoder.register_forward_hook(keep_last_hidden_state)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=no_logits)
    finally:
        handle.remove()
    if len(captured) != 1 or captured[0] is None:
        raise RuntimeError(
            f"okd.heads.final_hidden: {type(decoder).__name__} ran {len(captured)} times or returned no "
            "last_hidden_state; use --train.loss_positions_only false for this model"
        )
    return captured[0]


def final_hidden_at(model: nn.Module, input_ids, attention_mask, rows: torch.Tensor) -> torch.Tensor:
    """The final hidden states (after the final norm) at ``rows``: ``[N, d]`` (see :func:`final_hidden`)."""
    hidden = final_hidden(model, input_ids, attention_mask)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
