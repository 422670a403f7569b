"""Two processes on the CPU (gloo) through `accelerate launch`: OKD's module stays identical on both ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_processes_keeps_online_module_identical(tiny_setting, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "ddp"
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
        "-m", "okd.cli", "distill",
        "--model.teacher", tiny_setting["teacher"], "--model.tokenizer", tiny_setting["tokenizer"],
        "--model.student_size", "nano", "--method.name", "okd",
        "--data.train_file", tiny_setting["train"], "--data.validation_file", tiny_setting["validation"],
        "--data.max_length", "48", "--train.max_steps", "4", "--train.batch_size", "4", "--train.log_every", "1",
        "--output-dir", str(out), "--progress", "false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_processes"] == 2
    # Each rank saw different examples, so without the explicit gradient averaging the two copies
    # of the module would differ after the first update.
    assert summary["module_consistent_across_processes"] is True
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one writer: rank 0
    assert (out / "online_module" / "adapter.safetensors").exists()
