"""The decisive comparison of OKD with KD and the other methods, run as docs/results/protocol.md says.

Every stage is a subcommand; each one skips what is already done, so a grid interrupted by a reboot
(or a machine taken away) resumes where it stopped when the same command is run again, down to the last
half-epoch checkpoint of a run that was cut off. Results of finished runs are written under
``--results`` (committed), models and checkpoints under ``--runs`` (not committed).

    python benchmarks/okd_decision.py teacher --task builtin        # SmolLM2 fine-tuned, epochs chosen on validation
    python benchmarks/okd_decision.py prepare --task builtin        # 10-layer student + hidden-state teacher cache
    python benchmarks/okd_decision.py grid --task builtin --stage sweep --workers 2
    python benchmarks/okd_decision.py select --task builtin         # learning rates chosen on validation only
    python benchmarks/okd_decision.py grid --task builtin --stage seeds --workers 2
    python benchmarks/okd_decision.py test --task builtin --methods kd,okd   # once, after selection
    python benchmarks/okd_decision.py dose --task builtin                    # the module's strength, validation only
    python benchmarks/okd_decision.py status --task builtin

A run trains in segments of half an epoch; after each segment the student is scored on the whole
validation split (ROUGE-L of two sampling draws at temperature 1, and greedy) and a checkpoint is kept.
The student with the best sampled validation ROUGE-L is saved as the run's result. A run stops when
that score has not improved for ``patience`` evaluations after its first epoch, or at its epoch budget.
Training seconds exclude the evaluations; they are single-thread seconds (every job runs with one torch
thread, two jobs side by side on a two-core machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class TaskSettings:
    """What differs between tasks: where the data is, lengths."""

    data: str
    """Directory with train/validation/test.jsonl (``okd data build``)."""
    max_length: int = 96
    """Tokens per training example (prompt in the chat template + response)."""
    max_new_tokens: int = 32
    """Tokens generated per response when scoring."""


TASKS = {
    "builtin": TaskSettings(data="runs/data/builtin"),
    "wordnet": TaskSettings(data="runs/data/wordnet"),
}


@dataclass(frozen=True)
class Protocol:
    """The fixed settings of docs/results/protocol.md (changing one is a new protocol, not a rerun)."""

    batch_size: int = 8
    teacher_lora_rank: int = 8
    """The teacher is the base fine-tuned with LoRA (alpha 2 x rank, every linear layer but the head):
    its adapter is a few MB, committed with the results, so the teacher is rebuilt exactly anywhere."""
    teacher_learning_rate: float = 5e-4
    teacher_max_epochs: int = 2
    student_layers: int = 10
    student_max_epochs: int = 2
    min_epochs: int = 1
    patience: int = 2
    """Evaluations (half-epochs) without a better validation score before a run stops (after min_epochs)."""
    evals_per_epoch: int = 2
    warmup_fraction: float = 0.03
    validation_draws: tuple[int, ...] = (1001, 1002)
    """Sampling seeds of the validation score (temperature 1, top-p 1)."""
    test_draws: tuple[int, ...] = (2001, 2002, 2003)
    learning_rates: tuple[float, ...] = (5e-5, 1.5e-4, 4.5e-4)
    """The sweep of each method's peak learning rate, at training seed 0."""
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = ("sft", "kd", "rkl", "okd", "okd_kl", "distillm", "gkd")
    """Methods of the seeded grid (the `okd` preset; okd_kl is OKD with a KL module objective)."""
    one_seed_methods: tuple[str, ...] = ("seqkd", "imitkd", "minillm")
    cached_methods: tuple[str, ...] = ("kd", "rkl", "okd", "okd_kl")
    """Ground-truth methods that read the teacher from its hidden-state cache (sft needs no teacher)."""


PROTOCOL = Protocol()


# --------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------


def lr_label(lr: float) -> str:
    """``1.5e-4`` for 0.00015 (three significant digits at most)."""
    mantissa, exponent = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def run_label(method: str, lr: float, seed: int) -> str:
    return f"{method}-lr{lr_label(lr)}-s{seed}"


@dataclass
class Paths:
    task: str
    runs: Path
    results: Path
    base: Path

    @property
    def work(self) -> Path:
        return self.runs / self.task

    @property
    def out(self) -> Path:
        return self.results / self.task

    @property
    def teacher(self) -> Path:
        return self.work / "teacher"

    @property
    def student_init(self) -> Path:
        return self.work / f"student-{PROTOCOL.student_layers}l"

    @property
    def cache(self) -> Path:
        return self.work / "teacher_cache_hidden"

    def run_dir(self, label: str) -> Path:
        return self.work / "runs" / label

    def result(self, label: str) -> Path:
        return self.out / "runs" / f"{label}.json"


# --------------------------------------------------------------------------------------
# one training run with validation segments
# --------------------------------------------------------------------------------------


# The dose-response: the online module's strength (its learning rate, the weight of its pull toward the
# student), from the preset's up to settings that move the adapted teacher well away from the frozen one.
DOSE_LEVELS = {"okd": (5e-4, 1.0), "okd@m2e-3": (2e-3, 1.0), "okd@m8e-3": (8e-3, 1.0), "okd@m8e-3w4": (8e-3, 4.0)}


def method_sections(method: str) -> tuple[dict, dict]:
    """``(method fields, online-module fields)``: the presets, okd_kl (the `okd` preset with a KL module
    objective, the module divergence of earlier versions) and the dose-response levels (``okd@...``)."""
    if method == "okd_kl":
        return {"name": "okd"}, {"divergence": "kl"}
    if method.startswith("okd@"):
        learning_rate, student_weight = DOSE_LEVELS[method]
        return {"name": "okd"}, {"learning_rate": learning_rate, "student_weight": student_weight}
    return {"name": method}, {}


def adapted_teacher_metrics(teacher: Path, module: Path, settings: TaskSettings) -> dict:
    """What a trained online module does to the teacher on the validation split: the adapted teacher's
    CE and top-1 accuracy, its KL from the frozen teacher, and the frozen teacher's CE (token means)."""
    import torch

    from okd.data import Collator, InstructionDataset, read_jsonl
    from okd.models import load_model, load_tokenizer
    from okd.online.objective import AdaptedTeacherMetrics
    from okd.targets import next_token_targets
    from okd.teacher import with_online_module

    tokenizer = load_tokenizer(str(teacher))
    frozen = load_model(str(teacher)).eval()
    adapted = with_online_module(load_model(str(teacher)), module).eval()
    dataset = InstructionDataset(read_jsonl(str(Path(settings.data) / "validation.jsonl"), tokenizer=tokenizer), tokenizer, settings.max_length)
    collate, metrics = Collator(pad_token_id=tokenizer.pad_token_id), AdaptedTeacherMetrics()
    with torch.no_grad():
        for start in range(0, len(dataset), 16):
            batch = collate([dataset[i] for i in range(start, min(start + 16, len(dataset)))])
            targets, _ = next_token_targets(batch["labels"])
            inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            metrics.update(adapted(**inputs).logits, frozen(**inputs).logits, targets)
    return metrics.result()


def validation_score(student, tokenizer, dataset, settings: TaskSettings) -> dict:
    """Mean ROUGE-L over the validation draws (the selection score) and greedy ROUGE-L."""
    from okd.evaluation import GenerationConfig, evaluate_model

    common = dict(max_new_tokens=settings.max_new_tokens, batch_size=32)
    sampled = evaluate_model(student, tokenizer, dataset, list(PROTOCOL.validation_draws), GenerationConfig(do_sample=True, **common), progress=False)
    greedy = evaluate_model(student, tokenizer, dataset, [0], GenerationConfig(do_sample=False, **common), progress=False)
    return {
        "rouge_l": sampled.rouge_l_mean,
        "rouge_l_per_draw": [s["rouge_l"] for s in sampled.per_seed],
        "greedy_rouge_l": greedy.rouge_l_mean,
        "exact_match": sampled.exact_match_mean,
        "greedy_exact_match": greedy.exact_match_mean,
    }


def save_model_atomic(model, tokenizer, out: Path) -> None:
    from okd.models import save_pretrained_atomic

    save_pretrained_atomic(model, tokenizer, out)


def train_run(kind: str, method: str, lr: float, seed: int, paths: Paths, settings: TaskSettings, threads: int = 1) -> dict:
    """Train one run (teacher or student) in half-epoch segments, scoring validation after each; keep
    the best student; resume from the run's last segment when it was cut off. Returns the result."""
    import torch

    from okd.config import DataConfig, EvalConfig, LoraStudentConfig, MethodConfig, ModelConfig, OnlineModuleConfig, SamplingConfig, TrainConfig
    from okd.data import InstructionDataset, read_jsonl
    from okd.io import write_json
    from okd.training import Distiller

    torch.set_num_threads(threads)
    label = "teacher" if kind == "teacher" else run_label(method, lr, seed)
    run_dir = paths.work / "teacher_run" if kind == "teacher" else paths.run_dir(label)
    progress_file = run_dir / "decision_progress.json"
    data = Path(settings.data)
    n_train = sum(1 for _ in open(data / "train.jsonl"))
    steps_per_epoch = math.ceil(n_train / PROTOCOL.batch_size)
    segment = math.ceil(steps_per_epoch / PROTOCOL.evals_per_epoch)
    max_epochs = PROTOCOL.teacher_max_epochs if kind == "teacher" else PROTOCOL.student_max_epochs
    horizon = segment * PROTOCOL.evals_per_epoch * max_epochs
    method_kw, online_kw = method_sections(method)
    if kind == "teacher":
        rank = PROTOCOL.teacher_lora_rank
        model = ModelConfig(student=str(paths.base), student_lora=LoraStudentConfig(rank=rank, alpha=2.0 * rank))
    else:
        cached = method in PROTOCOL.cached_methods
        model = ModelConfig(teacher=str(paths.teacher), student=str(paths.student_init), teacher_cache=str(paths.cache) if cached else None)

    resuming = progress_file.exists() and any((run_dir / "checkpoints").glob("step-*"))
    progress = json.loads(progress_file.read_text()) if resuming else {"curve": [], "best": None}
    distiller = Distiller(
        model=model,
        method=MethodConfig(**method_kw),
        online=OnlineModuleConfig(**online_kw),
        data=DataConfig(
            train_file=str(data / "train.jsonl"), validation_file=str(data / "validation.jsonl"),
            max_length=settings.max_length, max_validation_examples=64,
        ),
        train=TrainConfig(
            max_steps=horizon, batch_size=PROTOCOL.batch_size, learning_rate=lr, lr_scheduler="cosine",
            warmup_steps=max(1, round(PROTOCOL.warmup_fraction * horizon)), seed=seed, log_every=25,
            keep_checkpoints=1,
        ),
        # DistiLLM's adaptive source reads the validation loss: once per segment, as the score.
        eval=EvalConfig(every=segment),
        sampling=SamplingConfig(max_new_tokens=settings.max_new_tokens),
        output_dir=str(run_dir),
        overwrite=not resuming,
        resume=resuming,
        progress=False,
    )
    # Curve points past the checkpoint the run resumed from are recomputed.
    progress["curve"] = [p for p in progress["curve"] if p["step"] <= distiller.step]
    if progress["best"] and progress["best"]["step"] > distiller.step:
        progress["best"] = max(progress["curve"], key=lambda p: p["rouge_l"], default=None)
    validation = InstructionDataset(read_jsonl(str(data / "validation.jsonl"), tokenizer=distiller.tokenizer), distiller.tokenizer, settings.max_length)
    stop_reason = progress.get("stop_reason", "epoch budget")
    while distiller.step < horizon and "stop_reason" not in progress:
        distiller.train_config.max_steps = min(distiller.step + segment, horizon)
        distiller.train()
        if distiller.interrupted:
            sys.exit(f"{label}: stopped by a signal at step {distiller.step}; rerun the same command to resume")
        student = distiller.accelerator.unwrap_model(distiller.student)
        eval_started = time.perf_counter()
        point = {"step": distiller.step, "epoch": distiller.step / steps_per_epoch, "train_seconds": distiller.train_seconds,
                 **validation_score(student, distiller.tokenizer, validation, settings),
                 "validation_ce": distiller.final_metrics.get("validation_ce"),
                 "eval_seconds": time.perf_counter() - eval_started}
        student.train()
        progress["curve"].append(point)
        if progress["best"] is None or point["rouge_l"] > progress["best"]["rouge_l"]:
            progress["best"] = point
            save_model_atomic(student, distiller.tokenizer, run_dir / "best_student")
            if distiller.online_config is not None:
                distiller.teacher.save_module(run_dir / "best_online_module")
        since_best = sum(1 for p in progress["curve"] if p["step"] > progress["best"]["step"])
        if point["epoch"] >= PROTOCOL.min_epochs - 1e-9 and since_best >= PROTOCOL.patience:
            progress["stop_reason"] = stop_reason = f"no better validation score in {PROTOCOL.patience} evaluations"
        # The progress file first: a kill between the two writes recomputes this point from the earlier checkpoint.
        write_json(progress_file, progress)
        distiller.save_checkpoint()
        print(f"{label}: step {point['step']} (epoch {point['epoch']:.2f}) validation ROUGE-L {point['rouge_l']:.2f} "
              f"greedy {point['greedy_rouge_l']:.2f} ({point['train_seconds']:.0f} s training)", flush=True)
    result = {
        "task": paths.task, "kind": kind, "method": method, "learning_rate": lr, "seed": seed, "label": label,
        "best": progress["best"], "curve": progress["curve"], "stop_reason": stop_reason,
        "steps": distiller.step, "steps_per_epoch": steps_per_epoch, "schedule_horizon": horizon,
        "train_seconds": distiller.train_seconds, "eval_seconds": sum(p["eval_seconds"] for p in progress["curve"]),
        "threads": threads, "protocol": asdict(PROTOCOL), "task_settings": asdict(settings),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "commit": git_commit(),
    }
    if kind == "teacher":
        publish_adapter(run_dir / "best_student", paths.out / "teacher_adapter")
    return result


def publish_adapter(best: Path, adapter: Path) -> None:
    """The teacher's LoRA adapter as committed: its weights and config (the base named, not its path)."""
    from okd.io import write_json

    if adapter.exists():
        shutil.rmtree(adapter)
    adapter.mkdir(parents=True)
    shutil.copy2(best / "adapter_model.safetensors", adapter / "adapter_model.safetensors")
    config = json.loads((best / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "SmolLM2-135M-Instruct (okd model convert smollm2)"
    write_json(adapter / "adapter_config.json", config)


def build_teacher(paths: Paths) -> Path:
    """The teacher: the base model with the committed LoRA adapter folded in (float32, exact)."""
    from peft import PeftModel

    from okd.models import load_model, load_tokenizer, save_pretrained_atomic

    base = load_model(str(paths.base))
    merged = PeftModel.from_pretrained(base, str(paths.out / "teacher_adapter")).merge_and_unload()
    save_pretrained_atomic(merged, load_tokenizer(str(paths.base)), paths.teacher)
    return paths.teacher


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def commit_results(paths: list[Path], message: str) -> None:
    """Commit finished results at once (the grid runs from its own worktree and branch)."""
    if os.environ.get("OKD_DECISION_NO_COMMIT"):
        return
    rel = [str(p.resolve().relative_to(REPO)) for p in paths]
    subprocess.run(["git", "-C", str(REPO), "add", *rel], check=True)
    subprocess.run(["git", "-C", str(REPO), "commit", "-q", "-m", message, "--", *rel], check=False)


# --------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------


def stage_teacher(args, paths: Paths, settings: TaskSettings) -> None:
    from okd.io import write_json

    result_path = paths.out / "teacher.json"
    if result_path.exists() and (paths.out / "teacher_adapter").exists():
        if not (paths.teacher / "config.json").exists():
            build_teacher(paths)
        print(f"teacher: {paths.teacher} (from {paths.out / 'teacher_adapter'})")
        return
    result = train_run("teacher", "sft", PROTOCOL.teacher_learning_rate, 0, paths, settings, threads=args.threads)
    write_json(result_path, result)
    build_teacher(paths)
    commit_results([result_path, paths.out / "teacher_adapter"], f"decision/{paths.task}: teacher fine-tuned, best validation ROUGE-L {result['best']['rouge_l']:.2f} at epoch {result['best']['epoch']:.1f}")


def stage_prepare(args, paths: Paths, settings: TaskSettings) -> None:
    import torch

    from okd.pretrained import shrink
    from okd.teacher_cache import cache_teacher

    torch.set_num_threads(args.threads)
    if not (paths.student_init / "config.json").exists():
        shrink(str(paths.teacher), str(paths.student_init), layers=PROTOCOL.student_layers)
    if not (paths.cache / "manifest.json").exists():
        cache_teacher(teacher=str(paths.teacher), data=str(Path(settings.data) / "train.jsonl"), out=str(paths.cache),
                      store="hidden", max_length=settings.max_length, overwrite=True, progress=False)
    print(f"student: {paths.student_init}\ncache: {paths.cache}")


def plan(stage: str, paths: Paths, methods: list[str]) -> list[tuple[str, float, int]]:
    """The jobs of a stage for ``methods``: the sweep (each learning rate at seed 0), or the remaining
    seeds at each method's selected rate (selection.json); a one-seed method runs seed 0 at kd's rate."""
    if stage == "sweep":
        return [(m, lr, 0) for m in methods if m in PROTOCOL.methods for lr in PROTOCOL.learning_rates]
    return [run for run in selected_runs(paths, methods, "grid") if run[2] != 0 or run[0] in PROTOCOL.one_seed_methods]


def selected_runs(paths: Paths, methods: list[str], stage: str) -> list[tuple[str, float, int]]:
    """Each method's runs at its selected rate: every seed, or seed 0 at kd's rate for a one-seed method."""
    selection = read_selection(paths)
    runs = []
    for m in methods:
        if m in PROTOCOL.one_seed_methods:
            runs.append((m, selection["kd"], 0))
        elif m not in selection:
            sys.exit(f"{stage}: {m} has no selected learning rate yet (run `select --methods {m}` after its sweep)")
        else:
            runs += [(m, selection[m], s) for s in PROTOCOL.seeds]
    return runs


def read_selection(paths: Paths) -> dict[str, float]:
    path = paths.out / "selection.json"
    return json.loads(path.read_text())["learning_rate"] if path.exists() else {}


def stage_run(args, paths: Paths, settings: TaskSettings) -> None:
    from okd.io import write_json

    label = run_label(args.method, args.lr, args.seed)
    if paths.result(label).exists():
        print(f"{label}: done")
        return
    result = train_run("student", args.method, args.lr, args.seed, paths, settings, threads=args.threads)
    write_json(paths.result(label), result)
    commit_results([paths.result(label)], f"decision/{paths.task}: {label} (best validation ROUGE-L {result['best']['rouge_l']:.2f})")


def stage_grid(args, paths: Paths, settings: TaskSettings) -> None:
    """Run a stage's jobs, ``--workers`` at a time, each in its own process with one thread."""
    jobs = [j for j in plan(args.stage, paths, args.methods) if not paths.result(run_label(*j)).exists()]
    print(f"{len(jobs)} job(s) to run, {args.workers} at a time", flush=True)
    running: list[tuple[subprocess.Popen, str]] = []
    log_dir = paths.work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    while jobs or running:
        while jobs and len(running) < args.workers:
            method, lr, seed = jobs.pop(0)
            label = run_label(method, lr, seed)
            cmd = [sys.executable, __file__, "run", "--task", paths.task, "--runs", str(paths.runs), "--results", str(paths.results),
                   "--data", settings.data, "--base", str(paths.base),
                   "--method", method, "--lr", repr(lr), "--seed", str(seed), "--threads", "1"]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            log = open(log_dir / f"{label}.log", "a")
            print(f"start {label}", flush=True)
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), label))
        time.sleep(5)
        for proc, label in list(running):
            if proc.poll() is not None:
                running.remove((proc, label))
                print(f"{'done' if proc.returncode == 0 else 'FAILED'} {label} (exit {proc.returncode})", flush=True)
                if proc.returncode != 0:
                    failed.append(label)
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (logs in {log_dir})")


def stage_select(args, paths: Paths, settings: TaskSettings) -> None:
    """Each method's learning rate: the best validation score of the seed-0 sweep (validation only)."""
    from okd.io import write_json

    chosen = read_selection(paths)
    table = json.loads((paths.out / "selection.json").read_text())["validation_rouge_l"] if chosen else {}
    for method in args.methods:
        scores = {}
        for lr in PROTOCOL.learning_rates:
            path = paths.result(run_label(method, lr, 0))
            if path.exists():
                scores[lr] = json.loads(path.read_text())["best"]["rouge_l"]
        if len(scores) < len(PROTOCOL.learning_rates):
            sys.exit(f"select: {method} has {len(scores)} of {len(PROTOCOL.learning_rates)} sweep runs; run the sweep first")
        chosen[method] = max(scores, key=scores.get)
        table[method] = {lr_label(lr): s for lr, s in scores.items()}
    out = paths.out / "selection.json"
    write_json(out, {"learning_rate": chosen, "validation_rouge_l": table, "rule": "argmax of the seed-0 run's best validation ROUGE-L (2 sampling draws)"})
    commit_results([out], f"decision/{paths.task}: learning rates selected on validation")
    for method in args.methods:
        lr = chosen[method]
        print(f"{method}: {lr_label(lr)}  {table[method]}")


def test_runs(paths: Paths, methods: list[str]) -> list[tuple[str, float, int]]:
    """The runs whose students are scored on test: each method's selected rate at its seeds."""
    runs = selected_runs(paths, methods, "test")
    missing = [run_label(*r) for r in runs if not paths.result(run_label(*r)).exists()]
    if missing:
        sys.exit(f"test: not trained yet: {', '.join(missing)}; test scores wait until every seed of a method is trained")
    return runs


def stage_test(args, paths: Paths, settings: TaskSettings) -> None:
    """Score each selected run's best-validation student once on the whole test split (greedy and the
    protocol's sampling draws, per example). A student no longer on disk is trained again first; its
    validation curve must equal the committed one."""
    import torch

    from okd.evaluation import GenerationConfig, evaluate

    torch.set_num_threads(args.threads)
    for method, lr, seed in test_runs(paths, args.methods):
        label = run_label(method, lr, seed)
        out = paths.out / "test" / f"{label}.json"
        if out.exists():
            print(f"{label}: test scores exist ({out}); not recomputed")
            continue
        best = paths.run_dir(label) / "best_student"
        if not (best / "config.json").exists():
            committed = json.loads(paths.result(label).read_text())
            shutil.rmtree(paths.run_dir(label), ignore_errors=True)
            print(f"{label}: student not on disk; training it again", flush=True)
            again = train_run("student", method, lr, seed, paths, settings, threads=args.threads)
            same = [round(a["rouge_l"], 6) for a in again["curve"]] == [round(b["rouge_l"], 6) for b in committed["curve"]]
            if not same:
                sys.exit(f"{label}: the repeated run's validation curve differs from the committed one; not scored (see docs/results/protocol.md)")
        evaluate(model=str(best), data=str(Path(settings.data) / "test.jsonl"), seeds=str(PROTOCOL.test_draws[0]),
                 samples=len(PROTOCOL.test_draws), greedy=True, name=method, json_out=str(out), max_length=settings.max_length,
                 generation=GenerationConfig(max_new_tokens=settings.max_new_tokens, batch_size=32), progress=False)
        commit_results([out], f"decision/{paths.task}: test scores of {label} (greedy + {len(PROTOCOL.test_draws)} draws, per example)")
        print(f"{label}: test scores in {out}", flush=True)


def stage_dose(args, paths: Paths, settings: TaskSettings) -> None:
    """The dose-response on validation: each module strength at okd's selected rate and seed 0, with
    what the module did to the teacher. The first level is the preset's seed-0 run itself."""
    import torch

    from okd.io import write_json

    torch.set_num_threads(args.threads)
    lr = read_selection(paths).get("okd")
    if lr is None:
        sys.exit("dose: okd has no selected learning rate yet (select --methods okd)")
    out_path = paths.out / "dose_response.json"
    table = json.loads(out_path.read_text()) if out_path.exists() else {}
    for level, (module_lr, student_weight) in DOSE_LEVELS.items():
        label = run_label(level, lr, 0)
        if label in table:
            continue
        if not paths.result(label).exists():
            write_json(paths.result(label), train_run("student", level, lr, 0, paths, settings, threads=args.threads))
        run = json.loads(paths.result(label).read_text())
        module = paths.run_dir(label) / "best_online_module"
        if not module.exists():
            sys.exit(f"dose: {module} is gone; train {label} again (delete its result file) to measure it")
        table[label] = {"module_learning_rate": module_lr, "student_weight": student_weight,
                        "validation_rouge_l": run["best"]["rouge_l"], "validation_greedy_rouge_l": run["best"]["greedy_rouge_l"],
                        **adapted_teacher_metrics(paths.teacher, module, settings)}
        write_json(out_path, table)
        commit_results([out_path, paths.result(label)], f"decision/{paths.task}: dose-response level {level}")
        print(f"{label}: validation ROUGE-L {table[label]['validation_rouge_l']:.2f}, adapted teacher KL from frozen "
              f"{table[label]['validation_teacher_kl_from_frozen']:.4f}", flush=True)


def stage_status(args, paths: Paths, settings: TaskSettings) -> None:
    done = sorted(p.stem for p in (paths.out / "runs").glob("*.json"))
    print(f"teacher: {'done' if (paths.out / 'teacher.json').exists() else 'not yet'}; {len(done)} finished run(s)")
    for label in done:
        r = json.loads(paths.result(label).read_text())
        print(f"  {label}: best {r['best']['rouge_l']:.2f} at epoch {r['best']['epoch']:.1f}, {r['train_seconds'] / 3600:.2f} h training, {r['stop_reason']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("teacher", "prepare", "run", "grid", "select", "test", "dose", "status"))
    parser.add_argument("--task", choices=tuple(TASKS), required=True)
    parser.add_argument("--runs", default="runs/decision", help="models, checkpoints and logs (not committed)")
    parser.add_argument("--results", default="docs/results/decision", help="per-run results (committed)")
    parser.add_argument("--data", default=None, help="the task's data directory (default: runs/data/<task>)")
    parser.add_argument("--base", default="runs/models/base", help="the converted SmolLM2-135M-Instruct (`okd model convert smollm2`)")
    parser.add_argument("--stage", dest="grid_stage", choices=("sweep", "seeds"), default="sweep")
    parser.add_argument("--methods", default=",".join(PROTOCOL.methods), help="comma-separated methods of grid / select")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--method", default="kd")
    parser.add_argument("--lr", type=float, default=1.5e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.stage = args.grid_stage
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in PROTOCOL.methods + PROTOCOL.one_seed_methods]
    if unknown:
        sys.exit(f"--methods: unknown {', '.join(unknown)} (the protocol's: {', '.join(PROTOCOL.methods + PROTOCOL.one_seed_methods)})")
    settings = TASKS[args.task]
    if args.data:
        settings = TaskSettings(**{**asdict(settings), "data": args.data})
    if not (Path(settings.data) / "train.jsonl").exists():
        sys.exit(f"{settings.data}/train.jsonl not found: build it with `okd data build --task {args.task}` or pass --data")
    paths = Paths(args.task, Path(args.runs), Path(args.results), Path(args.base))
    {"teacher": stage_teacher, "prepare": stage_prepare, "run": stage_run, "grid": stage_grid,
     "select": stage_select, "test": stage_test, "dose": stage_dose, "status": stage_status}[args.command](args, paths, settings)


if __name__ == "__main__":
    main()
