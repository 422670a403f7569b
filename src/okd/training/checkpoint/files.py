"""A checkpoint directory on disk: writing it, verifying it, finding the one to resume, reading it.

Loading runs no code from the files: tensors are read with safetensors, everything else with ``json``. See the
package docstring (``okd.training.checkpoint``) for the layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
import warnings
from pathlib import Path

import torch

from okd.io import atomic_directory, write_text

from .codec import CheckpointError, decode, encode

__all__ = [
    "CHECKPOINT_COMPLETE", "FORMAT", "STATE_JSON", "CheckpointDamaged", "complete_checkpoints", "latest_checkpoint",
    "read_meta", "read_state", "resumable_checkpoint", "verify_checkpoint", "write_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_COMPLETE = "checkpoint_complete.json"
STATE_JSON = "state.json"
FORMAT = "okd-checkpoint-2"
LEGACY_STATE_FILE = "state.pt"  # the old format, whose loading could run code: refused
_CHUNK = 1 << 20


class CheckpointDamaged(CheckpointError):
    """A complete-looking checkpoint whose files do not match their recorded checksums."""

    def __init__(self, checkpoint: Path, file: str, reason: str) -> None:
        self.checkpoint, self.file, self.reason = Path(checkpoint), file, reason
        super().__init__(f"checkpoint {self.checkpoint / file} is damaged: {reason}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _marker_digest(marker: dict) -> str:
    """The marker's checksum of its own content (every entry but ``sha256``)."""
    body = {k: v for k, v in marker.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _steps(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).glob("step-*") if p.is_dir())


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints of ``output_dir/checkpoints`` with a completion marker, oldest first; those
    without one (a write that never finished) are skipped with a warning."""
    complete = []
    for path in _steps(Path(output_dir) / "checkpoints"):
        if (path / CHECKPOINT_COMPLETE).exists():
            complete.append(path)
        else:
            warnings.warn(f"ignoring incomplete checkpoint {path}", stacklevel=2)
    return complete


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``output_dir/checkpoints`` (None if there is none); its
    files are not verified here (:func:`resumable_checkpoint` does)."""
    complete = complete_checkpoints(output_dir)
    return complete[-1] if complete else None


def write_checkpoint(root: Path, step: int, state: dict, meta: dict, keep: int) -> Path:
    """Write ``root/step-NNNNNNNN`` (the tensors, ``state.json``, then the marker with every file's
    checksum) inside a hidden directory renamed into place, then keep only the newest ``keep``."""
    root = Path(root)
    final = root / f"step-{step:08d}"
    tree, tensor_files = encode(state)
    _remove_leftovers(root)
    from safetensors.torch import save_file

    with atomic_directory(final) as tmp:
        for name, tensors in tensor_files.items():
            save_file(tensors, str(tmp / name))
        write_text(tmp / STATE_JSON, json.dumps({"format": FORMAT, "state": tree}) + "\n")
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        marker = {**meta, "format": FORMAT, "files": files}
        marker["sha256"] = _marker_digest(marker)
        write_text(tmp / CHECKPOINT_COMPLETE, json.dumps(marker) + "\n")  # last
    kept = [p for p in _steps(root) if (p / CHECKPOINT_COMPLETE).exists()]
    for old in kept[: max(len(kept) - keep, 0)]:
        _remove(old)
    return final


def _remove(path: Path) -> None:
    """Delete a checkpoint: first renamed to a hidden name (one atomic step), so that a crash while
    deleting never leaves a half-deleted checkpoint under a visible name."""
    hidden = path.parent / f".{path.name}.del-{uuid.uuid4().hex[:8]}"
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Hidden directories left by writes or deletions that a crash stopped (only the main process
    writes checkpoints, so none of them is in use)."""
    if root.is_dir():
        for path in root.glob(".step-*"):
            shutil.rmtree(path, ignore_errors=True)


def read_meta(checkpoint: Path) -> dict:
    """The completion marker of ``checkpoint`` (its run metadata and file checksums), as written."""
    path = Path(checkpoint) / CHECKPOINT_COMPLETE
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointDamaged(checkpoint, CHECKPOINT_COMPLETE, f"unreadable ({type(error).__name__})") from None
    if not isinstance(meta, dict):
        raise CheckpointDamaged(checkpoint, CHECKPOINT_COMPLETE, "not a JSON object")
    return meta


def verify_checkpoint(checkpoint: Path) -> dict:
    """Check every file of ``checkpoint`` against the checksums in its marker; return the marker.

    Raises :class:`CheckpointDamaged` naming the first file that is missing, has another size or
    another sha256 (the marker itself carries a checksum of its content), and a
    :class:`CheckpointError` for a checkpoint of the old ``state.pt`` format (never loaded).
    """
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    if meta.get("format") != FORMAT:
        if "files" not in meta and (checkpoint / LEGACY_STATE_FILE).exists():
            raise CheckpointError(
                f"cannot resume from {checkpoint}: it is in the old {LEGACY_STATE_FILE} format, which okd no longer loads "
                "because loading it can run arbitrary code; start a new run with --overwrite or another --output-dir"
            )
        raise CheckpointDamaged(checkpoint, CHECKPOINT_COMPLETE, f"unknown format {meta.get('format')!r} (expected {FORMAT!r})")
    if meta.get("sha256") != _marker_digest(meta):
        raise CheckpointDamaged(checkpoint, CHECKPOINT_COMPLETE, "its content does not match its own checksum")
    files = meta.get("files")
    if not isinstance(files, dict) or STATE_JSON not in files:
        raise CheckpointDamaged(checkpoint, CHECKPOINT_COMPLETE, f"no checksum of {STATE_JSON}")
    for name, record in sorted(files.items()):
        path = checkpoint / name
        if Path(name).name != name or not isinstance(record, dict):
            raise CheckpointDamaged(checkpoint, CHECKPOINT_COMPLETE, f"malformed entry for {name!r}")
        if not path.is_file():
            raise CheckpointDamaged(checkpoint, name, "the file is missing")
        size = path.stat().st_size
        if size != record.get("bytes"):
            raise CheckpointDamaged(checkpoint, name, f"{size} bytes, {record.get('bytes')} were written")
        if _sha256(path) != record.get("sha256"):
            raise CheckpointDamaged(checkpoint, name, "its sha256 differs from the one recorded when it was written")
    return meta


def resumable_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint of ``output_dir`` whose files all verify (None if there is none at all).

    A damaged newer checkpoint is skipped with a one-line warning naming its damaged file; when
    every complete checkpoint is damaged, a one-line :class:`CheckpointError` names the newest
    damaged file. A checkpoint of the old ``state.pt`` format stops the search with an error.
    """
    damaged: list[CheckpointDamaged] = []
    for path in reversed(complete_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointDamaged as error:
            damaged.append(error)
            continue
        for error in damaged:
            logger.warning("okd: %s; resuming from the intact %s instead", error, path)
        return path
    if damaged:
        others = f" (and {len(damaged) - 1} older damaged checkpoint(s))" if len(damaged) > 1 else ""
        root = Path(output_dir) / "checkpoints"
        raise CheckpointError(f"cannot resume from {root}: no intact checkpoint; {damaged[0]}{others}")
    return None


def read_state(checkpoint: Path, verified: bool = False) -> dict:
    """The training state stored in ``checkpoint`` (tensors on the CPU). The files are verified
    first unless ``verified`` says the caller just did (:func:`verify_checkpoint`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint) if verified else verify_checkpoint(checkpoint)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name in meta["files"]:
        if name.endswith(".safetensors"):
            try:
                tensors[name] = load_file(str(checkpoint / name), device="cpu")
            except (SafetensorError, OSError, ValueError) as error:
                reason = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
                raise CheckpointError(f"cannot read {checkpoint / name}: {reason}") from None
    try:
        document = json.loads((checkpoint / STATE_JSON).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {checkpoint / STATE_JSON}: {type(error).__name__}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT or not isinstance(document.get("state"), dict):
        raise CheckpointError(f"cannot read {checkpoint / STATE_JSON}: not an {FORMAT} state")
    return decode(document["state"], tensors, where=str(checkpoint / STATE_JSON))
