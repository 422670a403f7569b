"""Batched, KV-cached generation with an isolated, seeded RNG: the one generation path of okd.

Used by the generation-based sources (SeqKD's cache, on-policy, DistiLLM's replay), by evaluation and
by analysis. Two pieces:

* ``generate_batched``: one response per prompt, in batches of left-padded prompts, with the KV
  cache (okd's own decoding loop, or Hugging Face ``generate`` as the fallback: ``resolve_backend``), under ``torch.inference_mode()`` and in eval mode; each response is cut right AFTER its first EOS
  (the EOS is kept: it is a token the student must learn to emit).
* ``isolated_rng(seed)``: within the block, the CPU generator and every accelerator generator (all
  CUDA devices, MPS, XPU) start from ``seed``; on exit all of them are back where they were, so the
  caller's random streams are untouched.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from okd.data.instruction import collate_prompts

__all__ = ["BACKENDS", "cut_after_eos", "generate_batched", "generation_budget", "isolated_rng", "resolve_backend"]


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


# Which loop generates. "okd": the hand-written KV-cached loop below (``_decode``); "hf": Hugging
# Face ``model.generate``; "auto": okd's loop for decoder-only models whose forward takes a KV cache,
# ``generate`` for anything else (encoder-decoder models, models without cache support).
BACKENDS = ("auto", "okd", "hf")
DEFAULT_BACKEND = "auto"


def _cache_argument(model) -> str | None:
    """The forward keyword that takes the KV cache (``cache`` in transformers >= 5.2x, earlier
    ``past_key_values``), or None when the model has none."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def resolve_backend(model, backend: str | None = None) -> str:
    """``"okd"`` or ``"hf"`` for ``model``: the rule behind ``backend="auto"``.

    okd's loop needs a decoder-only model whose forward takes ``position_ids``, ``attention_mask``
    and a KV cache (``cache`` / ``past_key_values``): every Hugging Face causal LM okd trains
    (Llama, GPT-2, Qwen, SmolLM, ...). Anything else, encoder-decoder models first, goes to
    ``model.generate``. An explicit ``"okd"`` for a model that cannot take it is an error.
    """
    backend = backend or DEFAULT_BACKEND
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "hf":
        return "hf"
    config = getattr(model, "config", None)
    parameters = inspect.signature(model.forward).parameters
    supported = (
        config is not None
        and not getattr(config, "is_encoder_decoder", False)
        and _cache_argument(model) is not None
        and "position_ids" in parameters
        and "attention_mask" in parameters
    )
    if backend == "okd" and not supported:
        raise ValueError(
            f"backend='okd' needs a decoder-only model whose forward takes a KV cache and position_ids; "
            f"{type(model).__name__} does not: use backend='hf'"
        )
    return "okd" if supported else "hf"


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter, the same operations as transformers' ``TopPLogitsWarper`` (so the same nucleus):
    drop the smallest tokens whose cumulative probability stays at or below ``1 - top_p``, keep at
    least the largest one."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
    return scores.masked_fill(remove, -float("inf"))


def _sample(scores: torch.Tensor) -> torch.Tensor:
    """One token per row from ``softmax(scores)`` by inverse-CDF sampling: ``[batch, vocab] -> [batch]``.

    One uniform draw per row, scaled to the total, against the running sum of the probabilities.
    The same distribution as ``torch.multinomial(probs, 1)`` (both in fp32; the running sum's
    rounding, ~1e-7 per addition, is far below sampling error), which on CPU draws per
    vocabulary entry: 6.2-6.7 ms per call for 8 x 8192 against 0.57 ms here, a quarter of a tiny
    model's decoding step (benchmarks/results/generation_speed.md). So the draws differ from
    ``generate``'s for the same seed; the distribution does not (tested). ``right=True``: a token of
    probability 0 (cut by top-p) adds nothing to the sum, so it can never be chosen.
    """
    cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)
    u = torch.rand(scores.shape[0], 1, dtype=cdf.dtype, device=scores.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=scores.shape[-1] - 1)


class _PreallocatedLayer(DynamicLayer):
    """A full-attention KV cache layer over one ``[batch, kv heads, capacity, head dim]`` buffer each for
    keys and values: an update writes the new states in place and returns the filled part as a view,
    the same values ``DynamicLayer`` returns, without copying what is already cached.

    ``DynamicLayer.update`` concatenates the new states onto the whole cache at every step, so
    decoding ``n`` tokens copies the cache ``n`` times (the ``decode_loop`` table of
    benchmarks/results/generation_speed_idle.md measures the difference). A write past ``capacity``
    (``_decode`` sizes it, so never there) grows the buffers by doubling.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._keys = key_states.new_empty(*key_states.shape[:2], self.capacity, key_states.shape[-1])
        self._values = value_states.new_empty(*value_states.shape[:2], self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            self._keys, self._values = (_grown(buffer, max(end, 2 * buffer.shape[-2])) for buffer in (self._keys, self._values))
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


def _grown(buffer: torch.Tensor, length: int) -> torch.Tensor:
    extra = buffer.new_empty(*buffer.shape[:2], length - buffer.shape[-2], buffer.shape[-1])
    return torch.cat([buffer, extra], dim=-2)


def _preallocated_cache(model, capacity: int) -> DynamicCache:
    """``DynamicCache(config=model.config)`` with every full-attention layer a ``_PreallocatedLayer`` of
    ``capacity`` positions; layers of other kinds (sliding window, linear attention) keep their class."""
    cache = DynamicCache(config=model.config)
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[index] = _PreallocatedLayer(capacity)
    return cache


def _decode(model, input_ids, attention_mask, *, eos, pad_token_id, max_new_tokens, sample, temperature, top_p):
    """okd's KV-cached decoding loop: ``[batch, new tokens]`` ids, rows past their EOS filled with pad.

    It does what ``model.generate`` does for a decoder-only model with sampling or greedy search, in
    the same order, so greedy decoding gives the same tokens: position ids from the left-padded mask (``cumsum - 1``, 0 at padding), no mask
    at all when nothing is padded (as ``generate`` drops it), logits of the last position only
    (``logits_to_keep=1``) in fp32, temperature then top-p (the same operations as ``generate``'s
    warpers), pad for finished rows, and a stop as soon as every row has emitted an EOS. The one
    deliberate difference is the draw itself (``_sample``: inverse CDF, not ``torch.multinomial``):
    the same distribution, different samples for a seed; every row draws at every step, so the RNG
    use depends only on the seed and the number of steps. What it leaves out is ``generate``'s per-step
    machinery (logits-processor and stopping-criteria lists, kwargs preparation, generation-config
    merging: the model's ``generation_config`` sampling defaults are NOT applied, okd passes its own).
    """
    cache_name = _cache_argument(model)
    cache = _preallocated_cache(model, input_ids.shape[1] + max_new_tokens)
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    mask = None if bool(attention_mask.all()) else attention_mask
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    eos_ids = torch.tensor(sorted(eos), dtype=torch.long, device=input_ids.device) if eos else None
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    pad = torch.tensor(pad_token_id, dtype=torch.long, device=input_ids.device)
    tokens, step_ids = [], input_ids
    for step in range(max_new_tokens):
        outputs = model(
            input_ids=step_ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **{cache_name: cache}, **extra
        )
        scores = outputs.logits[:, -1].to(dtype=torch.float32)
        if sample:
            if temperature != 1.0:
                scores = scores / temperature
            if top_p < 1.0:
                scores = _top_p_filter(scores, top_p)
            next_tokens = _sample(scores)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        next_tokens = torch.where(unfinished, next_tokens, pad)
        tokens.append(next_tokens)
        if eos_ids is not None:
            unfinished &= ~torch.isin(next_tokens, eos_ids)
            if not bool(unfinished.any()):  # every row has its EOS: stop early
                break
        step_ids = next_tokens[:, None]
        position_ids = position_ids[:, -1:] + 1
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
    return torch.stack(tokens, dim=1)


def _generate_one_batch(model, prompts, *, pad_token_id, eos_token_id, max_new_tokens, temperature, top_p, do_sample, backend):
    sample = do_sample and temperature > 0
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_prompts(prompts, pad_token_id).items()}
    # inference_mode, not no_grad: no autograd bookkeeping at all (version counters, view tracking) for
    # the hundreds of small ops per token (generation_speed_idle.md's decode_loop table). Nothing created
    # here leaves the block as a tensor: the responses are returned as lists. (Sharded runs, where
    # parameters are materialised in forward, are refused for generating sources: distributed.py.)
    with torch.inference_mode():
        if backend == "okd":
            generated = _decode(
                model, batch["input_ids"], batch["attention_mask"], eos=_eos_set(eos_token_id), pad_token_id=pad_token_id,
                max_new_tokens=max_new_tokens, sample=sample, temperature=float(temperature), top_p=float(top_p),
            )
        else:
            kwargs: dict[str, Any] = dict(
                max_new_tokens=max_new_tokens, do_sample=sample, use_cache=True, pad_token_id=pad_token_id,
                eos_token_id=eos_token_id,
            )
            if sample:
                kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
            generated = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]
    return [cut_after_eos(row, eos_token_id) for row in generated.tolist()]


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
    backend: str | None = None,
    group_by_length: bool = False,
) -> list[list[int]]:
    """Generate one response per prompt; returns each prompt's new token ids, in prompt order.

    Prompts are decoded ``batch_size`` at a time (None: all at once), left-padded so that
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

    ``backend``: ``"okd"`` (okd's KV-cached loop: the same greedy tokens as ``generate``, samples from
    the same distribution but not the same draws, less per-step overhead), ``"hf"``
    (``model.generate``) or ``"auto"`` / None (``DEFAULT_BACKEND``:
    okd's loop where ``resolve_backend`` allows it, else ``generate``). ``group_by_length``: form
    the batches from prompts sorted by length (less left padding when there are more prompts than
    ``batch_size``); responses still come back in prompt order, but which prompts share a batch,
    and hence the samples, change.
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
    backend = resolve_backend(model, backend)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i])) if group_by_length else list(range(len(prompts)))
    responses: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        with isolated_rng(seed) if seed is not None else contextlib.nullcontext():
            for start in tqdm(range(0, len(prompts), step), desc=desc, unit="batch", disable=not progress, leave=False):
                chunk = [list(prompts[i]) for i in order[start : start + step]]
                budget = max_new_tokens if max_length is None else generation_budget(chunk, max_new_tokens, max_length)
                responses.extend(
                    _generate_one_batch(
                        model, chunk, pad_token_id=pad_token_id, eos_token_id=eos_token_id, max_new_tokens=budget,
                        temperature=temperature, top_p=top_p, do_sample=do_sample, backend=backend,
                    )
                )
    finally:
        model.train(was_training)
    if group_by_length:
        in_order: list[list[int]] = [[] for _ in prompts]
        for i, response in zip(order, responses):
            in_order[i] = response
        return in_order
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
