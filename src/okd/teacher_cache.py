"""Cached teacher outputs: run the teacher once, train many students from the cache.

A comparison or a sweep trains many students on the same data against the same teacher; the teacher's
forward pass is then the same on every run. ``okd teacher cache`` (:func:`cache_teacher`) runs it once,
teacher-forced over a tokenised :class:`okd.data.InstructionDataset`, and stores what the loss needs at
the **loss positions** only (position ``t`` of an example is a loss position when ``labels[t + 1] != -100``,
i.e. the logits at ``t`` predict a response token; prompt and padding are never stored):

* ``store="topk"``: the ``k`` largest teacher log-probabilities, their token ids, and the log of the
  remaining *tail* mass ``log(1 - sum_topk p)``. ``k = vocab`` is exact (the tail is then empty, ``-inf``).
  Training from it needs no teacher in memory.
* ``store="hidden"``: the teacher's final hidden state (``base_model(...).last_hidden_state``, what the
  ``adapter`` online module transforms), so an OKD step costs the adapter and the output head only.

Log-probabilities are stored at temperature 1 (``log_softmax(logits)`` over the vocabulary, after cutting
the teacher's logits to ``vocab_size``). See :func:`cached_divergence` for how temperature is applied.

Entries are found by **key**, a hash of the tokenised example (``input_ids`` and ``labels``), never by step
or position in the data: a shuffled second epoch reads the same entries as the first (easydistill's
offline logits were indexed by step and read all zeros after the first epoch).

On-disk format (``FORMAT_VERSION`` 1), one directory::

    manifest.json              what the cache holds and what it was made from (see below)
    shard-00000.safetensors    a few thousand positions each:
        example_keys     uint8 [E, 16]   the examples' keys (16 bytes of sha256), in shard order
        example_offsets  int64 [E + 1]   example e owns rows offsets[e]:offsets[e + 1] (its loss positions, in order)
        topk:   logprobs  <dtype> [N, k] top-k log-probs, descending;  token_ids int32 [N, k];
                tail_logprob float32 [N]  log of the mass outside the top k (-inf when k = vocab)
        hidden: hidden <dtype> [N, H]    final hidden states

``manifest.json`` names the cache format and version, ``store``, ``top_k``, ``vocab_size``,
``hidden_size``, ``temperature`` (always 1.0: what was stored), ``dtype``, the teacher (the path given and a
fingerprint of its config and weight files, :func:`fingerprint_teacher`), the tokenizer (a fingerprint of its
vocabulary and special tokens, :func:`fingerprint_tokenizer`), the data (a fingerprint of the sorted keys,
the numbers of examples and positions) and the shards. The directory is written under a hidden temporary
name and renamed into place at the end, so a crash leaves no directory that looks like a complete cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from okd.data.instruction import Collator
from okd.divergences import get_divergence
from okd.io import atomic_directory
from okd.targets import example_loss_positions, next_token_targets

# The loss positions of one unpadded example (``okd.targets``), under the name this module exports.
loss_positions = example_loss_positions

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "CacheExpectation",
    "CacheMismatchError",
    "CachedHiddenTeacher",
    "HiddenTargets",
    "SparseTargets",
    "TeacherCache",
    "bucket_student",
    "build_teacher_cache",
    "cache_teacher",
    "cached_divergence",
    "example_key",
    "fingerprint_teacher",
    "fingerprint_tokenizer",
    "loss_positions",
    "scatter_to_batch",
]

FORMAT_NAME = "okd-teacher-cache"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
KEY_BYTES = 16  # 128 bits of sha256: collisions are not a concern at any data-set size

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CacheMismatchError(ValueError):
    """The cache on disk is not the one asked for (teacher, tokenizer, k, format, data ...)."""


# --------------------------------------------------------------------------------------------------
# Keys and loss positions
# --------------------------------------------------------------------------------------------------


def _as_int_list(x: Sequence[int] | Tensor) -> list[int]:
    return x.tolist() if isinstance(x, Tensor) else [int(v) for v in x]


def example_key(input_ids: Sequence[int] | Tensor, labels: Sequence[int] | Tensor) -> str:
    """The cache key of one tokenised example: 32 hex digits of ``sha256(input_ids, labels)``.

    Both unpadded, as :class:`okd.data.InstructionDataset` gives them. The labels are part of the key
    because they decide which positions are loss positions (the same tokens with another prompt/response
    split are another entry).
    """
    ids, labs = _as_int_list(input_ids), _as_int_list(labels)
    if len(ids) != len(labs):
        raise ValueError(f"input_ids and labels differ in length ({len(ids)} vs {len(labs)})")
    digest = hashlib.sha256(json.dumps([ids, labs], separators=(",", ":")).encode())
    return digest.hexdigest()[: 2 * KEY_BYTES]


def batch_loss_mask(labels: Tensor) -> Tensor:
    """``[B, T]`` bool: the loss positions of a right-padded batch, the mask of ``okd.targets.next_token_targets``
    (kept under this name, which the cache's readers and their tests use)."""
    return next_token_targets(labels)[1]


def _batch_rows(input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor) -> list[tuple[list[int], list[int]]]:
    """The unpadded ``(input_ids, labels)`` of each row of a right-padded batch."""
    if input_ids.shape != labels.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids and labels must both be [batch, seq], got {tuple(input_ids.shape)} and {tuple(labels.shape)}"
        )
    if attention_mask is None:
        lengths = [input_ids.shape[1]] * input_ids.shape[0]
    else:
        am = attention_mask.to(torch.bool).cpu()
        lengths = am.sum(dim=1).tolist()
        # Right padding only: the attention mask must be a prefix of ones (Collator's layout).
        expected = torch.arange(am.shape[1]).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
        if not torch.equal(am, expected):
            raise ValueError("the teacher cache needs right-padded batches (attention_mask 1...1 0...0 per row)")
    ids, labs = input_ids.cpu().tolist(), labels.cpu().tolist()
    return [(ids[b][:n], labs[b][:n]) for b, n in enumerate(lengths)]


def scatter_to_batch(rows: Tensor, mask: Tensor, fill: float = 0.0) -> Tensor:
    """Put per-loss-position rows back into batch layout.

    Args:
        rows: ``[N, ...]``, row ``i`` belonging to the ``i``-th True of ``mask`` (row-major order).
        mask: ``[B, T]`` bool with ``N`` True entries.

    Returns:
        ``[B, T, ...]`` with ``rows`` at the mask and ``fill`` elsewhere (differentiable in ``rows``).
    """
    out = rows.new_full((*mask.shape, *rows.shape[1:]), fill)
    return out.index_put((mask.to(rows.device),), rows)


# --------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_SAMPLE_BYTES = 8 << 20  # fingerprint weight files by size + first and last 8 MiB


def _file_digest(path: Path, full: bool) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{path.name}:{size}:".encode())
    with open(path, "rb") as f:
        if full or size <= 2 * _SAMPLE_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(_SAMPLE_BYTES))
            f.seek(size - _SAMPLE_BYTES)
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def fingerprint_teacher(source: str | os.PathLike | nn.Module) -> str:
    """A short fingerprint of a teacher checkpoint (16 hex digits).

    * a directory: ``config.json`` and ``generation_config.json`` hashed whole, every weight file
      (``*.safetensors``, ``*.bin``, ``*.gguf``, ...) by name, size and its first and last 8 MiB, so that
      fingerprinting a 14 GB checkpoint reads 16 MiB per file. It tells checkpoints apart (a fine-tuned
      checkpoint differs from its first bytes on, a safetensors header names every tensor), it is not a
      defence against a deliberate edit in the middle of a file.
    * a file (a ``.gguf``): the same, for that file.
    * a hub id: its locally cached snapshot, as a directory.
    * an ``nn.Module`` (a model built in memory): its config and every parameter and buffer, hashed whole.
    """
    h = hashlib.sha256()
    if isinstance(source, nn.Module):
        config = getattr(source, "config", None)
        if config is not None:
            d = {k: v for k, v in config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}
            h.update(json.dumps(d, sort_keys=True, default=str).encode())
        for name, tensor in sorted(source.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]
    path = Path(source).expanduser()
    if not path.exists():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(source), local_files_only=True))
        except Exception as err:  # noqa: BLE001  (any failure: not found locally)
            raise FileNotFoundError(f"teacher {source}: no such file or directory, nor a cached hub id") from err
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    used = [
        p for p in files
        if p.name in ("config.json", "generation_config.json") or p.name.endswith(_WEIGHT_SUFFIXES)
    ]
    if not used:
        raise FileNotFoundError(f"teacher {source}: no config.json or weight files to fingerprint")
    for p in used:
        h.update(_file_digest(p, full=p.suffix == ".json").encode())
    return h.hexdigest()[:16]


def fingerprint_tokenizer(tokenizer) -> str:
    """A short fingerprint of a tokenizer (16 hex digits): its token -> id map and special-token ids.

    What decides whether cached ids mean the same tokens. (How text becomes ids, chat template included,
    is covered by the example keys: other ids are other keys.)
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = {role: getattr(tokenizer, f"{role}_token_id", None) for role in ("bos", "eos", "pad", "unk")}
    payload = json.dumps([vocab, special, len(tokenizer)], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _head_input(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The final hidden states ``[B, T, H]`` the output head reads (as the adapter module computes them)."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _topk_rows(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """From ``[n, V]`` logits: top-k log-probs ``[n, k]`` (descending), ids ``[n, k]``, tail ``[n]``.

    The tail is ``logsumexp`` of the log-probs outside the top k, i.e. ``log(1 - sum_topk p)`` computed
    without the cancellation of ``1 - sum``; ``-inf`` when ``k = V``.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(log_probs, top_k, dim=-1)
    if top_k == log_probs.shape[-1]:
        tail = torch.full(values.shape[:1], -math.inf, device=values.device)
    else:
        tail = torch.logsumexp(log_probs.scatter(-1, ids, -math.inf), dim=-1)
    return values, ids, tail


class _ShardWriter:
    """Accumulates entries and writes a shard every ``positions_per_shard`` positions."""

    def __init__(self, directory: Path, positions_per_shard: int, tensors: dict[str, torch.dtype]):
        self.directory = directory
        self.positions_per_shard = positions_per_shard
        self.tensor_dtypes = tensors
        self.shards: list[dict[str, Any]] = []
        self._reset()

    def _reset(self) -> None:
        self.keys: list[bytes] = []
        self.offsets = [0]
        self.parts: dict[str, list[Tensor]] = {name: [] for name in self.tensor_dtypes}

    def add(self, key: str, rows: dict[str, Tensor]) -> None:
        n = next(iter(rows.values())).shape[0]
        self.keys.append(bytes.fromhex(key))
        self.offsets.append(self.offsets[-1] + n)
        for name, value in rows.items():
            self.parts[name].append(value.detach().to("cpu", self.tensor_dtypes[name]))
        if self.offsets[-1] >= self.positions_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.keys:
            return
        from safetensors.torch import save_file

        name = f"shard-{len(self.shards):05d}.safetensors"
        tensors = {name_: torch.cat(parts).contiguous() for name_, parts in self.parts.items()}
        tensors["example_keys"] = torch.frombuffer(bytearray(b"".join(self.keys)), dtype=torch.uint8).reshape(-1, KEY_BYTES)
        tensors["example_offsets"] = torch.tensor(self.offsets, dtype=torch.int64)
        save_file(tensors, str(self.directory / name))
        self.shards.append({"file": name, "examples": len(self.keys), "positions": self.offsets[-1]})
        self._reset()


@torch.no_grad()
def build_teacher_cache(
    teacher_model: nn.Module,
    dataset: Sequence[dict[str, Any]],
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    store: Literal["topk", "hidden"] = "topk",
    top_k: int = 64,
    vocab_size: int | None = None,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    batch_size: int = 8,
    positions_per_shard: int = 4096,
    pad_token_id: int | None = None,
    teacher_path: str | None = None,
    teacher_fingerprint: str | None = None,
    overwrite: bool = False,
    progress: bool | Callable[[int, int], None] = False,
) -> Path:
    """Run the teacher teacher-forced over ``dataset`` and write a cache to ``out_dir``.

    Args:
        teacher_model: a Hugging Face causal LM (eval mode is set here; it runs under ``no_grad`` on its
            own device).
        dataset: items with unpadded ``input_ids`` and ``labels`` (an :class:`okd.data.InstructionDataset`).
            Duplicate examples (same key) are stored once.
        out_dir: the cache directory (must not exist unless ``overwrite``).
        tokenizer: fingerprinted into the manifest (recommended; the reader can then refuse another one)
            and its pad id used for batching.
        store: ``"topk"`` (log-probs) or ``"hidden"`` (final hidden states).
        top_k: ``k`` for ``store="topk"``; ``k >= vocab_size`` is clipped to ``vocab_size`` (exact).
        vocab_size: the teacher's logits are cut to this width before the softmax, as the dense loss cuts
            a padded teacher head to the student's width; default: the teacher's logits width.
        dtype: dtype of the stored log-probs or hidden states (the tail is float32, the ids int32).
        batch_size: sequences per teacher forward pass.
        positions_per_shard: a shard is closed once it holds at least this many loss positions.
        pad_token_id: padding id for batching (default: the tokenizer's, else 0; padding is masked out).
        teacher_path: recorded in the manifest (and fingerprinted when ``teacher_fingerprint`` is None).
        teacher_fingerprint: the teacher's fingerprint; default :func:`fingerprint_teacher` of
            ``teacher_path`` if given, else of the model in memory.
        overwrite: replace an existing cache (the old one stays until the new one is complete).
        progress: True for a tqdm bar, or a callable ``(examples_done, total)``.

    Returns:
        ``out_dir`` as an absolute Path.
    """
    if store not in ("topk", "hidden"):
        raise ValueError(f"store must be 'topk' or 'hidden', got {store!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: nothing to cache")
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"teacher cache {out} already exists (pass overwrite=True to replace it)")

    from okd.models import logits_width

    teacher_model.eval()
    width = logits_width(teacher_model)
    vocab = width if vocab_size is None else int(vocab_size)
    if not 1 <= vocab <= width:
        raise ValueError(f"vocab_size={vocab_size} must be between 1 and the teacher's logits width {width}")
    hidden_size = int(teacher_model.config.hidden_size) if store == "hidden" else None
    if store == "topk":
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        top_k = min(top_k, vocab)
        tensor_dtypes = {"logprobs": _DTYPES[dtype], "token_ids": torch.int32, "tail_logprob": torch.float32}
    else:
        from okd.online.adapter import check_adapter_supported

        check_adapter_supported(teacher_model)  # head(hidden) must be the logits
        tensor_dtypes = {"hidden": _DTYPES[dtype]}
    if teacher_fingerprint is None:
        teacher_fingerprint = fingerprint_teacher(teacher_path if teacher_path is not None else teacher_model)
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
    collate = Collator(pad_token_id if pad_token_id is not None else 0)
    device = next(teacher_model.parameters()).device

    # Written in a hidden temporary directory with the manifest last; the whole cache becomes visible
    # only by the rename at the end of the block (okd.io.atomic_directory), so a crash never leaves a
    # cache that looks complete, and an existing one stays until the new one is.
    with atomic_directory(out) as tmp:
        writer = _ShardWriter(tmp, positions_per_shard, tensor_dtypes)
        seen: set[str] = set()
        n_positions = 0
        total = len(dataset)
        bar = None
        if progress is True:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="Caching teacher", unit="ex")
        for start in range(0, total, batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, total))]
            keys = [example_key(item["input_ids"], item["labels"]) for item in items]
            fresh = [(k, item) for k, item in zip(keys, items) if k not in seen]
            fresh = list({k: item for k, item in fresh}.items())  # duplicates within the batch too
            if fresh:
                batch = collate([{"input_ids": it["input_ids"], "labels": it["labels"]} for _, it in fresh])
                input_ids = batch["input_ids"].to(device)
                attention_mask = batch["attention_mask"].to(device)
                mask = batch_loss_mask(batch["labels"]).to(device)
                if store == "topk":
                    logits = teacher_model(input_ids=input_ids, attention_mask=attention_mask).logits
                    values, ids, tail = _topk_rows(logits[mask][:, :vocab], top_k)
                    columns = {"logprobs": values, "token_ids": ids, "tail_logprob": tail}
                else:
                    columns = {"hidden": _head_input(teacher_model, input_ids, attention_mask)[mask]}
                counts = mask.sum(dim=1).tolist()
                row = 0
                for (key, _), n in zip(fresh, counts):
                    writer.add(key, {name: col[row : row + n] for name, col in columns.items()})
                    seen.add(key)
                    row += n
                n_positions += row
            if bar is not None:
                bar.update(len(items))
            elif callable(progress):
                progress(min(start + batch_size, total), total)
        if bar is not None:
            bar.close()
        writer.flush()
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "store": store,
            "top_k": top_k if store == "topk" else None,
            "vocab_size": vocab,
            "exact": store == "hidden" or top_k == vocab,
            "hidden_size": hidden_size,
            "temperature": 1.0,
            "dtype": dtype,
            "teacher": {"path": teacher_path, "fingerprint": teacher_fingerprint},
            "tokenizer": {"fingerprint": fingerprint_tokenizer(tokenizer) if tokenizer is not None else None},
            "data": {
                "fingerprint": hashlib.sha256("".join(sorted(seen)).encode()).hexdigest()[:16],
                "examples": len(seen),
                "positions": n_positions,
            },
            "shards": writer.shards,
        }
        # The manifest is written last.
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


@dataclass
class CacheExpectation:
    """What a run expects of a cache; ``None`` fields are not checked. The format version always is."""

    teacher_fingerprint: str | None = None
    """:func:`fingerprint_teacher` of the run's teacher."""
    tokenizer_fingerprint: str | None = None
    """:func:`fingerprint_tokenizer` of the run's tokenizer."""
    store: str | None = None
    """``"topk"`` or ``"hidden"``."""
    top_k: int | None = None
    """The ``k`` the run asks for."""
    vocab_size: int | None = None
    """The student's logits width."""
    data_fingerprint: str | None = None
    """The manifest's data fingerprint (usually left None: :meth:`TeacherCache.check_covers` checks the data)."""

    @classmethod
    def for_run(
        cls, teacher: str | os.PathLike | nn.Module, tokenizer, *, store: str, top_k: int | None = None,
        vocab_size: int | None = None,
    ) -> "CacheExpectation":
        """What a training run expects: its teacher (path or model, fingerprinted), tokenizer, store, k, width."""
        return cls(
            teacher_fingerprint=fingerprint_teacher(teacher), tokenizer_fingerprint=fingerprint_tokenizer(tokenizer),
            store=store, top_k=top_k, vocab_size=vocab_size,
        )


@dataclass
class SparseTargets:
    """Top-k teacher targets of a batch, one row per loss position.

    Rows follow ``mask.nonzero()`` (row-major: example by example, positions ascending).

    Attributes:
        logprobs: ``[N, k]`` float32 teacher log-probs (temperature 1), descending per row.
        token_ids: ``[N, k]`` int64 their token ids.
        tail_logprob: ``[N]`` float32 ``log(1 - sum_k p)``; ``-inf`` when ``k = vocab``.
        mask: ``[B, T]`` bool, the batch's loss positions (``N`` True entries).
        vocab_size: the vocabulary the log-probs are normalised over.
    """

    logprobs: Tensor
    token_ids: Tensor
    tail_logprob: Tensor
    mask: Tensor
    vocab_size: int

    @property
    def top_k(self) -> int:
        return self.logprobs.shape[-1]

    @property
    def exact(self) -> bool:
        return self.top_k == self.vocab_size

    def to(self, device) -> "SparseTargets":
        return SparseTargets(
            self.logprobs.to(device), self.token_ids.to(device), self.tail_logprob.to(device),
            self.mask.to(device), self.vocab_size,
        )


@dataclass
class HiddenTargets:
    """Cached final hidden states of a batch: ``hidden [N, H]`` (float32) at the loss positions ``mask [B, T]``."""

    hidden: Tensor
    mask: Tensor

    def to(self, device) -> "HiddenTargets":
        return HiddenTargets(self.hidden.to(device), self.mask.to(device))


class TeacherCache:
    """A cache written by :func:`build_teacher_cache`, opened for reading.

    Args:
        directory: the cache directory.
        expect: a :class:`CacheExpectation` (or a dict of its fields); any field that differs from the
            manifest raises :class:`CacheMismatchError` with one line naming it.

    ``cache.lookup(input_ids, attention_mask, labels)`` returns the batch's :class:`SparseTargets`
    (``store="topk"``) or :class:`HiddenTargets` (``store="hidden"``), found by each row's key. Shards
    are memory-mapped and sliced, so reading costs what the batch needs.
    """

    def __init__(self, directory: str | os.PathLike, expect: CacheExpectation | dict | None = None):
        self.directory = Path(directory)
        path = self.directory / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"teacher cache {self.directory}: no {MANIFEST_FILE} (not a complete okd teacher cache)")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CacheMismatchError(f"teacher cache {self.directory}: {MANIFEST_FILE} is not valid JSON ({err.msg})") from None
        self.manifest: dict[str, Any] = manifest
        if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
            raise CacheMismatchError(
                f"teacher cache {self.directory}: format {manifest.get('format')!r} version "
                f"{manifest.get('format_version')!r}, this okd reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
            )
        self._check(expect)
        from safetensors import safe_open

        self._shards = []
        self._index: dict[str, tuple[int, int, int]] = {}
        for s, shard in enumerate(manifest["shards"]):
            file = self.directory / shard["file"]
            if not file.is_file():
                raise FileNotFoundError(f"teacher cache {self.directory}: shard {shard['file']} is missing")
            handle = safe_open(str(file), framework="pt", device="cpu")
            self._shards.append(handle)
            keys = handle.get_tensor("example_keys").numpy()
            offsets = handle.get_tensor("example_offsets").tolist()
            if len(keys) != shard["examples"] or offsets[-1] != shard["positions"]:
                raise CacheMismatchError(f"teacher cache {self.directory}: shard {shard['file']} does not match the manifest")
            for e in range(len(keys)):
                self._index[keys[e].tobytes().hex()] = (s, offsets[e], offsets[e + 1])

    # -- manifest -------------------------------------------------------------------------------
    @property
    def store(self) -> str:
        return self.manifest["store"]

    @property
    def top_k(self) -> int | None:
        return self.manifest["top_k"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def _check(self, expect: CacheExpectation | dict | None) -> None:
        if expect is None:
            return
        if isinstance(expect, dict):
            expect = CacheExpectation(**expect)
        m = self.manifest
        found = {
            "teacher_fingerprint": m["teacher"]["fingerprint"],
            "tokenizer_fingerprint": m["tokenizer"]["fingerprint"],
            "store": m["store"],
            "top_k": m["top_k"],
            "vocab_size": m["vocab_size"],
            "data_fingerprint": m["data"]["fingerprint"],
        }
        for name, have in found.items():
            want = getattr(expect, name)
            if want is not None and have != want:
                raise CacheMismatchError(
                    f"teacher cache {self.directory}: {name} is {have!r}, the run expects {want!r} "
                    "(rebuild it with `okd teacher cache`, or point to the right cache)"
                )

    def check_covers(self, dataset: Iterable[dict[str, Any]]) -> None:
        """Raise a one-line :class:`CacheMismatchError` if an example of ``dataset`` is not cached (call it
        before training, so that a cache for other data, tokenisation or ``max_length`` fails at once)."""
        missing, first = 0, None
        for i, item in enumerate(dataset):
            if example_key(item["input_ids"], item["labels"]) not in self._index:
                missing += 1
                first = i if first is None else first
        if missing:
            raise CacheMismatchError(
                f"teacher cache {self.directory}: {missing} example(s) of the data are not in it (first: example "
                f"{first}); it was built from other data, another tokenizer or another max_length"
            )

    # -- entries --------------------------------------------------------------------------------
    def _read(self, key: str, n_expected: int) -> dict[str, Tensor]:
        try:
            s, start, stop = self._index[key]
        except KeyError:
            raise KeyError(f"teacher cache {self.directory}: no entry for example key {key}") from None
        if stop - start != n_expected:
            raise CacheMismatchError(
                f"teacher cache {self.directory}: entry {key} has {stop - start} loss positions, the example has {n_expected}"
            )
        names = ("logprobs", "token_ids", "tail_logprob") if self.store == "topk" else ("hidden",)
        return {name: self._shards[s].get_slice(name)[start:stop] for name in names}

    def entry(self, input_ids: Sequence[int] | Tensor, labels: Sequence[int] | Tensor) -> dict[str, Tensor]:
        """One unpadded example's stored tensors (as on disk, ``[n, ...]`` for its ``n`` loss positions)."""
        return self._read(example_key(input_ids, labels), len(example_loss_positions(labels)))

    def lookup(
        self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor
    ) -> SparseTargets | HiddenTargets:
        """The cached targets of a right-padded batch (``[B, T]`` each, as ``okd.data.Collator`` makes them).

        Returns :class:`SparseTargets` (float32 log-probs, int64 ids) or :class:`HiddenTargets` (float32),
        on ``labels``' device, rows aligned with ``mask = labels[:, 1:] != -100`` (row-major).
        """
        rows = _batch_rows(input_ids, attention_mask, labels)
        parts = [self._read(example_key(ids, labs), len(example_loss_positions(labs))) for ids, labs in rows]
        mask = batch_loss_mask(labels)
        device = labels.device
        if self.store == "topk":
            return SparseTargets(
                logprobs=torch.cat([p["logprobs"] for p in parts]).float().to(device),
                token_ids=torch.cat([p["token_ids"] for p in parts]).long().to(device),
                tail_logprob=torch.cat([p["tail_logprob"] for p in parts]).float().to(device),
                mask=mask,
                vocab_size=self.vocab_size,
            )
        return HiddenTargets(hidden=torch.cat([p["hidden"] for p in parts]).float().to(device), mask=mask)


# --------------------------------------------------------------------------------------------------
# Losses from a top-k cache
# --------------------------------------------------------------------------------------------------


def bucket_student(student_logits: Tensor, token_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """The student's distribution collapsed to the teacher's ``k + 1`` buckets, as log-probs.

    Args:
        student_logits: ``[N, V]`` (any float dtype; computed in float32).
        token_ids: ``[N, k]`` the teacher's top-k ids per row.
        temperature: divides the student's logits first.

    Returns:
        ``[N, k + 1]`` float32: ``log q`` at the k ids, then ``log`` of the student's mass on every other
        token (``logsumexp`` over them, no ``1 - sum`` cancellation; ``-inf`` when ``k = V``).
        Differentiable w.r.t. ``student_logits``.
    """
    s = student_logits.float() / temperature
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    head = s.gather(-1, token_ids) - lse
    if token_ids.shape[-1] == s.shape[-1]:
        tail = torch.full_like(lse, -math.inf)
    else:
        tail = torch.logsumexp(s.scatter(-1, token_ids, -math.inf), dim=-1, keepdim=True) - lse
    return torch.cat([head, tail], dim=-1)


def _bucket_teacher(targets: SparseTargets, temperature: float) -> Tensor:
    """``[N, k + 1]`` teacher log-probs: top-k then the tail bucket; at ``T != 1`` only when exact."""
    t = torch.cat([targets.logprobs.float(), targets.tail_logprob.float().unsqueeze(-1)], dim=-1)
    if temperature == 1.0:
        return t
    # Exact cache: the k = V log-probs are the logits up to a constant, so softmax(log p / T) is the
    # teacher's distribution at temperature T (the empty tail bucket stays -inf).
    return torch.log_softmax(t / temperature, dim=-1)


def cached_divergence(
    student_logits: Tensor,
    targets: SparseTargets,
    divergence: str = "forward_kl",
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    chunk_tokens: int = 1024,
    **params,
) -> Tensor:
    """A divergence between cached top-k teacher targets and the student, in bucket space.

    Both distributions are over the same ``k + 1`` buckets: the teacher's top-k tokens, one bucket each,
    and one *tail* bucket for all other tokens (the teacher's stored tail mass; the student's summed mass
    on those tokens, :func:`bucket_student`). Any ``okd.divergences`` divergence is then computed between
    these two distributions. Consequences:

    * the loss is 0 only when the student matches the teacher on every top-k token *and* on the tail's
      total: it cannot reach a false zero by dropping the tail;
    * for ``k = V`` the buckets are the vocabulary (permuted, plus an empty bucket), so the value and its
      gradient equal the dense divergence on the teacher's logits, for every divergence;
    * for ``k < V`` it is the divergence of the coarsened distributions. For forward KL, reverse KL,
      JSD, TVD, skew KL and skew reverse KL that is the same f-divergence on the ``k + 1`` buckets (a lower
      bound of the full one, by the data-processing inequality). For ``adaptive_kl`` the head/tail split
      is made over the buckets, the tail bucket counting as one token, so it is not the full AKL.

    Temperature: cached log-probs are at ``T = 1``. The student's logits are divided by ``T`` before
    bucketing. The teacher's top-k log-probs at ``T`` need the tail's ``sum p_i^(1/T)``, which the cache
    does not hold, so ``T != 1`` is refused unless the cache is exact (``k = V``), where it is exact.

    Args:
        student_logits: ``[B, T, V]`` (rows taken at ``targets.mask``) or ``[N, V]`` (already at the loss
            positions, in the same order); ``V`` must be the cache's ``vocab_size``.
        targets: from :meth:`TeacherCache.lookup`.
        divergence: a name of :data:`okd.divergences.DIVERGENCES`.
        temperature: see above (no ``T**2`` factor, as in ``okd.divergences``).
        reduction: ``"mean"`` over the loss positions, ``"sum"``, or ``"none"`` (``[N]`` per position).
        chunk_tokens: passed to the divergence.
        **params: the divergence's parameters (``beta=``, ``alpha=``, ``mu=``).

    Returns:
        float32 scalar (``[N]`` for ``"none"``).
    """
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if temperature != 1.0 and not targets.exact:
        raise ValueError(
            f"temperature {temperature} needs an exact teacher cache (k = vocab); this one has k = {targets.top_k} "
            f"of {targets.vocab_size} (cached log-probs are at T = 1 and the tail's tempered mass is unknown)"
        )
    if student_logits.dim() == 3:
        if tuple(student_logits.shape[:2]) != tuple(targets.mask.shape):
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} do not match the cached batch's mask {tuple(targets.mask.shape)}"
            )
        student_logits = student_logits[targets.mask.to(student_logits.device)]
    if student_logits.dim() != 2 or student_logits.shape[0] != targets.logprobs.shape[0]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} do not match the {targets.logprobs.shape[0]} cached loss positions"
        )
    if student_logits.shape[-1] != targets.vocab_size:
        raise ValueError(
            f"student logits width {student_logits.shape[-1]} differs from the cache's vocab_size {targets.vocab_size}"
        )
    fn = get_divergence(divergence, **params)
    teacher_b = _bucket_teacher(targets, temperature).to(student_logits.device)
    student_b = bucket_student(student_logits, targets.token_ids.to(student_logits.device), temperature)
    # The buckets are already log-probabilities at the chosen temperature: the divergence's own
    # log_softmax leaves them unchanged, so it runs at T = 1.
    return fn(teacher_b, student_b, None, temperature=1.0, reduction=reduction, chunk_tokens=chunk_tokens)


# --------------------------------------------------------------------------------------------------
# A teacher from a hidden-state cache (OKD with the adapter module)
# --------------------------------------------------------------------------------------------------


class CachedHiddenTeacher(nn.Module):
    """The (adapted) teacher's logits at the loss positions, from cached hidden states.

    ``logits = head(module(hidden))``: the cached final hidden state, the online module (a
    :class:`okd.online.ResidualAdapter`, or None for the frozen teacher) and the teacher's frozen output
    head; what :class:`okd.online.AdapterModule` computes, without the teacher's body.

    Args:
        cache: a ``store="hidden"`` :class:`TeacherCache`.
        head: the teacher's output head (``teacher_model.get_output_embeddings()``); frozen here.
        module: the online module on the hidden state, or None.

    ``forward(input_ids, attention_mask, labels, track_module_grad=False)`` returns ``(logits [N, V],
    mask [B, T])``: one row per loss position (``mask.nonzero()`` order). Use
    :func:`scatter_to_batch` for a ``[B, T, V]`` tensor.
    """

    def __init__(self, cache: TeacherCache, head: nn.Module, module: nn.Module | None = None):
        super().__init__()
        if cache.store != "hidden":
            raise CacheMismatchError(f"teacher cache {cache.directory}: store is {cache.store!r}, a hidden-state teacher needs 'hidden'")
        self.cache = cache
        self.head = head.requires_grad_(False)
        self.module = module

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor, *, track_module_grad: bool = False
    ) -> tuple[Tensor, Tensor]:
        targets = self.cache.lookup(input_ids, attention_mask, labels)
        weight = getattr(self.head, "weight", None)
        hidden = targets.hidden.to(weight.device if weight is not None else labels.device)
        if weight is not None:
            hidden = hidden.to(weight.dtype)
        with torch.set_grad_enabled(track_module_grad and torch.is_grad_enabled()):
            if self.module is not None:
                hidden = self.module(hidden)
            return self.head(hidden), targets.mask.to(hidden.device)


# --------------------------------------------------------------------------------------------------
# Entry point (``okd teacher cache``)
# --------------------------------------------------------------------------------------------------


def check_cache_options(
    *, store: str, top_k: int, dtype: str, batch_size: int, max_length: int, max_examples: int | None, vocab_size: int | None
) -> None:
    """``okd teacher cache``'s options, refused in one line each (called before anything loads)."""
    if store not in ("topk", "hidden"):
        raise ValueError(f"store must be 'topk' or 'hidden', got {store!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    for name, value, least in (("top_k", top_k, 1), ("batch_size", batch_size, 1), ("max_length", max_length, 2),
                               ("max_examples", max_examples, 1), ("vocab_size", vocab_size, 1)):
        if value is None and name in ("max_examples", "vocab_size"):
            continue
        if name == "top_k" and store != "topk":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def cache_teacher(
    teacher: str,
    data: str,
    out: str,
    top_k: int = 64,
    store: Literal["topk", "hidden"] = "topk",
    tokenizer: str | None = None,
    batch_size: int = 8,
    max_length: int = 256,
    max_examples: int | None = None,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    vocab_size: int | None = None,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """Run a teacher once over a JSONL data set and cache what distillation needs, for many runs.

    Stores, at the response positions only, the top-k teacher log-probs and the tail mass (store=topk), or
    the teacher's final hidden states for OKD with the adapter module (store=hidden). Tokenise the same way
    in training (same tokenizer and max_length): entries are found by a hash of the tokenised example.

    Args:
        teacher: Teacher model directory, GGUF file or hub id (cached locally).
        data: JSONL training file (the one the runs will train on).
        out: Cache directory to write (written atomically).
        top_k: Log-probs kept per position (store=topk); a value >= the vocabulary size keeps them all (exact).
        store: 'topk' (log-probs, no teacher needed in training) or 'hidden' (final hidden states).
        tokenizer: Tokenizer directory (default: the teacher's).
        batch_size: Sequences per teacher forward pass.
        max_length: Maximum tokens per example (as in training: data.max_length).
        max_examples: Cache only the first N examples.
        dtype: Dtype of the stored log-probs or hidden states.
        vocab_size: Cut the teacher's logits to this width (the student's logits width when the teacher's
            head is padded wider); default: the teacher's width.
        device: Where the teacher runs (default: cuda if available, else cpu).
        overwrite: Replace an existing cache.
        progress: Show a progress bar.
    """
    from okd.data import InstructionDataset, ensure_pad_token, read_jsonl
    from okd.models import load_model, load_tokenizer

    # Options, the output directory and the data are checked before the teacher's weights load.
    check_cache_options(store=store, top_k=top_k, dtype=dtype, batch_size=batch_size, max_length=max_length,
                        max_examples=max_examples, vocab_size=vocab_size)
    out_path = Path(out)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"teacher cache {out} already exists (pass --overwrite to replace it)")
    tok = ensure_pad_token(load_tokenizer(tokenizer or teacher))
    examples = read_jsonl(data, tok)
    if max_examples is not None:
        examples = examples[:max_examples]
    dataset = InstructionDataset(examples, tok, max_length)
    if len(dataset) == 0:
        raise ValueError(f"{data}: no examples to cache")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(teacher, device=device)
    path = build_teacher_cache(
        model, dataset, out, tokenizer=tok, store=store, top_k=top_k, vocab_size=vocab_size, dtype=dtype,
        batch_size=batch_size, teacher_path=str(teacher), teacher_fingerprint=fingerprint_teacher(teacher),
        overwrite=overwrite, progress=progress,
    )
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    size = sum(f.stat().st_size for f in path.iterdir())
    print(
        f"wrote {path}: {manifest['data']['examples']} examples, {manifest['data']['positions']} positions, "
        f"store={store}" + (f", k={manifest['top_k']} of {manifest['vocab_size']}" if store == "topk" else "")
        + f", {size / max(manifest['data']['positions'], 1):.0f} bytes per position"
    )
