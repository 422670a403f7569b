"""Evaluation: scoring functions on known answers, batched generation equals one-by-one generation."""

from __future__ import annotations

import json

import pytest
import torch

from okd.evaluation import GenerationConfig, exact_match, generate, rouge_l


def test_rouge_l_known_values():
    assert rouge_l("return the sum of a and b", "return the sum of a and b") == pytest.approx(100.0)
    assert rouge_l("alpha beta", "gamma delta") == 0.0
    # LCS "a c" of lengths 3 and 2: P = 2/2, R = 2/3, F = 0.8.
    assert rouge_l("a c", "a b c") == pytest.approx(80.0)
    assert rouge_l("", "something") == 0.0


def test_exact_match_normalises_case_punctuation_and_articles():
    assert exact_match("The answer.", "answer") == 100.0
    assert exact_match("an answer", "answers") == 0.0


def test_batched_left_padded_generation_matches_single_prompts(tiny_setting):
    from okd.data import read_jsonl, InstructionDataset
    from okd.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_setting["teacher"])
    model = load_model(tiny_setting["teacher"])
    dataset = InstructionDataset(read_jsonl(tiny_setting["validation"])[:6], tokenizer, 48)
    prompts = [dataset[i]["prompt_ids"] for i in range(len(dataset))]
    assert len({len(p) for p in prompts}) > 1, "need prompts of different lengths to exercise padding"
    greedy = GenerationConfig(max_new_tokens=8, do_sample=False, batch_size=6)
    batched = generate(model, tokenizer, prompts, greedy)
    single = [generate(model, tokenizer, [p], greedy)[0] for p in prompts]
    assert batched == single
    # The trained teacher answers the reverse task at least sometimes.
    references = [dataset.examples[i].response.strip() for i in range(len(dataset))]
    assert sum(rouge_l(p, r) for p, r in zip(batched, references)) > 0


def test_sampling_is_reproducible_per_seed_and_leaves_global_rng_alone(tiny_setting):
    from okd.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_setting["teacher"])
    model = load_model(tiny_setting["teacher"])
    prompts = [tokenizer("Reverse: alpha bravo charlie\nAnswer:")["input_ids"]] * 4
    config = GenerationConfig(max_new_tokens=8, do_sample=True, batch_size=4)
    state = torch.random.get_rng_state()
    a = generate(model, tokenizer, prompts, config, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    assert a == generate(model, tokenizer, prompts, config, seed=1)
    assert any(a != generate(model, tokenizer, prompts, config, seed=s) for s in (2, 3, 4))


def test_evaluate_writes_json_with_mean_and_spread(tiny_setting, tmp_path):
    from okd.evaluation import evaluate

    out = tmp_path / "eval.json"
    result = evaluate(
        tiny_setting["teacher"], tiny_setting["validation"], seeds="1,2,3", json_out=str(out),
        max_examples=8, max_length=48, generation=GenerationConfig(max_new_tokens=8), progress=False,
    )
    saved = json.loads(out.read_text())
    assert saved["rouge_l_mean"] == pytest.approx(result["rouge_l_mean"])
    assert [s["seed"] for s in saved["per_seed"]] == [1, 2, 3]
    per_seed = [s["rouge_l"] for s in saved["per_seed"]]
    assert saved["rouge_l_mean"] == pytest.approx(sum(per_seed) / 3)
    assert saved["num_examples"] == 8
    # The spread is the sample standard deviation over seeds (n - 1), written out here independently.
    assert len(set(per_seed)) > 1, "the seeds gave equal scores: the spread check below would be vacuous"
    mean = sum(per_seed) / 3
    assert saved["rouge_l_std"] == pytest.approx((sum((x - mean) ** 2 for x in per_seed) / 2) ** 0.5)
    exact = [s["exact_match"] for s in saved["per_seed"]]
    exact_mean = sum(exact) / 3
    assert saved["exact_match_mean"] == pytest.approx(exact_mean)
    assert saved["exact_match_std"] == pytest.approx((sum((x - exact_mean) ** 2 for x in exact) / 2) ** 0.5)
    assert result["rouge_l_std"] == pytest.approx(saved["rouge_l_std"])
