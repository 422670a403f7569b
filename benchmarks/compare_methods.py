"""Method comparison on the built-in task: same teacher, student size, data, step budget and seeds.

Usage:
    python benchmarks/compare_methods.py --quick                       # smoke test (about 1 minute)
    python benchmarks/compare_methods.py --student-sizes nano,tiny --seeds 0,1,2 --out docs/results/compare

Each (student size, method, seed) run trains in segments of ``--eval-every`` steps; after each
segment the student is scored (ROUGE-L, sampling with the run's seed) on the first ``--eval-examples``
test examples, so every run gives a ROUGE-L-vs-training-seconds curve (evaluation time excluded).
Writes ``results.json``, ``results.md`` (method, final ROUGE-L mean +- std over seeds, training seconds,
seconds to reach 95% of the best final ROUGE-L) and two figures per student size into ``--out``.
The teacher is the demo's (trained and cached by ``okd demo`` in ``--demo-dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from okd.config import DataConfig, EvalConfig, MethodConfig, ModelConfig, SamplingConfig, TrainConfig  # noqa: E402
from okd.data import InstructionDataset, read_jsonl  # noqa: E402
from okd.evaluation import GenerationConfig, evaluate_model, write_json_atomic  # noqa: E402
from okd.training import Distiller  # noqa: E402

DEFAULT_METHODS = "sft,kd,rkl,okd,seqkd,imitkd,gkd,distillm"


def parse_method(spec: str) -> tuple[str, dict]:
    """``"distillm:init_threshold=0.5"`` -> ``("distillm", {"init_threshold": 0.5})``: a preset and
    overrides of its ``sampling`` settings (numbers parsed; the whole spec is the method's label)."""
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        try:
            overrides[key] = float(value) if "." in value or "e" in value.lower() else int(value)
        except ValueError:
            overrides[key] = value
    return name, overrides


def run_one(method: str, size: str, seed: int, args, demo: Path, test_set, workdir: Path) -> dict:
    steps = args.steps
    preset, sampling_overrides = parse_method(method)
    setup_started = time.perf_counter()
    distiller = Distiller(
        model=ModelConfig(teacher=str(demo / "teacher"), tokenizer=str(demo / "tokenizer"), student_size=size),
        method=MethodConfig(name=preset),
        data=DataConfig(
            train_file=str(demo / "data" / "train.jsonl"),
            validation_file=str(demo / "data" / "validation.jsonl"),
            max_length=128,
            max_validation_examples=128,
        ),
        train=TrainConfig(
            max_steps=steps, batch_size=16, learning_rate=2e-3, warmup_steps=max(steps // 20, 1),
            lr_scheduler="cosine", seed=seed, log_every=max(steps // 30, 1),
        ),
        eval=EvalConfig(every=args.eval_every),
        sampling=SamplingConfig(
            max_new_tokens=args.max_new_tokens,
            # One SeqKD cache file for all runs; SeqKD samples with the run's seed, so each seed
            # regenerates it (that cost is the run's setup seconds).
            teacher_generations_file=str(workdir / "teacher_generations.jsonl"),
            **sampling_overrides,
        ),
        output_dir=str(workdir / f"{size}-{method.replace(':', '-').replace('=', '').replace(';', '-')}-{seed}"),
        overwrite=True,
        progress=False,
    )
    # Setup includes SeqKD's teacher generation (when its cache is not there yet): a real cost of
    # that method that the training seconds leave out.
    setup_seconds = time.perf_counter() - setup_started
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens)
    curve = []
    for target in range(args.eval_every, steps + args.eval_every, args.eval_every):
        distiller.train_config.max_steps = min(target, steps)
        distiller.train()
        student = distiller.accelerator.unwrap_model(distiller.student)
        scored = evaluate_model(student, distiller.tokenizer, test_set, [seed], generation, progress=False)
        curve.append({"step": distiller.step, "train_seconds": distiller.train_seconds, "rouge_l": scored.rouge_l_mean})
    # Keep the student (and OKD's module) for `okd analyze`; not timed.
    distiller.save()
    return {"method": method, "size": size, "seed": seed, "curve": curve, "final_rouge_l": curve[-1]["rouge_l"],
            "train_seconds": distiller.train_seconds, "setup_seconds": setup_seconds}


def summarise(runs: list[dict], methods: list[str]) -> dict:
    """Per method: final ROUGE-L mean/std over seeds, training seconds, seconds to 95% of the best."""
    table = {}
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        finals = [r["final_rouge_l"] for r in mine]
        table[method] = {
            "rouge_l_mean": statistics.mean(finals),
            "rouge_l_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "train_seconds": statistics.mean(r["train_seconds"] for r in mine),
            # Setup before the first step; for SeqKD it is generating the teacher's responses for every
            # training prompt (sampled with the run's seed, so each seed generates its own set).
            "setup_seconds": statistics.mean(r["setup_seconds"] for r in mine),
        }
    best = max(v["rouge_l_mean"] for v in table.values())
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        # Mean curve over seeds (all runs of a method share the evaluation steps).
        points = list(zip(*[r["curve"] for r in mine]))
        mean_curve = [
            (statistics.mean(p["train_seconds"] for p in pts), statistics.mean(p["rouge_l"] for p in pts)) for pts in points
        ]
        reached = [t for t, rouge in mean_curve if rouge >= 0.95 * best]
        table[method]["seconds_to_95pct_of_best"] = reached[0] if reached else None
        table[method]["mean_curve"] = mean_curve
    return table


def plot(table: dict, methods: list[str], size: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
        xs, ys = zip(*table[method]["mean_curve"])
        ax.plot(xs, ys, marker="o", markersize=3, label=method)
    ax.set_xlabel("training wall-clock seconds (evaluation excluded)")
    ax.set_ylabel("ROUGE-L (mean over seeds)")
    ax.set_title(f"ROUGE-L vs time, student {size}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"rouge_vs_time_{size}.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(methods, [table[m]["rouge_l_mean"] for m in methods], yerr=[table[m]["rouge_l_std"] for m in methods], capsize=4)
    ax.set_ylabel("final ROUGE-L (mean +- std over seeds)")
    ax.set_title(f"Final ROUGE-L, student {size}")
    fig.tight_layout()
    fig.savefig(out / f"final_rouge_{size}.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--methods", default=DEFAULT_METHODS,
        help="comma-separated presets; 'preset:field=value;field=value' overrides sampling settings "
        "(e.g. distillm:init_threshold=0.5)",
    )
    parser.add_argument("--student-sizes", default="nano,tiny")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-examples", type=int, default=150)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--demo-dir", default="runs/demo-toy", help="where `okd demo` left data, tokenizer and teacher")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="2 methods, 1 size, 2 seeds, 20 steps")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table and figures from <out>/results.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.methods, args.student_sizes, args.seeds = "sft,kd", "nano", "0,1"
        args.steps, args.eval_every, args.eval_examples, args.max_new_tokens = 20, 10, 16, 16

    if args.report_only:
        out = Path(args.out)
        results = json.loads((out / "results.json").read_text())
        report(results, results["settings"]["methods"].split(","), out)
        return
    demo = Path(args.demo_dir)
    if not (demo / "teacher" / "config.json").exists():
        sys.exit(f"no teacher in {demo}: run `okd demo` (or `okd demo --quick --output-dir {demo}`) first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]

    from okd.models import load_tokenizer

    tokenizer = load_tokenizer(str(demo / "tokenizer"))
    test_set = InstructionDataset(read_jsonl(demo / "data" / "test.jsonl")[: args.eval_examples], tokenizer, 128)
    results = {
        "command": " ".join(["python", "benchmarks/compare_methods.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "settings": vars(args),
        "sizes": {},
    }
    started = time.perf_counter()
    for size in args.student_sizes.split(","):
        runs = []
        for method in methods:
            for seed in seeds:
                runs.append(run_one(method, size, seed, args, demo, test_set, out / "runs"))
                print(f"{size} {method} seed {seed}: ROUGE-L {runs[-1]['final_rouge_l']:.2f} in {runs[-1]['train_seconds']:.1f} s", flush=True)
        results["sizes"][size] = {"runs": runs}
    results["total_seconds"] = time.perf_counter() - started
    report(results, methods, out)


def report(results: dict, methods: list[str], out: Path) -> None:
    """Summaries, ``results.json``, ``results.md`` and the figures, from the runs in ``results``."""
    machine = results["machine"]
    lines = [
        f"Command: `{results['command']}`; {machine['cpu_count']} CPUs, torch {machine['torch']} "
        f"({machine.get('torch_threads', '?')} threads); {results['total_seconds'] / 60:.0f} min in all",
        "",
    ]
    for size, entry in results["sizes"].items():
        table = summarise(entry["runs"], methods)
        entry["summary"] = table
        plot(table, methods, size, out)
        lines += [
            f"### Student `{size}`",
            "",
            "| method | final ROUGE-L | training seconds | setup seconds (SeqKD: teacher generation) | training + setup | seconds to 95% of best |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for method in methods:
            row = table[method]
            reach = f"{row['seconds_to_95pct_of_best']:.1f}" if row["seconds_to_95pct_of_best"] is not None else "not reached"
            lines.append(
                f"| {method} | {row['rouge_l_mean']:.2f} +- {row['rouge_l_std']:.2f} | {row['train_seconds']:.1f} "
                f"| {row['setup_seconds']:.1f} | {row['train_seconds'] + row['setup_seconds']:.1f} | {reach} |"
            )
        lines.append("")
        sgo = [m for m in methods if parse_method(m)[0] in ("seqkd", "imitkd", "gkd", "distillm")]
        if "okd" in methods and sgo:
            # SeqKD's cost is mostly its teacher generation, so compare training + setup for all.
            total = {m: table[m]["train_seconds"] + table[m]["setup_seconds"] for m in methods}
            ratios = {m: total[m] / total["okd"] for m in sgo}
            entry["generated_output_methods_over_okd_seconds"] = ratios
            lines += ["Training + setup seconds of each generated-output method / OKD's: "
                      + ", ".join(f"{m} {r:.2f}x" for m, r in ratios.items()), ""]
    write_json_atomic(out / "results.json", results)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
