"""Run under `accelerate launch --num_processes 2` by tests/test_scale.py (not a test module itself).

Trains OKD in the tiny setting with 2 micro-batches of 2 examples per process and writes, from rank 0,
the gradients each optimizer step applied (the student's after DDP's all-reduce, and the online
module's after the explicit average) to ``OUTPUT_DIR/gradients.pt``.

Usage: ``accumulation_worker.py SETTING_JSON OUTPUT_DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # engine_helpers, test_scale

import torch  # noqa: E402
from test_scale import accumulation_configs, record_gradients  # noqa: E402

from okd.training import Distiller  # noqa: E402


def main(setting_json: str, output_dir: str) -> None:
    torch.set_num_threads(1)
    setting = json.loads(Path(setting_json).read_text())
    out = Path(output_dir)
    distiller = Distiller(**accumulation_configs(setting, batch_size=2, accumulation=2), output_dir=str(out / "run"))
    gradients = record_gradients(distiller)
    distiller.train()
    if distiller.accelerator.is_main_process:
        torch.save(gradients, out / "gradients.pt")
    distiller.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
