"""`okd analyze` on every student that `benchmarks/compare_methods.py` trained, averaged over seeds.

Usage:
    python benchmarks/analyze_comparison.py --size nano --out docs/results/analysis_nano
    python benchmarks/analyze_comparison.py --size tiny --out docs/results/analysis_tiny
    python benchmarks/analyze_comparison.py --size 10l --demo-dir runs/demo --compare-dir docs/results/real/compare \\
        --methods sft,kd,rkl,okd --seeds 0,1 --max-new-tokens 20 --out docs/results/real/analysis_10l

Reads ``<compare-dir>/runs/<size>-<method>-<seed>/student`` (the comparison keeps them) and the demo's
teacher and test split. Runs ``okd.analysis.run_analysis`` once over all of them (same examples, same
sampling seed), then writes ``<out>.json`` (the full per-student result plus the per-method mean and
sample std over seeds), ``<out>.md`` (one row per method) and the plots into ``<out>/``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import AutoModelForCausalLM  # noqa: E402

from okd.analysis import make_plots, run_analysis  # noqa: E402
from okd.data import InstructionDataset, ensure_pad_token, read_jsonl  # noqa: E402
from okd.evaluation import GenerationConfig, evaluate_model, write_json_atomic  # noqa: E402
from okd.models import load_tokenizer  # noqa: E402

# (column title, where the value is in a student's entry)
COLUMNS = [
    ("top-1 agree", lambda e: e["metrics"]["top1_agreement"]),
    ("top-5 overlap", lambda e: e["metrics"]["top5_overlap"]),
    ("top-10 cover", lambda e: e["metrics"]["top10_coverage"]),
    ("H_student", lambda e: e["metrics"]["student_entropy"]),
    ("H_s - H_t", lambda e: e["metrics"]["entropy_gap"]),
    ("mass outside teacher top-10", lambda e: e["metrics"]["student_mass_outside_teacher_top10"]),
    ("FKL", lambda e: e["metrics"]["forward_kl"]),
    ("RKL", lambda e: e["metrics"]["reverse_kl"]),
    ("TVD", lambda e: e["metrics"]["tvd"]),
    ("rho@50", lambda e: e["metrics"]["spearman_top50"]),
    ("NLL", lambda e: e["metrics"]["student_nll"]),
    ("ECE", lambda e: e["metrics"]["student_ece"]),
    ("ExAccErr@{l} %", lambda e: e["exposure_bias"]["ex_acc_err_percent"][-1]),  # {l}: the last step, --max-new-tokens
    ("free-run ROUGE-L", lambda e: e["exposure_bias"]["rouge_l"]),
    ("greedy ROUGE-L", lambda e: e["greedy_rouge_l"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", required=True, help="student of the comparison: a toy size (nano, tiny, ...) or a real-tier depth (10l, 4l)")
    parser.add_argument("--methods", default="sft,kd,rkl,okd,seqkd,imitkd,gkd,distillm")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--compare-dir", default="runs/compare")
    parser.add_argument("--demo-dir", default="runs/demo-toy")
    parser.add_argument("--max-examples", type=int, default=300)
    parser.add_argument("--exposure-examples", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--greedy-examples", type=int, default=490, help="test examples for the greedy ROUGE-L column")
    parser.add_argument("--out", required=True, help="output stem: writes <out>.json, <out>.md and <out>/*.png")
    args = parser.parse_args()

    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    columns = [(title.format(l=args.max_new_tokens), get) for title, get in COLUMNS]
    students, names = [], []
    for method in methods:
        for seed in seeds:
            path = Path(args.compare_dir) / "runs" / f"{args.size}-{method}-{seed}"
            if not (path / "student" / "config.json").exists():
                sys.exit(f"no student in {path}: run benchmarks/compare_methods.py first")
            students.append(str(path))
            names.append(f"{method}-{seed}")
    started = time.perf_counter()
    result = run_analysis(
        str(Path(args.demo_dir) / "teacher"), students, str(Path(args.demo_dir) / "data" / "test.jsonl"),
        names=names, max_examples=args.max_examples, batch_size=32, exposure_examples=args.exposure_examples,
        max_new_tokens=args.max_new_tokens, seed=0, progress=True,
    )
    # The comparison samples at temperature 1, which favours low-entropy students; greedy decoding
    # separates "ranks the right token first" from "is sharp enough to sample well".
    # The toy demo keeps its tokenizer beside the teacher, the real one inside it (with the chat
    # template, which read_jsonl then applies to the prompts, as training did).
    demo = Path(args.demo_dir)
    tokenizer = load_tokenizer(str(demo / "tokenizer" if (demo / "tokenizer").exists() else demo / "teacher"))
    ensure_pad_token(tokenizer)
    test = InstructionDataset(read_jsonl(demo / "data" / "test.jsonl", tokenizer=tokenizer)[: args.greedy_examples], tokenizer, 128)
    greedy = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False)
    for name, path in zip(names, students):
        model = AutoModelForCausalLM.from_pretrained(str(Path(path) / "student"))
        result["students"][name]["greedy_rouge_l"] = evaluate_model(model, tokenizer, test, [0], greedy, progress=False).rouge_l_mean
    by_method = {}
    for method in methods:
        entries = [result["students"][f"{method}-{seed}"] for seed in seeds]
        by_method[method] = {}
        for title, get in columns:
            values = [get(e) for e in entries]
            by_method[method][title] = {
                "mean": statistics.mean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            }
    out = Path(args.out)
    result["per_method"] = by_method
    result["command"] = " ".join(["python", "benchmarks/analyze_comparison.py", *sys.argv[1:]])
    result["seconds"] = time.perf_counter() - started
    write_json_atomic(out.with_suffix(".json"), result)
    # Plots of the first seed's students only (one bar / histogram per method stays readable).
    make_plots(dict(result, students={m: result["students"][f"{m}-{seeds[0]}"] for m in methods}), out)

    teacher = result["teacher"]
    lines = [
        f"Command: `{result['command']}` ({result['seconds']:.0f} s). Teacher-forced on the first "
        f"{args.max_examples} test examples ({teacher['tokens']} response tokens); greedy ROUGE-L on the first "
        f"{args.greedy_examples}; exposure bias on "
        f"{args.exposure_examples} prompts, {args.max_new_tokens} sampled tokens. Mean +- std over seeds {args.seeds}; the plots in "
        f"`{out.name}/` show seed {seeds[0]}.",
        "",
        "| method | " + " | ".join(title for title, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for method in methods:
        cells = [f"{v['mean']:.3f} +- {v['std']:.3f}" if abs(v["mean"]) < 10 else f"{v['mean']:.1f} +- {v['std']:.1f}"
                 for v in by_method[method].values()]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    tm = teacher["metrics"]
    lines += ["", f"Teacher: entropy {tm.get('entropy', float('nan')):.3f}, NLL {tm['nll']:.3f}, accuracy "
              f"{tm['accuracy']:.3f}, ECE {tm['ece']:.3f}, free-run ROUGE-L {teacher['samples']['rouge_l']:.2f}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
