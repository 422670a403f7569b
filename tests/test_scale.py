"""What real runs need: gradient accumulation, gradient checkpointing, a LoRA student, a
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


# -- 2. gradient checkpointing ------------------------------------------------------------------
def _student_gradients(distiller: Distiller) -> dict[str, torch.Tensor]:
    """The gradients of the first optimizer step."""
    steps = record_gradients(distiller) if distiller.module_optimizer is not None else None
    if steps is None:
        steps = []
        names = {id(p): n for n, p in distiller.accelerator.unwrap_model(distiller.student).named_parameters()}

        def hook(optimizer, args, kwargs):
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            steps.append({names[id(p)]: p.grad.detach().clone() for p in params})

        distiller.optimizer.optimizer.register_step_pre_hook(hook)
    distiller.train()
    return steps[0]


def test_gradient_checkpointing_recomputes_and_keeps_the_gradients(tiny_setting, tmp_path):
    gradients, recomputed = {}, {}
    for flag in (False, True):
        kwargs = configs(tiny_setting, "kd", steps=1)
        kwargs["train"].gradient_checkpointing = flag
        kwargs["data"].validation_file = None
        distiller = Distiller(**kwargs, output_dir=str(tmp_path / str(flag)))
        student = distiller.accelerator.unwrap_model(distiller.student)
        assert student.is_activation_checkpointing == flag
        calls = []
        # transformers checkpoints a layer's `forward` (inside its hooks): count a module within it.
        student.model.layers[0].self_attn.register_forward_pre_hook(lambda module, args: calls.append(1))
        gradients[flag] = _student_gradients(distiller)
        recomputed[flag] = len(calls)
    assert recomputed == {False: 1, True: 2}  # the checkpointed layer ran again in the backward
    assert gradients[False].keys() == gradients[True].keys()
    for name in gradients[False]:
        torch.testing.assert_close(gradients[True][name], gradients[False][name], rtol=1e-5, atol=1e-7, msg=name)


def test_generation_keeps_the_kv_cache_under_gradient_checkpointing(tiny_setting):
    """On-policy sources generate with the student while it trains: with checkpointing on (and the
    model's config.use_cache off, as TRL sets it), every step after the prompt feeds one new token and
    the cache of the previous ones (TRL's GKD lost the cache this way)."""
    from okd.generation import generate_batched
    from okd.models import build_model, enable_gradient_checkpointing

    model = build_model("llama", "nano", vocab_size=320, max_positions=48, seed=0, eos_token_id=1, pad_token_id=0)
    enable_gradient_checkpointing(model)
    model.config.use_cache = False
    model.train()
    fed = []

    def record(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.x calls it `cache`
        fed.append((kwargs["input_ids"].shape[1], 0 if cache is None else cache.get_seq_length()))

    model.model.register_forward_pre_hook(record, with_kwargs=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    out = generate_batched(model, prompts, pad_token_id=0, eos_token_id=None, max_new_tokens=5, seed=0)
    assert [len(r) for r in out] == [5, 5]
    assert fed[0] == (4, 0)  # the (left-padded) prompts, no cache yet
    assert fed[1:] == [(1, 4 + i) for i in range(4)]  # then one token at a time on the growing cache
    assert model.training and model.is_activation_checkpointing  # the training mode is back


# -- 3. a LoRA student ------------------------------------------------------------------------
def test_lora_student_trains_only_adapters_and_saves_adapter_and_merged_student(tiny_setting, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    kwargs = configs(tiny_setting, "kd", steps=3)
    kwargs["model"].student_lora = LoraStudentConfig(rank=4, alpha=8.0, target_modules="all-linear")
    kwargs["data"].validation_file = None
    distiller = Distiller(**kwargs, output_dir=str(tmp_path / "lora"))
    student = distiller.accelerator.unwrap_model(distiller.student)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {id(p) for g in distiller.optimizer.param_groups for p in g["params"]} == {
        id(p) for n, p in student.named_parameters() if n in trainable
    }
    distiller.train()
    distiller.save()
    for name, p in student.named_parameters():
        if name not in trainable:
            assert torch.equal(p.detach(), before[name]), f"frozen {name} moved"
    assert any(not torch.equal(p.detach(), before[n]) for n, p in student.named_parameters() if "lora_B" in n)

    out = tmp_path / "lora"
    assert (out / "student_adapter" / "adapter_config.json").exists()
    adapter = load_file(str(out / "student_adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    merged = AutoModelForCausalLM.from_pretrained(str(out / "student"))
    assert not any("lora" in n for n, _ in merged.named_parameters())  # a plain transformers model
    merged.eval(), student.eval()
    batch = distiller.collator([distiller.train_set[i] for i in range(4)])
    with torch.no_grad():
        adapted = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        plain = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with student.disable_adapter():
            base = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(plain, adapted, rtol=1e-4, atol=1e-5)
    assert (adapted - base).abs().max() > 1e-3  # the adapters changed the model: the equality is not trivial


def test_lora_targets_matching_no_module_are_named_in_one_line(tiny_setting, tmp_path):
    kwargs = configs(tiny_setting, "kd", steps=1)
    kwargs["model"].student_lora = LoraStudentConfig(target_modules=["qproj", "v_projection"])
    with pytest.raises(ValueError) as raised:
        Distiller(**kwargs, output_dir=str(tmp_path / "bad"))
    message = str(raised.value)
    assert "\n" not in message
    assert "['qproj', 'v_projection'] match no module" in message and "q_proj" in message
    assert not (tmp_path / "bad").exists()  # nothing was written


# -- 6. a teacher in its own dtype --------------------------------------------------------------
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "adaptive_kl"])
def test_divergences_upcast_a_bf16_teacher_beside_an_fp32_student(name):
    """Every divergence computes in float32 per chunk: bf16 teacher logits with fp32 student logits give
    exactly what the teacher's (bf16-rounded) logits give in float32, never a negative value, and close
    to the all-fp32 value (ms-swift #10156: a JSD computed in bf16 went negative)."""
    from okd.divergences import get_divergence

    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(3, 7, 257, generator=generator) * 2
    student = teacher + 1e-3 * torch.randn(teacher.shape, generator=generator)  # nearly equal: D close to 0
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 5:] = False
    divergence = get_divergence(name, chunk_tokens=5, reduction="none")
    low = teacher.to(torch.bfloat16)
    mixed = divergence(low, student, mask)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, divergence(low.float(), student, mask), rtol=0, atol=0)
    assert (mixed >= 0).all(), mixed.min()
    far = student + torch.randn(teacher.shape, generator=generator)  # a real gap: the rounding is small beside it
    full, rounded = divergence(teacher, far, mask), divergence(low, far, mask)
    assert (rounded >= 0).all()
    # bf16 keeps 8 significant bits: logits of size ~2 move by up to ~0.008, the divergences by a few %.
    torch.testing.assert_close(rounded, full, rtol=0.05, atol=1e-2)


def test_teacher_dtype_is_set_apart_from_the_student(tiny_setting, tmp_path):
    kwargs = configs(tiny_setting, "kd", steps=2)
    kwargs["model"].teacher_dtype = "bfloat16"
    kwargs["data"].validation_file = None
    distiller = Distiller(**kwargs, output_dir=str(tmp_path / "mixed"))
    assert {p.dtype for p in distiller.teacher.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in distiller.student.parameters()} == {torch.float32}
    distiller.train()
    rows = _rows(tmp_path / "mixed")
    assert all(r["kd"] >= 0 and torch.isfinite(torch.tensor(r["loss"])) for r in rows)


# -- 7. throughput, memory and ETA ----------------------------------------------------------------
def test_metrics_report_throughput_peak_memory_and_eta_as_scalars_for_trackers(tiny_setting, tmp_path):
    """metrics.jsonl carries tokens_per_second, peak_memory_mb and eta_seconds; what goes to the trackers
    (train.report_to) is only scalars, the new fields included. TensorBoard is not installed in the
    test environment, so the tracker calls are recorded instead."""
    kwargs = configs(tiny_setting, "kd", steps=3)
    kwargs["data"].validation_file = None
    distiller = Distiller(**kwargs, output_dir=str(tmp_path / "run"))
    logged = []
    distiller.train_config.report_to = ["tensorboard"]
    distiller.accelerator.init_trackers = lambda *args, **kw: None
    distiller.accelerator.end_training = lambda: None
    distiller.accelerator.log = lambda values, step=None: logged.append((step, values))
    distiller.train()
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["tokens_per_second"] > 0 and row["peak_memory_mb"] > 0 and row["eta_seconds"] >= 0
    assert rows[-1]["eta_seconds"] == 0
    assert [step for step, _ in logged] == [1, 2, 3]
    for _, values in logged:
        assert {"tokens_per_second", "peak_memory_mb", "eta_seconds", "loss"} <= values.keys()
        assert all(type(v) in (int, float, bool) for v in values.values())


def test_checkpoints_from_before_the_new_fields_resume_at_their_defaults(tmp_path):
    """A checkpoint written before these fields existed ran with their defaults: it resumes when they
    are left at the defaults, and a changed accumulation is refused (it changes the run)."""
    from okd.config import DistillConfig
    from okd.training import checkpoint as ckpt

    current = ckpt.flatten_run_config(DistillConfig().run_config(1))
    old = {k: v for k, v in current.items() if k not in ckpt.ADDED_FIELD_DEFAULTS}
    ckpt.check_same_run(old, current, tmp_path)
    changed = ckpt.flatten_run_config(DistillConfig(train=TrainConfig(gradient_accumulation_steps=2)).run_config(1))
    with pytest.raises(ValueError, match=r"train\.gradient_accumulation_steps: checkpoint 1, now 2"):
        ckpt.check_same_run(old, changed, tmp_path)
    checkpointing = DistillConfig(train=TrainConfig(gradient_checkpointing=True))
    ckpt.check_same_run(current, ckpt.flatten_run_config(checkpointing.run_config(1)), tmp_path)  # memory only
