"""Batched, KV-cached generation with an isolated, seeded RNG: the one generation path of okd.

Used by the generation-based sources (SeqKD's cache, on-policy, DistiLLM's replay), by evaluation and
by analysis. Two pieces:

* ``generate_batched``: one response per prompt, in batches of left-padded prompts, with the KV
  cache, under ``torch.no_grad()`` and in eval mode; each response is cut right AFTER its first EOS
  (the EOS is kept: it is a token the student must learn to emit).
* ``isolated_rng(seed)``: within the block, the CPU generator and every accelerator generator (all
  CUDA devices, MPS, XPU) start from ``seed``; on exit all of them are back where they were, so the
  caller's random streams are untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

__all__ = ["cut_after_eos", "generate_batched", "generation_budget", "isolated_rng"]


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Seed every torch generator with ``seed`` inside the block; restore all of them afterwards.

    ``torch.random.fork_rng`` forks only the CUDA devices it is told about and no MPS/XPU
    generator, so this saves and restores each backend's state itself.
    """
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    mps = getattr(torch, "mps", None)
    mps_state = mps.get_rng_state() if mps is not None and torch.backends.mps.is_available() else None
    xpu = getattr(torch, "xpu", None)
    xpu_state = xpu.get_rng_state_all() if xpu is not None and xpu.is_available() else None
    try:
        torch.manual_seed(seed)  # seeds the CPU and every available accelerator generator
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        if mps_state is not None:
            mps.set_rng_state(mps_state)
        if xpu_state is not None:
            xpu.set_rng_state_all(xpu_state)


def _eos_set(eos_token_id: int | Sequence[int] | None) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(t) for t in eos_token_id}


def cut_after_eos(tokens: list[int], eos_token_id: int | Sequence[int] | None) -> list[int]:
    """``tokens`` up to and including the first EOS; all of them if there is none."""
    eos = _eos_set(eos_token_id)
    for position, token in enumerate(tokens):
        if token in eos:
            return tokens[: position + 1]
    return tokens


def generation_budget(prompts: Sequence[Sequence[int]], max_new_tokens: int | None, max_length: int) -> int:
    """``max_new_tokens`` capped to what fits ``max_length`` after the longest prompt (at least 1);
    when None, all of that room.

    Tokens past ``max_length`` would be cut from a training batch anyway, and a model with learned
    positions sized to ``max_length`` (GPT-2 built by okd.models) cannot go past it. The None
    default is modelled on DistiLLM, which generates ``max_length - max_prompt_length`` new tokens.
    """
    room = max(1, max_length - max(len(p) for p in prompts))
    return room if max_new_tokens is None else min(int(max_new_tokens), room)


def _generate_one_batch(model, prompts, *, pad_token_id, eos_token_id, max_new_tokens, temperature, top_p, do_sample):
    from okd.data.instruction import collate_prompts

    sample = do_sample and temperature > 0
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_prompts(prompts, pad_token_id).items()}
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=sample, use_cache=True, pad_token_id=pad_token_id, eos_token_id=eos_token_id
    )
    if sample:
        kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
    with torch.no_grad():
        generated = model.generate(**batch, **kwargs)
    return [cut_after_eos(row, eos_token_id) for row in generated[:, batch["input_ids"].shape[1] :].tolist()]


def generate_batched(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    eos_token_id: int | Sequence[int] | None,
    max_new_tokens: int | None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    batch_size: int | None = None,
    seed: int | None = None,
    max_length: int | None = None,
    progress: bool = False,
    desc: str = "generate",
) -> list[list[int]]:
    """Generate one response per prompt; returns each prompt's new token ids, in prompt order.

    Prompts go to ``model.generate`` ``batch_size`` at a time (None: all at once), left-padded so that
    every row's last prompt token sits in the last column; the KV cache is on, gradients off, and the
    model is in eval mode (its previous mode comes back afterwards, even on error). Each response is
    cut right AFTER its first EOS (what ``generate`` wrote after it is padding); one that never emits
    EOS keeps all its tokens. ``eos_token_id`` may be a list (several stop tokens); None means the
    model's ``generation_config.eos_token_id``.

    Sampling draws from the full distribution at ``temperature`` with nucleus ``top_p``: ``top_k=0``
    is passed explicitly, because Hugging Face's default generation config would otherwise apply
    ``top_k=50`` (DistiLLM and TRL both sample with ``top_k=0``). ``do_sample=False`` or
    ``temperature == 0`` is greedy decoding. With ``seed`` the whole call runs in ``isolated_rng(seed)``;
    without, sampling uses (and advances) the global torch RNG.

    ``max_length``, if given, caps each batch's ``max_new_tokens`` to the room after its longest
    prompt (``generation_budget``; ``max_new_tokens=None`` then fills that room).
    """
    if len(prompts) == 0:
        return []
    if max_new_tokens is None and max_length is None:
        raise ValueError("pass max_new_tokens, or max_length to fill the room after each prompt")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if eos_token_id is None:  # cut where generate stops: at the model's own EOS
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    step = batch_size or len(prompts)
    responses: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        with isolated_rng(seed) if seed is not None else contextlib.nullcontext():
            for start in tqdm(range(0, len(prompts), step), desc=desc, unit="batch", disable=not progress, leave=False):
                chunk = [list(p) for p in prompts[start : start + step]]
                budget = max_new_tokens if max_length is None else generation_budget(chunk, max_new_tokens, max_length)
                responses.extend(
                    _generate_one_batch(
                        model, chunk, pad_token_id=pad_token_id, eos_token_id=eos_token_id, max_new_tokens=budget,
                        temperature=temperature, top_p=top_p, do_sample=do_sample,
                    )
                )
    finally:
        model.train(was_training)
    return responses


def generate_responses(
    model,
    prompt_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    eos_token_id: int | Sequence[int] | None,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
) -> list[list[int]]:
    """One batch of ``generate_batched`` on the global RNG (the name earlier versions exported)."""
    return generate_batched(
        model, prompt_ids, pad_token_id=pad_token_id, eos_token_id=eos_token_id, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, do_sample=do_sample,
    )
