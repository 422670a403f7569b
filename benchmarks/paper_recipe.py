"""Paper-scale recipe on one GPU: GPT-2 XL (1.5B) -> GPT-2 (124M) on databricks-dolly-15k, as in MiniLLM / DistiLLM.

    python benchmarks/paper_recipe.py --data-root PATH [--out runs/paper] [--methods sft,kd,...] [--dry-run]

``--data-root`` is a local copy of MiniLLM's data (the directory holding its ``data/`` and
``processed_data/``; LAYOUT below and docs/guide/paper-recipe.md say which files and where they come
from). Nothing is downloaded: the models are hub ids read from the local Hugging Face cache (or local
directories, ``--teacher-base`` / ``--student-base``), the data from the root.

Steps, each a command (``--dry-run`` prints them all and runs none); a step whose output exists is
skipped, so a rerun continues where the last one stopped:

1. ``prepare``: the data root's files -> ``OUT/data/*.jsonl`` in okd's prompt / response layout (the
   lineage's prompts, with its instruction template, kept as they are);
2. the teacher: ``okd distill`` of GPT-2 XL with ``sft`` (configs/paper/teacher_sft.yaml);
3. one student per method (configs/paper/student.yaml, plus configs/paper/methods/<method>.yaml where
   a method has settings of its own; ``minillm`` starts from the ``sft`` student, as MiniLLM does);
4. ``evaluate``: the teacher and every student on each test set, on the GPU in bf16: ROUGE-L over the
   5 sampling seeds of the lineage (10, 20, 30, 40, 50; temperature 1, top-p 1) and greedy decoding,
   per example (``OUT/evals/<test set>/<model>.json``, okd eval's format);
5. ``okd compare`` per test set and decoding: ``okd`` minus ``kd``, then each method minus ``sft``
   (``OUT/compare/<test set>-<decoding>.md`` and ``.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "paper"

# Under --data-root, as MiniLLM's repository lays its data out (minillm/ in microsoft/LMOps).
LAYOUT = {
    # processed_data/: tools/process_data_dolly.py (scripts/gpt2/tools/process_data_dolly.sh) writes these
    # from data/dolly/raw.jsonl: 1,000 validation examples, the rest for training, prompts over 256 tokens dropped.
    "train": "processed_data/dolly/full/gpt2/train.jsonl",
    "valid": "processed_data/dolly/full/gpt2/valid.jsonl",
}
TEST_SETS = {
    # The evaluation sets of MiniLLM's evaluate.py (scripts/gpt2/eval/eval_main_*.sh): <data dir>/valid.jsonl.
    "dolly": "data/dolly/valid.jsonl",  # DollyEval: the 500 held-out Dolly examples
    "self_inst": "data/self-inst/valid.jsonl",  # SelfInst
    "vicuna": "data/vicuna/valid.jsonl",  # Vicuna
    "sinst": "data/sinst/11_/valid.jsonl",  # S-NI, responses of 11 tokens or more
    "uinst": "data/uinst/11_/valid.jsonl",  # UnNI, responses of 11 tokens or more
}
METHODS = ["sft", "kd", "rkl", "okd", "gkd", "distillm", "seqkd", "minillm"]
SEEDS = [10, 20, 30, 40, 50]
STEPS = ("prepare", "teacher", "students", "evaluate", "compare")
# MiniLLM's MiniLLM run starts from the SFT student (its "init" checkpoint).
STARTS_FROM = {"minillm": "sft"}
# The instruction template of the lineage's processing, for records that have no "prompt" yet.
TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Response:\n")
TEMPLATE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                  "Write a response that appropriately completes the request.\n\n"
                  "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


class RecipeError(Exception):
    """A problem with the arguments or the data: one line, no traceback."""


# --------------------------------------------------------------------------------------------------
# arguments and configs
# --------------------------------------------------------------------------------------------------


def _names(text: str, valid, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise RecipeError(f"--{what}: unknown {', '.join(unknown) or '(empty)'} (valid: {', '.join(valid)})")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="GPT-2 XL -> GPT-2 on Dolly, the MiniLLM / DistiLLM setting, on one GPU.")
    parser.add_argument("--data-root", required=True, help="local copy of MiniLLM's data: the directory holding data/ and processed_data/")
    parser.add_argument("--out", default="runs/paper", help="where data, models, evaluations and comparisons go")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--test-sets", default=",".join(TEST_SETS), help=f"comma-separated, from {','.join(TEST_SETS)}")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"which steps to run, from {','.join(STEPS)}")
    parser.add_argument("--teacher-base", default="gpt2-xl", help="GPT-2 XL: hub id (local cache) or directory")
    parser.add_argument("--student-base", default="gpt2", help="GPT-2 (124M): hub id (local cache) or directory")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="sampling seeds of the evaluation, one draw each")
    parser.add_argument("--max-length", type=int, default=512, help="evaluation: prompt + reference tokens per example (a longer prompt is cut from the left)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated per response in evaluation")
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--max-examples", type=int, default=None, help="evaluate the first N examples of each test set (a quick check)")
    parser.add_argument("--distill-args", default="", help="more okd distill options for every training run, e.g. "
                        "'--train.max_steps 20' for a smoke test (they come last, so they win)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and run none")
    args = parser.parse_args(argv)
    args.methods = _names(args.methods, METHODS, "methods")
    args.test_sets = _names(args.test_sets, list(TEST_SETS), "test-sets")
    args.steps = _names(args.steps, STEPS, "steps")
    for name in args.methods:
        needed = STARTS_FROM.get(name)
        if needed and needed not in args.methods and "students" in args.steps:
            raise RecipeError(f"--methods: {name} starts from the {needed} student; add {needed}")
    try:
        args.distill_args = shlex.split(args.distill_args)
    except ValueError as error:
        raise RecipeError(f"--distill-args: {error}") from None
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise RecipeError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if not args.seeds:
        raise RecipeError("--seeds must list at least one seed")
    return args


def check_data_root(root: str, test_sets: list[str]) -> dict[str, Path]:
    """The files the recipe reads, or a one-line error naming the first one missing."""
    base = Path(root)
    if not base.is_dir():
        raise RecipeError(f"--data-root {root}: no such directory (MiniLLM's data; see docs/guide/paper-recipe.md)")
    wanted = {**LAYOUT, **{name: TEST_SETS[name] for name in test_sets}}
    missing = [rel for rel in wanted.values() if not (base / rel).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise RecipeError(f"--data-root {root}: no {missing[0]}{more}; expected MiniLLM's layout, see docs/guide/paper-recipe.md")
    return {name: base / rel for name, rel in wanted.items()}


def method_configs(method: str) -> list[Path]:
    """The config files of one student run, in the order they apply."""
    extra = CONFIGS / "methods" / f"{method}.yaml"
    return [CONFIGS / "student.yaml", *([extra] if extra.exists() else [])]


def load_config(configs: list[Path], overrides: list[str]):
    """The ``DistillConfig`` that ``okd distill --config ... <overrides>`` would run, checked (method and
    sampling presets resolved) without loading any model."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    from okd.config import DistillConfig
    from okd.training import distill

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(distill)
    args = [arg for path in configs for arg in ("--config", str(path))]
    normalised = ["--" + o[2:].replace("-", "_") if o.startswith("--") else o for o in overrides]
    try:
        namespace = parser.instantiate(parser.parse_args(args + normalised))
    except Exception as error:  # jsonargparse's ArgumentError, or a dataclass's ValueError
        raise RecipeError(f"{', '.join(p.name for p in configs)}: {str(error).splitlines()[0]}") from None
    config = DistillConfig(**{k: v for k, v in vars(namespace).items() if k != "config"})
    config.resolved()
    return config


# --------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------


def _rel(path) -> str:
    """A repository path relative to the working directory when it lies under it (shorter commands)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _okd(*args) -> list[str]:
    return [sys.executable, "-m", "okd.cli", *(_rel(a) if isinstance(a, Path) and a.is_relative_to(REPO) else str(a) for a in args)]


def _self(*args) -> list[str]:
    return [sys.executable, _rel(Path(__file__).resolve()), *map(str, args)]


def _run_state(run: Path) -> list[str]:
    """How to (re)start a training run in ``run``: continue from its checkpoints, or replace a run that has none."""
    if list((run / "checkpoints").glob("step-*")):
        return ["--resume", "true"]
    return ["--overwrite", "true"] if run.exists() else []


def _done(path: Path) -> bool:
    return path.is_file()


def plan(args: argparse.Namespace) -> list[tuple[str, list[str], Path]]:
    """Every step as (label, command, output that marks it done), in order."""
    out = Path(args.out)
    data = out / "data"
    steps: list[tuple[str, list[str], Path]] = []
    if "prepare" in args.steps:
        steps.append(("prepare", _self("prepare", "--data-root", args.data_root, "--out", data, "--test-sets", ",".join(args.test_sets)),
                      data / "prepared.json"))
    files = ["--data.train_file", data / "train.jsonl", "--data.validation_file", data / "valid.jsonl"]
    teacher_run, students = out / "teacher", out / "students"
    teacher = teacher_run / "student"
    if "teacher" in args.steps:
        steps.append(("teacher", _okd("distill", "--config", CONFIGS / "teacher_sft.yaml", "--model.student", args.teacher_base,
                                      *files, *args.distill_args, "--output-dir", teacher_run, *_run_state(teacher_run)),
                      teacher / "config.json"))
    if "students" in args.steps:
        for method in args.methods:
            run = students / method
            start = students / STARTS_FROM[method] / "student" if method in STARTS_FROM else args.student_base
            configs = [a for path in method_configs(method) for a in ("--config", path)]
            steps.append((f"student {method}", _okd("distill", *configs, "--method.name", method, "--model.teacher", teacher,
                                                    "--model.student", start, *files, *args.distill_args, "--output-dir", run,
                                                    *_run_state(run)),
                          run / "student" / "config.json"))
    models = {"teacher": teacher, **{m: students / m / "student" for m in args.methods}}
    if "evaluate" in args.steps:
        for test in args.test_sets:
            for name, model in models.items():
                command = _self("evaluate", "--model", model, "--data", data / f"{test}.jsonl", "--name", name,
                                "--json", out / "evals" / test / f"{name}.json", "--seeds", ",".join(map(str, args.seeds)),
                                "--max-length", args.max_length, "--max-new-tokens", args.max_new_tokens,
                                "--batch-size", args.eval_batch_size,
                                *(["--max-examples", args.max_examples] if args.max_examples else []))
                steps.append((f"evaluate {name} on {test}", command, out / "evals" / test / f"{name}.json"))
    pairs = [("okd", "kd")] if {"okd", "kd"} <= set(args.methods) else []
    pairs += [(m, "sft") for m in args.methods if m != "sft"] if "sft" in args.methods else []
    if "compare" in args.steps and pairs:
        for test in args.test_sets:
            evals = [f"{name}={out / 'evals' / test / f'{name}.json'}" for name in dict.fromkeys(n for p in pairs for n in p)]
            for decoding in ("sampled", "greedy"):
                target = out / "compare" / f"{test}-{decoding}"
                steps.append((f"compare on {test} ({decoding})",
                              _okd("compare", *evals, "--pairs", ",".join(f"{a}:{b}" for a, b in pairs), "--decoding", decoding,
                                   "--md", f"{target}.md", "--json", f"{target}.json"), Path(f"{target}.json")))
    return steps


def check_configs(args: argparse.Namespace) -> None:
    """Load every run's config as okd distill will (a typo fails here, before hours of GPU time)."""
    load_config([CONFIGS / "teacher_sft.yaml"], ["--model.student", args.teacher_base, *args.distill_args])
    for method in args.methods:
        load_config(method_configs(method), ["--method.name", method, *args.distill_args])


def run(args: argparse.Namespace) -> int:
    check_data_root(args.data_root, args.test_sets)
    check_configs(args)
    steps = plan(args)
    if args.dry_run:
        for label, command, done in steps:
            print(f"# {label}{' (done: skipped)' if _done(done) else ''}")
            print(shlex.join(command))
        return 0
    started = time.perf_counter()
    for label, command, done in steps:
        if _done(done):
            print(f"[paper recipe] {label}: done ({done}), skipped", flush=True)
            continue
        print(f"[paper recipe {time.perf_counter() - started:8.0f}s] {label}: {shlex.join(command)}", flush=True)
        code = subprocess.call(command)
        if code:
            raise RecipeError(f"{label} failed (exit status {code}); rerun to continue from the steps already done")
    print(f"[paper recipe] done in {time.perf_counter() - started:.0f} s; comparisons in {Path(args.out) / 'compare'}")
    return 0


# --------------------------------------------------------------------------------------------------
# the steps that are not okd commands
# --------------------------------------------------------------------------------------------------


def convert_record(record: dict) -> dict:
    """One record of the lineage's files as okd's {"prompt", "response"}: its ``prompt`` (``<n>`` is a
    newline there), or the instruction template applied to ``instruction`` / ``input``; its ``output``
    (the first, when it is a list of references)."""
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        instruction, given = record.get("instruction"), record.get("input") or ""
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("no 'prompt' and no 'instruction'")
        prompt = (TEMPLATE_INPUT if given.strip() else TEMPLATE).format(instruction=instruction, input=given)
    response = record.get("output", record.get("response"))
    if isinstance(response, list):
        response = response[0] if response else None
    if not isinstance(response, str) or not response.strip():
        raise ValueError("no 'output'")
    return {"prompt": prompt.replace("<n>", "\n"), "response": response}


def prepare(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="paper_recipe.py prepare")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--test-sets", default=",".join(TEST_SETS))
    args = parser.parse_args(argv)
    files = check_data_root(args.data_root, _names(args.test_sets, list(TEST_SETS), "test-sets"))
    converted = {}
    for name, source in files.items():  # every file is read and checked before any is written
        rows = []
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(convert_record(json.loads(line)))
            except (ValueError, AttributeError) as error:
                raise RecipeError(f"{source}, line {number}: {error}") from None
        converted[name] = rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, rows in converted.items():
        target = out / f"{name}.jsonl"
        tmp = target.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, target)
        counts[name] = len(rows)
        print(f"{name}: {len(rows)} examples from {files[name]} -> {target}")
    (out / "prepared.json").write_text(json.dumps({"data_root": str(args.data_root), "examples": counts}, indent=1) + "\n")
    return 0


def evaluate(argv: list[str]) -> int:
    """One model on one test set, on the GPU when there is one: okd.evaluation.evaluate_model with the
    sampling draws and greedy decoding, written as okd eval's JSON (what okd compare reads)."""
    parser = argparse.ArgumentParser(prog="paper_recipe.py evaluate")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-examples", type=int, default=None)
    args = parser.parse_args(argv)
    import torch

    from okd.data import InstructionDataset, ensure_pad_token, read_jsonl
    from okd.evaluation import GenerationConfig, evaluate_model
    from okd.io import write_json
    from okd.models import load_model, load_tokenizer

    cuda = torch.cuda.is_available()
    tokenizer = load_tokenizer(args.model)
    ensure_pad_token(tokenizer)
    model = load_model(args.model, dtype="bfloat16" if cuda else "float32", device="cuda" if cuda else None)
    examples = read_jsonl(args.data, tokenizer=tokenizer)[: args.max_examples]
    dataset = InstructionDataset(examples, tokenizer, args.max_length)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0, batch_size=args.batch_size)
    seeds = [int(s) for s in args.seeds.split(",")]
    result = evaluate_model(model, tokenizer, dataset, seeds, config, greedy=True).to_dict()
    header = {key: result.pop(key) for key in ("format", "format_version")}
    write_json(args.json, {**header, "name": args.name, "model": args.model, "data": args.data, "max_length": args.max_length,
                           "max_examples": args.max_examples, "dtype": "bfloat16" if cuda else "float32", **result})
    print(f"{args.name} on {args.data}: ROUGE-L {result['rouge_l_mean']:.2f} +- {result['rouge_l_std']:.2f} over {len(seeds)} seeds, "
          f"greedy {result['greedy_rouge_l']:.2f} ({len(examples)} examples)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["prepare"]:
            return prepare(argv[1:])
        if argv[:1] == ["evaluate"]:
            return evaluate(argv[1:])
        return run(parse_args(argv))
    except (RecipeError, FileNotFoundError, ValueError) as error:
        print(f"paper_recipe: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
