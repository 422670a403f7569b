"""Sharded runs through Accelerate: the shipped accelerate configs, FSDP2 with 2 CPU processes (gloo)
against one process, and the one-line refusals of a sharded run okd cannot do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


# The runs of tests/fsdp_worker.py: name -> (method, examples per micro-batch, micro-batches per step
# (per process), where the heads run: okd.heads' "fused" (the default), "positions" or "full").
SHARDED_RUNS = {
    "kd": ("kd", 4, 1, "fused"), "okd": ("okd", 4, 1, "fused"), "okd_accumulated": ("okd", 2, 2, "fused"),
    "okd_positions": ("okd", 4, 1, "positions"), "okd_full": ("okd", 4, 1, "full"),
}


def sharded_configs(setting: dict, method: str, batch_size: int, accumulation: int = 1, heads: str = "fused") -> dict:
    """A run of tests/fsdp_worker.py, or its one-process twin (one micro-batch of all 8 examples)."""
    from engine_helpers import configs

    kwargs = configs(setting, method, steps=3)
    kwargs["train"].batch_size = batch_size
    kwargs["train"].gradient_accumulation_steps = accumulation
    kwargs["train"].fused_loss = heads == "fused"
    kwargs["train"].fused_min_logits_mib = 0.0  # "fused": on every micro-batch, however small
    kwargs["train"].loss_positions_only = heads != "full"
    kwargs["data"].max_validation_examples = 16
    kwargs["train"].checkpoint_every = 2
    return kwargs


# -- the accelerate config files ---------------------------------------------------------------


def unknown_keys(path: Path) -> list[str]:
    """The keys of the file's fsdp_config / deepspeed_config that are no `accelerate launch` option
    (`accelerate launch` copies such keys onto its arguments without checking them: a typo is ignored)."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    config = ClusterConfig.from_yaml_file(str(path))  # unknown top-level keys raise here
    options = {action.dest for action in launch_command_parser()._actions}
    nested = {**(config.fsdp_config or {}), **(config.deepspeed_config or {})}
    return [key for key in nested if key not in options]


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml", "zero2.yaml", "zero3.yaml"])
def test_accelerate_config_loads_with_known_keys(name):
    """Each file parses with Accelerate's own config class and names only known options."""
    from accelerate.commands.config.config_args import ClusterConfig

    assert unknown_keys(CONFIGS / name) == []
    config = ClusterConfig.from_yaml_file(str(CONFIGS / name))
    expected = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "zero2.yaml": "DEEPSPEED", "zero3.yaml": "DEEPSPEED"}[name]
    assert config.distributed_type.value == expected
    if name == "fsdp.yaml":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[4])


def test_every_shipped_accelerate_config_is_checked():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == ["ddp.yaml", "fsdp.yaml", "zero2.yaml", "zero3.yaml"]


def test_a_misspelled_key_is_caught(tmp_path):
    """The check can fail: a misspelled FSDP key and a misspelled DeepSpeed key are reported, a
    misspelled top-level key is refused by Accelerate."""
    for name, good, bad in (
        ("fsdp.yaml", "fsdp_reshard_after_forward", "fsdp_reshard_after_froward"),
        ("zero3.yaml", "zero3_save_16bit_model", "zero3_save_16_bit_model"),
    ):
        path = tmp_path / name
        path.write_text((CONFIGS / name).read_text().replace(good, bad))
        assert unknown_keys(path) == [bad]
    path = tmp_path / "top.yaml"
    path.write_text((CONFIGS / "ddp.yaml").read_text().replace("num_machines", "num_machine"))
    with pytest.raises(ValueError, match="unknown keys"):
        unknown_keys(path)


# -- FSDP2 on 2 CPU processes ------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_runs(tiny_setting, tmp_path_factory):
    """``SHARDED_RUNS``, 3 steps each, by tests/fsdp_worker.py under FSDP2 with 2 processes of 4 examples."""
    out = tmp_path_factory.mktemp("fsdp")
    setting_json = out / "setting.json"
    setting_json.write_text(json.dumps(tiny_setting))
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate), "launch", "--config_file", str(CONFIGS / "fsdp.yaml"), "--num_processes", "2",
        "--num_cpu_threads_per_process", "1", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
        str(Path(__file__).with_name("fsdp_worker.py")), str(setting_json), str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("run", list(SHARDED_RUNS))
def test_fsdp_two_processes_match_one_process(tiny_setting, fsdp_runs, tmp_path, run):
    """Same examples per step (2 processes x 4 sharded, or x 2 micro-batches of 2, vs 1 x 8 whole):
    the same logged losses (OKD's module terms included) and the same saved student, up to float rounding."""
    import torch
    from safetensors.torch import load_file

    from okd.training import distill

    method, _, _, heads = SHARDED_RUNS[run]
    single = distill(**sharded_configs(tiny_setting, method, 8, 1, heads), output_dir=str(tmp_path / "single"))
    terms = ("loss", "ce", "kd") + (("module_loss", "module_ce", "module_divergence") if method == "okd" else ())
    one, two = _rows(single.output_dir), _rows(fsdp_runs / run)
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        for term in terms:
            assert abs(a[term] - b[term]) <= 1e-5 * abs(a[term]) + 1e-6, (a["step"], term, a[term], b[term])
    assert abs(one[-1]["validation_ce"] - two[-1]["validation_ce"]) <= 1e-5 * one[-1]["validation_ce"]
    whole = load_file(str(single.output_dir / "student" / "model.safetensors"))
    gathered = load_file(str(fsdp_runs / run / "student" / "model.safetensors"))
    assert whole.keys() == gathered.keys()
    # atol 3e-5: after 3 Adam steps at lr 3e-3, a float32 rounding difference in a near-zero gradient entry
    # moves that weight by up to ~1e-5 (Adam divides by the gradient's own scale); a wrong update is >= 1e-3.
    for name in whole:
        torch.testing.assert_close(gathered[name], whole[name], rtol=1e-4, atol=3e-5)
    summary = json.loads((fsdp_runs / run / "train_summary.json").read_text())
    assert summary["num_processes"] == 2
    if method == "okd":
        assert summary["module_consistent_across_processes"] is True
        saved = load_file(str(fsdp_runs / run / "online_module" / "adapter.safetensors"))
        reference = load_file(str(single.output_dir / "online_module" / "adapter.safetensors"))
        for name in reference:
            torch.testing.assert_close(saved[name], reference[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["kd", "okd"])
def test_fsdp_shards_the_teacher_and_the_student_but_not_the_online_module(fsdp_runs, method):
    """Each rank stores about half of the frozen teacher's elements (and of the student's); the two
    halves add up to the whole model; after the training steps the teacher is still split that way.
    OKD's adapter stays a whole (plain) tensor on every rank."""
    reports = [json.loads((fsdp_runs / f"{method}_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["sharding"] == "fsdp" and r["num_processes"] == 2 for r in reports)
    for model in ("teacher", "student"):
        total = reports[0][model]["total"]
        assert sum(r[model]["local"] for r in reports) == total, model  # split, nothing held twice
        assert all(r[model]["local"] <= 0.55 * total for r in reports), (model, [r[model] for r in reports])
    assert all(r["teacher_after"] == r["teacher"] for r in reports), [r["teacher_after"] for r in reports]
    if method == "okd":
        assert all(r["module_is_plain"] for r in reports)


def test_a_sharded_checkpoint_is_not_resumed_unsharded(tiny_setting, fsdp_runs, tmp_path):
    """The checkpoint of the 2-process FSDP run (its optimizer state keyed by parameter names) is
    refused by a one-process resume, naming the sharding."""
    import shutil

    from okd.training import Distiller

    shutil.copytree(fsdp_runs / "okd", tmp_path / "okd")
    with pytest.raises(ValueError, match=r"cannot resume .*sharding: checkpoint 'fsdp', now None"):
        Distiller(**sharded_configs(tiny_setting, "okd", 4), output_dir=str(tmp_path / "okd"), resume=True)


def test_fsdp_checkpoint_resumes_the_same_run(fsdp_runs):
    """OKD's FSDP run resumed from its step-2 checkpoint (the whole student and optimizer state,
    gathered on rank 0 and cut into shards again on resume) repeats step 3 and ends with the same student."""
    import torch
    from safetensors.torch import load_file

    straight, resumed = _rows(fsdp_runs / "okd"), _rows(fsdp_runs / "okd_resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for term in ("loss", "ce", "kd", "module_loss"):
        assert abs(straight[2][term] - resumed[2][term]) <= 1e-6 * abs(straight[2][term]), term
    one = load_file(str(fsdp_runs / "okd" / "student" / "model.safetensors"))
    two = load_file(str(fsdp_runs / "okd_resumed" / "student" / "model.safetensors"))
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-6, atol=1e-7)


# -- bad input: a sharded run okd cannot do is refused in one line, before any model loads ------


@pytest.mark.parametrize("flag, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_sharding_in_one_process_is_one_line_before_any_model_loads(tiny_setting, tmp_path, capsys, monkeypatch, flag, name):
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1` (what it sets:
    ACCELERATE_USE_FSDP, no WORLD_SIZE; the same for a DeepSpeed config). The teacher path does not
    exist: the sharding error comes first."""
    from test_bad_input import _assert_no_outputs, _cli_args, _cli_error

    monkeypatch.setenv(flag, "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    message = _cli_error(capsys, *_cli_args(tiny_setting, out, **{"model.teacher": str(tmp_path / "no_such_teacher")}))
    assert f"{name} was asked for" in message and f"{flag}=true" in message and "in one process" in message
    _assert_no_outputs(out)


def _refusal(setting, monkeypatch, env: dict, method: str = "kd", online: dict | None = None, **sections) -> str:
    """The one-line error ``check_sharding_request`` gives a 2-process launch with ``env`` set, for the
    tiny setting's run with ``online`` fields and ``sections`` (``train={"checkpoint_every": 2}``) changed."""
    from engine_helpers import configs

    from okd.config import DistillConfig, OnlineModuleConfig
    from okd.training.distributed import check_sharding_request

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "FSDP_VERSION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    kwargs = configs(setting, method, online=OnlineModuleConfig(**(online or {})))
    for section, fields in sections.items():
        for name, value in fields.items():
            setattr(kwargs[section], name, value)
    with pytest.raises(ValueError) as raised:
        check_sharding_request(DistillConfig(**kwargs))
    message = str(raised.value)
    assert "\n" not in message
    return message


FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


def test_fsdp1_is_refused(tiny_setting, monkeypatch):
    message = _refusal(tiny_setting, monkeypatch, {**FSDP2, "FSDP_VERSION": "1"})
    assert "fsdp_version 1" in message and "FSDP2 only" in message


def test_what_sharded_runs_do_not_support_is_refused(tiny_setting, monkeypatch):
    assert "method 'seqkd' (source teacher_generated)" in _refusal(tiny_setting, monkeypatch, FSDP2, "seqkd")
    assert "online.kind='lora'" in _refusal(tiny_setting, monkeypatch, FSDP2, "okd", online={"kind": "lora"})
    assert "model.student_lora" in _refusal(tiny_setting, monkeypatch, FSDP2, model={"student_lora": {"rank": 4}})
    assert "model.teacher_cache" in _refusal(tiny_setting, monkeypatch, FSDP2, model={"teacher_cache": "cache"})


def test_what_deepspeed_runs_do_not_support_is_refused(tiny_setting, monkeypatch):
    """As if deepspeed and a GPU were there (neither is on the test machine)."""
    import okd.training.distributed as distributed

    monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(distributed, "has_accelerator_device", lambda: True)
    deepspeed = {"ACCELERATE_USE_DEEPSPEED": "true"}
    for field, value in (("gradient_accumulation_steps", 2), ("skip_nonfinite_steps", True), ("checkpoint_every", 2)):
        assert f"train.{field}" in _refusal(tiny_setting, monkeypatch, deepspeed, train={field: value})
    from engine_helpers import configs

    from okd.config import DistillConfig

    distributed.check_sharding_request(DistillConfig(**configs(tiny_setting, "okd")))  # the defaults pass


def test_a_supported_sharded_run_passes_the_check(tiny_setting, monkeypatch):
    """The refusals above are not unconditional: FSDP2 with OKD's adapter on 2 processes is accepted."""
    from engine_helpers import configs

    from okd.config import DistillConfig
    from okd.training.distributed import check_sharding_request

    for name, value in {**FSDP2, "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    check_sharding_request(DistillConfig(**configs(tiny_setting, "okd")))


def test_deepspeed_without_the_package_names_it(tiny_setting, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    message = _refusal(tiny_setting, monkeypatch, {"ACCELERATE_USE_DEEPSPEED": "true"})
    assert "DeepSpeed was asked for" in message and "deepspeed package is not installed" in message
