"""Safe interruption (SIGINT/SIGTERM) and numerical faults (NaN/inf losses and gradients)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_helpers import configs

from okd.training import Distiller, distill, latest_checkpoint
from okd.training.checkpoint import verify_checkpoint


def _cli_command(setting, out: Path, steps: int, *extra: str) -> list[str]:
    okd = Path(sys.executable).with_name("okd")
    return [
        str(okd), "distill",
        "--model.teacher", setting["teacher"], "--model.tokenizer", setting["tokenizer"],
        "--model.student_size", "nano", "--method.name", "okd",
        "--data.train_file", setting["train"], "--data.validation_file", setting["validation"],
        "--data.max_length", "48", "--train.max_steps", str(steps), "--train.batch_size", "4",
        "--train.log_every", "1", "--output-dir", str(out), "--progress", "false", *extra,
    ]


@contextlib.contextmanager
def _child(command: list[str]):
    """The training subprocess, killed on the way out whatever happened (a failed or timed-out test
    must not leave it running)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def _wait_for_steps(metrics: Path, n: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        if process.poll() is not None:
            raise AssertionError(f"process ended early: {process.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("training did not start in time")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_a_checkpoint_and_exits_cleanly_then_resume_finishes(tiny_setting, tmp_path, signum):
    out = tmp_path / "run"
    with _child(_cli_command(tiny_setting, out, 100000)) as process:
        _wait_for_steps(out / "metrics.jsonl", 3, process)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert "okd: stopped by signal after step" in stderr
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None, stderr[-2000:]
    stopped_at = json.loads((checkpoint / "checkpoint_complete.json").read_text())["step"]
    assert stopped_at >= 3
    assert not (out / "student").exists()  # an interrupted run is not a finished one
    assert "--resume" in stderr

    total = stopped_at + 3
    resumed = subprocess.run(_cli_command(tiny_setting, out, total, "--resume"), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, total + 1))
    assert (out / "student" / "model.safetensors").exists()


def test_second_signal_stops_at_once(tiny_setting, tmp_path):
    out = tmp_path / "run"
    with _child(_cli_command(tiny_setting, out, 100000)) as process:
        _wait_for_steps(out / "metrics.jsonl", 2, process)
        # Two different signals: a repeated SIGINT sent back to back may be merged into one by the OS.
        process.send_signal(signal.SIGINT)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)  # a guard against a hang, not a timing check
    # Stopped by the second signal, not by the first one's finish-the-step-and-checkpoint path.
    assert process.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "okd: interrupted (second SIGTERM: stopping at once)"
    assert "stopped by signal after step" not in stderr
    assert not (out / "student").exists()
    # Whatever was written is either a complete checkpoint or ignored on resume, never a broken one.
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None:
        verify_checkpoint(checkpoint)  # every file matches the checksum recorded when it was written


def _inject(distiller: Distiller, at_step: int, where: str):
    """Make the loss (or a gradient) of one step NaN. Wraps the step's forward (`forward_losses`), so
    every loss path (full logits, loss positions, fused) is covered."""
    original = distiller.forward_losses

    def faulty(batch, update_module):
        losses = original(batch, update_module)
        if distiller.step == at_step and where == "loss":
            losses.kd = losses.kd * float("nan")
            losses.loss = losses.loss * float("nan")
        if distiller.step == at_step and where == "gradient":
            losses.loss.register_hook(lambda grad: grad * float("inf"))
        return losses

    distiller.forward_losses = faulty


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_stops_with_a_message_naming_step_term_and_method(tiny_setting, tmp_path, where):
    kwargs = configs(tiny_setting, "kd", steps=6)
    kwargs["train"].checkpoint_every = 2
    distiller = Distiller(**kwargs, output_dir=str(tmp_path / "run"))
    _inject(distiller, 4, where)
    with pytest.raises(FloatingPointError) as raised:
        distiller.train()
    message = str(raised.value)
    assert "step 4" in message and "'kd'" in message
    assert ("kd loss" if where == "loss" else "gradient") in message
    assert "step-00000002" in message  # the last good checkpoint is named and kept
    assert latest_checkpoint(tmp_path / "run").name == "step-00000002"


def test_skip_nonfinite_steps_skips_and_counts(tiny_setting, tmp_path):
    kwargs = configs(tiny_setting, "kd", steps=5)
    kwargs["train"].skip_nonfinite_steps = True
    distiller = Distiller(**kwargs, output_dir=str(tmp_path / "run"))
    _inject(distiller, 3, "gradient")
    snapshots = {}
    original_step = distiller.training_step

    def recording_step(batch, update_module):
        losses = original_step(batch, update_module)
        snapshots[distiller.step] = [p.detach().clone() for p in distiller.student.parameters()]
        return losses

    distiller.training_step = recording_step
    distiller.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in rows] == [False, False, True, False, False]
    assert rows[-1]["nonfinite_steps_skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))  # the skipped step moved nothing
    assert all(torch.isfinite(p).all() for p in distiller.student.parameters())


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones included) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _fail_on_replace(monkeypatch):
    """Make the rename that publishes a write fail: the data is written, the final step is not."""
    import os

    def failing_replace(src, dst):
        raise OSError(f"injected failure renaming {src} -> {dst}")

    monkeypatch.setattr(os, "replace", failing_replace)


def test_interrupted_checkpoint_write_leaves_the_previous_checkpoint_intact(tiny_setting, tmp_path, monkeypatch):
    """A checkpoint write that fails between writing and renaming (as a kill would) leaves the previous
    complete checkpoint as it was, and nothing visible under the new checkpoint's name."""
    kwargs = configs(tiny_setting, "okd", steps=4)
    kwargs["train"].checkpoint_every = 2
    distiller = Distiller(**kwargs, output_dir=str(tmp_path / "run"))
    original_step = distiller.training_step

    def stop_at_step_4(batch, update_module):
        if distiller.step == 4:
            raise KeyboardInterrupt
        return original_step(batch, update_module)

    distiller.training_step = stop_at_step_4
    with pytest.raises(KeyboardInterrupt):
        distiller.train()
    root = tmp_path / "run" / "checkpoints"
    before = _snapshot(root)
    assert [p.name for p in root.iterdir()] == ["step-00000002"]

    distiller.step = 3  # the checkpoint of a later step, then a rewrite of the existing one
    with monkeypatch.context() as patch:
        _fail_on_replace(patch)
        with pytest.raises(OSError, match="injected failure"):
            distiller.save_checkpoint()
    distiller.step = 2
    with monkeypatch.context() as patch:
        _fail_on_replace(patch)
        with pytest.raises(OSError, match="injected failure"):
            distiller.save_checkpoint()
    assert _snapshot(root) == before  # no leftover, not even a hidden one
    assert latest_checkpoint(tmp_path / "run") == root / "step-00000002"
    # ... and it still resumes.
    assert distill(**configs(tiny_setting, "okd", steps=4), output_dir=str(tmp_path / "run"), resume=True).steps == 4


def test_interrupted_result_writes_leave_the_previous_files_intact(tiny_setting, tmp_path, monkeypatch):
    """train_summary.json, the metrics rewrite of a resume, run_config.yaml and evaluation's JSON:
    a failure between write and rename keeps the old complete file and leaves no partial one."""
    from okd.evaluation import evaluate
    from okd.training.checkpoint import drop_metrics_after

    kwargs = configs(tiny_setting, "kd", steps=2)
    distiller = Distiller(**kwargs, output_dir=str(tmp_path / "run"))
    distiller.train()
    distiller.save()
    out = tmp_path / "run"
    eval_json = tmp_path / "eval.json"
    evaluate(str(out / "student"), tiny_setting["validation"], seeds="1", json_out=str(eval_json), max_examples=2, progress=False)
    before = _snapshot(tmp_path)

    with monkeypatch.context() as patch:
        _fail_on_replace(patch)
        with pytest.raises(OSError, match="injected failure"):
            distiller.save()  # the student directory, then train_summary.json
        distiller.final_metrics = {"changed": 1.0}
        with pytest.raises(OSError, match="injected failure"):
            distiller.save_checkpoint()
        with pytest.raises(OSError, match="injected failure"):
            drop_metrics_after(out / "metrics.jsonl", 1)
        with pytest.raises(OSError, match="injected failure"):
            distiller.train()  # rewrites run_config.yaml first
        with pytest.raises(OSError, match="injected failure"):
            evaluate(str(out / "student"), tiny_setting["validation"], seeds="2", json_out=str(eval_json), max_examples=2, progress=False)
    after = _snapshot(tmp_path)
    assert after.keys() == before.keys()  # no half-written file under any name, hidden ones included
    for name in ("run/train_summary.json", "run/metrics.jsonl", "run/run_config.yaml", "eval.json", "run/student/model.safetensors"):
        assert after[name] == before[name], name
