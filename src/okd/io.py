"""Atomic writes: a reader (or a resumed run) never sees a half-written file or directory.

Every file okd writes goes through here. A file is written to a hidden temporary sibling, flushed
to disk, and renamed over the final name with ``os.replace`` (atomic on POSIX and Windows); on any
error the temporary is removed and the previous file stays as it was. A directory (a saved model,
a checkpoint) is filled inside a hidden sibling and renamed into place the same way; the previous
directory is moved aside first and deleted only once the new one is in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_directory", "write_json", "write_jsonl", "write_text"]


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8, ``\\n`` line ends) in one step. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _all_finite(payload) -> bool:
    if isinstance(payload, float):
        return math.isfinite(payload)
    if isinstance(payload, dict):
        return all(_all_finite(v) for v in payload.values())
    if isinstance(payload, (list, tuple)):
        return all(_all_finite(v) for v in payload)
    return True


def write_json(path: str | os.PathLike, payload: Any, indent: int | None = 2) -> Path:
    """``payload`` as JSON (indented, newline-terminated). Strict JSON unless the payload holds a
    NaN or inf, which is then written as Python's json module writes it (``NaN``, ``Infinity``)."""
    text = json.dumps(payload, indent=indent, allow_nan=not _all_finite(payload))
    return write_text(path, text + "\n")


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> Path:
    """Records (dicts or dataclass instances), one JSON object a line, non-ASCII kept as is."""
    lines = []
    for record in records:
        if dataclasses.is_dataclass(record) and not isinstance(record, type):
            record = dataclasses.asdict(record)
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return write_text(path, "".join(lines))


def _fsync_tree(root: Path) -> None:
    # Flush file contents before the rename publishes them, so that after a power loss the
    # directory cannot be complete-looking but hold truncated files.
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_directory(out) as tmp:`` fill ``tmp``; on a clean exit it becomes ``out``.

    A crash or exception leaves either the old ``out``, the new one, or a hidden ``.NAME.tmp-*`` /
    ``.NAME.old-*`` leftover, never a half-written ``out``.
    """
    out = Path(path).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    old = out.parent / f".{out.name}.old-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    moved_aside = False
    try:
        if out.exists():
            os.replace(out, old)
            moved_aside = True
        os.replace(tmp, out)
    except BaseException:
        # Put the previous directory back so ``out`` keeps pointing at something complete.
        if moved_aside and not out.exists():
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out.parent)
    if moved_aside:
        shutil.rmtree(old, ignore_errors=True)
