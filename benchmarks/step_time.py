"""Median training-step time of every method preset, for two model sizes, in one run.

Usage:
    python benchmarks/step_time.py                     # full run (a few minutes on 2 CPU cores)
    python benchmarks/step_time.py --quick             # smoke test
    python benchmarks/step_time.py --device cuda --sizes medium:small,large:medium

Each step is timed end to end (student and teacher forward, the divergence, one backward, the
optimizer steps, OKD's module step) on batches of the built-in data. Teachers are randomly
initialised: their weights do not change the cost. Writes ``benchmarks/results/step_time.json`` and
prints a markdown table with the ratio okd / kd.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from okd.config import METHOD_PRESETS, DataConfig, MethodConfig, ModelConfig, OnlineModuleConfig, TrainConfig  # noqa: E402
from _cache import builtin_data_and_tokenizer  # noqa: E402

from okd.evaluation import write_json_atomic  # noqa: E402
from okd.models import build_model, count_parameters, save_pretrained_atomic  # noqa: E402
from okd.training import Distiller  # noqa: E402

ROOT = Path(__file__).resolve().parent


def time_presets(presets: list[str], setting: dict, args, online: OnlineModuleConfig, workdir: Path) -> dict:
    """Time every preset on the same batches, round robin: step i of every preset runs before step
    i + 1 of any, so drift in the machine's speed (other processes, thermal, allocator state)
    affects all presets alike instead of whichever preset happened to run during it."""
    distillers, batches = {}, {}
    for preset in presets:
        distiller = Distiller(
            model=ModelConfig(teacher=setting["teacher"], tokenizer=setting["tokenizer"], student_size=setting["student_size"]),
            method=MethodConfig(name=preset),
            online=online,
            data=DataConfig(train_file=setting["train"], validation_file=None, max_length=args.max_length),
            train=TrainConfig(max_steps=args.warmup + args.steps, batch_size=args.batch_size, log_every=10**9),
            output_dir=str(workdir / f"{setting['name']}-{preset}"),
            overwrite=True,
            progress=False,
        )
        device = distiller.accelerator.device
        # The same batches for every preset: the source is seeded identically.
        batches[preset] = [
            {k: v.to(device) for k, v in distiller.source.next_batch().items()} for _ in range(args.warmup + args.steps)
        ]
        distillers[preset] = distiller
    times: dict[str, list[float]] = {preset: [] for preset in presets}
    for step in range(1, args.warmup + args.steps + 1):
        for preset in presets:
            distiller = distillers[preset]
            update = distiller.module_optimizer is not None and step % online.update_every == 0
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            distiller.step = step
            distiller.training_step(batches[preset][step - 1], update)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[preset].append(time.perf_counter() - start)
    results = {}
    for preset in presets:
        measured = times[preset][args.warmup :]
        tokens = [int(b["attention_mask"].sum()) for b in batches[preset][args.warmup :]]
        results[preset] = {
            "median_seconds": statistics.median(measured),
            "mean_seconds": statistics.mean(measured),
            "min_seconds": min(measured),
            "tokens_per_second": sum(tokens) / sum(measured),
        }
        print(f"{setting['name']} {preset}: {results[preset]['median_seconds'] * 1000:.1f} ms/step", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="medium:small,large:medium", help="teacher:student size pairs")
    parser.add_argument("--presets", default=",".join(METHOD_PRESETS), help="comma-separated presets")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per preset")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--online-kind", default="adapter", choices=["adapter", "lora"])
    parser.add_argument("--update-every", type=int, default=1, help="OKD's online.update_every")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: what Accelerate picks)")
    parser.add_argument("--out", default=str(ROOT / "results" / "step_time.json"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.steps, args.warmup, args.vocab_size = "tiny:nano", 3, 1, 1024
        args.presets = "sft,kd,okd"
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"

    presets = args.presets.split(",")
    online = OnlineModuleConfig(kind=args.online_kind, update_every=args.update_every)
    paths, tokenizer_dir, tokenizer = builtin_data_and_tokenizer(args.vocab_size)

    results = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "sizes": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for pair in args.sizes.split(","):
            teacher_size, student_size = pair.split(":")
            teacher = build_model("llama", teacher_size, vocab_size=len(tokenizer), max_positions=args.max_length)
            teacher_dir = workdir / f"teacher-{teacher_size}"
            save_pretrained_atomic(teacher, tokenizer, teacher_dir)
            student_params = count_parameters(build_model("llama", student_size, vocab_size=len(tokenizer)))
            setting = {
                "name": pair.replace(":", "-"),
                "teacher": str(teacher_dir),
                "tokenizer": str(tokenizer_dir),
                "student_size": student_size,
                "train": str(paths["train"]),
            }
            entry = {
                "teacher_size": teacher_size,
                "student_size": student_size,
                "teacher_parameters": count_parameters(teacher),
                "student_parameters": student_params,
                "presets": {},
            }
            entry["presets"] = time_presets(presets, setting, args, online, workdir)
            if "okd" in entry["presets"] and "kd" in entry["presets"]:
                entry["okd_over_kd"] = entry["presets"]["okd"]["median_seconds"] / entry["presets"]["kd"]["median_seconds"]
                # With update_every > 1 only some steps update the module: the mean shows the average cost.
                entry["okd_over_kd_mean"] = entry["presets"]["okd"]["mean_seconds"] / entry["presets"]["kd"]["mean_seconds"]
            results["sizes"].append(entry)

    write_json_atomic(args.out, results)
    lines = [
        f"Command: `python benchmarks/{results['command']}`; machine: {results['machine']['platform']}, "
        f"{results['machine']['cpu_count']} CPUs, torch {results['machine']['torch']}"
        + (f", {results['machine']['cuda']}" if results["machine"]["cuda"] else ""),
        "",
        "| teacher -> student | " + " | ".join(presets) + " | okd / kd (median) | okd / kd (mean) |",
        "|---|" + "---:|" * (len(presets) + 2),
    ]
    for entry in results["sizes"]:
        cells = [f"{entry['presets'][p]['median_seconds'] * 1000:.0f} ms" for p in presets]
        ratio = f"{entry['okd_over_kd']:.3f} | {entry['okd_over_kd_mean']:.3f}" if "okd_over_kd" in entry else "- | -"
        lines.append(
            f"| {entry['teacher_size']} ({entry['teacher_parameters'] / 1e6:.1f}M) -> {entry['student_size']} "
            f"({entry['student_parameters'] / 1e6:.1f}M) | " + " | ".join(cells) + f" | {ratio} |"
        )
    table = "\n".join(lines)
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
