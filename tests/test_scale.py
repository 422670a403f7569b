"""What real runs need (issue 16): gradient accumulation, gradient checkpointing, a LoRA student, a
teacher in its own dtype, and the throughput / memory / ETA fields of the metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import configs

from okd.config import LoraStudentConfig, SamplingConfig, TrainConfig
from okd.training import Distiller, distill


def accumulation_configs(setting: dict, batch_size: int, accumulation: int, steps: int = 2) -> dict:
    """OKD (the student and the online module both accumulate) with ``accumulation`` micro-batches
    of ``batch_size`` examples per process and per step."""
    kwargs = configs(setting, "okd", steps=steps)
    kwargs["train"].batch_size = batch_size
    kwargs["train"].gradient_accumulation_steps = accumulation
    kwargs["data"].validation_file = None
    return kwargs


def record_gradients(distiller: Distiller) -> list[dict[str, torch.Tensor]]:
    """A list that receives, at every optimizer step, the gradients the step applies (by name:
    ``student.*`` and ``module.*``), recorded by step pre-hooks on the underlying optimizers."""
    steps: list[dict[str, torch.Tensor]] = []
    student_names = {id(p): n for n, p in distiller.accelerator.unwrap_model(distiller.student).named_parameters()}
    module_names = {id(p): f"module.{i}" for i, p in enumerate(distiller.teacher.module_parameters())}

    def capture(names, prefix):
        def hook(optimizer, args, kwargs):
            if prefix == "student":
                steps.append({})
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        steps[-1][f"{prefix}.{names[id(p)]}"] = p.grad.detach().clone()
        return hook

    distiller.optimizer.optimizer.register_step_pre_hook(capture(student_names, "student"))
    distiller.module_optimizer.register_step_pre_hook(capture(module_names, "module"))
    return steps


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _launch_two_processes(script: Path, *args: str) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), str(script), *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


# -- 1. gradient accumulation ------------------------------------------------------------------
def test_accumulation_equals_one_large_batch_and_two_processes(tiny_setting, tmp_path):
    """1 process x 1 micro-batch of 8 == 1 process x 4 micro-batches of 2 == 2 processes x 2 micro-batches
    of 2: the same gradients (student and online module) at every step, on examples of different
    lengths, because every micro-batch's mean loss is weighted by its share of the step's tokens."""
    runs = {}
    for name, batch_size, accumulation in (("whole", 8, 1), ("accumulated", 2, 4)):
        distiller = Distiller(**accumulation_configs(tiny_setting, batch_size, accumulation), output_dir=str(tmp_path / name))
        runs[name] = record_gradients(distiller)
        if name == "accumulated":  # the micro-batches differ in loss tokens, so plain averaging would differ
            counts = []
            original = distiller.training_step

            def counting(batches, update_module):
                counts.append([int((b["labels"][:, 1:] != -100).sum()) for b in batches])
                return original(batches, update_module)

            distiller.training_step = counting
        distiller.train()
        runs[name + "_rows"] = _rows(tmp_path / name)
    assert all(len(set(step)) > 1 for step in counts), counts

    setting_json = tmp_path / "setting.json"
    setting_json.write_text(json.dumps(tiny_setting))
    _launch_two_processes(Path(__file__).with_name("accumulation_worker.py"), str(setting_json), str(tmp_path / "ddp"))
    runs["two_processes"] = torch.load(tmp_path / "ddp" / "gradients.pt")
    runs["two_processes_rows"] = _rows(tmp_path / "ddp" / "run")

    whole = runs["whole"]
    assert len(whole) == 2 and any(k.startswith("module.") for k in whole[0])
    for name in ("accumulated", "two_processes"):
        assert len(runs[name]) == len(whole)
        for step, (a, b) in enumerate(zip(whole, runs[name]), start=1):
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=f"{name}, step {step}, {key}")
        for a, b in zip(runs["whole_rows"], runs[name + "_rows"], strict=True):
            for term in ("loss", "ce", "kd", "module_loss"):
                assert b[term] == pytest.approx(a[term], rel=1e-5), (name, a["step"], term)


def test_resume_with_accumulation_reproduces_the_uninterrupted_run(tiny_setting, tmp_path):
    """Checkpoints fall on optimizer steps; the source state they hold is after the step's last
    micro-batch, so a resumed run (GKD: generated micro-batches too) continues exactly."""
    from safetensors.torch import load_file

    def run_configs():
        kwargs = configs(tiny_setting, "gkd", steps=5)
        kwargs["train"].batch_size, kwargs["train"].gradient_accumulation_steps = 2, 3
        kwargs["sampling"] = SamplingConfig(max_new_tokens=6)
        kwargs["data"].validation_file = None
        return kwargs

    full = distill(**run_configs(), output_dir=str(tmp_path / "full"))
    interrupted = run_configs()
    interrupted["train"].checkpoint_every = 2
    distiller = Distiller(**interrupted, output_dir=str(tmp_path / "resumed"))
    original = distiller.training_step

    def crash_at_step_4(batches, update_module):
        if distiller.step == 4:
            raise KeyboardInterrupt
        return original(batches, update_module)

    distiller.training_step = crash_at_step_4
    with pytest.raises(KeyboardInterrupt):
        distiller.train()
    resumed = distill(**interrupted, output_dir=str(tmp_path / "resumed"), resume=True)
    assert resumed.steps == 5
    full_rows, resumed_rows = _rows(full.output_dir), _rows(resumed.output_dir)
    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4, 5]
    assert full_rows[-1]["source_on_policy_batches"] > 0  # some micro-batches were generated
    for a, b in zip(full_rows, resumed_rows, strict=True):
        assert a["loss"] == b["loss"], a["step"]
    a = load_file(str(full.output_dir / "student" / "model.safetensors"))
    b = load_file(str(resumed.output_dir / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_below_one_is_refused():
    with pytest.raises(ValueError, match=r"^train\.gradient_accumulation_steps must be >= 1, got 0$"):
        TrainConfig(gradient_accumulation_steps=0)
