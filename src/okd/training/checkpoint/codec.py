"""Nested training state <-> JSON plus flat tensor dicts: a format whose loading runs no code.

A training state is a tree of dicts, lists, tuples, numbers, strings, None and tensors (optimizer
and source states included). :func:`encode` splits it into

* a JSON tree, in which each tensor is replaced by ``{"__tensor__": [FILE, KEY]}``, and
* one flat ``{KEY: tensor}`` dict per top-level entry of the state (``student``, ``optimizer``,
  ``source``...), saved as ``FILE = <entry>.safetensors``.

KEY is the tensor's path below its top-level entry, joined by ``/`` (``state/0/exp_avg`` for an
optimizer's first moment of parameter 0), so keys are stable across runs. Values JSON cannot hold
exactly are tagged: a tuple is ``{"__tuple__": [...]}``; a dict with a key that is not a string (an
optimizer's parameter ids) or that starts with ``__`` is ``{"__items__": [[key, value], ...]}``; a
list of integers of :data:`PACKED_INTS_MIN` or more entries (a replay buffer's token ids) is stored
as an int64 tensor, ``{"__ints__": [FILE, KEY]}``. :func:`decode` is the inverse and accepts nothing
else: a file that is not this encoding is refused with a :class:`CheckpointError`.
"""

from __future__ import annotations

import torch

__all__ = ["CheckpointError", "decode", "encode"]

TENSOR, INTS, TUPLE, ITEMS = "__tensor__", "__ints__", "__tuple__", "__items__"
PACKED_INTS_MIN = 8
_INT64 = (-(2**63), 2**63 - 1)


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read (the message is one line naming the culprit)."""


class _Encoder:
    def __init__(self) -> None:
        self.files: dict[str, dict[str, torch.Tensor]] = {}
        self._storages: set[int] = set()

    def tensor(self, value: torch.Tensor, file: str, path: list[str]) -> list[str]:
        key = "/".join(path)
        tensors = self.files.setdefault(file, {})
        if key in tensors:
            raise CheckpointError(f"cannot write the checkpoint: two tensors would both be stored as {file}:{key}")
        value = value.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (tied weights, views): store a copy of each repeat.
        storage = value.untyped_storage().data_ptr()
        if value.numel() and storage in self._storages:
            value = value.clone()
        self._storages.add(value.untyped_storage().data_ptr())
        tensors[key] = value
        return [file, key]

    def __call__(self, value, file: str, path: list[str]):
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value)
        if isinstance(value, torch.Tensor):
            return {TENSOR: self.tensor(value, file, path)}
        if isinstance(value, tuple):
            return {TUPLE: [self(v, file, [*path, str(i)]) for i, v in enumerate(value)]}
        if isinstance(value, list):
            if len(value) >= PACKED_INTS_MIN and all(type(v) is int and _INT64[0] <= v <= _INT64[1] for v in value):
                return {INTS: self.tensor(torch.tensor(value, dtype=torch.int64), file, path)}
            return [self(v, file, [*path, str(i)]) for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: self(v, file, [*path, k]) for k, v in value.items()}
            return {ITEMS: [[self(k, file, [*path, "key"]), self(v, file, [*path, str(k)])] for k, v in value.items()]}
        where = f"{file}:{'/'.join(path)}" if path else file
        raise CheckpointError(
            f"cannot write the checkpoint: {type(value).__name__} at {where} is not a tensor, number, string, list or dict"
        )


def encode(state: dict) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """``state`` -> (JSON tree, ``{file name: {key: tensor}}``); see the module docstring."""
    encoder = _Encoder()
    tree = {name: encoder(value, f"{name}.safetensors", []) for name, value in state.items()}
    return tree, encoder.files


def decode(tree, files: dict[str, dict[str, torch.Tensor]], where: str = "state.json"):
    """Inverse of :func:`encode` (``files``: the tensor files, loaded). ``where`` names the JSON file
    in errors."""

    def lookup(ref, tag: str) -> torch.Tensor:
        if not (isinstance(ref, list) and len(ref) == 2 and all(isinstance(r, str) for r in ref)):
            raise CheckpointError(f"{where}: malformed {tag} reference {ref!r}")
        file, key = ref
        if file not in files or key not in files[file]:
            raise CheckpointError(f"{where}: tensor {file}:{key} is missing")
        return files[file][key]

    def walk(value):
        if value is None or isinstance(value, (bool, str, int, float)):
            return value
        if isinstance(value, list):
            return [walk(v) for v in value]
        if not isinstance(value, dict):
            raise CheckpointError(f"{where}: unexpected value {value!r}")
        if len(value) == 1:
            (tag, inner), = value.items()
            if tag == TENSOR:
                return lookup(inner, tag)
            if tag == INTS:
                return lookup(inner, tag).tolist()
            if tag in (TUPLE, ITEMS) and not isinstance(inner, list):
                raise CheckpointError(f"{where}: malformed {tag} entry")
            if tag == TUPLE:
                return tuple(walk(v) for v in inner)
            if tag == ITEMS:
                if not all(isinstance(pair, list) and len(pair) == 2 for pair in inner):
                    raise CheckpointError(f"{where}: malformed {tag} entry")
                keys = [walk(k) for k, _ in inner]
                if not all(isinstance(k, (str, int, float, bool, type(None))) for k in keys):
                    raise CheckpointError(f"{where}: malformed {tag} key")
                return {k: walk(v) for k, (_, v) in zip(keys, inner)}
        if any(k.startswith("__") for k in value):
            raise CheckpointError(f"{where}: unknown entry {sorted(value)[0]!r}")
        return {k: walk(v) for k, v in value.items()}

    return walk(tree)
