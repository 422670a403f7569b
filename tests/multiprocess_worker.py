"""Run under `accelerate launch --num_processes 2` by tests/test_multiprocess.py (not a test module itself).

Trains OKD in the tiny setting through the public ``Distiller``, then lets every rank write what it holds,
so that the test can compare the ranks independently of the flag ``Distiller.save`` computes:

* ``rank{i}_module_initial.safetensors`` / ``rank{i}_module.safetensors``: the rank's online module
  before and after training;
* ``rank{i}.json``: ``module_consistent_across_processes()`` after training, and again after rank 1 alone
  perturbed one weight of its module (the check must then say False on every rank).

Usage: ``multiprocess_worker.py SETTING_JSON OUTPUT_DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # engine_helpers

import torch  # noqa: E402
from engine_helpers import configs  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from okd.training import Distiller  # noqa: E402


def worker_configs(setting: dict) -> dict:
    """The run the worker makes (also used by the test to resume it in one process)."""
    kwargs = configs(setting, "okd", steps=4)
    kwargs["train"].batch_size = 4
    kwargs["train"].checkpoint_every = 2
    return kwargs


def _module_state(distiller: Distiller) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in distiller.teacher.module_state_dict().items()}


def main(setting_json: str, output_dir: str) -> None:
    torch.set_num_threads(1)
    setting = json.loads(Path(setting_json).read_text())
    out = Path(output_dir)
    distiller = Distiller(**worker_configs(setting), output_dir=str(out / "run"))
    rank = distiller.accelerator.process_index
    initial = _module_state(distiller)
    distiller.train()
    distiller.save()
    save_file(initial, str(out / f"rank{rank}_module_initial.safetensors"))
    save_file(_module_state(distiller), str(out / f"rank{rank}_module.safetensors"))
    report = {"num_processes": distiller.accelerator.num_processes}
    report["consistent_after_training"] = distiller.module_consistent_across_processes()
    if rank == 1:
        with torch.no_grad():
            parameter = distiller.teacher.module_parameters()[0]
            parameter.view(-1)[0] += 1e-3
    report["consistent_after_perturbing"] = distiller.module_consistent_across_processes()
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    distiller.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
