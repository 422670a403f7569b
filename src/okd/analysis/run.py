"""The entry points: :func:`analyze` (models in memory) and :func:`run_analysis` (paths, what
``okd analyze`` calls: resolving and loading the models, the tokenizer checks, JSON and plots)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from okd.analysis.config import AnalysisConfig
from okd.analysis.exposure import exposure_bias
from okd.analysis.metrics import ece_from_bins
from okd.analysis.passes import CURVE_KEYS, _Running, teacher_forced_pass
from okd.analysis.report import make_plots


def analyze(teacher, students: dict, tokenizer, dataset, config: AnalysisConfig | None = None, **options) -> dict:
    """Teacher-forced distribution metrics, calibration and exposure bias of each student.

    One pass over ``dataset`` (:func:`okd.analysis.passes.teacher_forced_pass`: each model runs once per
    batch, under ``no_grad`` in eval mode, modes restored afterwards), then :func:`exposure_bias` on the
    first ``exposure_examples`` prompts (0 skips it).

    Args:
        teacher: the teacher model (a Hugging Face causal LM).
        students: ``{name: model}``, in table order.
        tokenizer: the tokenizer of the data, shared by every model (checked with
            ``okd.models.check_compatible``; logits are sliced to the common width, dropping padding rows).
        dataset: an ``InstructionDataset``.
        config: the options (:class:`AnalysisConfig`, whose fields document each one).
        **options: fields of :class:`AnalysisConfig` given as keywords (``batch_size=4``, ...); they
            override ``config``'s.

    Returns:
        A JSON-ready dict::

            {"settings": {...},
             "teacher": {"tokens", "metrics": {nll, accuracy, confidence, entropy, ece}, "samples": {...}},
             "students": {name: {"tokens", "metrics": {...}, "per_position": {...},
                                 "entropy_gap_histogram": {"edges", "counts", "tokens"},
                                 "exposure_bias": {...}}}}

        ``metrics`` holds the token-weighted mean of every per-token metric (:func:`pair_metrics`), the
        student's ``student_nll``, ``student_accuracy``, ``student_confidence`` and ``student_ece``.

    Raises:
        ValueError: no students, a bad option, incompatible tokenizer/logits width (naming the student),
            or no response token in the data.
    """
    if not students:
        raise ValueError("analyze needs at least one student")
    config = AnalysisConfig.from_options(config, **options)
    if len(dataset) == 0:
        raise ValueError("analyze: the data set is empty")
    widths = _logits_widths(teacher, students, tokenizer)
    teacher_stats, stats = teacher_forced_pass(teacher, students, widths, tokenizer, dataset, config)
    if teacher_stats.tokens == 0:
        raise ValueError("analyze: no response tokens in the data (every label is -100)")

    teacher_metrics = teacher_stats.means()
    teacher_metrics["ece"] = ece_from_bins(teacher_stats.calibration)
    result: dict = {
        "settings": {
            "examples": len(dataset),
            "batch_size": config.batch_size,
            "top_ks": list(config.top_ks),
            "rank_top": config.rank_top,
            "ece_bins": config.ece_bins,
            "position_curve_length": config.position_curve_length,
            "logits_width": widths,
        },
        "teacher": {"tokens": teacher_stats.tokens, "metrics": teacher_metrics},
        "students": {},
    }
    histograms = _entropy_gap_histograms(stats, config.histogram_bins)
    for name, s in stats.items():
        metrics = s.means()
        metrics["student_ece"] = ece_from_bins(s.calibration)
        result["students"][name] = {
            "tokens": s.tokens,
            "metrics": dict(sorted(metrics.items())),
            "per_position": s.curves(CURVE_KEYS),
            "entropy_gap_histogram": histograms[name],
        }

    if config.exposure_examples > 0:
        exposure = exposure_bias(
            teacher, students, tokenizer, dataset, widths=widths, num_examples=config.exposure_examples,
            max_new_tokens=config.max_new_tokens, lengths=config.exposure_lengths, seed=config.seed,
            batch_size=config.batch_size, chunk_tokens=config.chunk_tokens, progress=config.progress,
        )
        result["settings"]["exposure"] = exposure["settings"]
        result["teacher"]["samples"] = exposure["teacher"]
        for name, values in exposure["students"].items():
            values["ground_truth_fkl_per_token"] = result["students"][name]["metrics"]["forward_kl"]
            result["students"][name]["exposure_bias"] = values
    return result


def _logits_widths(teacher, students: dict, tokenizer) -> dict[str, int]:
    """``{name: common logits width of teacher and student}``; a ``ValueError`` naming the student otherwise."""
    from okd.models import check_compatible

    widths = {}
    for name, student in students.items():
        try:
            widths[name] = check_compatible(teacher, student, tokenizer, tokenizer)
        except ValueError as error:
            raise ValueError(f"student {name!r}: {error}") from None
    return widths


def _entropy_gap_histograms(stats: dict[str, _Running], n_bins: int) -> dict[str, dict]:
    """One set of bins for every student (from all their kept entropy gaps), so that their histograms
    can be compared bar by bar."""
    kept = {name: torch.cat(s.kept) if s.kept else torch.zeros(0, dtype=torch.float64) for name, s in stats.items()}
    every = torch.cat(list(kept.values()))
    low, high = (float(every.min()), float(every.max())) if every.numel() else (-1.0, 1.0)
    if not (math.isfinite(low) and math.isfinite(high)):
        low, high = -1.0, 1.0
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    edges = torch.linspace(low, high, n_bins + 1, dtype=torch.float64)
    out = {}
    for name, values in kept.items():
        counts = torch.histogram(values.clamp(low, high), bins=edges).hist if values.numel() else torch.zeros(n_bins)
        out[name] = {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()], "tokens": stats[name].n_kept}
    return out


def resolve_model_path(path: str, role: str) -> tuple[str, str]:
    """``(model directory, default name)`` for a run directory (with ``student/``) or a model directory.

    The default name is the run directory's name (for ``runs/kd/student``, ``kd``). A path that does not
    exist locally is passed on as is (a hub id; loading fails with a one-line error when it is not
    cached). Raises ``FileNotFoundError`` naming ``role`` for a directory that holds no model.
    """
    from okd.models import looks_like_hub_id

    p = Path(path).expanduser()
    if not p.exists():
        if not looks_like_hub_id(path):
            raise FileNotFoundError(f"{role}: no such file or directory: {path}")
        return path, path.split("/")[-1]
    if (p / "student" / "config.json").is_file():
        return str(p / "student"), p.resolve().name
    if (p / "config.json").is_file() or p.suffix.lower() == ".gguf":
        name = p.resolve().parent.name if p.resolve().name == "student" else p.resolve().name
        return str(p), name
    raise FileNotFoundError(f"{role}: {path} is neither a model directory (config.json) nor a run directory (student/config.json)")


def run_analysis(
    teacher: str,
    students: Sequence[str],
    data: str,
    *,
    names: Sequence[str] | None = None,
    json_out: str | None = None,
    plots_dir: str | None = None,
    max_examples: int | None = None,
    max_length: int = 256,
    device: str | None = None,
    teacher_module: str | None = None,
    config: AnalysisConfig | None = None,
    **options,
) -> dict:
    """Load the teacher, the students and the data from paths, :func:`analyze`, write JSON and plots.

    Args:
        teacher: teacher model directory, run directory or hub id; its tokenizer is the one used.
        students: student run directories (``student/`` inside) or model directories.
        data: JSONL file (any layout ``okd.data.read_jsonl`` accepts).
        names: one name per student (default: the run directory's name; repeats get ``-2``, ``-3``).
        json_out: write the result there, atomically.
        plots_dir: write the PNG plots there (:func:`make_plots`).
        max_examples: analyse only the first N examples.
        max_length: maximum tokens per example (prompt cut from the left first).
        device: ``"cuda"``, ``"cpu"``, ...; default: CUDA when available. Models run in float32.
        teacher_module: an OKD run's ``online_module`` directory (or the run directory): compare with
            the adapted teacher that run trained, instead of the frozen one
            (:func:`okd.teacher.with_online_module`).
        config, **options: passed to :func:`analyze` (:class:`AnalysisConfig` and its fields as keywords).

    Raises:
        FileNotFoundError, ValueError (``okd.data.DataError`` included): one-line messages naming the
        culprit (missing path, tokenizer or vocabulary mismatch, bad or empty data).
    """
    from okd.data import InstructionDataset, ensure_pad_token, read_jsonl
    from okd.io import write_json
    from okd.models import load_tokenizer

    if not students:
        raise ValueError("give at least one --student")
    if names is not None and len(names) != len(students):
        raise ValueError(f"--names has {len(names)} names for {len(students)} students")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"--max-examples must be >= 1, got {max_examples}")
    # Resolve every path before loading anything, so a typo fails in a second, not after a teacher load.
    teacher_dir, _ = resolve_model_path(teacher, "teacher")
    resolved = [resolve_model_path(s, f"student {s}") for s in students]
    unique = _unique_names(list(names) if names is not None else [default for _, default in resolved])
    if not Path(data).is_file():
        raise FileNotFoundError(f"--data: no such file: {data}")

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = load_tokenizer(teacher_dir)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"teacher (its tokenizer is the one used): {error}") from None
    ensure_pad_token(tokenizer)
    examples = read_jsonl(data, tokenizer=tokenizer)[:max_examples]
    dataset = InstructionDataset(examples, tokenizer, max_length)
    teacher_model = _load_teacher(teacher_dir, teacher_module, device)
    student_models = {name: _load_student(path, name, tokenizer, device) for name, (path, _) in zip(unique, resolved)}
    result = analyze(teacher_model, student_models, tokenizer, dataset, config, **options)
    result["settings"].update(
        {"teacher": str(teacher), "teacher_module": teacher_module, "students": dict(zip(unique, map(str, students))), "data": str(data),
         "max_length": max_length, "max_examples": max_examples, "device": str(device)}
    )
    if plots_dir:
        result["settings"]["plots"] = [str(p) for p in make_plots(result, plots_dir)]
    if json_out:
        write_json(json_out, result)
    return result


def _unique_names(chosen: list[str]) -> list[str]:
    """The names in order, a repeated one suffixed ``-2``, ``-3``, ..."""
    unique: list[str] = []
    for name in chosen:
        candidate, i = name, 1
        while candidate in unique:
            i += 1
            candidate = f"{name}-{i}"
        unique.append(candidate)
    return unique


def _load(path: str, role: str, device: str):
    """A float32 model on ``device``; a missing file names ``role`` (which of several models failed)."""
    from okd.models import load_model

    try:
        return load_model(path, dtype="float32", device=device)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{role}: {error}") from None


def _load_teacher(teacher_dir: str, teacher_module: str | None, device: str):
    """The teacher, with an OKD run's online module folded in when ``teacher_module`` is given."""
    model = _load(teacher_dir, "teacher", device)
    if teacher_module is None:
        return model
    from okd.teacher import with_online_module

    module_dir = Path(teacher_module)
    if (module_dir / "online_module").is_dir():  # an OKD run directory
        module_dir = module_dir / "online_module"
    return with_online_module(model, module_dir).eval()


def _load_student(path: str, name: str, tokenizer, device: str):
    """A student, after checking that its saved tokenizer (when it has one) is the teacher's."""
    from okd.data import ensure_pad_token
    from okd.models import load_tokenizer, tokenizer_differences

    try:
        saved = load_tokenizer(path)
    except (FileNotFoundError, OSError):
        saved = None  # a model directory without a tokenizer: the logits width check still runs
    if saved is not None:
        ensure_pad_token(saved)
        problems = tokenizer_differences(tokenizer, saved)
        if problems:
            raise ValueError(f"student {name!r} ({path}): its tokenizer differs from the teacher's: " + "; ".join(problems))
    return _load(path, f"student {name!r}", device)
