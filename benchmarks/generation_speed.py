"""Where generation time goes, and what makes it faster: okd's decoding loop vs Hugging Face ``generate``.

Usage:
    python benchmarks/generation_speed.py            # toy tier (a few minutes on 2 CPU cores)
    python benchmarks/generation_speed.py --real     # + SmolLM2-135M teacher, 10-layer shrunk student
    python benchmarks/generation_speed.py --quick    # smoke test

A sampling micro-benchmark (``torch.multinomial`` vs okd's inverse-CDF draw) and four measurements, each written to ``benchmarks/results/generation_speed.json`` and a markdown table:

1. ``gkd_step``: one `gkd` step at lambda 1 (every step generates), split into the source's
   ``next_batch`` (the student's generation plus collation) and ``training_step`` (both forwards,
   the loss, backward, optimizer step), with each generation backend.
2. ``backend``: ``generate_batched`` on one batch (the on-policy source's call: batch 8, 64 new
   tokens, temperature 0.9, top-p 1, top-k off), ``backend="hf"`` vs ``"okd"``, alternating.
3. ``group_by_length``: many prompts in batches of 8 (SeqKD's cache, evaluation), prompts in data
   order vs sorted by length; okd backend, greedy, so that only the padding differs.
4. ``static_and_compile``: HF ``generate`` with a static KV cache, and okd's loop with the model's
   forward under ``torch.compile(dynamic=True)`` (compile time reported apart from steady state).
5. ``decode_loop``: okd's loop itself on one batch (8 prompts, 64 new tokens, T 0.9), in three
   variants, alternating: the concatenating ``DynamicCache`` under ``no_grad`` (the loop before the
   preallocated cache), the preallocated cache under ``no_grad``, and the preallocated cache under
   ``inference_mode`` (okd's loop); greedy tokens are checked equal across the three.

Random models rarely emit EOS, so every row uses the whole budget: the numbers are per-token
decoding cost, the case where the per-step overhead matters most.
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

import torch  # noqa: E402

import okd.generation  # noqa: E402
from _cache import CACHE, builtin_data_and_tokenizer  # noqa: E402
from okd.data import InstructionDataset, read_jsonl  # noqa: E402
from okd.evaluation import write_json_atomic  # noqa: E402
from okd.generation import generate_batched  # noqa: E402
from okd.models import build_model, count_parameters, load_model, load_tokenizer, save_pretrained_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parent


def clock(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def med(times: list[float]) -> float:
    return statistics.median(times)


def prompts_of(train_file: str, tokenizer, max_length: int, n: int) -> list[list[int]]:
    dataset = InstructionDataset(read_jsonl(train_file), tokenizer, max_length)
    return [dataset[i]["prompt_ids"] for i in range(min(n, len(dataset)))]


def bench_backend(model, prompts, tokenizer, args) -> dict:
    kwargs = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  max_new_tokens=args.max_new_tokens, temperature=0.9, top_p=1.0, seed=0)
    times = {"hf": [], "okd": []}
    tokens = {}
    for backend in ("hf", "okd"):  # warm-up
        tokens[backend] = sum(len(r) for r in generate_batched(model, prompts, backend=backend, **kwargs))
    for _ in range(args.repeats):
        for backend in ("hf", "okd"):
            times[backend] += clock(lambda: generate_batched(model, prompts, backend=backend, **kwargs), 1)
    return {
        "batch": len(prompts), "max_new_tokens": args.max_new_tokens, "new_tokens": tokens,
        "hf_seconds": med(times["hf"]), "okd_seconds": med(times["okd"]),
        "okd_over_hf": med(times["okd"]) / med(times["hf"]),
        "same_samples_for_the_seed": generate_batched(model, prompts, backend="hf", **kwargs) == generate_batched(model, prompts, backend="okd", **kwargs),
    }


def bench_sampling(args) -> dict:
    """One draw per row from [8, vocab] probabilities: torch.multinomial (what generate calls) vs
    okd's inverse-CDF ``_sample`` (softmax included in both)."""
    from okd.generation import _sample

    out = {}
    for vocab in (8192, 49152):
        scores = torch.randn(8, vocab)
        n = 20 * args.repeats
        multinomial = min(clock(lambda: [torch.multinomial(torch.softmax(scores, -1), 1) for _ in range(n)], 3)) / n
        inverse_cdf = min(clock(lambda: [_sample(scores) for _ in range(n)], 3)) / n
        out[str(vocab)] = {"multinomial_ms": multinomial * 1e3, "inverse_cdf_ms": inverse_cdf * 1e3}
    return out


def bench_grouping(model, prompts, tokenizer, args) -> dict:
    kwargs = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  max_new_tokens=args.max_new_tokens // 2, do_sample=False, batch_size=8, backend="okd")

    def padding(order):
        batches = [order[i : i + 8] for i in range(0, len(order), 8)]
        cells = sum(len(b) * max(len(prompts[j]) for j in b) for b in batches)
        return 1 - sum(len(p) for p in prompts) / cells

    plain_order = list(range(len(prompts)))
    sorted_order = sorted(plain_order, key=lambda i: len(prompts[i]))
    times = {False: [], True: []}
    for _ in range(max(1, args.repeats // 2)):
        for grouped in (False, True):
            times[grouped] += clock(lambda: generate_batched(model, prompts, group_by_length=grouped, **kwargs), 1)
    return {
        "prompts": len(prompts), "batch_size": 8, "max_new_tokens": kwargs["max_new_tokens"],
        "prompt_lengths": [min(map(len, prompts)), max(map(len, prompts))],
        "padding_fraction_plain": padding(plain_order), "padding_fraction_grouped": padding(sorted_order),
        "plain_seconds": med(times[False]), "grouped_seconds": med(times[True]),
        "grouped_over_plain": med(times[True]) / med(times[False]),
    }


def bench_static_and_compile(model, prompts, tokenizer, args) -> dict:
    from okd.data.instruction import collate_prompts

    batch = collate_prompts(prompts, tokenizer.pad_token_id)
    common = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    out: dict = {}
    with torch.no_grad():
        dynamic = lambda: model.generate(**batch, **common)  # noqa: E731
        static = lambda: model.generate(**batch, cache_implementation="static", **common)  # noqa: E731
        try:
            static()
            t = {"dynamic": [], "static": []}
            for _ in range(args.repeats):
                t["dynamic"] += clock(dynamic, 1)
                t["static"] += clock(static, 1)
            out["hf_dynamic_cache_seconds"] = med(t["dynamic"])
            out["hf_static_cache_seconds"] = med(t["static"])
        except Exception as error:  # noqa: BLE001 - reported, not fatal
            out["hf_static_cache_error"] = f"{type(error).__name__}: {error}"[:300]
    kwargs = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=None, max_new_tokens=args.max_new_tokens, do_sample=False, backend="okd")
    eager = clock(lambda: generate_batched(model, prompts, **kwargs), args.repeats)
    out["okd_eager_seconds"] = med(eager)
    if args.no_compile:
        return out
    original = model.forward
    try:
        model.forward = torch.compile(original, dynamic=True)
        start = time.perf_counter()
        reference = generate_batched(model, prompts, **{**kwargs, "backend": "okd"})
        out["okd_compiled_first_call_seconds"] = time.perf_counter() - start
        out["okd_compiled_seconds"] = med(clock(lambda: generate_batched(model, prompts, **kwargs), args.repeats))
        model.forward = original
        out["okd_compiled_same_tokens"] = reference == generate_batched(model, prompts, **kwargs)
    except Exception as error:  # noqa: BLE001
        out["okd_compiled_error"] = f"{type(error).__name__}: {error}"[:300]
    finally:
        model.forward = original
    return out


def bench_decode_loop(model, prompts, tokenizer, args) -> dict:
    from transformers import DynamicCache

    from okd.data.instruction import collate_prompts

    batch = collate_prompts(prompts, tokenizer.pad_token_id)
    preallocated = okd.generation._preallocated_cache
    variants = {  # name: (cache factory, grad-mode context)
        "concatenating_no_grad": (lambda model, capacity: DynamicCache(config=model.config), torch.no_grad),
        "preallocated_no_grad": (preallocated, torch.no_grad),
        "preallocated_inference_mode": (preallocated, torch.inference_mode),
    }

    def run(name: str, sample: bool = True) -> torch.Tensor:
        factory, context = variants[name]
        okd.generation._preallocated_cache = factory
        try:
            with context():
                return okd.generation._decode(
                    model, batch["input_ids"], batch["attention_mask"], eos=set(), pad_token_id=tokenizer.pad_token_id,
                    max_new_tokens=args.max_new_tokens, sample=sample, temperature=0.9, top_p=1.0,
                ).clone()
        finally:
            okd.generation._preallocated_cache = preallocated

    greedy = {name: run(name, sample=False) for name in variants}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name in variants:
            times[name] += clock(lambda: run(name), 1)
    out = {f"{name}_seconds": med(t) for name, t in times.items()}
    out["same_greedy_tokens"] = all(torch.equal(greedy["concatenating_no_grad"], g) for g in greedy.values())
    out["today_over_concatenating"] = out["preallocated_inference_mode_seconds"] / out["concatenating_no_grad_seconds"]
    return out


def bench_gkd_step(teacher_dir, student_dir, tokenizer_dir, train_file, args) -> dict:
    from okd.config import DataConfig, MethodConfig, ModelConfig, SamplingConfig, TrainConfig
    from okd.training import Distiller

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("hf", "okd"):
            okd.generation.DEFAULT_BACKEND = backend
            distiller = Distiller(
                model=ModelConfig(teacher=str(teacher_dir), tokenizer=str(tokenizer_dir), student=str(student_dir)),
                method=MethodConfig(name="gkd"),
                data=DataConfig(train_file=str(train_file), validation_file=None, max_length=args.max_length),
                train=TrainConfig(max_steps=10**6, batch_size=8, learning_rate=1e-4, log_every=10**9, seed=0),
                sampling=SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.9, top_p=1.0, on_policy_ratio=1.0),
                output_dir=str(Path(tmp) / backend), overwrite=True, progress=False,
            )
            device = distiller.accelerator.device
            generate, train = [], []
            for step in range(1, args.steps + 2):
                distiller.step = step
                start = time.perf_counter()
                batch = {k: v.to(device) for k, v in distiller.source.next_batch().items()}
                middle = time.perf_counter()
                distiller.training_step(batch, False)
                end = time.perf_counter()
                if step > 1:  # the first step warms up
                    generate.append(middle - start)
                    train.append(end - middle)
            result[backend] = {
                "next_batch_seconds": med(generate), "training_step_seconds": med(train),
                "generation_share": med(generate) / (med(generate) + med(train)),
            }
    okd.generation.DEFAULT_BACKEND = "auto"
    result["step_okd_over_hf"] = sum(result["okd"][k] for k in ("next_batch_seconds", "training_step_seconds")) / sum(
        result["hf"][k] for k in ("next_batch_seconds", "training_step_seconds")
    )
    return result


def tier_toy(args, workdir: Path) -> list[dict]:
    paths, tokenizer_dir, tokenizer = builtin_data_and_tokenizer(8192)
    prompts = prompts_of(paths["train"], tokenizer, args.max_length, 64)
    entries = []
    for teacher_size, student_size in (pair.split(":") for pair in args.sizes.split(",")):
        dirs = {}
        for role, size in (("teacher", teacher_size), ("student", student_size)):
            torch.manual_seed(0)
            model = build_model("llama", size, vocab_size=len(tokenizer), max_positions=args.max_length)
            dirs[role] = workdir / f"{role}-{size}"
            save_pretrained_atomic(model, tokenizer, dirs[role])
        student = load_model(str(dirs["student"])).eval()
        entry = {"tier": "toy", "teacher": teacher_size, "student": student_size, "student_parameters": count_parameters(student)}
        print(f"toy {teacher_size}->{student_size}", flush=True)
        entry["backend"] = bench_backend(student, prompts[:8], tokenizer, args)
        print(" backend", entry["backend"], flush=True)
        entry["group_by_length"] = bench_grouping(student, prompts, tokenizer, args)
        print(" group_by_length", entry["group_by_length"], flush=True)
        # torch.compile only for the first pair: its compile time alone is minutes on 2 loaded cores.
        no_compile, args.no_compile = args.no_compile, args.no_compile or bool(entries)
        entry["static_and_compile"] = bench_static_and_compile(student, prompts[:8], tokenizer, args)
        args.no_compile = no_compile
        print(" static_and_compile", entry["static_and_compile"], flush=True)
        entry["decode_loop"] = bench_decode_loop(student, prompts[:8], tokenizer, args)
        print(" decode_loop", entry["decode_loop"], flush=True)
        entry["gkd_step"] = bench_gkd_step(dirs["teacher"], dirs["student"], tokenizer_dir, paths["train"], args)
        print(" gkd_step", entry["gkd_step"], flush=True)
        entries.append(entry)
    return entries


def tier_real(args) -> list[dict]:
    from okd.pretrained import convert, shrink

    teacher_dir = convert("smollm2", str(CACHE / "smollm2"))
    student_dir = shrink(str(teacher_dir), str(CACHE / "smollm2-10layers"), layers=10)
    tokenizer = load_tokenizer(str(teacher_dir))
    paths, _, _ = builtin_data_and_tokenizer(8192)
    prompts = prompts_of(paths["train"], tokenizer, args.max_length, 32)
    student = load_model(str(student_dir)).eval()
    entry = {"tier": "real", "teacher": "SmolLM2-135M", "student": "SmolLM2 10 layers", "student_parameters": count_parameters(student)}
    print("real", flush=True)
    entry["backend"] = bench_backend(student, prompts[:8], tokenizer, args)
    print(" backend", entry["backend"], flush=True)
    entry["group_by_length"] = bench_grouping(student, prompts, tokenizer, args)
    print(" group_by_length", entry["group_by_length"], flush=True)
    entry["decode_loop"] = bench_decode_loop(student, prompts[:8], tokenizer, args)
    print(" decode_loop", entry["decode_loop"], flush=True)
    entry["gkd_step"] = bench_gkd_step(teacher_dir, student_dir, teacher_dir, paths["train"], args)
    print(" gkd_step", entry["gkd_step"], flush=True)
    return [entry]


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Command: `{results['command']}`; machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} "
             f"({m['torch_threads']} threads), transformers {m['transformers']}; {results['note']}", ""]
    lines += ["| vocab | softmax + torch.multinomial ms (8 rows) | okd inverse-CDF ms |", "|---:|---:|---:|"]
    for vocab, r in results["sampling"].items():
        lines.append(f"| {vocab} | {r['multinomial_ms']:.2f} | {r['inverse_cdf_ms']:.2f} |")
    lines += ["", "| tier | student | gkd step at lambda 1, HF generate: generation / rest (s) | generation share | okd loop: generation / rest (s) | step okd / HF |",
              "|---|---|---:|---:|---:|---:|"]
    for e in results["entries"]:
        g = e["gkd_step"]
        lines.append(f"| {e['tier']} | {e['student']} ({e['student_parameters'] / 1e6:.1f}M) | {g['hf']['next_batch_seconds']:.3f} / "
                     f"{g['hf']['training_step_seconds']:.3f} | {g['hf']['generation_share']:.0%} | {g['okd']['next_batch_seconds']:.3f} / "
                     f"{g['okd']['training_step_seconds']:.3f} | {g['step_okd_over_hf']:.2f} |")
    lines += ["", "| tier | student | one batch (8 x 64 new tokens, T 0.9): HF generate s | okd loop s | okd / HF | same draws for the seed (expected False: inverse-CDF draw) |",
              "|---|---|---:|---:|---:|---|"]
    for e in results["entries"]:
        b = e["backend"]
        lines.append(f"| {e['tier']} | {e['student']} | {b['hf_seconds']:.3f} | {b['okd_seconds']:.3f} | {b['okd_over_hf']:.2f} | {b['same_samples_for_the_seed']} |")
    lines += ["", "| tier | student | prompts (lengths) | padding: data order / grouped | data order s | grouped s | grouped / data order |",
              "|---|---|---|---:|---:|---:|---:|"]
    for e in results["entries"]:
        g = e["group_by_length"]
        lines.append(f"| {e['tier']} | {e['student']} | {g['prompts']} in batches of 8, {g['max_new_tokens']} new ({g['prompt_lengths'][0]}-{g['prompt_lengths'][1]}) | "
                     f"{g['padding_fraction_plain']:.0%} / {g['padding_fraction_grouped']:.0%} | {g['plain_seconds']:.3f} | {g['grouped_seconds']:.3f} | {g['grouped_over_plain']:.2f} |")
    lines += ["", "| tier | student | HF dynamic cache s | HF static cache s | okd loop eager s | okd loop, torch.compile: first call s | compiled steady s |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for e in results["entries"]:
        s = e.get("static_and_compile")
        if not s:
            continue
        f = lambda k: f"{s[k]:.3f}" if k in s else "n/a"  # noqa: E731
        lines.append(f"| {e['tier']} | {e['student']} | {f('hf_dynamic_cache_seconds')} | {f('hf_static_cache_seconds')} | {f('okd_eager_seconds')} | "
                     f"{f('okd_compiled_first_call_seconds')} | {f('okd_compiled_seconds')} |")
    lines += ["", "| tier | student | okd loop (one batch of 8, T 0.9): concatenating cache, no_grad s | preallocated, no_grad s | "
              "preallocated, inference_mode s (today) | today / concatenating | same greedy tokens |", "|---|---|---:|---:|---:|---:|---|"]
    for e in results["entries"]:
        d = e.get("decode_loop")
        if d:
            lines.append(f"| {e['tier']} | {e['student']} | {d['concatenating_no_grad_seconds']:.3f} | {d['preallocated_no_grad_seconds']:.3f} | "
                         f"{d['preallocated_inference_mode_seconds']:.3f} | {d['today_over_concatenating']:.2f} | {d['same_greedy_tokens']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small:tiny,medium:small", help="toy teacher:student pairs")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--steps", type=int, default=6, help="timed gkd steps per backend")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--real", action="store_true", help="also the real tier (SmolLM2-135M)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--note", default="machine shared with other jobs (numbers are relative, measured in one run)")
    parser.add_argument("--out", default=str(ROOT / "results" / "generation_speed.json"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.sizes, args.repeats, args.steps, args.max_new_tokens, args.no_compile = "tiny:nano", 1, 1, 8, True
    import transformers

    results = {
        "command": " ".join(["python", "benchmarks/generation_speed.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__},
        "note": args.note,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    results["sampling"] = bench_sampling(args)
    print("sampling", results["sampling"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:  # --sizes "" skips the toy tier
        results["entries"] = tier_toy(args, Path(tmp)) if args.sizes else []
    if args.real:
        results["entries"] += tier_real(args)
    write_json_atomic(args.out, results)
    table = markdown(results)
    Path(args.out).with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
