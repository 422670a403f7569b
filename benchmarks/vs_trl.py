"""Seconds per training step: okd's `gkd` preset vs TRL's `GKDTrainer`, same models, data and settings.

Usage:
    python benchmarks/vs_trl.py              # full run (a few minutes on 2 CPU cores)
    python benchmarks/vs_trl.py --quick      # smoke test
    python benchmarks/vs_trl.py --device cuda --sizes medium:small,large:medium
    python benchmarks/vs_trl.py --sizes "" --real --steps 3 --rounds 1   # the real tier only

Needs the optional extra: ``pip install -c constraints-cpu.txt -e '.[compare]'``.

What is held equal: the teacher and student (the same randomly initialised Llama-style models, saved
once and loaded by both), the tokenizer, the built-in training examples (already tokenized, batched by
the same collation: right-padded sequences plus left-padded prompts), batch size, AdamW learning rate,
generalized JSD with beta 0.5 at loss temperature 1, sampling at temperature 0.9 with top-p 1 and
top-k off, the same fixed number of new tokens, fp32, dropout off, one process, the same torch threads.
With ``--real`` also the real tier: SmolLM2-135M-Instruct (converted from the installed package) as the
teacher and a 10-layer student shrunk from it (``okd.pretrained``), with SmolLM2's tokenizer and chat
template.

GKD flips a coin per step (probability lambda of a student-generated batch), and the two libraries
flip different coins, so a run at lambda 0.5 compares different numbers of generating steps. The
benchmark therefore times lambda = 0 (ground truth only) and lambda = 1 (every step generates)
separately; the expected cost of a step at GKD's default lambda = 0.5 is their mean, and the headline
ratio is ours / TRL's on that expected cost.

The one thing not held equal is how each library decodes: TRL calls Hugging Face ``generate``, okd its
own KV-cached loop (``okd.generation``: the same greedy tokens, samples from the same distribution).

TRL's ``GKDConfig`` turns gradient checkpointing on by default, and with it GKDTrainer generates
without the KV cache. okd does neither, so the equal-settings comparison turns it off for TRL; TRL
with its defaults is timed as well and reported beside it.

A step is timed end to end, from the end of the previous step to the end of this one: fetching and
collating the batch, generation when the coin says so, both forwards, the loss, backward and the
optimizer step. For TRL that is the interval between consecutive ``on_step_end`` callbacks; for okd
the same interval in a loop that does what ``Distiller._loop`` does per step (without its logging).
The implementations alternate for ``--rounds`` rounds so that drift in the machine's speed affects
both. Writes ``benchmarks/results/vs_trl.json`` and a markdown table next to it.
"""

from __future__ import annotations

import argparse
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
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402

from okd.config import DataConfig, MethodConfig, ModelConfig, SamplingConfig, TrainConfig  # noqa: E402
from okd.data import Collator, InstructionDataset, collate_prompts, read_jsonl  # noqa: E402
from _cache import CACHE, builtin_data_and_tokenizer  # noqa: E402

from okd.evaluation import write_json_atomic  # noqa: E402
from okd.models import build_model, count_parameters, load_tokenizer, save_pretrained_atomic  # noqa: E402
from okd.training import Distiller  # noqa: E402

ROOT = Path(__file__).resolve().parent
# okd; TRL with okd's settings; TRL with its own defaults (gradient checkpointing on).
IMPLEMENTATIONS = ("okd", "trl", "trl_defaults")


def _import_trl():
    try:
        import trl
    except ImportError:
        sys.exit("TRL is not installed: pip install -c constraints-cpu.txt -e '.[compare]'")
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:  # TRL releases before GKD moved to trl.experimental
        from trl import GKDConfig, GKDTrainer
    return trl.__version__, GKDConfig, GKDTrainer


class TrlCollator:
    """Our training collation plus the left-padded ``prompts`` that GKDTrainer generates from."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self.sequences = Collator(pad_token_id)

    def __call__(self, features):
        batch = self.sequences(features)
        batch.pop("index", None)
        prompts = collate_prompts([f["prompt_ids"] for f in features], self.pad_token_id)
        batch["prompts"] = prompts["input_ids"]
        batch["prompt_attention_mask"] = prompts["attention_mask"]
        return batch


def time_okd(setting: dict, lmbda: float, args, workdir: Path) -> list[float]:
    distiller = Distiller(
        model=ModelConfig(teacher=setting["teacher"], tokenizer=setting["tokenizer"], student=setting["student"]),
        method=MethodConfig(name="gkd"),  # generalized JSD, beta 0.5
        data=DataConfig(train_file=setting["train"], validation_file=None, max_length=args.max_length),
        train=TrainConfig(
            max_steps=args.warmup + args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
            log_every=10**9, seed=args.seed,
        ),
        sampling=SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.9, top_p=1.0, on_policy_ratio=lmbda),
        output_dir=str(workdir / f"okd-{lmbda}"),
        overwrite=True,
        progress=False,
    )
    device = distiller.accelerator.device
    ends = [time.perf_counter()]
    for step in range(1, args.warmup + args.steps + 1):
        distiller.step = step
        batch = {k: v.to(device) for k, v in distiller.source.next_batch().items()}
        distiller.training_step(batch, False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
    return [b - a for a, b in zip(ends, ends[1:])][args.warmup :]


def time_trl(setting: dict, lmbda: float, args, workdir: Path, trl_classes, checkpointing: bool = False) -> list[float]:
    from transformers import AutoModelForCausalLM, TrainerCallback

    _, GKDConfig, GKDTrainer = trl_classes
    tokenizer = load_tokenizer(setting["tokenizer"])
    from datasets import Dataset

    # The same tokenized examples okd trains on (SFTTrainer insists on a `datasets.Dataset`).
    examples = InstructionDataset(read_jsonl(setting["train"], tokenizer), tokenizer, args.max_length)  # chat template as okd
    dataset = Dataset.from_list(
        [{k: examples[i][k] for k in ("input_ids", "labels", "prompt_ids")} for i in range(len(examples))]
    )
    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            ends.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    config = GKDConfig(
        output_dir=str(workdir / f"trl-{lmbda}"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        lmbda=lmbda,
        beta=0.5,
        temperature=0.9,
        max_new_tokens=args.max_new_tokens,
        max_length=args.max_length,
        disable_dropout=True,
        seq_kd=False,
        # TRL's SFTConfig turns gradient checkpointing on by default, and GKDTrainer then also generates
        # WITHOUT the KV cache. okd does neither, so the equal-settings run turns it off; the
        # "TRL defaults" run keeps it, as a user who changes nothing gets it.
        gradient_checkpointing=checkpointing,
        seed=args.seed,
        use_cpu=args.device == "cpu" or not torch.cuda.is_available(),
        bf16=False,
        fp16=False,
        save_strategy="no",
        logging_steps=10**6,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = GKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(setting["student"], dtype=torch.float32),
        teacher_model=AutoModelForCausalLM.from_pretrained(setting["teacher"], dtype=torch.float32),
        args=config,
        data_collator=TrlCollator(tokenizer.pad_token_id),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepClock()],
    )
    trainer.train()
    return [b - a for a, b in zip(ends, ends[1:])][args.warmup :]


def toy_setting(teacher_size: str, student_size: str, args, workdir: Path, train_file: str, tokenizer_dir, tokenizer) -> tuple[dict, dict]:
    """Randomly initialised Llama-style teacher and student of the given toy sizes, saved under ``workdir``."""
    setting = {"train": train_file, "tokenizer": str(tokenizer_dir)}
    entry = {"teacher_size": teacher_size, "student_size": student_size}
    for role, size in (("teacher", teacher_size), ("student", student_size)):
        torch.manual_seed(args.seed)
        model = build_model("llama", size, vocab_size=len(tokenizer), max_positions=args.max_length)
        setting[role] = str(workdir / role)
        save_pretrained_atomic(model, tokenizer, workdir / role)
        entry[f"{role}_parameters"] = count_parameters(model)
    return setting, entry


def real_setting(train_file: str) -> tuple[dict, dict]:
    """SmolLM2-135M-Instruct and a 10-of-30-layer student shrunk from it (cached under benchmarks/results/.cache)."""
    from okd.models import load_model
    from okd.pretrained import convert, shrink

    teacher_dir = convert("smollm2", str(CACHE / "smollm2-135m"))  # the directories step_time_real.py uses
    student_dir = shrink(str(teacher_dir), str(CACHE / "smollm2-135m-10layers"), layers=10)
    entry = {"teacher_size": "SmolLM2-135M", "student_size": "SmolLM2 10 layers"}
    for role, path in (("teacher", teacher_dir), ("student", student_dir)):
        entry[f"{role}_parameters"] = count_parameters(load_model(str(path)))
    return {"train": train_file, "tokenizer": str(teacher_dir), "teacher": str(teacher_dir), "student": str(student_dir)}, entry


def summary(times: list[float]) -> dict:
    return {"median_seconds": statistics.median(times), "mean_seconds": statistics.mean(times), "steps": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small:tiny,medium:small", help="teacher:student size pairs")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per implementation, lambda and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2, help="okd and TRL alternate this many times")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default=str(ROOT / "results" / "vs_trl.json"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    parser.add_argument("--note", default="", help="a remark printed under the table (e.g. the machine's load)")
    parser.add_argument("--skip-trl-defaults", action="store_true", help="time TRL with equal settings only (saves a third)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps")
    parser.add_argument("--real", action="store_true", help="also the real tier (SmolLM2-135M -> 10 of its layers)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.sizes, args.steps, args.warmup, args.rounds, args.vocab_size, args.max_new_tokens = "tiny:nano", 2, 1, 1, 1024, 8
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    trl_classes = _import_trl()

    paths, tokenizer_dir, tokenizer = builtin_data_and_tokenizer(args.vocab_size)

    results = {
        "command": " ".join(["python", "benchmarks/vs_trl.py", *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "trl": trl_classes[0],
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else None,
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "sizes": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pairs = [pair.split(":") for pair in args.sizes.split(",") if pair] + ([["real", "real"]] if args.real else [])
        for teacher_size, student_size in pairs:
            if teacher_size == "real":
                setting, entry = real_setting(str(paths["train"]))
            else:
                setting, entry = toy_setting(teacher_size, student_size, args, workdir, str(paths["train"]), tokenizer_dir, tokenizer)
            pair = f"{entry['teacher_size']}:{entry['student_size']}"
            impls = [impl for impl in IMPLEMENTATIONS if impl != "trl_defaults" or not args.skip_trl_defaults]
            times = {(impl, lmbda): [] for impl in impls for lmbda in (0.0, 1.0)}
            for _ in range(args.rounds):
                for lmbda in (0.0, 1.0):
                    times[("okd", lmbda)] += time_okd(setting, lmbda, args, workdir)
                    times[("trl", lmbda)] += time_trl(setting, lmbda, args, workdir, trl_classes)
                    if "trl_defaults" in impls:
                        times[("trl_defaults", lmbda)] += time_trl(setting, lmbda, args, workdir, trl_classes, checkpointing=True)
                    print(
                        f"{pair} lambda {lmbda:g} (median ms per step so far): "
                        + ", ".join(f"{impl} {statistics.median(times[(impl, lmbda)]) * 1000:.0f}" for impl in impls),
                        flush=True,
                    )
            for impl in impls:
                entry[impl] = {f"lambda_{lmbda:g}": summary(times[(impl, lmbda)]) for lmbda in (0.0, 1.0)}
                # Expected seconds per step at GKD's default lambda = 0.5.
                entry[impl]["lambda_0.5_expected_seconds"] = statistics.mean(
                    entry[impl][f"lambda_{lmbda:g}"]["median_seconds"] for lmbda in (0.0, 1.0)
                )
            entry["okd_over_trl"] = {
                f"lambda_{lmbda:g}": entry["okd"][f"lambda_{lmbda:g}"]["median_seconds"] / entry["trl"][f"lambda_{lmbda:g}"]["median_seconds"]
                for lmbda in (0.0, 1.0)
            }
            entry["okd_over_trl"]["lambda_0.5_expected"] = (
                entry["okd"]["lambda_0.5_expected_seconds"] / entry["trl"]["lambda_0.5_expected_seconds"]
            )
            if "trl_defaults" in impls:
                entry["okd_over_trl_defaults_lambda_0.5_expected"] = (
                    entry["okd"]["lambda_0.5_expected_seconds"] / entry["trl_defaults"]["lambda_0.5_expected_seconds"]
                )
            results["sizes"].append(entry)

    write_json_atomic(args.out, results)
    machine = results["machine"]
    lines = [
        f"Command: `{results['command']}`; machine: {machine['platform']}, {machine['cpu_count']} CPUs, "
        f"torch {machine['torch']} ({machine['torch_threads']} threads), TRL {machine['trl']}"
        + (f", {machine['cuda']}" if machine["cuda"] else ""),
        "",
        "| teacher -> student | lambda | okd s/step | TRL s/step (equal settings) | okd / TRL | TRL defaults s/step (gradient checkpointing, no KV cache) | okd / TRL defaults |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in results["sizes"]:
        name = f"{e['teacher_size']} ({e['teacher_parameters'] / 1e6:.1f}M) -> {e['student_size']} ({e['student_parameters'] / 1e6:.1f}M)"
        for lmbda in ("0", "1"):
            ours, theirs, default = (e[impl][f"lambda_{lmbda}"]["median_seconds"] if impl in e else float("nan") for impl in IMPLEMENTATIONS)
            lines.append(f"| {name} | {lmbda} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f} | {default:.3f} | {ours / default:.2f} |")
        ours, theirs, default = (e[impl]["lambda_0.5_expected_seconds"] if impl in e else float("nan") for impl in IMPLEMENTATIONS)
        lines.append(
            f"| {name} | 0.5 (expected) | {ours:.3f} | {theirs:.3f} | **{ours / theirs:.2f}** | {default:.3f} | {ours / default:.2f} |"
        )
    if args.note:
        lines += ["", args.note]
    table = "\n".join(lines)
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
