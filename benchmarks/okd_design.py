"""OKD design study, toy tier: which online-module design, if any, makes OKD beat plain KD.

Usage:
    python benchmarks/okd_design.py --quick                       # smoke test (2-3 minutes)
    python benchmarks/okd_design.py --seeds 0,1,2 --out runs/okd_design
    python benchmarks/okd_design.py --report-only --out runs/okd_design

Every variant (``VARIANTS``: KD, the baseline, and OKD designs, each a set of ``method``/``online``
fields) is trained with each seed on the demo's teacher and data (``okd demo``'s cached teacher in
``--demo-dir``; trained here with the demo's settings if it is not there), round robin: seed 0 of
every variant, then seed 1, ..., so an interrupted study still has comparable seeds for all.

Protocol (select on validation, test once):
* after training, each student is scored on the **validation** split: ROUGE-L (sampling with the run's
  seed, first ``--eval-examples`` examples) and the validation CE; the OKD runs also log what the module
  did to the teacher (adapted teacher's validation CE, top-1 accuracy, KL from the frozen teacher);
* the OKD variant with the highest mean validation ROUGE-L is **selected** (:func:`select`; ties go to
  the lower validation CE); test scores play no part;
* only then are KD, OKD's former default (``okd_kl``) and the selected variant scored on the **test**
  split, once.
Means +- sample std over seeds; :func:`beats` calls a difference real only when it exceeds the sum of
the two seed spreads. Writes ``results.json`` (after every run: nothing is lost on interruption) and
``results.md`` into ``--out``.
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

BASELINE = "kd"
# The OKD design the study compared against: okd's default until the study chose okd_jsd (now the
# okd preset's default, okd.config.OnlineModuleConfig).
DEFAULT_OKD = "okd_kl"
# Every OKD variant's online fields start from that former default, so the study reproduces whatever
# the preset's defaults are now; a variant's own fields override it.
FORMER_DEFAULT_ONLINE = {"divergence": "same"}

# name -> (description, method fields, online fields). Method name "okd" unless the method says otherwise.
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "kd": ("plain KD (forward KL), the baseline", {"name": "kd"}, {}),
    "okd_kl": ("okd's default until this study: CE + KL(q || p_phi), adapter 64, lr 5e-4", {}, {}),
    "okd_rkl": ("module divergence KL(p_phi || q) (mode-seeking)", {}, {"divergence": "reverse_kl"}),
    "okd_jsd": ("module divergence generalized JSD, beta 0.5", {}, {"divergence": "jsd", "divergence_params": {"beta": 0.5}}),
    "okd_promptkd": (
        "PromptKD-like: KL(p_phi || q) + (1 - t/T) KL(p_0 || p_phi)", {},
        {"divergence": "reverse_kl", "anchor_weight": 1.0, "anchor_schedule": "linear"},
    ),
    "okd_anchor": ("okd_kl + constant anchor 1.0 * KL(p_0 || p_phi)", {}, {"anchor_weight": 1.0}),
    "okd_late": ("okd_kl, module starts at step T/3, cosine LR", {}, {"start_step": "T/3", "lr_scheduler": "cosine"}),
    "okd_mix": ("okd_kl, student learns from 0.5 p_phi + 0.5 p_0", {}, {"teacher_mix": 0.5}),
    "okd_ce3": ("okd_kl with CE weight 3 (module stays accurate)", {}, {"ce_weight": 3.0}),
    "okd_lora": ("LoRA rank 8 on all layers instead of the adapter", {}, {"kind": "lora", "lora_top_layers": 0}),
}
FULL_VARIANTS = list(VARIANTS)
QUICK_VARIANTS = ["kd", "okd_kl", "okd_promptkd"]

VALIDATION_METRICS = (
    "validation_ce",
    "validation_teacher_ce",
    "validation_teacher_accuracy",
    "validation_teacher_kl_from_frozen",
)


# ----------------------------------------------------------------------------------------------
# Selection and reporting (pure functions of the results; tested on hand-made results)
# ----------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict], variants: list[str]) -> dict:
    """Per variant: mean and std over seeds of validation ROUGE-L and each validation metric present,
    mean training seconds, and the test ROUGE-L where the variant was scored on test."""
    table = {}
    for name in variants:
        mine = [r for r in runs if r["variant"] == name]
        if not mine:
            continue
        row = {"seeds": sorted(r["seed"] for r in mine), "train_seconds": statistics.mean(r["train_seconds"] for r in mine)}
        row["validation_rouge_l_mean"], row["validation_rouge_l_std"] = _mean_std([r["validation_rouge_l"] for r in mine])
        for metric in VALIDATION_METRICS:
            values = [r["validation"][metric] for r in mine if metric in r["validation"]]
            if values:
                row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(values)
        tests = [r["test_rouge_l"] for r in mine if r.get("test_rouge_l") is not None]
        if tests:
            row["test_rouge_l_mean"], row["test_rouge_l_std"] = _mean_std(tests)
        table[name] = row
    return table


def select(table: dict, baseline: str = BASELINE) -> str | None:
    """The OKD variant to carry forward: highest mean validation ROUGE-L, ties to the lower mean
    validation CE. Reads validation fields only (never test); the baseline is not a candidate."""
    candidates = [name for name in table if name != baseline]
    if not candidates:
        return None
    return max(candidates, key=lambda n: (table[n]["validation_rouge_l_mean"], -table[n].get("validation_ce_mean", 0.0)))


def beats(a: dict, b: dict, metric: str = "validation_rouge_l") -> bool | None:
    """Does ``a`` beat ``b`` on ``metric`` (rows with ``<metric>_mean`` / ``<metric>_std``) beyond the seed
    spread (mean difference larger than the sum of the two standard deviations)? None when either has
    fewer than 2 seeds (no spread)."""
    if min(len(a.get("seeds", ())), len(b.get("seeds", ()))) < 2:
        return None
    diff = a[f"{metric}_mean"] - b[f"{metric}_mean"]
    return diff > a[f"{metric}_std"] + b[f"{metric}_std"]


def tested_variants(selected: str | None, variants: list[str]) -> list[str]:
    """Scored on test at the end: the baseline, OKD's former default (okd_kl) and the selected variant."""
    chosen = [BASELINE, DEFAULT_OKD, selected]
    return [v for i, v in enumerate(chosen) if v is not None and v in variants and v not in chosen[:i]]


def _verdict(beat: bool | None, baseline: str) -> str:
    if beat is None:
        return f"cannot be compared with {baseline} (one seed: no spread)"
    return f"{'beats' if beat else 'does not beat'} {baseline} beyond the seed spread"


def _fmt(row: dict, key: str, digits: int = 2) -> str:
    if f"{key}_mean" not in row:
        return "-"
    return f"{row[f'{key}_mean']:.{digits}f} +- {row[f'{key}_std']:.{digits}f}"


def report(results: dict, out: Path) -> dict:
    """Summary, selection and tables from ``results["runs"]``; writes results.json and results.md."""
    from okd.evaluation import write_json_atomic

    variants = results["settings"]["variants"]
    table = summarise(results["runs"], variants)
    selected = select(table)
    results["summary"], results["selected"] = table, selected
    s, machine = results["settings"], results["machine"]
    lines = [
        "# OKD design study (toy tier)",
        "",
        f"Command: `{results['command']}`; {machine['cpu_count']} CPUs, torch {machine['torch']} "
        f"({machine['torch_threads']} threads); {results.get('total_seconds', 0) / 60:.0f} min in all.",
        f"Teacher: the demo's ({s['teacher']}); student `{s['student_size']}`, {s['steps']} steps, seeds {s['seeds']}. "
        f"ROUGE-L on the first {s['eval_examples']} examples of each split, sampling with the run's seed, "
        f"{s['max_new_tokens']} new tokens. Mean +- std over seeds.",
        "",
        "## Validation (selection)",
        "",
        "| variant | design | val ROUGE-L | val CE (student) | adapted teacher val CE | teacher top-1 acc | KL(p_0 \\|\\| p_phi) | train s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in variants:
        if name not in table:
            continue
        row = table[name]
        lines.append(
            f"| {name} | {VARIANTS.get(name, ('?',))[0].replace('|', chr(92) + '|')} | {_fmt(row, 'validation_rouge_l')} | {_fmt(row, 'validation_ce', 3)} "
            f"| {_fmt(row, 'validation_teacher_ce', 3)} | {_fmt(row, 'validation_teacher_accuracy', 3)} "
            f"| {_fmt(row, 'validation_teacher_kl_from_frozen', 4)} | {row['train_seconds']:.1f} |"
        )
    frozen = [r["validation"].get("validation_frozen_teacher_ce") for r in results["runs"] if "validation_frozen_teacher_ce" in r["validation"]]
    if frozen:
        lines += ["", f"Frozen teacher's validation CE: {frozen[0]:.3f}."]
    lines += ["", f"Selected on validation ROUGE-L: **{selected}**."]
    if selected and BASELINE in table:
        verdict = _verdict(beats(table[selected], table[BASELINE]), BASELINE)
        lines.append(f"On validation it {verdict} "
                     f"({_fmt(table[selected], 'validation_rouge_l')} vs {_fmt(table[BASELINE], 'validation_rouge_l')}).")
    tested = [v for v in tested_variants(selected, variants) if "test_rouge_l_mean" in table.get(v, {})]
    if tested:
        lines += ["", "## Test (once, after the selection)", "", "| variant | test ROUGE-L |", "|---|---:|"]
        lines += [f"| {v} | {_fmt(table[v], 'test_rouge_l')} |" for v in tested]
        if selected in tested and BASELINE in tested:
            verdict = _verdict(beats(table[selected], table[BASELINE], "test_rouge_l"), BASELINE)
            lines += ["", f"On test, {selected} {verdict}."]
    write_json_atomic(out / "results.json", results)
    (out / "results.md.tmp").write_text("\n".join(lines) + "\n")
    (out / "results.md.tmp").replace(out / "results.md")
    print("\n".join(lines))
    return results


# ----------------------------------------------------------------------------------------------
# Running the study
# ----------------------------------------------------------------------------------------------
def prepare_demo(demo: Path, quick: bool) -> dict:
    """The demo's data, tokenizer and teacher in ``demo`` (``okd demo``'s cache: reused when the
    settings match, trained here with the demo's settings otherwise)."""
    from okd.config import DataConfig
    from okd.data.builtin import build_builtin_dataset
    from okd.demo.toy import QUICK, DemoSettings, _prepare_tokenizer, _train_teacher

    settings = QUICK if quick else DemoSettings()
    paths = build_builtin_dataset(demo / "data")
    _prepare_tokenizer(demo / "data", demo / "tokenizer", settings.vocab_size)
    data = DataConfig(train_file=str(paths["train"]), validation_file=str(paths["validation"]), max_length=settings.max_length)
    teacher = _train_teacher(settings, data, demo / "tokenizer", demo / "teacher", lambda m: print(f"[okd_design] {m}", flush=True))
    return {"teacher": str(teacher), "tokenizer": str(demo / "tokenizer"), **{k: str(v) for k, v in paths.items()}}


def variant_configs(name: str, steps: int) -> tuple[dict, dict]:
    """``(method fields, online fields)`` of a variant; "T/3" in a field means steps // 3."""
    _, method, online = VARIANTS[name]
    method = {"name": "okd", **method}
    base = FORMER_DEFAULT_ONLINE if method["name"] == "okd" else {}  # the baseline has no online module
    online = {k: (steps // 3 if v == "T/3" else v) for k, v in {**base, **online}.items()}
    return method, online


def run_one(name: str, seed: int, args, paths: dict, validation_set, workdir: Path) -> dict:
    from okd.config import DataConfig, EvalConfig, MethodConfig, ModelConfig, OnlineModuleConfig, TrainConfig
    from okd.evaluation import GenerationConfig, evaluate_model
    from okd.training import Distiller

    method, online = variant_configs(name, args.steps)
    distiller = Distiller(
        model=ModelConfig(teacher=paths["teacher"], tokenizer=paths["tokenizer"], student_size=args.student_size),
        method=MethodConfig(**method),
        online=OnlineModuleConfig(**online),
        data=DataConfig(train_file=paths["train"], validation_file=paths["validation"], max_length=128, max_validation_examples=128),
        train=TrainConfig(
            max_steps=args.steps, batch_size=16, learning_rate=2e-3, warmup_steps=max(args.steps // 20, 1),
            lr_scheduler="cosine", seed=seed, log_every=max(args.steps // 30, 1),
        ),
        eval=EvalConfig(every=0),  # validation metrics once, after the last step
        output_dir=str(workdir / f"{name}-{seed}"),
        overwrite=True,
        progress=False,
    )
    distiller.train()
    distiller.save()
    student = distiller.accelerator.unwrap_model(distiller.student)
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens)
    eval_started = time.perf_counter()
    scored = evaluate_model(student, distiller.tokenizer, validation_set, [seed], generation, progress=False)
    validation = {k: v for k, v in distiller.final_metrics.items() if k.startswith("validation_")}
    return {
        "variant": name, "seed": seed, "train_seconds": distiller.train_seconds,
        "validation_rouge_l": scored.rouge_l_mean, "validation": validation,
        "student": str(distiller.output / "student"), "test_rouge_l": None,
        "eval_seconds": time.perf_counter() - eval_started,
    }


def score_test(run: dict, args, test_set) -> float:
    from okd.evaluation import GenerationConfig, evaluate_model
    from okd.models import load_model, load_tokenizer

    model = load_model(run["student"])
    scored = evaluate_model(model, load_tokenizer(run["student"]), test_set, [run["seed"]],
                            GenerationConfig(max_new_tokens=args.max_new_tokens), progress=False)
    return scored.rouge_l_mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(FULL_VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--student-size", default="nano")
    parser.add_argument("--eval-examples", type=int, default=150)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--demo-dir", default="runs/demo-toy", help="okd demo's output (its cached teacher is reused)")
    parser.add_argument("--out", default="runs/okd_design")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--teacher", choices=("demo", "quick"), default="demo",
                        help="the teacher okd demo trains (demo), or okd demo --quick's (quick; for smoke tests)")
    parser.add_argument("--quick", action="store_true", help="3 variants, 2 seeds, 40 steps, the quick teacher")
    parser.add_argument("--report-only", action="store_true", help="rewrite results.md from <out>/results.json")
    args = parser.parse_args()
    out = Path(args.out)
    if args.report_only:
        report(json.loads((out / "results.json").read_text()), out)
        return
    import torch
    from transformers.utils import logging as hf_logging

    from okd.data import InstructionDataset, read_jsonl
    from okd.models import load_tokenizer

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    if args.quick:
        args.variants, args.seeds, args.steps, args.teacher = ",".join(QUICK_VARIANTS), "0,1", 40, "quick"
        args.eval_examples, args.max_new_tokens = 16, 16
    if args.teacher == "quick" and args.demo_dir == "runs/demo-toy":
        args.demo_dir = "runs/demo_quick"  # never retrain (overwrite) the full demo's teacher
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out.mkdir(parents=True, exist_ok=True)
    paths = prepare_demo(Path(args.demo_dir), args.teacher == "quick")
    tokenizer = load_tokenizer(paths["tokenizer"])
    split = lambda name: InstructionDataset(read_jsonl(paths[name])[: args.eval_examples], tokenizer, 128)  # noqa: E731
    results = {
        "command": " ".join(["python", "benchmarks/okd_design.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "settings": {**vars(args), "variants": variants, "seeds": seeds, "teacher": paths["teacher"]},
        "runs": [],
    }
    started = time.perf_counter()
    validation_set = split("validation")
    for seed in seeds:  # round robin: every variant's seed s before any seed s + 1
        for name in variants:
            run = run_one(name, seed, args, paths, validation_set, out / "runs")
            results["runs"].append(run)
            results["total_seconds"] = time.perf_counter() - started
            print(f"{name} seed {seed}: validation ROUGE-L {run['validation_rouge_l']:.2f}, "
                  f"{run['train_seconds']:.1f} s", flush=True)
            from okd.evaluation import write_json_atomic

            write_json_atomic(out / "results.json", results)
    # Selection on validation only; then the test split, once, for the chosen variants.
    selected = select(summarise(results["runs"], variants))
    test_set = split("test")
    for run in results["runs"]:
        if run["variant"] in tested_variants(selected, variants):
            run["test_rouge_l"] = score_test(run, args, test_set)
    results["total_seconds"] = time.perf_counter() - started
    report(results, out)


if __name__ == "__main__":
    main()
