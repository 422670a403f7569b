"""Run under `accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2` by
tests/test_sharded.py (not a test module itself).

Trains the runs of ``test_sharded.SHARDED_RUNS`` (KD, OKD, OKD with 2 micro-batches of 2, OKD with
its heads on the loss positions, and on every position) in the tiny setting through the public ``Distiller`` with FSDP2 (2 CPU
processes, gloo) and writes, per rank, what the rank holds: ``OUTPUT_DIR/{run}_rank{i}.json`` with
the numbers of teacher and student parameter elements stored on this rank (``local``) and in the
whole model (``total``), before training and after it, and whether OKD's online adapter is a plain
(replicated) tensor. The runs themselves go to ``OUTPUT_DIR/{run}/``. OKD's run checkpoints at
step 2; a copy of it, ``OUTPUT_DIR/okd_resumed/``, is then resumed from that checkpoint (step 3 again).

Usage: ``fsdp_worker.py SETTING_JSON OUTPUT_DIR``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_sharded

import torch  # noqa: E402
from test_sharded import SHARDED_RUNS, sharded_configs  # noqa: E402

from okd.training import Distiller  # noqa: E402


def held(parameters) -> dict:
    """Elements of ``parameters`` stored on this rank (a DTensor's local shard) and in total."""
    parameters = list(parameters)
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in parameters)
    return {"local": local, "total": sum(p.numel() for p in parameters)}


def main(setting_json: str, output_dir: str) -> None:
    torch.set_num_threads(1)
    setting = json.loads(Path(setting_json).read_text())
    out = Path(output_dir)
    for run, settings in SHARDED_RUNS.items():
        distiller = Distiller(**sharded_configs(setting, *settings), output_dir=str(out / run))
        assert distiller.heads == settings[3], (run, distiller.heads)
        report = {
            "sharding": distiller.sharding,
            "num_processes": distiller.accelerator.num_processes,
            "teacher": held(distiller.teacher.model.parameters()),
            "student": held(distiller.student.parameters()),
            "module_is_plain": all(not hasattr(p, "to_local") for p in distiller.teacher.module_parameters()),
        }
        distiller.train()
        distiller.save()
        report["teacher_after"] = held(distiller.teacher.model.parameters())
        rank = distiller.accelerator.process_index
        (out / f"{run}_rank{rank}.json").write_text(json.dumps(report))
        distiller.accelerator.wait_for_everyone()
    if distiller.accelerator.is_main_process:
        shutil.copytree(out / "okd", out / "okd_resumed")
        shutil.rmtree(out / "okd_resumed" / "student")
    distiller.accelerator.wait_for_everyone()
    resumed = Distiller(**sharded_configs(setting, "okd", batch_size=4), output_dir=str(out / "okd_resumed"), resume=True)
    assert resumed.step == 2, resumed.step
    resumed.train()
    resumed.save()


if __name__ == "__main__":
    main(*sys.argv[1:])
