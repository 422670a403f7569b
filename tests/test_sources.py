"""Tests for okd.data.generated: generation, generated batches, SeqKD / on-policy / adaptive replay sources.

Models: the tiny trained teacher of ``tiny_setting`` (it ends its answers with EOS) and a fresh ``nano``
Llama student (its samples are noise, which is what on-policy tests need: they never equal the references).
"""

from __future__ import annotations

import json

import pytest
import torch

from okd.data import IGNORE_INDEX, Collator, InstructionDataset, read_jsonl
from okd.data.generated import (
    AdaptiveReplaySource,
    OnPolicySource,
    ReplayBuffer,
    TeacherGeneratedSource,
    build_batch,
    generate_responses,
)
from okd.data.sources import GroundTruthSource

BATCH = 4
NEW_TOKENS = 6  # short student samples keep the tests fast


@pytest.fixture(scope="module")
def env(tiny_setting):
    from okd.models import build_model, load_model, load_tokenizer

    # One thread: these models are so small that a second OpenMP thread only adds synchronisation,
    # which on a busy 2-core machine makes each generate call ~50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = load_tokenizer(tiny_setting["tokenizer"])
    examples = read_jsonl(tiny_setting["train"], tok)
    yield {
        "tok": tok,
        "teacher": load_model(tiny_setting["teacher"]),
        "student": build_model("llama", "nano", vocab_size=len(tok), seed=0),
        "dataset": InstructionDataset(examples[:64], tok, 48),
        "teacher_path": tiny_setting["teacher"],
    }
    torch.set_num_threads(threads)


def gt_source(env, seed=0):
    return GroundTruthSource(env["dataset"], Collator(env["tok"].pad_token_id), BATCH, seed=seed)


def same_batch(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_well_formed(batch: dict, prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> None:
    """Labels -100 exactly on prompt and padding, = input_ids on the response; mask 1 on real tokens."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.dtype == mask.dtype == labels.dtype == torch.long
    assert ids.shape == mask.shape == labels.shape
    assert ids.shape[1] == max(len(p) + len(r) for p, r in zip(prompts, responses))
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        n_p, n = len(prompt), len(prompt) + len(response)
        assert ids[row, :n].tolist() == prompt + response
        assert (ids[row, n:] == pad_id).all()
        assert mask[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert (labels[row, :n_p] == IGNORE_INDEX).all() and (labels[row, n:] == IGNORE_INDEX).all()
        assert torch.equal(labels[row, n_p:n], ids[row, n_p:n])


# ----------------------------------------------------------------------------------------------
# generate_responses / build_batch
# ----------------------------------------------------------------------------------------------


class ScriptedModel(torch.nn.Module):
    """Stands in for an HF model: ``generate`` appends fixed rows, recording the mode and kwargs."""

    def __init__(self, rows: list[list[int]]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.rows = rows
        self.calls = []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append({"training": self.training, "grad": torch.is_grad_enabled(), **kwargs})
        new = torch.tensor(self.rows, dtype=torch.long)
        return torch.cat([input_ids, new], dim=1)


def test_responses_cut_after_first_eos_and_keep_eos():
    eos, pad = 0, 1
    model = ScriptedModel([[5, 6, eos, pad, pad], [7, eos, 8, eos, pad], [9, 9, 9, 9, 9], [eos, pad, pad, pad, pad]])
    model.train()
    out = generate_responses(
        model, [[3, 4], [3], [4, 4, 4], [2]], pad_token_id=pad, eos_token_id=eos, max_new_tokens=5, temperature=0.7, top_p=0.9
    )
    # EOS kept, everything after it dropped; no EOS -> all max_new_tokens tokens kept, nothing appended.
    assert out == [[5, 6, eos], [7, eos], [9, 9, 9, 9, 9], [eos]]
    call = model.calls[0]
    assert call["training"] is False and call["grad"] is False  # eval mode, no graph
    assert model.training  # previous mode restored
    assert call["use_cache"] is True and call["do_sample"] is True
    assert (call["temperature"], call["top_p"], call["top_k"]) == (0.7, 0.9, 0)
    # Several stop tokens (Llama 3 style), and greedy when temperature is 0.
    out = generate_responses(model, [[3]] * 4, pad_token_id=pad, eos_token_id=[6, 8], max_new_tokens=5, temperature=0.0)
    assert out[0] == [5, 6] and out[1] == [7, eos, 8]
    assert model.calls[1]["do_sample"] is False and "temperature" not in model.calls[1]


def test_batched_greedy_generation_equals_one_by_one(env):
    tok, teacher, dataset = env["tok"], env["teacher"], env["dataset"]
    prompts = [dataset[i]["prompt_ids"] for i in range(6)]
    assert len({len(p) for p in prompts}) > 1  # different lengths: left padding is exercised
    kwargs = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, max_new_tokens=20, do_sample=False)
    batched = generate_responses(teacher, prompts, **kwargs)
    single = [generate_responses(teacher, [p], **kwargs)[0] for p in prompts]
    assert batched == single
    for response in batched:  # the trained teacher stops: EOS last, never earlier, no padding kept
        assert response.count(tok.eos_token_id) == 1 and response[-1] == tok.eos_token_id
        assert tok.pad_token_id not in response


def test_build_batch_is_well_formed():
    pad = 1
    prompts = [[10, 11, 12], [13], [14, 15]]
    responses = [[20, 21, 0], [22, 23, 24, 25, 0], []]
    batch = build_batch(prompts, responses, pad_token_id=pad, max_length=32, indices=[7, 8, 9])
    check_well_formed(batch, prompts, responses, pad)
    assert batch["index"].tolist() == [7, 8, 9]
    assert (batch["labels"][2] == IGNORE_INDEX).all()  # empty response: no loss token at all
    assert batch["attention_mask"][2].sum() == 2  # but the prompt is still there
    # Same tensors as the Collator makes for the same rows.
    features = [{"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r, "index": i} for i, (p, r) in zip([7, 8, 9], zip(prompts, responses))]
    assert same_batch(batch, Collator(pad)(features))
    padded = build_batch(prompts, responses, pad_token_id=pad, max_length=32, pad_to_multiple_of=8)
    assert padded["input_ids"].shape == (3, 8) and (padded["labels"][:, 6:] == IGNORE_INDEX).all()


def test_build_batch_truncation_keeps_a_response_token():
    pad = 1
    # Fits after cutting the response's end.
    batch = build_batch([[10, 11, 12]], [[20, 21, 22, 23]], pad, max_length=5)
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 20, 21]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 3 + [20, 21]
    # The prompt fills max_length: cut from the left, one response token survives.
    batch = build_batch([[10, 11, 12, 13, 14]], [[20, 21]], pad, max_length=4)
    assert batch["input_ids"][0].tolist() == [12, 13, 14, 20]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 3 + [20]
    # An empty response with a too-long prompt: still no loss token, prompt cut from the left.
    batch = build_batch([[10, 11, 12, 13, 14]], [[]], pad, max_length=3)
    assert batch["input_ids"][0].tolist() == [12, 13, 14] and (batch["labels"] == IGNORE_INDEX).all()


# ----------------------------------------------------------------------------------------------
# OnPolicySource
# ----------------------------------------------------------------------------------------------


def on_policy(env, lambda_, seed=0, gt_seed=0):
    return OnPolicySource(
        gt_source(env, gt_seed), env["student"], eos_token_id=env["tok"].eos_token_id,
        lambda_=lambda_, max_new_tokens=NEW_TOKENS, temperature=1.0, seed=seed,
    )


def test_on_policy_lambda_zero_is_ground_truth_bit_for_bit(env):
    source, reference = on_policy(env, 0.0), gt_source(env)
    for _ in range(5):
        assert same_batch(source.next_batch(), reference.next_batch())
    assert source.stats()["on_policy_fraction"] == 0.0
    assert source.state.epoch == reference.state.epoch and source.state.position == reference.state.position


def test_on_policy_lambda_one_never_uses_ground_truth(env):
    tok = env["tok"]
    source, reference = on_policy(env, 1.0), gt_source(env)
    for _ in range(4):
        batch, gt = source.next_batch(), reference.next_batch()
        assert torch.equal(batch["index"], gt["index"])  # same prompts, in the ground-truth order
        assert batch["labels"].shape != gt["labels"].shape or not torch.equal(batch["labels"], gt["labels"])
        prompts = [env["dataset"][i]["prompt_ids"] for i in gt["index"].tolist()]
        responses = []
        for row, prompt in enumerate(prompts):
            n = int(batch["attention_mask"][row].sum())
            responses.append(batch["input_ids"][row, len(prompt):n].tolist())
            assert 1 <= len(responses[-1]) <= NEW_TOKENS
            assert tok.eos_token_id not in responses[-1][:-1]  # nothing after an EOS
        check_well_formed(batch, prompts, responses, tok.pad_token_id)
    assert source.stats()["on_policy_fraction"] == 1.0


def test_on_policy_coin_flips_follow_the_seed(env):
    source = on_policy(env, 0.5, seed=123)
    expected_draws = torch.rand(12, generator=torch.Generator().manual_seed(123))
    flags = []
    for _ in range(12):
        source.next_batch()
        flags.append(source.last_on_policy)
    assert flags == (expected_draws < 0.5).tolist()
    assert 0 < sum(flags) < 12
    assert source.stats()["on_policy_batches"] == sum(flags)


def test_on_policy_resume_is_exact(env):
    source = on_policy(env, 0.5, seed=1)
    for _ in range(3):
        source.next_batch()
    state = source.state_dict()
    rng = torch.get_rng_state()  # the loop saves this too: HF sampling draws from it
    continued = [source.next_batch() for _ in range(3)]

    torch.manual_seed(999)  # anything in between must not matter
    fresh = on_policy(env, 0.5, seed=77)
    fresh.load_state_dict(_roundtrip(state))
    torch.set_rng_state(rng)
    kinds = []
    for expected in continued:
        assert same_batch(fresh.next_batch(), expected)
        kinds.append(fresh.last_on_policy)
    assert True in kinds  # the resumed steps include generated batches
    assert fresh.stats() == source.stats()


# ----------------------------------------------------------------------------------------------
# ReplayBuffer
# ----------------------------------------------------------------------------------------------


def test_replay_buffer_fifo_sampling_and_state():
    buffer = ReplayBuffer(capacity=3)
    buffer.add([[1], [2]], [[10], [20]])
    buffer.add([[3], [4], [5]], [[30], [40], [50]])
    assert len(buffer) == 3
    assert buffer.items() == [([3], [30]), ([4], [40]), ([5], [50])]  # the two oldest evicted

    a = buffer.sample(2, torch.Generator().manual_seed(5))
    b = buffer.sample(2, torch.Generator().manual_seed(5))
    assert a == b and len({tuple(p) for p, _ in a}) == 2  # reproducible, without replacement
    with pytest.raises(ValueError):
        buffer.sample(4, torch.Generator())

    restored = ReplayBuffer(capacity=3)
    restored.load_state_dict(json.loads(json.dumps(buffer.state_dict())))
    assert restored.items() == buffer.items()
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert [buffer.sample(3, g1) for _ in range(3)] == [restored.sample(3, g2) for _ in range(3)]
    restored.add([[6]], [[60]])  # and it keeps evicting in the same order
    assert restored.items() == [([4], [40]), ([5], [50]), ([6], [60])]


# ----------------------------------------------------------------------------------------------
# AdaptiveReplaySource
# ----------------------------------------------------------------------------------------------


def adaptive(env, **kwargs):
    defaults = dict(eos_token_id=env["tok"].eos_token_id, max_new_tokens=NEW_TOKENS, replay_ratio=0.5)
    return AdaptiveReplaySource(gt_source(env), env["student"], **{**defaults, **kwargs})


def test_adaptive_threshold_follows_validation_losses(env):
    # Values exactly representable in binary, so the boundary (loss == reference + eps) is exact.
    source = adaptive(env, init_threshold=0.25, threshold_step=0.25, max_threshold=0.75, loss_eps=0.5)
    expected = [
        (2.0, 0.25),   # first loss: the reference, no change
        (2.25, 0.25),  # up, but by less than eps
        (2.5, 0.5),    # up by exactly eps: rises (DistiLLM compares with >=); reference -> 2.5
        (2.75, 0.5),   # 2.75 < 2.5 + 0.5
        (1.0, 0.5),    # down
        (1.25, 0.5),   # DistiLLM's reference is the loss at the last rise (2.5), not the previous one
        (3.0, 0.75),   # 3.0 >= 2.5 + 0.5
        (9.0, 0.75),   # rises again but capped
        (float("nan"), 0.75),
    ]
    for loss, threshold in expected:
        source.observe_validation_loss(loss)
        assert source.threshold == threshold, loss
    assert source.reference_loss == 9.0 and source.stats()["adaptive_threshold"] == 0.75

    previous = adaptive(env, init_threshold=0.25, threshold_step=0.25, max_threshold=0.75, loss_eps=0.5, threshold_reference="previous")
    for loss, threshold in [(2.0, 0.25), (1.0, 0.25), (1.25, 0.25), (1.75, 0.5), (2.0, 0.5)]:
        previous.observe_validation_loss(loss)
        assert previous.threshold == threshold, loss

    distillm = adaptive(env)  # DistiLLM's defaults: start at 0, +0.1 per rise of >= 0.1, cap 1.0
    assert distillm.threshold == 0.0
    for loss in [3.0, 3.05, 3.2, 3.25, 3.5, 3.45]:
        distillm.observe_validation_loss(loss)
    assert distillm.threshold == pytest.approx(0.2)
    for k in range(20):
        distillm.observe_validation_loss(4.0 + k)
    assert distillm.threshold == 1.0


def test_adaptive_threshold_zero_is_ground_truth(env):
    source, reference = adaptive(env), gt_source(env)  # DistiLLM starts at threshold 0
    for _ in range(4):
        assert same_batch(source.next_batch(), reference.next_batch())
    assert source.stats()["student_fraction"] == 0.0 and len(source.buffer) == 0


def test_adaptive_fresh_until_buffer_holds_enough_then_replay(env):
    source = adaptive(env, init_threshold=1.0, capacity=2 * BATCH, replay_ratio=1.0)
    kinds = []
    for _ in range(5):
        batch = source.next_batch()
        kinds.append(source.last_kind)
        if source.last_kind == "replay":  # replayed rows are pairs held in the buffer
            held = source.buffer.items()
            for row in range(BATCH):
                n = int(batch["attention_mask"][row].sum())
                ids = batch["input_ids"][row, :n].tolist()
                prompt_len = int((batch["labels"][row, :n] == IGNORE_INDEX).sum())
                assert (ids[:prompt_len], ids[prompt_len:]) in held
            assert "index" not in batch
    # DistiLLM: fresh while the buffer is below capacity, then (replay share 1) always replay.
    assert kinds == ["fresh", "fresh", "replay", "replay", "replay"]
    assert len(source.buffer) == 2 * BATCH
    never_replay = adaptive(env, init_threshold=1.0, capacity=BATCH, replay_ratio=0.0)
    for _ in range(3):
        never_replay.next_batch()
        assert never_replay.last_kind == "fresh"
    with pytest.raises(ValueError, match="total_steps"):
        adaptive(env, replay_ratio="decreasing")
    scheduled = adaptive(env, replay_ratio="decreasing", total_steps=10)
    assert scheduled.replay_probability(step=5) == 0.5 and scheduled.replay_probability(step=10) == 1.0


def test_adaptive_resume_is_exact(env):
    def make(seed):
        return adaptive(env, init_threshold=0.25, threshold_step=0.5, capacity=2 * BATCH, replay_ratio=0.5, seed=seed)

    source = make(seed=3)
    source.observe_validation_loss(1.0)
    for _ in range(4):
        source.next_batch()
    source.observe_validation_loss(1.5)  # -> threshold 0.75
    for _ in range(3):
        source.next_batch()
    state = source.state_dict()
    rng = torch.get_rng_state()
    continued, kinds = [], []
    for _ in range(6):
        continued.append(source.next_batch())
        kinds.append(source.last_kind)
    assert {"fresh", "replay", "ground_truth"} <= set(kinds)  # every branch is checked after resume

    torch.manual_seed(1234)
    fresh = make(seed=0)
    fresh.load_state_dict(_roundtrip(state))
    torch.set_rng_state(rng)
    assert fresh.threshold == 0.75 and fresh.reference_loss == 1.5
    for expected in continued:
        assert same_batch(fresh.next_batch(), expected)
    assert fresh.buffer.items() == source.buffer.items()
    assert fresh.stats() == source.stats()


def _roundtrip(state):
    """Through a checkpoint's format, as a checkpoint stores it: tensors in safetensors, the rest in JSON."""
    import json

    from safetensors.torch import load, save

    from okd.training.checkpoint import decode, encode

    tree, files = encode({"source": state})
    files = {name: load(save(tensors)) for name, tensors in files.items()}
    return decode(json.loads(json.dumps(tree)), files)["source"]


# ----------------------------------------------------------------------------------------------
# TeacherGeneratedSource
# ----------------------------------------------------------------------------------------------


def test_teacher_generated_cache_and_batches(env, tmp_path, monkeypatch):
    tok, teacher, dataset = env["tok"], env["teacher"], env["dataset"]
    import okd.generation

    calls = []  # one per generated batch, whichever backend decodes it
    original = okd.generation._generate_one_batch

    def counting_generate(*args, **kwargs):
        calls.append(kwargs.get("temperature"))
        return original(*args, **kwargs)

    monkeypatch.setattr(okd.generation, "_generate_one_batch", counting_generate)
    cache = tmp_path / "seqkd" / "teacher.jsonl"
    common = dict(
        cache_path=cache, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, batch_size=BATCH,
        teacher_id=env["teacher_path"], generation_batch_size=32, progress=False,
    )
    rng = torch.get_rng_state()
    source = TeacherGeneratedSource(dataset, teacher, **common)
    assert torch.equal(torch.get_rng_state(), rng)  # generation ran under its own seed
    assert len(calls) == 2 and not source.stats()["teacher_cache_hit"]  # 64 prompts / 32
    lines = cache.read_text().splitlines()
    assert json.loads(lines[0])["key"] == source.key and len(lines) == 1 + len(dataset)
    assert [p.name for p in cache.parent.iterdir()] == ["teacher.jsonl"]  # no temporary file left
    record = json.loads(lines[1])
    assert record["index"] == 0 and record["prompt_ids"] == dataset[0]["prompt_ids"]
    assert record["response_ids"] == source.responses[0]

    # Same settings: reused, the teacher is not even loaded.
    def no_teacher():
        raise AssertionError("the cache should have been reused")

    again = TeacherGeneratedSource(dataset, no_teacher, **common)
    assert again.responses == source.responses and again.stats()["teacher_cache_hit"] == 1.0
    assert len(calls) == 2

    # A changed generation setting rebuilds it.
    changed = TeacherGeneratedSource(dataset, teacher, **{**common, "temperature": 0.5})
    assert len(calls) == 4 and calls[-1] == 0.5 and changed.key != source.key
    assert json.loads(cache.read_text().splitlines()[0])["key"] == changed.key

    # Batches: the ground-truth order, teacher responses, correct masks.
    reference = gt_source(env)
    eos_endings = 0
    for _ in range(3):
        batch, gt = source.next_batch(), reference.next_batch()
        assert torch.equal(batch["index"], gt["index"])
        indices = batch["index"].tolist()
        prompts = [dataset[i]["prompt_ids"] for i in indices]
        responses = [source.responses[i] for i in indices]
        check_well_formed(batch, prompts, responses, tok.pad_token_id)
        eos_endings += sum(r[-1] == tok.eos_token_id for r in responses)
    assert eos_endings >= 6  # the trained teacher mostly ends its answers
    state = source.state_dict()
    restored = TeacherGeneratedSource(dataset, no_teacher, **{**common, "temperature": 0.5})
    assert restored.key == changed.key
    again.load_state_dict(state)
    assert same_batch(again.next_batch(), source.next_batch())


def test_config_source_names_come_from_the_registry():
    import typing

    from okd.config import MethodConfig, SourceName, resolve_method
    from okd.sources import SOURCES, Source, register_source

    assert set(typing.get_args(SourceName)) == set(SOURCES) == {"ground_truth", "teacher_generated", "on_policy", "adaptive_replay", "teacher_mixed"}
    assert all(issubclass(cls, Source) and cls.name == name for name, cls in SOURCES.items())

    @register_source("test_constant")
    class Constant(Source):  # the smallest source: the defaults cover stats and validation
        @classmethod
        def from_config(cls, setup):
            return cls()

    try:
        assert Constant().stats() == {} and Constant().observe_validation_loss(1.0) is None
        assert resolve_method(MethodConfig(name="kd", source="test_constant")).source == "test_constant"
    finally:
        del SOURCES["test_constant"]
    with pytest.raises(ValueError, match="did you mean 'on_policy'"):
        resolve_method(MethodConfig(name="kd", source="on_polcy"))


def test_isolated_rng_seeds_then_restores_every_generator():
    from okd.generation import isolated_rng

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    cuda_before = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    with isolated_rng(7):
        inside = torch.rand(3)
        if torch.cuda.is_available():
            cuda_inside = torch.rand(3, device="cuda")
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(7)
    assert torch.equal(inside, torch.rand(3))
    if torch.cuda.is_available():  # every CUDA generator comes back, not only the CPU one
        assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda_before))
        assert torch.equal(cuda_inside, torch.rand(3, device="cuda"))
