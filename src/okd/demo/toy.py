"""`okd demo --tier toy` (and `okd demo --quick`): the from-scratch toy demo on the built-in data, on a CPU.

1. build the built-in data set (standard-library docstrings) and a byte-level BPE tokenizer for it;
2. train a teacher from scratch with cross-entropy (cached: reused when its settings are unchanged);
3. distil a smaller student with each method, same data, steps and seed;
4. evaluate the teacher and every student (ROUGE-L and exact match over sampling seeds, and greedy),
   keeping every model's per-example scores (``eval-<model>.json``, the format of ``okd eval``);
5. compute the paired differences between methods (``okd.demo.paired``) and write ``report.md``,
   ``results.json`` and PNG plots into the output directory.

Nothing here is special to the demo except the sizes: every step uses the public API, so the demo is
also a worked example of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from okd.config import DataConfig, EvalConfig, MethodConfig, ModelConfig, OnlineModuleConfig, SamplingConfig, TrainConfig
from okd.evaluation import GenerationConfig, evaluate_model
from okd.io import atomic_directory, write_json, write_text

DEFAULT_METHODS = ["sft", "kd", "rkl", "okd", "gkd", "distillm"]


@dataclass
class DemoSettings:
    """Sizes and budgets of one demo run.

    Chosen by experiment on a 2-core CPU: a `small` teacher (1.3M parameters) trained 800 steps scored
    9.2 ROUGE-L against 7.9 for a `medium` one (7.3M) trained 400 steps in about the same time; with a
    `nano` student (0.08M) the teacher beats the `sft` baseline by more than 5 ROUGE-L points, which a
    `tiny` student (0.26M, 5.4 ROUGE-L) did not leave. 1200 teacher steps widen that margin.
    """

    teacher_size: str = "small"
    teacher_steps: int = 1200
    student_size: str = "nano"
    student_steps: int = 300
    architecture: str = "llama"
    batch_size: int = 16
    learning_rate: float = 2e-3
    teacher_learning_rate: float = 2e-3
    max_length: int = 128
    vocab_size: int = 2048
    eval_examples: int = 300
    eval_seeds: list[int] = field(default_factory=lambda: [10, 20, 30])
    max_new_tokens: int = 40
    seed: int = 0


QUICK = DemoSettings(
    teacher_size="tiny",
    teacher_steps=60,
    student_size="nano",
    student_steps=30,
    eval_examples=48,
    eval_seeds=[10, 20],
    max_new_tokens=24,
)


def _fingerprint(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _prepare_tokenizer(data_dir: Path, out: Path, vocab_size: int):
    from okd.data.builtin import builtin_texts
    from okd.models import load_tokenizer, train_tokenizer

    meta_file = out / "okd_tokenizer.json"
    key = _fingerprint({"data": (data_dir / "meta.json").read_text(), "vocab": vocab_size})
    if meta_file.exists() and json.loads(meta_file.read_text()).get("key") == key:
        return load_tokenizer(str(out))
    tokenizer = train_tokenizer(builtin_texts(data_dir), vocab_size=vocab_size)
    tokenizer.save_pretrained(str(out))
    meta_file.write_text(json.dumps({"key": key}) + "\n")
    return load_tokenizer(str(out))


def _teacher_key(settings: DemoSettings, data: DataConfig, tokenizer_dir: Path) -> str:
    """What the cached teacher depends on; a different key retrains it."""
    return _fingerprint(
        {
            "size": settings.teacher_size,
            "arch": settings.architecture,
            "steps": settings.teacher_steps,
            "lr": settings.teacher_learning_rate,
            "batch": settings.batch_size,
            # The data's content (hashes in meta.json), not its location: a copied run dir still hits.
            "data": (Path(data.train_file).parent / "meta.json").read_text(),
            "max_length": data.max_length,
            "tokenizer": (tokenizer_dir / "okd_tokenizer.json").read_text(),
            "seed": settings.seed,
        }
    )


def _train_teacher(settings: DemoSettings, data: DataConfig, tokenizer_dir: Path, out: Path, log) -> Path:
    """Train (or reuse) the teacher: a larger model trained with plain cross-entropy.

    The training run (metrics, summary, key of the cache) goes to ``<out>_run``; ``out`` itself is
    the teacher model alone (weights, config, tokenizer), as a teacher directory should be.
    """
    from okd.training import distill

    run = out.with_name(out.name + "_run")
    key = _teacher_key(settings, data, tokenizer_dir)
    marker = run / "okd_teacher_key.txt"
    if (out / "config.json").exists() and marker.exists() and marker.read_text().strip() == key:
        log(f"teacher: reusing {out} (same settings)")
        return out
    log(f"teacher: training a {settings.teacher_size} {settings.architecture} for {settings.teacher_steps} steps")
    distill(
        model=ModelConfig(
            tokenizer=str(tokenizer_dir),
            student_architecture=settings.architecture,
            student_size=settings.teacher_size,
        ),
        method=MethodConfig(name="sft"),
        data=data,
        train=demo_train_config(settings, settings.teacher_steps, settings.teacher_learning_rate),
        output_dir=str(run),
        overwrite=True,
    )
    publish_teacher(run, out, marker, key)
    return out


def publish_teacher(run: Path, out: Path, marker: Path, key: str) -> None:
    """Make the trained run's ``student/`` the teacher directory ``out`` (atomically: a plain model
    directory), then write the settings key that lets a later demo reuse it."""
    with atomic_directory(out) as tmp:
        for file in (run / "student").iterdir():
            shutil.copy2(file, tmp / file.name)
    write_text(marker, key + "\n")


def demo_train_config(settings, steps: int, lr: float, *, warmup_per: int = 20, logs: int = 30) -> TrainConfig:
    """A demo run's training settings: ``settings.batch_size`` and ``settings.seed``, a cosine schedule
    after ``steps // warmup_per`` warm-up steps (at least 1), about ``logs`` metric lines."""
    return TrainConfig(
        max_steps=steps,
        batch_size=settings.batch_size,
        learning_rate=lr,
        warmup_steps=max(steps // warmup_per, 1),
        lr_scheduler="cosine",
        seed=settings.seed,
        log_every=max(steps // logs, 1),
    )


def run_toy_demo(quick: bool = False, output_dir: str = "runs/demo", methods: list[str] | None = None, settings: DemoSettings | None = None) -> dict:
    """Run the demo and return the results dict (also written to ``output_dir/results.json``)."""
    from okd.data import InstructionDataset, ensure_pad_token, read_jsonl
    from okd.data.builtin import build_builtin_dataset
    from okd.demo.paired import paired_statistics, write_eval_file
    from okd.models import count_parameters, load_model, load_tokenizer
    from okd.training import distill

    settings = settings or (QUICK if quick else DemoSettings())
    methods = methods or DEFAULT_METHODS
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[okd demo {time.perf_counter() - started:6.1f}s] {message}", flush=True)

    paths = build_builtin_dataset(out / "data")
    log(f"data: {', '.join(f'{k}={v}' for k, v in paths.items())}")
    tokenizer = _prepare_tokenizer(out / "data", out / "tokenizer", settings.vocab_size)
    ensure_pad_token(tokenizer)
    log(f"tokenizer: {len(tokenizer)} tokens")
    data = DataConfig(
        train_file=str(paths["train"]),
        validation_file=str(paths["validation"]),
        max_length=settings.max_length,
        max_validation_examples=128,
    )
    teacher_dir = _train_teacher(settings, data, out / "tokenizer", out / "teacher", log)

    test_examples = read_jsonl(paths["test"], tokenizer=tokenizer)[: settings.eval_examples]
    test_set = InstructionDataset(test_examples, tokenizer, settings.max_length)
    generation = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0)

    results: dict = {"settings": dataclasses.asdict(settings), "methods": {}, "eval_files": {}}

    def score(name: str, model_dir: Path, train_seconds: float | None, steps: int | None) -> None:
        model = load_model(str(model_dir))
        scored = evaluate_model(model, load_tokenizer(str(model_dir)), test_set, settings.eval_seeds, generation, progress=False, greedy=True)
        # Per-example scores, in okd eval's format, next to results.json (okd compare reads them).
        path = write_eval_file(out, name, scored.to_dict(), model_dir, paths["test"], settings.max_length, settings.eval_examples)
        results["eval_files"][name] = path.name
        results["methods"][name] = {
            "rouge_l_mean": scored.rouge_l_mean,
            "rouge_l_std": scored.rouge_l_std,
            "exact_match_mean": scored.exact_match_mean,
            "exact_match_std": scored.exact_match_std,
            "greedy_rouge_l": scored.greedy_rouge_l,
            "train_seconds": train_seconds,
            "steps": steps,
            "parameters": count_parameters(model),
            "samples": scored.per_seed[0]["samples"],
        }
        log(f"{name}: ROUGE-L {scored.rouge_l_mean:.2f} +- {scored.rouge_l_std:.2f}, greedy {scored.greedy_rouge_l:.2f}")

    teacher_summary = json.loads((out / "teacher_run" / "train_summary.json").read_text())
    score("teacher", teacher_dir, teacher_summary["train_seconds"], teacher_summary["steps"])

    for name in methods:
        log(f"{name}: distilling a {settings.student_size} student for {settings.student_steps} steps")
        run = distill(
            model=ModelConfig(
                teacher=str(teacher_dir),
                tokenizer=str(out / "tokenizer"),
                student_architecture=settings.architecture,
                student_size=settings.student_size,
            ),
            method=MethodConfig(name=name),
            online=OnlineModuleConfig(),
            data=data,
            train=demo_train_config(settings, settings.student_steps, settings.learning_rate),
            # Validation every 10% of the run: its loss drives DistiLLM's adaptive threshold.
            eval=EvalConfig(every=max(settings.student_steps // 10, 1)),
            sampling=SamplingConfig(max_new_tokens=settings.max_new_tokens),
            output_dir=str(out / "methods" / name),
            overwrite=True,
        )
        score(name, run.output_dir / "student", run.train_seconds, run.steps)

    results["paired"] = paired_statistics(out, results["eval_files"], methods)
    results["total_seconds"] = time.perf_counter() - started
    write_json(out / "results.json", results)
    _plot(results, out, methods)
    _write_report(results, out, methods)
    log(f"report: {out / 'report.md'}")
    return results


def _plot(results: dict, out: Path, methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from okd.demo.report import plot_training_curves

    curves = {}
    for name in methods:
        rows = [json.loads(line) for line in (out / "methods" / name / "metrics.jsonl").read_text().splitlines()]
        curves[name] = [(r["step"], r["ce"]) for r in rows]
    plot_training_curves(curves, out / "loss_curves.png")

    names = ["teacher", *methods]
    means = [results["methods"][n]["rouge_l_mean"] for n in names]
    stds = [results["methods"][n]["rouge_l_std"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(names, means, yerr=stds, capsize=4, color=["grey"] + ["C0"] * len(methods))
    ax.set_ylabel("ROUGE-L (mean +- std over seeds)")
    ax.set_title("Built-in test set")
    fig.tight_layout()
    fig.savefig(out / "rouge_l.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(methods, [results["methods"][n]["train_seconds"] for n in methods])
    ax.set_ylabel("training wall-clock seconds")
    ax.set_title("Training time per method (same steps)")
    fig.tight_layout()
    fig.savefig(out / "train_time.png", dpi=120)
    plt.close(fig)


def _write_report(results: dict, out: Path, methods: list[str]) -> None:
    from okd.demo.paired import paired_table

    s = results["settings"]
    lines = [
        "# okd demo report",
        "",
        f"Teacher: {s['architecture']} `{s['teacher_size']}` trained {s['teacher_steps']} steps with cross-entropy. "
        f"Students: `{s['student_size']}`, {s['student_steps']} steps each, batch {s['batch_size']}, seed {s['seed']}.",
        f"Test: first {s['eval_examples']} examples of the built-in test split; sampling at temperature 1, "
        f"seeds {s['eval_seeds']}, up to {s['max_new_tokens']} new tokens.",
        "",
        "| model | parameters | ROUGE-L (sampled) | greedy ROUGE-L | exact match | train seconds | steps |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ["teacher", *methods]:
        r = results["methods"][name]
        lines.append(
            f"| {name} | {r['parameters']:,} | {r['rouge_l_mean']:.2f} +- {r['rouge_l_std']:.2f} | {r['greedy_rouge_l']:.2f} | "
            f"{r['exact_match_mean']:.2f} | {r['train_seconds']:.1f} | {r['steps']} |"
        )
    gap = results["methods"]["teacher"]["rouge_l_mean"] - results["methods"].get("sft", {}).get("rouge_l_mean", float("nan"))
    lines += [
        "",
        f"Teacher minus `sft` student: {gap:.2f} ROUGE-L points.",
        f"Total demo wall-clock: {results['total_seconds']:.0f} s.",
        "",
        *(paired + [""] if (paired := paired_table(results.get("paired"), results.get("eval_files"))) else []),
        "![loss curves](loss_curves.png) ![ROUGE-L](rouge_l.png) ![time](train_time.png)",
        "",
        "## Sample generations (first seed)",
        "",
    ]
    for name in ["teacher", *methods]:
        sample = results["methods"][name]["samples"][0]
        lines.append(f"- **{name}**: {sample['prediction']!r} (reference: {sample['reference']!r})")
    write_text(out / "report.md", "\n".join(lines) + "\n")
