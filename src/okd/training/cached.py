"""Training from cached teacher outputs (``model.teacher_cache``): the teacher's forward pass is read, not run.

``okd teacher cache`` (:mod:`okd.teacher_cache`) runs a teacher once over the training data; a run with
``model.teacher_cache DIR`` then trains from it:

* a ``store="topk"`` cache replaces the teacher: its weights are never loaded. The student's loss is
  ``(1 - kd_ratio) * CE + kd_ratio * D``, ``D`` the method's divergence between the cached top-k buckets
  and the student's (:func:`okd.teacher_cache.cached_divergence`; exact for ``k = vocab``, where
  ``method.temperature != 1`` is allowed; refused for ``k < vocab``);
* a ``store="hidden"`` cache holds the teacher's final hidden states: only the teacher's output head
  is kept (the teacher is loaded, its head taken and the rest dropped, :class:`HeadOnlyTeacher`), and an
  OKD step with ``online.kind=adapter`` costs the adapter and the head. With ``train.loss_positions_only``
  (the default) the student's head, too, runs on the loss positions only (``okd.heads``) and the usual
  :class:`okd.losses.DistillationLoss` takes both models' ``[positions, vocab]`` logits, as on the live
  teacher's positions path; otherwise the teacher's logits are scattered back to ``[batch, seq, vocab]``
  (zeros off the loss positions, which every loss masks out). Either way the run equals the live one.

Only teacher-forced ground-truth data can be cached (``method.source=ground_truth``): generated
sequences are new every step. Entries are found by a hash of each tokenised example, so shuffled
epochs read the right ones. Validation: the validation split is not in the cache, so a cached run logs
``validation_ce`` only (no ``validation_divergence`` nor adapted-teacher metrics). Every process opens
the cache itself, read-only (memory-mapped safetensors shards). The cache's path and a fingerprint of
its manifest are part of the run's config, so ``--resume`` refuses another cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from okd.heads import apply_head, final_hidden_at
from okd.losses import StepLosses, cross_entropy
from okd.targets import loss_positions, mix_losses, next_token_targets
from okd.teacher_cache import (
    MANIFEST_FILE,
    CacheExpectation,
    TeacherCache,
    cached_divergence,
    fingerprint_tokenizer,
    scatter_to_batch,
)

if TYPE_CHECKING:
    from okd.config import DistillConfig, ModelConfig, ResolvedMethod

__all__ = [
    "HeadOnlyTeacher",
    "cache_identity",
    "cache_store",
    "cached_forward_losses",
    "check_cache_config",
    "open_teacher_cache",
]


def cache_store(directory: str) -> str:
    """The ``store`` of the cache at ``directory`` (``"topk"`` or ``"hidden"``), read from its manifest."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"model.teacher_cache {directory}: no {MANIFEST_FILE} (build one with `okd teacher cache`)")
    try:
        return json.loads(path.read_text())["store"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"model.teacher_cache {directory}: {MANIFEST_FILE} is not an okd teacher cache manifest") from None


def check_cache_config(config: DistillConfig, method: ResolvedMethod) -> None:
    """Refuse, in one line each, what a cache cannot serve (called before any model is loaded)."""
    directory = config.model.teacher_cache
    if not directory:
        return
    if not (method.kd_ratio > 0 or method.online_teacher):
        raise ValueError(f"model.teacher_cache is set but method {method.name!r} learns nothing from a teacher (kd_ratio 0)")
    if method.source != "ground_truth":
        raise ValueError(
            f"model.teacher_cache needs teacher-forced data (method.source=ground_truth); method.source={method.source} "
            "makes new sequences every step, which no cache holds"
        )
    store = cache_store(directory)
    if method.online_teacher:
        if config.online.kind != "adapter":
            raise ValueError(
                f"model.teacher_cache with OKD needs online.kind=adapter (a hidden-state cache), got online.kind={config.online.kind}"
            )
        if store != "hidden":
            raise ValueError(
                f"model.teacher_cache {directory} holds store={store}; OKD needs a store=hidden cache "
                "(`okd teacher cache --store hidden`)"
            )


class HeadOnlyTeacher(nn.Module):
    """What a hidden-state cache needs of the teacher: its config and its output head.

    Built from the loaded teacher, whose body is then dropped (only the head's weight stays in memory;
    with tied embeddings that is the embedding matrix). :class:`okd.teacher.Teacher` and the adapter
    module accept it in place of the model; calling it fails, as nothing may run the body.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.config = model.config
        self.lm_head = model.get_output_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, *args, **kwargs):
        raise RuntimeError("the teacher's body is not loaded: this run trains from a hidden-state teacher cache")


def open_teacher_cache(config: DistillConfig, method: ResolvedMethod, tokenizer, student: nn.Module, train_set) -> TeacherCache | None:
    """Open ``model.teacher_cache`` checked against the run (teacher, tokenizer, width, data); None without one."""
    model: ModelConfig = config.model
    if not model.teacher_cache:
        return None
    from okd.models import logits_width

    store = cache_store(model.teacher_cache)
    # The teacher's files are fingerprinted (a few MiB read), never loaded; without model.teacher the
    # manifest's teacher is trusted.
    if model.teacher:
        expect = CacheExpectation.for_run(model.teacher, tokenizer, store=store)
    else:
        expect = CacheExpectation(tokenizer_fingerprint=fingerprint_tokenizer(tokenizer), store=store)
    if store == "topk":
        # Cached log-probs are normalised over the cache's vocab_size: it must be the student's logits width.
        expect.vocab_size = logits_width(student)
    cache = TeacherCache(model.teacher_cache, expect)
    cache.check_covers(train_set)
    if store == "topk" and method.temperature != 1.0 and cache.top_k != cache.vocab_size:
        raise ValueError(
            f"method.temperature={method.temperature} needs an exact teacher cache (k = vocab); model.teacher_cache "
            f"{model.teacher_cache} has k = {cache.top_k} of {cache.vocab_size}"
        )
    return cache


def cache_identity(cache: TeacherCache) -> dict:
    """What the resume check compares: the cache's path and a fingerprint of its manifest."""
    manifest = (cache.directory / MANIFEST_FILE).read_bytes()
    return {"path": str(cache.directory), "manifest_fingerprint": hashlib.sha256(manifest).hexdigest()[:16]}


def _hidden_teacher_logits(
    teacher, cache: TeacherCache, batch: dict, *, track_module_grad: bool, need_frozen: bool, positions: bool = False
):
    """``(adapted, frozen)`` logits from cached hidden states, as the adapter computes them
    (``head(adapter(h))`` and ``head(h)``); ``frozen`` None unless needed. ``positions``: ``[N, V]``, one
    row per loss position (row-major, as ``okd.targets.loss_positions``); else ``[B, T, V]``, zeros off
    the loss positions."""
    targets = cache.lookup(batch["input_ids"], batch["attention_mask"], batch["labels"])
    head = teacher.model.get_output_embeddings()
    hidden = targets.hidden.to(head.weight.device, head.weight.dtype)
    adapter = teacher.adapter
    with torch.no_grad():
        frozen = head(hidden) if (need_frozen or adapter is None) else None
    if adapter is None:
        adapted = frozen
    else:
        with torch.set_grad_enabled(track_module_grad and torch.is_grad_enabled()):
            adapted = head(adapter(hidden))
    frozen = frozen if adapter is not None else None
    if positions:
        return adapted, frozen
    mask = targets.mask
    return scatter_to_batch(adapted, mask), (scatter_to_batch(frozen, mask) if frozen is not None else None)


def cached_forward_losses(
    distiller, batch: dict[str, torch.Tensor], update_module: bool, *, need_frozen: bool = False
) -> StepLosses:
    """:meth:`okd.training.Distiller.forward_losses` with the teacher read from ``distiller.teacher_cache``;
    ``need_frozen``: whether the frozen teacher's logits are computed (``okd.training.forward.frozen_needed``)."""
    loss_fn, cache = distiller.loss_fn, distiller.teacher_cache
    with distiller.accelerator.autocast():
        if cache.store == "hidden" and distiller.loss_path.heads == "positions":
            # Both heads on the loss positions only: the student's from its final hidden states there.
            rows, targets = loss_positions(batch["labels"])
            student = distiller.student
            student_hidden = final_hidden_at(student, batch["input_ids"], batch["attention_mask"], rows)
            student_logits = apply_head(distiller.accelerator.unwrap_model(student).get_output_embeddings(), student_hidden)
            teacher_logits, frozen_logits = _hidden_teacher_logits(
                distiller.teacher, cache, batch, track_module_grad=update_module,
                need_frozen=need_frozen, positions=True,
            )
            return loss_fn(
                student_logits, teacher_logits, None, update_module, frozen_logits, distiller.step, targets=targets,
            )
        student_logits = distiller.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if cache.store == "hidden":
            teacher_logits, frozen_logits = _hidden_teacher_logits(
                distiller.teacher, cache, batch, track_module_grad=update_module,
                need_frozen=need_frozen,
            )
            return loss_fn(
                student_logits, teacher_logits, batch["labels"], update_module=update_module,
                frozen_logits=frozen_logits, step=distiller.step,
            )
        # Top-k cache: the objective of okd.losses.DistillationLoss, its divergence taken in bucket space.
        method = loss_fn.method
        targets, _ = next_token_targets(batch["labels"])
        ratio = method.kd_ratio
        with torch.set_grad_enabled(torch.is_grad_enabled() and ratio < 1):  # kd_ratio 1: CE only logged
            ce = cross_entropy(student_logits, targets)
        cached = cache.lookup(batch["input_ids"], batch["attention_mask"], batch["labels"])
        kd = cached_divergence(
            student_logits, cached, method.divergence, temperature=method.temperature,
            chunk_tokens=loss_fn.chunk_tokens, **method.divergence_params,
        )
        loss = mix_losses(ce, kd, ratio)
        return StepLosses(loss=loss, ce=ce, kd=kd)
