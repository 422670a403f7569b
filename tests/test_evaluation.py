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


def test_sampling_seeds_from_a_list_or_a_base_seed():
    from okd.evaluation import sampling_seeds

    assert sampling_seeds() == [10, 20, 30]
    assert sampling_seeds("1, 2") == [1, 2]
    assert sampling_seeds("5", samples=3) == [5, 6, 7]
    assert sampling_seeds(None, samples=2) == [0, 1]
    assert sampling_seeds("1,4,9", samples=3) == [1, 4, 9]
    with pytest.raises(ValueError, match="one base seed"):
        sampling_seeds("1,2", samples=3)
    with pytest.raises(ValueError, match="comma-separated integers"):
        sampling_seeds("a,b")
    with pytest.raises(ValueError, match="at least 1"):
        sampling_seeds("1", samples=0)


def test_evaluate_writes_per_example_scores_for_every_draw_and_greedy(tiny_setting, tmp_path):
    from statistics import mean

    from okd.data import read_jsonl
    from okd.evaluation import evaluate, example_hash

    out = tmp_path / "eval.json"
    result = evaluate(
        tiny_setting["teacher"], tiny_setting["validation"], seeds="5", samples=3, json_out=str(out), max_examples=6,
        max_length=48, generation=GenerationConfig(max_new_tokens=8), progress=False, name="teacher",
    )
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert (saved["format"], saved["format_version"], saved["name"]) == ("okd-eval", 1, "teacher")
    assert (saved["model"], saved["data"], saved["max_length"]) == (tiny_setting["teacher"], tiny_setting["validation"], 48)
    assert saved["generation"]["max_new_tokens"] == 8 and saved["generation"]["do_sample"] is True
    assert saved["seeds"] == [5, 6, 7] and [s["seed"] for s in saved["per_seed"]] == [5, 6, 7]
    for key in ("rouge_l_mean", "rouge_l_std", "exact_match_mean", "exact_match_std", "num_examples", "greedy_rouge_l", "greedy_exact_match"):
        assert isinstance(saved[key], (int, float)), key
    references = read_jsonl(tiny_setting["validation"])[:6]
    records = saved["examples"]
    assert [r["index"] for r in records] == list(range(6))
    for record, example in zip(records, references):
        assert record["reference"] == example.response and record["prompt"] == example.prompt
        assert record["hash"] == example_hash(example.prompt, example.response)
        assert [d["seed"] for d in record["samples"]] == [5, 6, 7]
        for draw in [*record["samples"], record["greedy"]]:
            assert draw["rouge_l"] == pytest.approx(rouge_l(draw["prediction"], example.response))
            assert draw["exact_match"] == exact_match(draw["prediction"], example.response)
    # The summary is the mean of the per-example scores.
    for k, summary in enumerate(saved["per_seed"]):
        assert summary["rouge_l"] == pytest.approx(mean(r["samples"][k]["rouge_l"] for r in records))
        assert summary["exact_match"] == pytest.approx(mean(r["samples"][k]["exact_match"] for r in records))
    assert saved["rouge_l_mean"] == pytest.approx(mean(s["rouge_l"] for s in saved["per_seed"]))
    assert saved["greedy_rouge_l"] == pytest.approx(mean(r["greedy"]["rouge_l"] for r in records))
    assert saved["greedy_exact_match"] == pytest.approx(mean(r["greedy"]["exact_match"] for r in records))
    # The draws are different samples; the greedy prediction is the model's greedy decoding.
    assert any(len({d["prediction"] for d in r["samples"]}) > 1 for r in records)
    from okd.data import InstructionDataset
    from okd.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_setting["teacher"])
    dataset = InstructionDataset(references, tokenizer, 48)
    greedy = generate(load_model(tiny_setting["teacher"]), tokenizer, [dataset[i]["prompt_ids"] for i in range(6)],
                      GenerationConfig(max_new_tokens=8, do_sample=False))
    assert [r["greedy"]["prediction"] for r in records] == greedy


def test_in_memory_evaluation_pairs_with_okd_eval_output(tiny_setting, tmp_path, capsys):
    """evaluate_model on a loaded model gives the same per-example structure; okd compare pairs it with
    an okd eval file over the same examples and refuses one over other examples."""
    from okd.cli import main
    from okd.comparison import run_comparison
    from okd.data import InstructionDataset, read_jsonl
    from okd.evaluation import evaluate_model
    from okd.io import write_json
    from okd.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_setting["teacher"])
    model = load_model(tiny_setting["teacher"])
    dataset = InstructionDataset(read_jsonl(tiny_setting["validation"])[:5], tokenizer, 48)
    greedy_only = evaluate_model(model, tokenizer, dataset, seeds=[0], config=GenerationConfig(max_new_tokens=6, do_sample=False), progress=False)
    assert greedy_only.greedy_rouge_l == greedy_only.rouge_l_mean and len(greedy_only.per_seed) == 1
    assert all(r["samples"] == [] and "greedy" in r for r in greedy_only.examples)
    write_json(tmp_path / "memory.json", {**greedy_only.to_dict(), "name": "memory"})

    main(["eval", "--model", tiny_setting["teacher"], "--data", tiny_setting["validation"], "--samples", "2", "--seeds", "3",
          "--no-greedy", "--max-examples", "5", "--max-length", "48", "--generation.max_new_tokens", "6",
          "--json", str(tmp_path / "cli.json"), "--name", "cli", "--no-progress"])
    cli = json.loads((tmp_path / "cli.json").read_text())
    assert cli["greedy_rouge_l"] is None and all("greedy" not in r and len(r["samples"]) == 2 for r in cli["examples"])
    assert [d["seed"] for d in cli["examples"][0]["samples"]] == [3, 4]
    assert [r["hash"] for r in cli["examples"]] == [r["hash"] for r in greedy_only.examples]

    with pytest.raises(ValueError, match="no greedy scores per example"):
        run_comparison([str(tmp_path / "cli.json"), str(tmp_path / "memory.json")], decoding="greedy")
    with pytest.raises(ValueError, match="no sampled draws per example"):
        run_comparison([str(tmp_path / "memory.json"), str(tmp_path / "cli.json")])
    # Greedy decoding of the same model, twice: the paired difference is exactly 0.
    (tmp_path / "copy.json").write_text((tmp_path / "memory.json").read_text())
    main(["compare", str(tmp_path / "memory.json"), "--decoding", "greedy", f"copy={tmp_path / 'copy.json'}"])
    table = capsys.readouterr().out
    assert "| memory - copy |" in table and "| +0.00 | [+0.00, +0.00] | 1.0000 |" in table
    write_json(tmp_path / "fewer.json", {**evaluate_model(model, tokenizer, InstructionDataset(dataset.examples[:4], tokenizer, 48), seeds=[0],
                                                           config=GenerationConfig(max_new_tokens=2, do_sample=False), progress=False).to_dict()})
    with pytest.raises(ValueError, match="not over the same examples"):
        run_comparison([str(tmp_path / "memory.json"), str(tmp_path / "fewer.json")], decoding="greedy")


def test_example_hash_covers_prompt_and_reference():
    import hashlib

    from okd.evaluation import example_hash

    assert example_hash("Reverse: a b\nAnswer:", " b a") == hashlib.sha256(b'["Reverse: a b\\nAnswer:", " b a"]').hexdigest()
    assert example_hash("p", "a") != example_hash("p", "b")
    assert example_hash("p", "a") != example_hash("q", "a")
    assert example_hash("pa", "") != example_hash("p", "a")
