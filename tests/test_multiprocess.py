"""Two processes on the CPU (gloo) through `accelerate launch`: OKD's module stays identical on both ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_distill(setting: dict, out: Path, method: str, *options: str) -> subprocess.CompletedProcess:
    """`accelerate launch` two CPU processes (gloo) running `okd distill` on the tiny setting."""
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
        "-m", "okd.cli", "distill",
        "--model.teacher", setting["teacher"], "--model.tokenizer", setting["tokenizer"],
        "--model.student_size", "nano", "--method.name", method,
        "--data.train_file", setting["train"], "--data.validation_file", setting["validation"],
        "--data.max_length", "48", "--train.batch_size", "4", "--train.log_every", "1",
        "--output-dir", str(out), "--progress", "false", *options,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_accelerate_launch_two_processes_keeps_online_module_identical(tiny_setting, tmp_path):
    out = tmp_path / "ddp"
    _launch_distill(tiny_setting, out, "okd", "--train.max_steps", "4")
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_processes"] == 2
    # Each rank saw different examples, so without the explicit gradient averaging the two copies
    # of the module would differ after the first update.
    assert summary["module_consistent_across_processes"] is True
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one writer: rank 0
    assert (out / "online_module" / "adapter.safetensors").exists()


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_setting, tmp_path):
    """Same examples per step (2 x 4 vs 1 x 8): same logged losses and the same student, up to float rounding."""
    import torch
    from engine_helpers import configs
    from safetensors.torch import load_file

    from okd.training import distill

    kwargs = configs(tiny_setting, "okd", steps=4)
    kwargs["train"].batch_size = 8
    single = distill(**kwargs, output_dir=str(tmp_path / "single"))

    out = tmp_path / "ddp"
    _launch_distill(
        tiny_setting, out, "okd", "--train.max_steps", "4", "--data.max_validation_examples", "32",
        "--train.learning_rate", str(kwargs["train"].learning_rate), "--train.lr_scheduler", "constant",
    )

    def rows(path):
        return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]

    for a, b in zip(rows(single.output_dir), rows(out), strict=True):
        for term in ("loss", "ce", "kd", "module_loss"):
            assert abs(a[term] - b[term]) <= 1e-4 * abs(a[term]) + 1e-6, (a["step"], term, a[term], b[term])
    one = load_file(str(single.output_dir / "student" / "model.safetensors"))
    two = load_file(str(out / "student" / "model.safetensors"))
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-5)


def test_two_processes_make_the_same_replay_choices(tiny_setting, tmp_path):
    """DistiLLM's source draws its branch (fresh / replay / ground truth) from a generator seeded alike on
    every rank, and its threshold follows the same validation loss: the ranks never disagree."""
    out = tmp_path / "ddp"
    _launch_distill(
        tiny_setting, out, "distillm", "--data.max_validation_examples", "16", "--train.max_steps", "6",
        "--eval.every", "2", "--sampling.max_new_tokens", "6", "--sampling.init_threshold", "0.7",
        "--sampling.replay_capacity", "8", "--sampling.replay_ratio", "0.5",
    )
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_processes"] == 2
    assert summary["source_consistent_across_processes"] is True
    assert summary["final"]["source_student_fraction"] > 0  # student samples were used


def test_two_processes_follow_the_learning_rate_schedule_of_one_process(tiny_setting, tmp_path):
    """The default schedule (cosine with warm-up) advances once per optimizer step whatever the process
    count: Accelerate's prepared scheduler would step it once per process."""
    from engine_helpers import configs

    from okd.training import distill

    kwargs = configs(tiny_setting, "sft", steps=6)
    kwargs["train"].batch_size, kwargs["train"].lr_scheduler, kwargs["train"].warmup_steps = 8, "cosine", 2
    kwargs["data"].validation_file = None
    single = distill(**kwargs, output_dir=str(tmp_path / "single"))

    out = tmp_path / "ddp"
    _launch_distill(
        tiny_setting, out, "sft", "--train.max_steps", "6", "--data.validation_file", "null",
        "--train.learning_rate", str(kwargs["train"].learning_rate), "--train.lr_scheduler", "cosine",
        "--train.warmup_steps", "2",
    )

    def rates(path):
        return [json.loads(line)["learning_rate"] for line in (path / "metrics.jsonl").read_text().splitlines()]

    one, two = rates(single.output_dir), rates(out)
    assert len(one) == 6 and len(set(one)) > 3  # warm-up then decay: the rate moves every step
    assert two == one


def test_ranks_hold_the_same_module_and_the_check_reports_a_difference(tiny_setting, tmp_path):
    """Each rank writes its own copy of the online module (tests/multiprocess_worker.py): the copies are
    compared here, not through the flag `Distiller.save` computes; then one rank perturbs its copy and
    `Distiller.module_consistent_across_processes` must say so. The checkpoint of that 2-process run is
    then refused by a 1-process resume (the process count changes the run)."""
    import torch
    from safetensors.torch import load_file

    setting_json = tmp_path / "setting.json"
    setting_json.write_text(json.dumps(tiny_setting))
    worker = Path(__file__).with_name("multiprocess_worker.py")
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
        str(worker), str(setting_json), str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["num_processes"] == 2 for r in reports)
    modules = [load_file(str(tmp_path / f"rank{r}_module.safetensors")) for r in (0, 1)]
    initial = load_file(str(tmp_path / "rank0_module_initial.safetensors"))
    assert modules[0].keys() == modules[1].keys() == initial.keys()
    for name in modules[0]:
        assert torch.equal(modules[0][name], modules[1][name]), f"ranks differ in {name}"
    assert any(not torch.equal(modules[0][k], initial[k]) for k in initial), "the module never moved"
    saved = load_file(str(tmp_path / "run" / "online_module" / "adapter.safetensors"))
    assert all(torch.equal(saved[k], modules[0][k]) for k in saved)  # what rank 0 wrote is what both held

    assert [r["consistent_after_training"] for r in reports] == [True, True]
    assert [r["consistent_after_perturbing"] for r in reports] == [False, False]

    from multiprocess_worker import worker_configs

    from okd.training import Distiller

    with pytest.raises(ValueError, match=r"cannot resume .*num_processes: checkpoint 2, now 1"):
        Distiller(**worker_configs(tiny_setting), output_dir=str(tmp_path / "run"), resume=True)


def test_two_processes_run_minillm_in_step(tiny_setting, tmp_path):
    """MiniLLM under DDP: each rank samples its own prompts with the same seeds and stores as many
    rollouts, so the ranks start rounds and passes on the same steps (two student forwards, rollout
    and LM batch, before one backward)."""
    out = tmp_path / "ddp"
    _launch_distill(
        tiny_setting, out, "minillm", "--data.max_validation_examples", "16", "--train.max_steps", "6",
        "--sampling.max_new_tokens", "6", "--minillm.num_rollouts", "16", "--minillm.ppo_epochs", "2",
    )
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_processes"] == 2
    assert summary["source_consistent_across_processes"] is True
    # 16 rollouts = 2 global batches of 2 x 4, served twice: round 2 starts at step 5.
    assert summary["final"]["source_rollout_round"] == 2.0 and summary["final"]["source_rollout_size"] == 8.0
