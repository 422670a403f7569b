"""Method comparison on the built-in task: same teacher, student, data, step budget and seeds.

Usage:
    python benchmarks/compare_methods.py --quick                       # smoke test (about 1 minute)
    python benchmarks/compare_methods.py --student-sizes nano,tiny --seeds 0,1,2 --out docs/results/compare
    python benchmarks/compare_methods.py --tier real --students 10,4 --seeds 0,1 --out docs/results/real/compare

Two tiers. ``toy`` (default): the toy demo's from-scratch teacher (``okd demo --tier toy`` in
``--demo-dir``, default ``runs/demo-toy``) and from-scratch students of the named ``--student-sizes``.
``real``: the real demo's teacher (SmolLM2-135M-Instruct fine-tuned on the task by ``okd demo``, in
``--demo-dir``, default ``runs/demo``) and pretrained students made from it by keeping the given numbers
of its layers (``--students 10,4``; ``okd.pretrained.shrink``; ``10ends``: its first 5 and last 5 layers
instead of 10 evenly spaced ones), prompts in its chat template.

Each (student, method, seed) run trains in segments of ``--eval-every`` steps; after each segment the
student is scored (ROUGE-L, sampling with the run's seed) on the first ``--eval-examples`` test
examples, so every run gives a ROUGE-L-vs-training-seconds curve (evaluation time excluded). After the
last segment the student is also scored on the first ``--eval-examples`` *validation* examples: the
OKD design variants (``benchmarks/okd_design.py``'s names, e.g. ``okd_jsd``) are selected on that.
Writes ``results.json`` after every run (a rerun with the same ``--out`` skips the runs already there,
so an interrupted grid resumes and seeds can be added later), ``results.md`` (method, final ROUGE-L mean
+- std over seeds, validation ROUGE-L, training seconds, seconds to reach 95% of the best final ROUGE-L)
and two figures per student into ``--out``.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # okd_design's variants, also when imported by the tests

from okd.config import DataConfig, EvalConfig, MethodConfig, ModelConfig, OnlineModuleConfig, SamplingConfig, TrainConfig  # noqa: E402
from okd.data import InstructionDataset, read_jsonl  # noqa: E402
from okd.evaluation import GenerationConfig, evaluate_model, write_json_atomic  # noqa: E402
from okd.training import Distiller  # noqa: E402

DEFAULT_METHODS = "sft,kd,rkl,okd,seqkd,imitkd,gkd,distillm,minillm"


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


# What differs between the tiers: where the teacher is, what a student is, and the training settings
# (the real tier's are the real demo's: batch 8, 96 tokens, a higher learning rate for the healing of
# a depth-pruned student; the toy tier's are the toy demo's).
TIERS = {
    "toy": dict(demo_dir="runs/demo-toy", students="nano,tiny", max_length=128, batch_size=16, learning_rate=2e-3, warmup_fraction=0.05,
                validation_examples=128),
    # The validation loss (DistiLLM's adaptive source reads it; its time counts as training time, as
    # for every method) on 32 examples: on this tier it costs teacher passes.
    "real": dict(demo_dir="runs/demo", students="10,4", max_length=96, batch_size=8, learning_rate=5e-4, warmup_fraction=0.1,
                 validation_examples=32),
}


def method_fields(spec: str, steps: int) -> tuple[dict, dict, dict]:
    """``(method fields, online-module fields, sampling overrides)`` of a method spec: a preset with
    optional sampling overrides (``distillm:init_threshold=0.5``) or an OKD design variant of
    ``benchmarks/okd_design.py`` (``okd_jsd``)."""
    from okd.config import METHOD_PRESETS as PRESETS

    name, overrides = parse_method(spec)
    if name in PRESETS:
        return {"name": name}, {}, overrides
    from okd_design import VARIANTS, variant_configs

    if name in VARIANTS:
        method, online = variant_configs(name, steps)
        return method, online, overrides
    sys.exit(f"unknown method {name!r}: not a preset ({', '.join(PRESETS)}) nor an OKD design variant ({', '.join(VARIANTS)})")


def run_label(size: str, method: str, seed: int) -> str:
    return f"{size}-{method.replace(':', '-').replace('=', '').replace(';', '-')}-{seed}"


def real_students(demo: Path, layers: list[str], out: Path) -> dict[str, str]:
    """``{"10l": directory, ...}``: pretrained students shrunk from the real demo's teacher (made once).

    ``N`` keeps N evenly spaced layers, the first and the last among them (``okd model shrink --layers N``,
    student ``Nl``); ``Nends`` keeps the first ceil(N/2) and the last floor(N/2) layers (student
    ``Nends``), the first-and-last-heavy choice of depth-pruning work that keeps the layers nearest the
    embeddings and the head."""
    from transformers import AutoConfig

    from okd.pretrained import shrink

    depth = AutoConfig.from_pretrained(str(demo / "teacher"), local_files_only=True).get_text_config().num_hidden_layers
    students = {}
    for spec in layers:
        if spec.endswith("ends"):
            n = int(spec[: -len("ends")])
            if not 2 <= n <= depth:
                sys.exit(f"--students {spec}: needs 2 to {depth} layers")
            keep = list(range((n + 1) // 2)) + list(range(depth - n // 2, depth))
            students[spec] = str(shrink(str(demo / "teacher"), str(out / "students" / f"student-{spec}"), keep=",".join(map(str, keep))))
        else:
            students[f"{spec}l"] = str(shrink(str(demo / "teacher"), str(out / "students" / f"student-{spec}l"), layers=int(spec)))
    return students


def run_one(method: str, size: str, seed: int, args, demo: Path, eval_sets, workdir: Path, students: dict | None = None) -> dict:
    steps, tier = args.steps, TIERS[args.tier]
    method_kw, online_kw, sampling_overrides = method_fields(method, steps)
    test_set, validation_set = eval_sets
    setup_started = time.perf_counter()
    if args.tier == "real":
        model = ModelConfig(teacher=str(demo / "teacher"), student=students[size])
    else:
        model = ModelConfig(teacher=str(demo / "teacher"), tokenizer=str(demo / "tokenizer"), student_size=size)
    distiller = Distiller(
        model=model,
        method=MethodConfig(**method_kw),
        online=OnlineModuleConfig(**online_kw),
        data=DataConfig(
            train_file=str(demo / "data" / "train.jsonl"),
            validation_file=str(demo / "data" / "validation.jsonl"),
            max_length=tier["max_length"],
            max_validation_examples=tier["validation_examples"],
            # A run sees each example at most once: SeqKD generates for exactly the examples it trains on.
            max_train_examples=args.max_train_examples,
        ),
        train=TrainConfig(
            max_steps=steps, batch_size=tier["batch_size"], learning_rate=tier["learning_rate"],
            warmup_steps=max(int(steps * tier["warmup_fraction"]), 1),
            lr_scheduler="cosine", seed=seed, log_every=max(steps // 30, 1),
        ),
        eval=EvalConfig(every=args.eval_every),
        sampling=SamplingConfig(
            max_new_tokens=args.max_new_tokens,
            # One SeqKD cache file for all runs; SeqKD samples with the run's seed, so each seed
            # regenerates it (that cost is the run's setup seconds).
            teacher_generations_file=str(workdir / f"teacher_generations-{args.tier}.jsonl"),
            **sampling_overrides,
        ),
        output_dir=str(workdir / run_label(size, method, seed)),
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
        if distiller.interrupted:  # SIGTERM / SIGINT: the loop saved a checkpoint; stop the grid, not just this segment
            sys.exit(f"stopped by a signal during {run_label(size, method, seed)}; rerun the same command to resume the grid")
        student = distiller.accelerator.unwrap_model(distiller.student)
        scored = evaluate_model(student, distiller.tokenizer, test_set, [seed], generation, progress=False)
        curve.append({"step": distiller.step, "train_seconds": distiller.train_seconds, "rouge_l": scored.rouge_l_mean})
    validation = evaluate_model(student, distiller.tokenizer, validation_set, [seed], generation, progress=False)
    # Keep the student (and OKD's module) for `okd analyze`; not timed.
    distiller.save()
    return {"method": method, "size": size, "seed": seed, "curve": curve, "final_rouge_l": curve[-1]["rouge_l"],
            "validation_rouge_l": validation.rouge_l_mean,
            "validation": {k: v for k, v in distiller.final_metrics.items() if k.startswith("validation_")},
            "train_seconds": distiller.train_seconds, "setup_seconds": setup_seconds}


def summarise(runs: list[dict], methods: list[str]) -> dict:
    """Per method: final ROUGE-L mean/std over seeds, training seconds, seconds to 95% of the best."""
    table = {}
    methods = [m for m in methods if any(r["method"] == m for r in runs)]  # an interrupted grid may lack some
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        finals = [r["final_rouge_l"] for r in mine]
        table[method] = {
            "seeds": sorted(r["seed"] for r in mine),
            "rouge_l_mean": statistics.mean(finals),
            "rouge_l_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "train_seconds": statistics.mean(r["train_seconds"] for r in mine),
            # Setup before the first step; for SeqKD it is generating the teacher's responses for every
            # training prompt (sampled with the run's seed, so each seed generates its own set).
            "setup_seconds": statistics.mean(r["setup_seconds"] for r in mine),
        }
        validation = [r["validation_rouge_l"] for r in mine if r.get("validation_rouge_l") is not None]
        if validation:
            table[method]["validation_rouge_l_mean"] = statistics.mean(validation)
            table[method]["validation_rouge_l_std"] = statistics.stdev(validation) if len(validation) > 1 else 0.0
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
        help="comma-separated presets or OKD design variants (benchmarks/okd_design.py); 'preset:field=value;field=value' "
        "overrides sampling settings (e.g. distillm:init_threshold=0.5)",
    )
    parser.add_argument("--tier", choices=tuple(TIERS), default="toy", help="toy: from-scratch models; real: SmolLM2 and students shrunk from it")
    parser.add_argument("--students", "--student-sizes", dest="students", default=None,
                        help="toy: student sizes (default nano,tiny); real: layers kept (default 10,4)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-examples", type=int, default=150)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--max-train-examples", type=int, default=None, help="training examples loaded (default: all)")
    parser.add_argument("--demo-dir", default=None, help="where `okd demo` left data and teacher (default: the tier's demo directory)")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="2 methods, 1 student, 2 seeds, 20 steps")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table and figures from <out>/results.json")
    parser.add_argument("--merge-from", default=None,
                        help="with --report-only: comma-separated other --out directories (grids of other students, "
                        "methods or seeds run as separate processes) whose runs are added to <out>'s results")
    args = parser.parse_args()
    args.demo_dir = args.demo_dir or TIERS[args.tier]["demo_dir"]
    args.students = args.students or TIERS[args.tier]["students"]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.methods, args.students, args.seeds = "sft,kd", args.students.split(",")[0], "0,1"
        args.steps, args.eval_every, args.eval_examples, args.max_new_tokens = 20, 10, 16, 16

    out = Path(args.out)
    if args.report_only:
        results = json.loads((out / "results.json").read_text())
        for other in filter(None, (args.merge_from or "").split(",")):
            results = merge_results(results, json.loads((Path(other) / "results.json").read_text()), other)
        report(results, results["settings"]["methods"].split(","), out)
        return
    demo = Path(args.demo_dir)
    if not (demo / "teacher" / "config.json").exists():
        tier_flag = "" if args.tier == "real" else " --tier toy"
        sys.exit(f"no teacher in {demo}: run `okd demo{tier_flag} --output-dir {demo}` first")
    out.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    for method in methods:
        method_fields(method, args.steps)  # an unknown name stops here, before any training
    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = args.students.split(",")

    from okd.data import ensure_pad_token
    from okd.models import load_tokenizer

    students = None
    if args.tier == "real":
        students = real_students(demo, sizes, out)
        sizes = list(students)
        # The teacher's tokenizer, so prompts get its chat template, as in training.
        tokenizer = load_tokenizer(str(demo / "teacher"))
        ensure_pad_token(tokenizer)
        split = lambda name: InstructionDataset(  # noqa: E731
            read_jsonl(demo / "data" / f"{name}.jsonl", tokenizer=tokenizer)[: args.eval_examples], tokenizer, TIERS["real"]["max_length"])
    else:
        tokenizer = load_tokenizer(str(demo / "tokenizer"))
        split = lambda name: InstructionDataset(read_jsonl(demo / "data" / f"{name}.jsonl")[: args.eval_examples], tokenizer, 128)  # noqa: E731
    eval_sets = (split("test"), split("validation"))
    settings = {**vars(args), "students": ",".join(sizes)}
    results = {
        "command": " ".join(["python", "benchmarks/compare_methods.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "settings": settings,
        "sizes": {size: {"runs": []} for size in sizes},
        "total_seconds": 0.0,
    }
    previous = _previous_runs(out, settings)
    relabelled = json.loads((out / "results.json").read_text()).get("relabelled") if previous else None
    if relabelled:  # benchmarks/relabel_methods.py's record of renamed methods
        results["relabelled"] = relabelled
    reported = carry_over(results, previous, sizes, seeds, methods)
    started, before = time.perf_counter(), sum(r.get("wall_seconds", 0.0) for r in previous.values())
    # One student at a time (in --students order), and for it round robin over seeds: seed s of
    # every method before any seed s + 1, so an interrupted grid still has comparable seeds for all
    # methods of the students it reached.
    for size in sizes:
        for seed in seeds:
            for method in methods:
                key = (size, method, seed)
                if key in previous:
                    run = previous[key]
                else:
                    run_started = time.perf_counter()
                    run = run_one(method, size, seed, args, demo, eval_sets, out / "runs", students)
                    run["wall_seconds"] = time.perf_counter() - run_started
                    print(f"{size} {method} seed {seed}: ROUGE-L {run['final_rouge_l']:.2f} (validation "
                          f"{run['validation_rouge_l']:.2f}) in {run['train_seconds']:.1f} s", flush=True)
                results["sizes"][size]["runs"].append(run)
                results["total_seconds"] = before + time.perf_counter() - started
                write_json_atomic(out / "results.json", results)
    report(results, reported, out)


def merge_results(results: dict, other: dict, name: str = "other") -> dict:
    """``results`` with the runs of ``other`` (another process's grid, same settings: other students, or
    other methods or seeds of the same ones) added; a run in both stops the merge. The commands are kept
    side by side and the wall-clock seconds summed (the processes may have overlapped)."""
    shaping = ("tier", "steps", "eval_every", "eval_examples", "max_new_tokens", "max_train_examples")
    changed = [k for k in shaping if results["settings"].get(k) != other["settings"].get(k)]
    if changed:
        sys.exit(f"{name} was written with other settings ({', '.join(changed)}): cannot merge")
    keys = lambda grid: {(size, r["method"], r["seed"]) for size, entry in grid["sizes"].items() for r in entry["runs"]}  # noqa: E731
    clash = keys(results) & keys(other)
    if clash:
        shown = ", ".join(f"{size} {method} seed {seed}" for size, method, seed in sorted(clash)[:3])
        sys.exit(f"{name} has runs that are already in the results: {shown}")
    methods = results["settings"]["methods"].split(",")
    methods += [m for m in other["settings"]["methods"].split(",") if m not in methods]
    sizes = {size: {"runs": list(entry["runs"])} for size, entry in results["sizes"].items()}
    for size, entry in other["sizes"].items():  # another student, or other methods / seeds of the same one
        sizes.setdefault(size, {"runs": []})["runs"] += entry["runs"]
    relabelled = [*results.get("relabelled", []), *(e for e in other.get("relabelled", []) if e not in results.get("relabelled", []))]
    return {
        **results,
        **({"relabelled": relabelled} if relabelled else {}),
        "command": f"{results['command']}` and `{other['command']}",
        "settings": {**results["settings"], "methods": ",".join(methods)},
        "sizes": sizes,
        "total_seconds": results["total_seconds"] + other["total_seconds"],
    }


def carry_over(results: dict, previous: dict, sizes: list[str], seeds: list[int], methods: list[str]) -> list[str]:
    """Put the finished runs this invocation will not visit (other methods, seeds or students) into
    ``results``, so a rerun with a narrower grid never drops what an earlier one wrote; returns the
    methods to report (this invocation's, then the earlier ones'), also recorded in the settings."""
    planned = {(size, method, seed) for size in sizes for method in methods for seed in seeds}
    for key, run in previous.items():
        if key not in planned:
            results["sizes"].setdefault(key[0], {"runs": []})["runs"].append(run)
    reported = methods + [m for m in dict.fromkeys(key[1] for key in previous) if m not in methods]
    results["settings"]["methods"] = ",".join(reported)
    return reported


def _previous_runs(out: Path, settings: dict) -> dict:
    """Finished runs of an earlier invocation with the same ``--out``, by (student, method, seed), when
    every setting that shapes a run is the same (methods, students and seeds may differ)."""
    path = out / "results.json"
    if not path.exists():
        return {}
    stored = json.loads(path.read_text())
    # (Not the demo directory: the toy demo moved from runs/demo to runs/demo-toy with the same teacher.)
    shaping = ("tier", "steps", "eval_every", "eval_examples", "max_new_tokens", "max_train_examples")
    # Results written before the real tier existed were toy-tier runs over every training example.
    written = {"tier": "toy", "max_train_examples": None, **stored["settings"]}
    changed = [k for k in shaping if written.get(k) != settings.get(k)]
    if changed:
        sys.exit(f"{path} was written with other settings ({', '.join(changed)}): use another --out or the same settings")
    runs = [r for entry in stored["sizes"].values() for r in entry["runs"]]
    print(f"reusing {len(runs)} finished runs from {path}", flush=True)
    return {(r["size"], r["method"], r["seed"]): r for r in runs}


SAMPLING_METHODS = ("seqkd", "imitkd", "gkd", "distillm", "minillm")


def _pm(row: dict, key: str) -> str:
    """``mean +- std`` over seeds; the mean alone for one seed (a std of 0 would read as no spread)."""
    if f"{key}_mean" not in row:
        return "-"
    if len(row.get("seeds", ())) == 1:
        return f"{row[f'{key}_mean']:.2f}"
    return f"{row[f'{key}_mean']:.2f} +- {row[f'{key}_std']:.2f}"


def okd_time_to_quality(table: dict, sgo: list[str]) -> dict | None:
    """Time to quality: the seconds OKD needs to reach the best sampling method's final
    ROUGE-L, over that method's seconds (the paper claims up to 4x less, i.e. a ratio down to 0.25).

    Read off the mean curves over seeds (test ROUGE-L at the evaluation steps, the only split scored
    during training), interpolating linearly between evaluation points; seconds are training + setup
    (OKD's setup added to its curve). None without OKD or a sampling method; ``okd_seconds`` / ``ratio``
    are None when OKD's curve never reaches the target."""
    if "okd" not in table or not sgo:
        return None
    best = max(sgo, key=lambda m: table[m]["rouge_l_mean"])
    target = table[best]["rouge_l_mean"]
    okd_seconds, previous = None, (0.0, 0.0)
    for seconds, rouge in table["okd"]["mean_curve"]:
        if rouge >= target:
            t0, r0 = previous
            okd_seconds = t0 + (seconds - t0) * (target - r0) / (rouge - r0) if rouge > r0 else seconds
            break
        previous = (seconds, rouge)
    if okd_seconds is not None:
        okd_seconds += table["okd"]["setup_seconds"]
    best_seconds = table[best]["train_seconds"] + table[best]["setup_seconds"]
    return {
        "method": best, "target_rouge_l": target, "okd_seconds": okd_seconds, "method_seconds": best_seconds,
        "ratio": None if okd_seconds is None else okd_seconds / best_seconds,
        "okd_final_rouge_l": table["okd"]["rouge_l_mean"],
    }


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
        if not table:
            continue
        present = list(table)
        entry["summary"] = table
        plot(table, present, size, out)
        lines += [
            f"### Student `{size}`",
            "",
            "| method | seeds | final ROUGE-L (test) | validation ROUGE-L | training seconds | setup seconds (SeqKD: teacher generation) "
            "| training + setup | seconds to 95% of best |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for method in present:
            row = table[method]
            reach = f"{row['seconds_to_95pct_of_best']:.1f}" if row["seconds_to_95pct_of_best"] is not None else "not reached"
            lines.append(
                f"| {method} | {len(row['seeds'])} | {_pm(row, 'rouge_l')} | {_pm(row, 'validation_rouge_l')} "
                f"| {row['train_seconds']:.1f} | {row['setup_seconds']:.1f} | {row['train_seconds'] + row['setup_seconds']:.1f} | {reach} |"
            )
        lines.append("")
        sgo = [m for m in present if parse_method(m)[0] in SAMPLING_METHODS]
        if "okd" in table and sgo:
            # SeqKD's cost is mostly its teacher generation, so compare training + setup for all.
            total = {m: table[m]["train_seconds"] + table[m]["setup_seconds"] for m in present}
            ratios = {m: total[m] / total["okd"] for m in sgo}
            entry["generated_output_methods_over_okd_seconds"] = ratios
            lines += ["Training + setup seconds of each generated-output method / OKD's: "
                      + ", ".join(f"{m} {r:.2f}x" for m, r in ratios.items()), ""]
            quality = entry["okd_time_to_quality"] = okd_time_to_quality(table, sgo)
            if quality["ratio"] is not None:
                lines += [f"Time to quality: OKD reaches {quality['method']}'s final {quality['target_rouge_l']:.2f} after "
                          f"{quality['okd_seconds']:.0f} s, {quality['ratio']:.2f}x {quality['method']}'s {quality['method_seconds']:.0f} s.", ""]
            else:
                lines += [f"Time to quality: OKD does not reach {quality['method']}'s final {quality['target_rouge_l']:.2f} "
                          f"(OKD's final: {quality['okd_final_rouge_l']:.2f}).", ""]
        lines += _okd_selection(table, entry)
    write_json_atomic(out / "results.json", results)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _okd_variant_table(variants: dict, kd: dict, runs: list[dict]) -> list[str]:
    """The OKD variants beside KD: validation and test ROUGE-L, and what each module did to the teacher
    (the adapted teacher's validation CE and top-1 accuracy, its KL from the frozen teacher), mean +- std."""
    def metric(method: str, key: str) -> str:
        values = [r["validation"][key] for r in runs if r["method"] == method and key in r.get("validation", {})]
        if not values:
            return "-"
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} +- {std:.3f}"

    frozen = [r["validation"]["validation_frozen_teacher_ce"] for r in runs if "validation_frozen_teacher_ce" in r.get("validation", {})]
    lines = [
        "| method | seeds | validation ROUGE-L | test ROUGE-L | adapted teacher val CE | its top-1 accuracy | KL(p_0 \\|\\| p_phi) |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| kd | {len(kd['seeds'])} | {_pm(kd, 'validation_rouge_l')} | {_pm(kd, 'rouge_l')} | - | - | - |",
    ]
    for method, row in variants.items():
        lines.append(
            f"| {method} | {len(row['seeds'])} | {_pm(row, 'validation_rouge_l')} | {_pm(row, 'rouge_l')} "
            f"| {metric(method, 'validation_teacher_ce')} | {metric(method, 'validation_teacher_accuracy')} "
            f"| {metric(method, 'validation_teacher_kl_from_frozen')} |"
        )
    if frozen:
        lines.append(f"\nThe frozen teacher's validation CE: {statistics.mean(frozen):.3f}.")
    return lines + [""]


def _okd_selection(table: dict, entry: dict) -> list[str]:
    """When OKD design variants ran: the one selected on *validation* ROUGE-L, and whether it beats KD
    beyond the seed spread on validation and on test (okd_design.py's rules)."""
    variants = {m: row for m, row in table.items() if (m == "okd" or m.startswith("okd_")) and "validation_rouge_l_mean" in row}
    if len(variants) < 2 or "kd" not in table or "validation_rouge_l_mean" not in table["kd"]:
        return []
    from okd_design import _verdict, beats, select

    selected = select(variants, baseline="kd")
    on_validation = beats(variants[selected], table["kd"])
    on_test = beats(variants[selected], table["kd"], "rouge_l")  # the table's test ROUGE-L: rouge_l_mean / _std
    entry["okd_selected"] = {"variant": selected, "beats_kd_validation": on_validation, "beats_kd_test": on_test}
    return _okd_variant_table(variants, table["kd"], entry["runs"]) + [
        f"OKD design selected on validation ROUGE-L among {', '.join(variants)}: **{selected}** "
        f"({_pm(variants[selected], 'validation_rouge_l')} vs kd {_pm(table['kd'], 'validation_rouge_l')}); on validation it "
        f"{_verdict(on_validation, 'kd')}; on test it {_verdict(on_test, 'kd')}.",
        "",
    ]


if __name__ == "__main__":
    main()
