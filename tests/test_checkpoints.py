"""Checkpoints: a format that loads without running code, checksums, the fallback to an intact
checkpoint, and runs killed (SIGKILL) while they write one."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import configs
from safetensors.torch import load_file

from okd.training import Distiller, distill
from okd.training.checkpoint import (
    CHECKPOINT_COMPLETE,
    CheckpointError,
    decode,
    encode,
    read_meta,
    read_state,
    resumable_checkpoint,
    verify_checkpoint,
    write_checkpoint,
)
from okd.training.checkpoint.files import _marker_digest

SRC = Path(__file__).resolve().parents[1] / "src" / "okd"


def _okd_configs(setting) -> dict:
    kwargs = configs(setting, "okd", steps=6)
    kwargs["train"].checkpoint_every = 2
    return kwargs


@pytest.fixture(scope="module")
def runs(tiny_setting, tmp_path_factory):
    """An uninterrupted OKD run of 6 steps, and the same run stopped at step 5 with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("checkpoint_runs")
    full = distill(**_okd_configs(tiny_setting), output_dir=str(root / "full"))
    distiller = Distiller(**_okd_configs(tiny_setting), output_dir=str(root / "interrupted"))
    original_step = distiller.training_step

    def crash_at_step_5(batch, update_module):
        if distiller.step == 5:
            raise KeyboardInterrupt
        return original_step(batch, update_module)

    distiller.training_step = crash_at_step_5
    with pytest.raises(KeyboardInterrupt):
        distiller.train()
    checkpoints = sorted(p.name for p in (root / "interrupted" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000002", "step-00000004"]
    return {"full": full.output_dir, "interrupted": root / "interrupted"}


def _copy(runs, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(runs["interrupted"], out)
    return out


def _same_student(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "student" / "model.safetensors")), load_file(str(b / "student" / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) * 2 // 3] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": _truncate, "bit-flipped": _flip_a_bit, "missing": Path.unlink}


class _Payload:
    """Unpickling this creates ``path`` (what a hostile file could do instead: anything)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


# ----------------------------------------------------------------------------------------------
# The format
# ----------------------------------------------------------------------------------------------


def test_a_checkpoint_is_safetensors_and_json_with_checksums_in_its_marker(runs):
    checkpoint = runs["interrupted"] / "checkpoints" / "step-00000004"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert names == sorted([
        CHECKPOINT_COMPLETE, "state.json", "student.safetensors", "optimizer.safetensors", "module.safetensors",
        "module_optimizer.safetensors", "rng.safetensors",
    ])
    marker = json.loads((checkpoint / CHECKPOINT_COMPLETE).read_text())
    assert marker["step"] == 4 and marker["format"] == "okd-checkpoint-2"
    assert sorted(marker["files"]) == [n for n in names if n != CHECKPOINT_COMPLETE]
    assert verify_checkpoint(checkpoint) == marker
    # Stable keys: the optimizer's tensors by parameter id and name, the RNG state as uint8.
    optimizer = load_file(str(checkpoint / "optimizer.safetensors"))
    assert {"state/0/exp_avg", "state/0/exp_avg_sq", "state/0/step"} <= optimizer.keys()
    assert load_file(str(checkpoint / "rng.safetensors"))["torch"].dtype == torch.uint8
    state = json.loads((checkpoint / "state.json").read_text())["state"]
    assert state["scheduler"]["last_epoch"] == 4 and state["source"][0] == {"epoch": 0, "position": 32}


def test_the_codec_round_trips_what_training_states_hold_exactly(tmp_path):
    tied = torch.randn(3, 2)
    generator = torch.Generator().manual_seed(5)
    state = {
        "student": {"embed.weight": tied, "head.weight": tied, "half": torch.randn(2, dtype=torch.bfloat16), "empty": torch.zeros(0)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"betas": (0.9, 0.999), "params": [0], "lr": 1e-3}]},
        "source": [{"generator": generator.get_state(), "buffer": {"items": [[list(range(20)), [1, 2]]]}, "loss": None,
                    "odd": {"__tensor__": "not a marker", 7: "int key"}, "nan": math.nan, "inf": -math.inf, "flag": True}],
        "rng": {"torch": torch.get_rng_state(), "cuda": None},
    }
    tree, files = encode(state)
    assert set(files) == {"student.safetensors", "optimizer.safetensors", "source.safetensors", "rng.safetensors"}
    assert "0/buffer/items/0/0" in files["source.safetensors"]  # a replay buffer's token ids: a tensor
    back = decode(json.loads(json.dumps(tree)), files)
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]  # a tuple stays a tuple
    assert back["source"][0]["buffer"] == state["source"][0]["buffer"]
    assert back["source"][0]["odd"] == state["source"][0]["odd"]
    assert math.isnan(back["source"][0]["nan"]) and back["source"][0]["inf"] == -math.inf
    assert back["source"][0]["loss"] is None and back["source"][0]["flag"] is True
    for key in state["student"]:
        assert torch.equal(back["student"][key], state["student"][key]) and back["student"][key].dtype == state["student"][key].dtype
    assert torch.equal(back["source"][0]["generator"], generator.get_state())

    # Written and read through the files, the same (tied weights are stored as two tensors).
    write_checkpoint(tmp_path / "checkpoints", 1, state, {"step": 1}, keep=2)
    read = read_state(resumable_checkpoint(tmp_path))
    assert torch.equal(read["student"]["head.weight"], tied) and read["optimizer"]["state"][0]["step"].item() == 3.0

    # The CUDA RNG states (one per device, as on a GPU machine): uint8 tensors keyed by device.
    cuda = [torch.randint(0, 256, (16,), dtype=torch.uint8) for _ in range(2)]
    tree, files = encode({"rng": {"torch": torch.get_rng_state(), "cuda": cuda}})
    assert sorted(files["rng.safetensors"]) == ["cuda/0", "cuda/1", "torch"]
    assert all(torch.equal(a, b) for a, b in zip(decode(json.loads(json.dumps(tree)), files)["rng"]["cuda"], cuda))

    with pytest.raises(CheckpointError, match=r"^cannot write the checkpoint: object at source.safetensors:0/bad is not"):
        encode({"source": [{"bad": object()}]})


def test_the_next_write_clears_what_a_killed_write_left_and_pruning_leaves_nothing_half_deleted(tmp_path):
    root = tmp_path / "checkpoints"
    write_checkpoint(root, 1, {"rng": {"torch": torch.get_rng_state()}}, {"step": 1}, keep=1)
    (root / ".step-00000002.tmp-0123abcd").mkdir()  # a write killed before its rename
    (root / ".step-00000000.del-0123abcd").mkdir()  # a pruning killed before its deletion
    write_checkpoint(root, 2, {"rng": {"torch": torch.get_rng_state()}}, {"step": 2}, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]


# ----------------------------------------------------------------------------------------------
# Loading runs no code
# ----------------------------------------------------------------------------------------------


def test_an_old_state_pt_checkpoint_carrying_a_payload_is_refused_in_one_line_without_running_it(tiny_setting, runs, tmp_path):
    out = _copy(runs, tmp_path)
    sentinel = tmp_path / "payload-ran"
    old = out / "checkpoints" / "step-00000006"  # the newest checkpoint, as an older okd wrote it
    old.mkdir()
    torch.save({"student": _Payload(sentinel)}, old / "state.pt")
    meta = {k: v for k, v in read_meta(out / "checkpoints" / "step-00000004").items() if k not in ("format", "files", "sha256")}
    (old / CHECKPOINT_COMPLETE).write_text(json.dumps({**meta, "step": 6}))

    with pytest.raises(CheckpointError) as raised:
        Distiller(**_okd_configs(tiny_setting), output_dir=str(out), resume=True)
    message = str(raised.value)
    assert "\n" not in message and str(old) in message and "old state.pt format" in message, message
    assert not sentinel.exists()  # the payload did not run
    # ... and it is a live one: loading the file the way checkpoints used to be loaded runs it.
    torch.load(old / "state.pt", weights_only=False)
    assert sentinel.exists()


def test_a_forged_checkpoint_with_a_pickle_in_place_of_a_tensor_file_is_refused_without_running_it(tiny_setting, runs, tmp_path):
    """Even with checksums that match (whoever forged the file recomputed them), a file that is not
    safetensors is refused with one line naming it, and nothing in it runs."""
    out = _copy(runs, tmp_path)
    sentinel = tmp_path / "payload-ran"
    checkpoint = out / "checkpoints" / "step-00000004"
    forged = checkpoint / "student.safetensors"
    torch.save({"weight": _Payload(sentinel)}, forged)
    marker = read_meta(checkpoint)
    digest = hashlib.sha256(forged.read_bytes()).hexdigest()
    marker["files"]["student.safetensors"] = {"bytes": forged.stat().st_size, "sha256": digest}
    marker["sha256"] = _marker_digest(marker)
    (checkpoint / CHECKPOINT_COMPLETE).write_text(json.dumps(marker))
    assert verify_checkpoint(checkpoint)  # the checksums do match

    with pytest.raises(CheckpointError) as raised:
        Distiller(**_okd_configs(tiny_setting), output_dir=str(out), resume=True)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"cannot read {forged}"), message
    assert not sentinel.exists()


def test_no_load_path_in_okd_unpickles():
    offending = []
    for path in sorted(SRC.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if any(word in line for word in ("torch.load(", "pickle", "weights_only=False")):
                offending.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert not offending, offending


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints: the fallback, or one line
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "damage"),
    [
        ("student.safetensors", "truncated"),
        ("optimizer.safetensors", "bit-flipped"),
        ("module.safetensors", "missing"),
        ("rng.safetensors", "bit-flipped"),
        ("state.json", "truncated"),
        (CHECKPOINT_COMPLETE, "bit-flipped"),
    ],
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_intact_one_and_resumes_the_same_run(
    tiny_setting, runs, tmp_path, caplog, file, damage
):
    out = _copy(runs, tmp_path)
    DAMAGE[damage](out / "checkpoints" / "step-00000004" / file)
    with caplog.at_level(logging.WARNING, logger="okd.training.checkpoint"):
        distiller = Distiller(**_okd_configs(tiny_setting), output_dir=str(out), resume=True)
    assert distiller.step == 2 and distiller.resumed_from.name == "step-00000002"
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("okd.training.checkpoint")]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert f"step-00000004/{file} is damaged" in warnings[0] and "step-00000002" in warnings[0], warnings[0]
    distiller.train()
    distiller.save()
    assert _same_student(out, runs["full"])  # steps 3..6 redone exactly


def test_no_intact_checkpoint_stops_with_one_line_naming_the_damaged_file(tiny_setting, runs, tmp_path):
    out = _copy(runs, tmp_path)
    _truncate(out / "checkpoints" / "step-00000004" / "optimizer.safetensors")
    (out / "checkpoints" / "step-00000002" / "state.json").unlink()
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError) as raised:
        Distiller(**_okd_configs(tiny_setting), output_dir=str(out), resume=True)
    message = str(raised.value)
    assert "\n" not in message, message
    assert message.startswith(f"cannot resume from {out / 'checkpoints'}: no intact checkpoint")
    assert "step-00000004/optimizer.safetensors is damaged" in message and "1 older damaged" in message
    assert (out / "metrics.jsonl").read_text() == before  # the refused resume touched nothing


def test_on_the_command_line_a_damaged_checkpoint_is_one_warning_line_and_none_intact_one_error_line(tiny_setting, tmp_path):
    """`okd distill --resume`: a skipped incomplete checkpoint and a damaged one are one warning line
    each and the run finishes; with no intact checkpoint left, one error line and exit status 2."""
    okd = Path(sys.executable).with_name("okd")
    out = tmp_path / "run"
    command = [
        str(okd), "distill", "--model.teacher", tiny_setting["teacher"], "--model.tokenizer", tiny_setting["tokenizer"],
        "--model.student_size", "nano", "--method.name", "kd", "--data.train_file", tiny_setting["train"],
        "--data.validation_file", tiny_setting["validation"], "--data.max_length", "48", "--train.batch_size", "4",
        "--train.max_steps", "5",
        "--train.checkpoint_every", "2", "--output-dir", str(out), "--progress", "false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert subprocess.run(command, capture_output=True, text=True, timeout=300, env=env).returncode == 0
    _flip_a_bit(out / "checkpoints" / "step-00000004" / "student.safetensors")
    incomplete = out / "checkpoints" / "step-00000005"  # no completion marker
    incomplete.mkdir()
    (incomplete / "state.json").write_text("{")
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    lines = resumed.stderr.splitlines()
    assert f"okd: warning: ignoring incomplete checkpoint {incomplete}" in lines, resumed.stderr[-2000:]
    assert not any("UserWarning" in line or "warnings.warn" in line for line in lines), resumed.stderr[-2000:]
    damaged = [line for line in lines if "damaged" in line]
    assert len(damaged) == 1 and "step-00000004/student.safetensors is damaged" in damaged[0], resumed.stderr[-2000:]
    assert "resuming from the intact" in damaged[0] and "step-00000002" in damaged[0]
    shutil.rmtree(incomplete)

    for checkpoint in (out / "checkpoints").iterdir():
        _truncate(checkpoint / "rng.safetensors")
    refused = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode == 2
    err = refused.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("okd: error: cannot resume from") and "rng.safetensors is damaged" in err


# ----------------------------------------------------------------------------------------------
# Killed while writing a checkpoint
# ----------------------------------------------------------------------------------------------


def test_runs_killed_at_random_moments_of_checkpoint_writes_resume_to_the_uninterrupted_student(tiny_setting, tmp_path):
    attempts = 20
    worker = Path(__file__).with_name("kill_worker.py")
    command = [sys.executable, str(worker), json.dumps(tiny_setting), str(tmp_path), str(attempts), "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["reference_exit"] == 0, result.stderr[-3000:]
    assert len(report["attempts"]) == attempts
    for attempt in report["attempts"]:
        assert attempt["resumed_exit"] == 0, (attempt, result.stderr[-3000:])
        assert _same_student(Path(attempt["student"]).parents[1], tmp_path / "reference"), attempt
    # The kills did land inside checkpoint writes (a hidden directory left behind), not only between them.
    mid_write = sum(bool(a["leftovers"]) for a in report["attempts"])
    assert mid_write >= attempts // 2, report["attempts"]
