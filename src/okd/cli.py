"""The `okd` command line.

Each subcommand is a typed Python function; jsonargparse turns its signature (and the docstrings of
the config dataclasses) into options, `--help` text and a YAML schema. So::

    okd distill --config configs/demo.yaml --train.max_steps 50 --output-dir runs/x

loads the YAML file, overrides one field and calls ``okd.training.distill``. Dashes and underscores
are interchangeable in option names (``--output-dir`` = ``--output_dir``).
"""

from __future__ import annotations

import functools
import json as _json
import os
import re
import sys
import warnings
from typing import Literal, Optional

from jsonargparse import ArgumentParser, auto_cli, set_parsing_settings

from okd import installed_version, pretrained
from okd.comparison import compare
from okd.config import closest
from okd.evaluation import evaluate
from okd.teacher_cache import cache_teacher
from okd.training import distill

set_parsing_settings(docstring_parse_attribute_docstrings=True)


def data_build(
    task: str = "builtin", out_dir: Optional[str] = None, force: bool = False, source: Optional[str] = None
) -> None:
    """Build a data task's train/validation/test JSONL files.

    Tasks: builtin (Python standard-library docstrings: describe a function in one sentence) and
    wordnet (WordNet 3.0 definitions: define an English word given its part of speech).

    Args:
        task: Which data set: builtin or wordnet.
        out_dir: Directory for train.jsonl, validation.jsonl, test.jsonl and meta.json
            (default runs/data/TASK).
        force: Rebuild even if up-to-date files exist.
        source: wordnet only: the directory of the WordNet 3.0 dict files (index.noun, data.noun, ...).
            Default: /usr/share/wordnet, then .cache/debian/wordnet-base/usr/share/wordnet (filled by
            `make install`).
    """
    from okd.data.tasks import build_task

    paths = build_task(task, out_dir=out_dir, force=force, source=source)
    for split, path in paths.items():
        print(f"{split}: {path}")


def _report_evaluation(result: dict) -> None:
    sampled = result["generation"].get("do_sample", True)
    print(
        f"ROUGE-L {result['rouge_l_mean']:.2f} +- {result['rouge_l_std']:.2f}, "
        f"exact match {result['exact_match_mean']:.2f} over {result['num_examples']} examples "
        + (f"and {len(result['per_seed'])} seed(s)" if sampled else "with greedy decoding")
    )
    if sampled and result.get("greedy_rouge_l") is not None:
        print(f"greedy: ROUGE-L {result['greedy_rouge_l']:.2f}, exact match {result['greedy_exact_match']:.2f}")


def _report_comparison(result: dict) -> None:
    print(result["table"], end="")


def printing(function, report):
    """A subcommand with ``function``'s signature and help (jsonargparse reads them through
    ``functools.wraps``) that prints ``report(result)`` instead of returning the result."""

    @functools.wraps(function)
    def command(*args, **kwargs):
        report(function(*args, **kwargs))

    return command


def analyze(
    teacher: str,
    student: list[str],
    data: str,
    json: str,
    plots: str | None = None,
    names: str | None = None,
    max_examples: int | None = None,
    batch_size: int = 8,
    max_length: int = 256,
    exposure_examples: int = 32,
    max_new_tokens: int = 64,
    seed: int = 0,
    progress: bool = True,
    teacher_module: str | None = None,
) -> None:
    """Which features of the teacher's next-token distribution does each student transfer?

    Teacher-forced on the data's responses: top-1 agreement, top-k overlap and coverage, entropy gap,
    tail mass, forward/reverse KL, TVD, rank correlation, calibration (ECE) and NLL; then exposure bias
    (MiniLLM's ExAccErr) and ROUGE-L of free-running samples. Repeat --student for several students.
    Prints a markdown table and writes the full result as JSON.

    Args:
        teacher: Teacher model directory, run directory (with student/) or hub id; its tokenizer is used.
        student: A student run directory (with student/) or model directory; repeat the flag for more.
        data: JSONL file of prompt/response examples (e.g. the test split).
        json: Write the full result to this JSON file.
        plots: Write PNG plots (entropy-gap histogram, top-k coverage, ExAccErr) to this directory.
        names: Comma-separated student names, in --student order (default: the run directories' names).
        max_examples: Analyse only the first N examples.
        batch_size: Sequences per forward pass and per generation batch.
        max_length: Maximum tokens per example (prompts are cut from the left first).
        exposure_examples: Prompts sampled for the exposure-bias measurement (0 skips it).
        max_new_tokens: Tokens sampled per prompt for the exposure-bias measurement.
        seed: Sampling seed (the same for every model).
        progress: Show progress bars.
        teacher_module: An OKD run directory (or its online_module/): compare with the adapted teacher
            that run trained instead of the frozen one.
    """
    from okd.analysis import format_table, run_analysis

    name_list = [n.strip() for n in names.split(",")] if names else None
    result = run_analysis(
        teacher, student, data, names=name_list, json_out=json, plots_dir=plots, max_examples=max_examples,
        max_length=max_length, batch_size=batch_size, exposure_examples=exposure_examples,
        max_new_tokens=max_new_tokens, seed=seed, progress=progress, teacher_module=teacher_module,
    )
    print(format_table(result))
    print(f"\nwrote {json}")
    for path in result["settings"].get("plots", []):
        print(f"wrote {path}")


def demo(quick: bool = False, output_dir: str | None = None, methods: str | None = None, tier: Literal["toy", "real"] | None = None, workers: int | None = None) -> None:
    """Run the main job on the built-in data: a teacher, students distilled from it, evaluation, report.

    Args:
        quick: The toy tier's smoke test (about 2 minutes on 2 CPU cores).
        output_dir: Where the report, results, plots and models go (default: runs/demo for the real tier,
            runs/demo-toy for the toy tier).
        methods: Comma-separated method presets (default: the tier's list).
        tier: real (default): SmolLM2-135M-Instruct fine-tuned as the teacher and shrunk into pretrained
            students (about 30 minutes on 2 CPU cores); toy (default with --quick): models trained from scratch.
        workers: Real tier: methods distilled at once, one process each (default 1; more helps only with idle
            cores or on a CPU shared with other jobs).
    """
    from okd.demo import run_demo

    run_demo(quick=quick, output_dir=output_dir, methods=methods.split(",") if methods else None, tier=tier, workers=workers)


# Lines of jsonargparse's reports that say which types were tried, not what is wrong with the value.
_TYPE_ATTEMPT = re.compile(
    r"^(Expected a <class 'NoneType'>|Does not validate against any of the Union subtypes|Expected a path but"
    r"|Not a valid subclass of|Subclass types expect|a class path|a dict with|a dict without|Subtypes:|Given value|Errors:|Problem with given class_path)"
)


def one_line_error(message: str) -> str:
    """jsonargparse's multi-line report of a value that matches none of an option's types (a union such
    as ``LoraStudentConfig | None``, a nested dataclass) as one line: the innermost message that says what
    is wrong, prefixed with the option (``Parser key "..."``) when it does not name it already. A one-line
    message is returned as it is."""
    message = str(message).strip()
    if "\n" not in message:
        return message
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    key = None
    for name in re.findall(r'Parser key "([^"]+)"', message):  # nested keys are relative to the outer one
        key = name if key is None or name.startswith(key + ".") else f"{key}.{name}"
    reasons = []
    for line in lines:
        text = line[2:].strip() if line.startswith("- ") else line
        if text and not text.startswith("Parser key") and not _TYPE_ATTEMPT.match(text):
            reasons.append(text)
    if reasons:
        reason = reasons[0]
    else:
        given = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Given value:")), None)
        reason = f"invalid value {given}" if given is not None else " ".join(lines)
    inner = re.match(r"^([A-Za-z_][\w.]*): (.*)$", reason)  # a nested field: "rank: Expected ..."
    if key and inner and not inner.group(1).startswith(key):
        reason = f"{key}.{inner.group(1)}: {inner.group(2)}"
    elif key and key not in reason:
        reason = f"{key}: {reason}"
    return reason


class _Parser(ArgumentParser):
    """jsonargparse's parser, with a suggestion when an option or config key is misspelled, and
    ``--version`` on the parser given a ``version`` (the top-level one)."""

    def __init__(self, *args, version: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if version is not None:
            self.add_argument("--version", action="version", version=version, help="Print the version of okd and exit.")

    def error(self, message, ex=None):
        match = re.search(r"(?:option|arguments?:?) '?-*([\w.\-]+)'?", message)
        if match:
            # A subcommand's unknown key (from the command line or a --config file) is reported by
            # the top-level parser; the keys to compare with are the subcommand's.
            parser = getattr(ex, "subcommand_parser", None) or self
            known = [o.lstrip("-") for a in parser._actions for o in a.option_strings]
            close = closest(match.group(1), known)
            if close:
                message = f"{message} (did you mean --{close}?)"
        return super().error(one_line_error(message), ex)


# Boolean parameters of the subcommands accept the flag alone: `--quick` means `--quick true`.
FLAGS = ("quick", "force", "overwrite", "resume", "progress", "greedy")


def _normalise_option_names(argv: list[str]) -> list[str]:
    """``--output-dir x`` -> ``--output_dir x`` (only the option name, never its value), a bare
    boolean flag (``--quick``) -> ``--quick true``, and its negation (``--no-progress``) ->
    ``--progress false``."""
    out = []
    for i, arg in enumerate(argv):
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            negated = name.replace("-", "_")[3:] if name.replace("-", "_").startswith("no_") else None
            if negated in FLAGS and not eq:
                out.extend([f"--{negated}", "false"])
                continue
            arg = "--" + name.replace("-", "_") + eq + value
            out.append(arg)
            following = argv[i + 1].lower() if i + 1 < len(argv) else ""
            if not eq and name.replace("-", "_") in FLAGS and following not in ("true", "false"):
                out.append("true")
            continue
        out.append(arg)
    return out


# List-valued options that may be given several times (`--student a --student b`).
REPEATABLE = {"analyze": ("student",), "compare": ("evals",)}


# Subcommands whose bare (positional) arguments are the values of one option: `okd compare a.json b.json`.
POSITIONAL = {"compare": "evals"}


def _positionals_to_option(argv: list[str]) -> list[str]:
    """``compare a.json --seed 1 b.json`` -> ``compare --evals a.json --seed 1 --evals b.json``.

    Every option of these subcommands takes a value (bare flags already got theirs from
    ``_normalise_option_names``), so a token that is neither an option nor an option's value is positional.
    Runs before ``_collect_repeated``, which gathers the repeated option into one list.
    """
    option = POSITIONAL.get(argv[0] if argv else "")
    if option is None:
        return argv
    out, i = argv[:1], 1
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-") and len(arg) > 1:
            out.append(arg)
            if "=" not in arg and arg not in ("-h", "--help") and i + 1 < len(argv):
                out.append(argv[i + 1])
                i += 1
        else:
            out.extend([f"--{option}", arg])
        i += 1
    return out


def _collect_repeated(argv: list[str]) -> list[str]:
    """``analyze --student a --student b`` -> ``analyze --student '["a", "b"]'``.

    jsonargparse keeps only the last value of a repeated option, so the values are gathered into one
    JSON list, at the place of the first occurrence. A value that is itself a list (``--student [a,b]``)
    is spliced in. Runs after ``_normalise_option_names`` (names already use underscores).
    """
    options = REPEATABLE.get(argv[0] if argv else "", ())
    out, values, first = [], {}, {}
    i = 0
    while i < len(argv):
        name, eq, value = argv[i][2:].partition("=") if argv[i].startswith("--") else ("", "", "")
        if name in options and (eq or i + 1 < len(argv)):
            if not eq:
                value, i = argv[i + 1], i + 1
            parsed = None
            if value.lstrip().startswith("["):
                try:
                    import yaml

                    parsed = yaml.safe_load(value)
                except yaml.YAMLError:
                    parsed = None
            values.setdefault(name, []).extend(map(str, parsed) if isinstance(parsed, list) else [value])
            if name not in first:
                first[name] = len(out)
                out.append(None)  # placeholder, filled below
        else:
            out.append(argv[i])
        i += 1
    for name, at in sorted(first.items(), key=lambda item: -item[1]):
        out[at : at + 1] = [f"--{name}", _json.dumps(values[name])]
    return out


# The subcommands: each is a typed function whose signature is its options. Adding one (or a group,
# a dict with a "_help" entry) is one line here.
COMMANDS: dict = {
    "data": {"_help": "Data tools.", "build": data_build},
    "distill": distill,
    "eval": printing(evaluate, _report_evaluation),
    "analyze": analyze,
    "compare": printing(compare, _report_comparison),
    "demo": demo,
    "model": {"_help": "Real checkpoints for okd.", "convert": pretrained.convert, "shrink": pretrained.shrink},
    "teacher": {"_help": "Teacher tools.", "cache": cache_teacher},
}

# Option names kept from earlier versions: {subcommand: {old name: parameter}}.
ALIASES = {"eval": {"json": "json_out"}}


def _apply_aliases(argv: list[str]) -> list[str]:
    aliases = ALIASES.get(argv[0] if argv else "", {})
    out = []
    for arg in argv:
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        out.append(f"--{aliases[name]}{eq}{value}" if name in aliases else arg)
    return out


_OKD_DIR = os.path.dirname(os.path.abspath(__file__))
_format_warning = warnings.formatwarning


def _one_line_okd_warning(message, category, filename, lineno, line=None) -> str:
    """okd's own warnings (an incomplete checkpoint skipped on resume) as one line; others as Python shows them."""
    if os.path.abspath(filename).startswith(_OKD_DIR + os.sep):
        return f"okd: warning: {message}\n"
    return _format_warning(message, category, filename, lineno, line)


def _run_record_as_config(argv: list[str]) -> list[str]:
    """``distill --config run_config.yaml``: a run directory's saved config, given to --config, runs
    the same distillation. Its record-only keys and the sections the method did not use (saved as null)
    are dropped (``okd.config.replayable_run_config``), and the rest is passed on as YAML text. Any other
    config file is left as it is."""
    from okd.config import replayable_run_config

    if not argv or argv[0] != "distill":
        return argv
    out = list(argv)
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name != "--config" or (not eq and i + 1 >= len(argv)):
            continue
        at = i if eq else i + 1
        path = value if eq else argv[at]
        try:
            import yaml

            record = yaml.safe_load(open(path, encoding="utf-8"))
        except (OSError, ValueError):  # not a readable YAML file: jsonargparse reports it
            continue
        if not isinstance(record, dict) or "num_processes" not in record:
            continue
        text = yaml.safe_dump(replayable_run_config(record), sort_keys=False)
        out[at] = f"--config={text}" if eq else text
    return out


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.formatwarning = _one_line_okd_warning
    argv = _normalise_option_names(sys.argv[1:] if argv is None else list(argv))
    argv = _run_record_as_config(_apply_aliases(_collect_repeated(_positionals_to_option(argv))))
    if argv[:2] == ["model", "convert"] and len(argv) > 2 and not argv[2].startswith("-"):
        argv = [*argv[:2], "--src", *argv[2:]]  # `okd model convert SRC --out DIR`
    try:
        auto_cli(COMMANDS, args=argv, as_positional=False, parser_class=_Parser, prog="okd", version=f"okd {installed_version()}")
    except KeyboardInterrupt as error:
        # A second SIGINT/SIGTERM during training (the first one saves a checkpoint and returns).
        print(f"okd: interrupted ({error or 'KeyboardInterrupt'})", file=sys.stderr)
        raise SystemExit(130) from None
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as error:
        # Expected user errors get one line, not a traceback (OKD_TRACEBACK=1 shows it).
        if os.environ.get("OKD_TRACEBACK"):
            raise
        print(f"okd: error: {one_line_error(str(error))}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
