"""Evaluation: generate responses and score them with ROUGE-L and exact match.

Protocol of the DistiLLM / MiniLLM line of work: for each prompt of a test set, generate a response
(batched, left-padded prompts, KV cache), score it against the reference with ROUGE-L F-measure
(``rouge-score``, stemming on) and report the mean over the set, repeated over several sampling seeds;
the result gives the mean and the spread (sample standard deviation) over seeds. Greedy decoding is
deterministic, so it is scored once.
"""

from __future__ import annotations

import re
import statistics
import string
from dataclasses import asdict, dataclass, field

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


@dataclass
class EvalResult:
    rouge_l_mean: float
    rouge_l_std: float
    exact_match_mean: float
    exact_match_std: float
    per_seed: list[dict] = field(default_factory=list)
    num_examples: int = 0
    generation: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def evaluate_model(model, tokenizer, dataset, seeds=(10, 20, 30), config: GenerationConfig | None = None, progress: bool = True, samples_to_keep: int = 3) -> EvalResult:
    """Generate for every example of ``dataset`` (an ``InstructionDataset``) once per seed and score."""
    config = config or GenerationConfig()
    seeds = list(seeds) if config.do_sample else list(seeds)[:1]
    prompt_ids = [dataset[i]["prompt_ids"] for i in range(len(dataset))]
    references = [dataset.examples[i].response for i in range(len(dataset))]
    per_seed = []
    for seed in seeds:
        predictions = generate(model, tokenizer, prompt_ids, config, seed=seed, progress=progress)
        rouge = [rouge_l(p, r) for p, r in zip(predictions, references)]
        exact = [exact_match(p, r) for p, r in zip(predictions, references)]
        per_seed.append(
            {
                "seed": seed,
                "rouge_l": sum(rouge) / len(rouge),
                "exact_match": sum(exact) / len(exact),
                "samples": [
                    {"prompt": dataset.examples[i].prompt, "reference": references[i], "prediction": predictions[i]}
                    for i in range(min(samples_to_keep, len(predictions)))
                ],
            }
        )
    rouges = [s["rouge_l"] for s in per_seed]
    exacts = [s["exact_match"] for s in per_seed]
    return EvalResult(
        rouge_l_mean=sum(rouges) / len(rouges),
        rouge_l_std=_spread(rouges),
        exact_match_mean=sum(exacts) / len(exacts),
        exact_match_std=_spread(exacts),
        per_seed=per_seed,
        num_examples=len(dataset),
        generation=asdict(config),
    )


def evaluate(
    model: str,
    data: str,
    seeds: str = "10,20,30",
    json_out: str | None = None,
    max_examples: int | None = None,
    max_length: int = 256,
    generation: GenerationConfig = GenerationConfig(),
    progress: bool = True,
) -> dict:
    """Evaluate a saved model on a JSONL file: ROUGE-L and exact match, mean and spread over seeds.

    This signature is also the schema of ``okd eval`` (``--json`` is accepted for ``--json-out``).

    Args:
        model: Directory (or hub id) of the model to evaluate.
        data: JSONL test file.
        seeds: Comma-separated sampling seeds (greedy decoding uses only the first).
        json_out: Write the result to this JSON file (atomically).
        max_examples: Evaluate only the first N examples.
        max_length: Maximum prompt tokens (prompts are cut from the left).
        generation: How responses are generated.
        progress: Show a progress bar.
    """
    from okd.data import InstructionDataset, ensure_pad_token, read_jsonl
    from okd.models import load_model, load_tokenizer

    seed_list = [int(s) for s in str(seeds).replace(" ", "").split(",") if s]
    if not seed_list:
        raise ValueError("--seeds must list at least one integer, e.g. 10,20,30")
    tokenizer = load_tokenizer(model)
    ensure_pad_token(tokenizer)
    lm = load_model(model)
    examples = read_jsonl(data, tokenizer=tokenizer)
    if max_examples:
        examples = examples[:max_examples]
    dataset = InstructionDataset(examples, tokenizer, max_length)
    result = evaluate_model(lm, tokenizer, dataset, seeds=seed_list, config=generation, progress=progress)
    payload = {"model": str(model), "data": str(data), **result.to_dict()}
    if json_out:
        write_json(json_out, payload)
    return payload
