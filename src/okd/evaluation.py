"""Evaluation: generate responses and score them with ROUGE-L and exact match.

Protocol of the DistiLLM / MiniLLM line of work: for each prompt of a test set, generate a response
(batched, left-padded prompts, KV cache), score it against the reference with ROUGE-L F-measure
(``rouge-score``, stemming on) and report the mean over the set, repeated over several sampling seeds;
the result gives the mean and the spread (sample standard deviation) over seeds. Greedy decoding is
deterministic, so it is scored once. Every draw is also kept per example (prediction, ROUGE-L, exact
match, and a hash of the example's prompt and reference), which ``okd.comparison`` uses for paired
statistics between methods.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from okd.generation import generate_batched
from okd.io import write_json

# Kept for scripts written against earlier versions.
write_json_atomic = write_json


@dataclass
class GenerationConfig:
    """How responses are generated for evaluation."""

    max_new_tokens: int = 64
    """Maximum tokens generated per response."""
    do_sample: bool = True
    """Sample (with temperature / top_p) instead of greedy decoding."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    batch_size: int = 32
    """Prompts generated together."""


def generate(model, tokenizer, prompt_ids: list[list[int]], config: GenerationConfig, seed: int = 0, progress: bool = False) -> list[str]:
    """Generate one response per prompt (``okd.generation.generate_batched``, seeded and isolated
    from the caller's RNG). Returns the decoded generated text (prompt excluded), stripped."""
    responses = generate_batched(
        model,
        prompt_ids,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        do_sample=config.do_sample,
        batch_size=config.batch_size,
        seed=seed,
        progress=progress,
    )
    return [text.strip() for text in tokenizer.batch_decode(responses, skip_special_tokens=True)]


_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 100] (rouge-score, Porter stemming)."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100.0 * _ROUGE.score(reference, prediction)["rougeL"].fmeasure


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, articles and extra whitespace (SQuAD-style exact match)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """100 if the normalised strings are equal, else 0."""
    return 100.0 * (normalize_answer(prediction) == normalize_answer(reference))


EVAL_FORMAT = "okd-eval"
"""The ``format`` field of an evaluation JSON with per-example scores (``okd compare`` checks it)."""
EVAL_FORMAT_VERSION = 1


def example_hash(prompt: str, reference: str) -> str:
    """SHA-256 (hex) of one example's prompt and reference text: two evaluations are over the same
    examples in the same order exactly when their lists of hashes are equal."""
    return hashlib.sha256(json.dumps([prompt, reference], ensure_ascii=False).encode("utf-8")).hexdigest()


def sampling_seeds(seeds: str | Sequence[int] | None = None, samples: int | None = None) -> list[int]:
    """The seeds of the sampling draws, one draw per seed.

    Without ``samples``: the comma-separated ``seeds`` (default ``10,20,30``). With ``samples=N``:
    ``seeds`` is one base seed (default 0) and the draws use ``base, base + 1, ..., base + N - 1``; a
    list of exactly N seeds is also accepted and used as given.
    """
    if isinstance(seeds, str) or seeds is None:
        text = "" if seeds is None else str(seeds).replace(" ", "")
        try:
            values = [int(s) for s in text.split(",") if s]
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers, e.g. 10,20,30; got {seeds!r}") from None
    else:
        values = [int(s) for s in seeds]
    if samples is None:
        if seeds is None:
            return [10, 20, 30]
        if not values:
            raise ValueError("--seeds must list at least one integer, e.g. 10,20,30")
        return values
    if samples < 1:
        raise ValueError(f"--samples must be at least 1, got {samples}")
    if len(values) == samples:
        return values
    if len(values) > 1:
        raise ValueError(f"--samples {samples} takes one base seed in --seeds (or exactly {samples} seeds), got {len(values)} seeds")
    base = values[0] if values else 0
    return [base + i for i in range(samples)]


@dataclass
class EvalResult:
    """Scores of one model on one data set.

    The summary (``rouge_l_mean`` ...) is the mean over the sampling seeds of each seed's mean over the
    examples, and the sample standard deviation over seeds; ``greedy_*`` are the greedy-decoding means
    (None when greedy decoding was not scored). ``examples`` holds the per-example scores: one dict per
    example with ``index``, ``source``, ``hash`` (``example_hash``), ``prompt``, ``reference``,
    ``samples`` (one ``{seed, prediction, rouge_l, exact_match}`` per sampling draw) and, when greedy
    decoding was scored, ``greedy`` (``{prediction, rouge_l, exact_match}``).
    """

    rouge_l_mean: float
    rouge_l_std: float
    exact_match_mean: float
    exact_match_std: float
    per_seed: list[dict] = field(default_factory=list)
    num_examples: int = 0
    generation: dict = field(default_factory=dict)
    greedy_rouge_l: float | None = None
    greedy_exact_match: float | None = None
    seeds: list[int] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The JSON form: ``format`` and ``format_version`` first, then every field (``examples`` last)."""
        return {"format": EVAL_FORMAT, "format_version": EVAL_FORMAT_VERSION, **asdict(self)}


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def evaluate_model(
    model,
    tokenizer,
    dataset,
    seeds=(10, 20, 30),
    config: GenerationConfig | None = None,
    progress: bool = True,
    samples_to_keep: int = 3,
    greedy: bool = False,
) -> EvalResult:
    """Generate for every example of ``dataset`` (an ``InstructionDataset``) once per seed and score.

    With ``config.do_sample`` (the default) there is one sampling draw per seed; with ``greedy`` the
    model's greedy decoding is scored too (once). With ``do_sample=False`` the evaluation is greedy
    decoding only (the first seed is recorded). Every draw's per-example scores are kept in
    ``EvalResult.examples``; ``per_seed[k]["samples"]`` keeps the first ``samples_to_keep`` predictions
    of draw ``k`` for a quick look.
    """
    config = config or GenerationConfig()
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("evaluate_model needs at least one seed")
    n = len(dataset)
    prompt_ids = [dataset[i]["prompt_ids"] for i in range(n)]
    texts = [dataset.examples[i] for i in range(n)]
    references = [e.response for e in texts]
    records = [
        {"index": i, "source": e.source, "hash": example_hash(e.prompt, e.response), "prompt": e.prompt,
         "reference": e.response, "samples": []}
        for i, e in enumerate(texts)
    ]

    def run(run_config: GenerationConfig, seed: int) -> tuple[list[str], list[float], list[float], dict]:
        predictions = generate(model, tokenizer, prompt_ids, run_config, seed=seed, progress=progress)
        rouge = [rouge_l(p, r) for p, r in zip(predictions, references)]
        exact = [exact_match(p, r) for p, r in zip(predictions, references)]
        summary = {
            "seed": seed,
            "rouge_l": _mean(rouge),
            "exact_match": _mean(exact),
            "samples": [
                {"prompt": texts[i].prompt, "reference": references[i], "prediction": predictions[i]}
                for i in range(min(samples_to_keep, n))
            ],
        }
        return predictions, rouge, exact, summary

    per_seed = []
    greedy_summary = None
    if config.do_sample:
        for seed in seeds:
            predictions, rouge, exact, summary = run(config, seed)
            per_seed.append(summary)
            for record, p, r, x in zip(records, predictions, rouge, exact):
                record["samples"].append({"seed": seed, "prediction": p, "rouge_l": r, "exact_match": x})
    if greedy or not config.do_sample:
        predictions, rouge, exact, greedy_summary = run(replace(config, do_sample=False), seeds[0])
        for record, p, r, x in zip(records, predictions, rouge, exact):
            record["greedy"] = {"prediction": p, "rouge_l": r, "exact_match": x}
        if not config.do_sample:
            per_seed.append(greedy_summary)
    rouges = [s["rouge_l"] for s in per_seed]
    exacts = [s["exact_match"] for s in per_seed]
    return EvalResult(
        rouge_l_mean=_mean(rouges),
        rouge_l_std=_spread(rouges),
        exact_match_mean=_mean(exacts),
        exact_match_std=_spread(exacts),
        per_seed=per_seed,
        num_examples=n,
        generation=asdict(config),
        greedy_rouge_l=None if greedy_summary is None else greedy_summary["rouge_l"],
        greedy_exact_match=None if greedy_summary is None else greedy_summary["exact_match"],
        seeds=seeds if config.do_sample else seeds[:1],
        examples=records,
    )


def evaluate(
    model: str,
    data: str,
    seeds: str | None = None,
    json_out: str | None = None,
    max_examples: int | None = None,
    max_length: int = 256,
    generation: GenerationConfig = GenerationConfig(),
    progress: bool = True,
    samples: int | None = None,
    greedy: bool = True,
    name: str | None = None,
) -> dict:
    """Evaluate a saved model on a JSONL file: ROUGE-L and exact match, per example and summarised.

    Scores every sampling draw and greedy decoding per example (the JSON's ``examples``: prediction,
    reference, ROUGE-L and exact match, and a hash of the prompt and reference that ``okd compare``
    uses to check two evaluations are over the same examples), plus the summary: the mean and spread
    over the sampling seeds, and the greedy means. This signature is also the schema of ``okd eval``
    (``--json`` is accepted for ``--json-out``).

    Args:
        model: Directory (or hub id) of the model to evaluate.
        data: JSONL test file.
        seeds: Comma-separated sampling seeds, one draw per seed (default 10,20,30); with --samples,
            one base seed (default 0).
        json_out: Write the result to this JSON file (atomically).
        max_examples: Evaluate only the first N examples.
        max_length: Maximum prompt tokens (prompts are cut from the left).
        generation: How responses are generated (--generation.do_sample false: greedy decoding only).
        progress: Show a progress bar.
        samples: Sampling draws per example, with seeds BASE, BASE+1, ..., BASE+N-1 (BASE from --seeds).
        greedy: Also score greedy decoding (once per example).
        name: Method name recorded in the JSON (okd compare groups runs by it; default: the file name).
    """
    from okd.data import InstructionDataset, ensure_pad_token, read_jsonl
    from okd.models import load_model, load_tokenizer

    seed_list = sampling_seeds(seeds, samples)
    tokenizer = load_tokenizer(model)
    ensure_pad_token(tokenizer)
    lm = load_model(model)
    examples = read_jsonl(data, tokenizer=tokenizer)
    if max_examples:
        examples = examples[:max_examples]
    dataset = InstructionDataset(examples, tokenizer, max_length)
    result = evaluate_model(lm, tokenizer, dataset, seeds=seed_list, config=generation, progress=progress, greedy=greedy)
    body = result.to_dict()
    header = {key: body.pop(key) for key in ("format", "format_version")}
    payload = {
        **header, "name": name, "model": str(model), "data": str(data), "max_length": max_length,
        "max_examples": max_examples, **body,
    }
    if json_out:
        write_json(json_out, payload)
    return payload
