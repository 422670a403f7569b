"""Run by tests/test_checkpoints.py (not a test module itself): SIGKILL a training run at random
moments of its checkpoint writes, then resume it to the end, many times over.

The worker sets a run up once (a ``Distiller`` at step 0) and forks a child per run, so that an
attempt costs neither an interpreter start nor the models' loading. In every child the checkpoint
writer is slowed down (a pause after each tensor file, before ``state.json`` and the completion
marker, and between renaming a pruned checkpoint away and deleting it), and it tells the worker,
through a pipe, when each write starts and ends. Each attempt, in its own output directory:

1. a child trains from step 0 (a checkpoint every step); when its k-th checkpoint write starts
   (k drawn at random), the worker waits a random fraction of a write's duration and kills the
   child with SIGKILL;
2. the worker notes the hidden leftovers of the interrupted write (``.step-*`` directories);
3. a second child resumes: it takes ``resumable_checkpoint`` of the directory (verified, with the
   fallback) and ``Distiller.load_checkpoint`` (or starts over when there is none), trains to the
   end and saves the student.

The uninterrupted reference run is made the same way. ``report.json`` lists, per attempt, the
write that was hit, the delay, the leftovers, the resumed child's exit status and its student.

Usage: ``kill_worker.py SETTING_JSON OUTPUT_DIR ATTEMPTS SEED``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # engine_helpers

from engine_helpers import configs  # noqa: E402

from okd.training import Distiller, resumable_checkpoint  # noqa: E402

STEPS = 6
PAUSE = 0.02  # seconds, at each point of a checkpoint write where a kill is of interest


def run_configs(setting: dict) -> dict:
    """The killed run: OKD (an online module and its optimizer in the checkpoint), a checkpoint every step."""
    kwargs = configs(setting, "okd", steps=STEPS)
    kwargs["train"].checkpoint_every, kwargs["train"].keep_checkpoints = 1, 2
    return kwargs


def instrument_checkpoint_writes(pipe: int) -> None:
    """Slow the writer down at its interesting points; report each write's start (``s``) and end (``e``)."""
    import safetensors.torch

    from okd.training import checkpoint
    from okd.training.checkpoint import files

    save_file, write_text, rmtree, write_checkpoint = (
        safetensors.torch.save_file, files.write_text, files.shutil.rmtree, checkpoint.write_checkpoint,
    )

    def paused(function, before: bool):
        def wrapper(*args, **kwargs):
            if before:
                time.sleep(PAUSE)
            result = function(*args, **kwargs)
            if not before:
                time.sleep(PAUSE)
            return result
        return wrapper

    def reported_write(*args, **kwargs):
        os.write(pipe, b"s")
        result = write_checkpoint(*args, **kwargs)
        os.write(pipe, b"e")
        return result

    safetensors.torch.save_file = paused(save_file, before=False)
    files.write_text = paused(write_text, before=True)
    files.shutil = types.SimpleNamespace(rmtree=paused(rmtree, before=True))
    checkpoint.write_checkpoint = reported_write


def in_child(function) -> int:
    """Fork; the child runs ``function`` and exits (0: it returned). Returns the child's pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            function()
            code = 0
        except BaseException as error:  # noqa: BLE001 - reported through the exit status
            print(f"child failed: {type(error).__name__}: {error}", file=sys.stderr)
        finally:
            os._exit(code)
    return pid


def wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main(setting_json: str, out: str, attempts: int, seed: int) -> None:
    setting, out = json.loads(setting_json), Path(out)
    rng = random.Random(seed)
    template = Distiller(**run_configs(setting), output_dir=str(out / "setup"))

    def training(directory: Path, pipe: int | None, resume: bool):
        def run():
            if pipe is not None:
                instrument_checkpoint_writes(pipe)
            template.output = directory
            directory.mkdir(parents=True, exist_ok=True)
            checkpoint = resumable_checkpoint(directory) if resume else None
            if checkpoint is not None:
                template.load_checkpoint(checkpoint, verified=True)
            template.train()
            template.save()
        return run

    def read_event(pipe: int) -> bytes:
        return os.read(pipe, 1)

    # The reference, timing its checkpoint writes.
    read_end, write_end = os.pipe()
    pid = in_child(training(out / "reference", write_end, resume=False))
    os.close(write_end)
    writes, started = [], None
    while event := read_event(read_end):
        if event == b"s":
            started = time.monotonic()
        else:
            writes.append(time.monotonic() - started)
    os.close(read_end)
    report = {"reference_exit": wait(pid), "write_seconds": writes, "attempts": []}
    duration = max(writes)

    for i in range(attempts):
        directory = out / f"attempt-{i:02d}"
        target, delay = rng.randint(1, len(writes)), rng.uniform(0.0, duration)
        read_end, write_end = os.pipe()
        pid = in_child(training(directory, write_end, resume=False))
        os.close(write_end)
        starts = 0
        while starts < target and (event := read_event(read_end)):
            starts += event == b"s"
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        killed = wait(pid)
        os.close(read_end)
        root = directory / "checkpoints"
        leftovers = sorted(p.name for p in root.glob(".step-*")) if root.is_dir() else []
        visible = sorted(p.name for p in root.glob("step-*")) if root.is_dir() else []
        resumed = wait(in_child(training(directory, None, resume=True)))
        report["attempts"].append({
            "write": target, "delay": delay, "killed_exit": killed, "leftovers": leftovers, "checkpoints": visible,
            "resumed_exit": resumed, "student": str(directory / "student" / "model.safetensors"),
        })
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
