"""The data tasks that ``okd data build --task NAME`` builds: a registry, name -> builder.

Every task writes the same layout: ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` with
``{"prompt", "response", "name"}`` records, and ``meta.json`` (counts, hashes, source, licence),
by default into ``runs/data/NAME``. Adding a task is one ``TASKS`` entry: a function
``build(out_dir, force=False, source=None) -> {"train": Path, "validation": Path, "test": Path,
"meta": Path}`` and a one-line description.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .builtin import build_builtin_dataset
from .records import DataError
from .wordnet import build_wordnet_dataset


@dataclass(frozen=True)
class Task:
    """One buildable data task."""

    build: Callable[..., dict[str, Path]]
    """``build(out_dir, force=False, source=None)``: build or reuse the files, return their paths."""
    description: str
    """One line for help texts and docs."""
    takes_source: bool = False
    """Whether ``build`` reads a source directory (``--source``)."""


def _build_builtin(out_dir, force: bool = False, source=None) -> dict[str, Path]:
    return build_builtin_dataset(out_dir, force=force)


TASKS: dict[str, Task] = {
    "builtin": Task(
        build=_build_builtin,
        description="Python standard-library docstrings: describe a function in one sentence",
    ),
    "wordnet": Task(
        build=build_wordnet_dataset,
        description="WordNet 3.0 definitions: define an English word given its part of speech",
        takes_source=True,
    ),
}
DEFAULT_TASK = "builtin"


def default_out_dir(name: str) -> str:
    """Where a task's files go unless told otherwise: ``runs/data/NAME``."""
    return f"runs/data/{name}"


def get_task(name: str) -> Task:
    """The task called ``name``; ``DataError`` listing the valid names if there is none."""
    try:
        return TASKS[name]
    except KeyError:
        raise DataError(f"unknown data task {name!r}; valid tasks: {', '.join(TASKS)}") from None


def build_task(
    name: str = DEFAULT_TASK,
    out_dir: str | os.PathLike | None = None,
    force: bool = False,
    source: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Build (or reuse) task ``name``'s files in ``out_dir`` (default ``runs/data/NAME``)."""
    task = get_task(name)
    if source is not None and not task.takes_source:
        raise DataError(f"data task {name!r} reads no source directory; drop --source")
    return task.build(default_out_dir(name) if out_dir is None else out_dir, force=force, source=source)
