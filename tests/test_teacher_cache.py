"""Cached teacher outputs (okd.teacher_cache): writer, reader, bucketed losses, hidden-state cache."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from okd import teacher_cache as tc
from okd.data import Collator, Example, InstructionDataset
from okd.divergences import DIVERGENCES, get_divergence
from okd.models import build_model, train_tokenizer
from okd.teacher_cache import (
    CacheMismatchError,
    CachedHiddenTeacher,
    SparseTargets,
    TeacherCache,
    build_teacher_cache,
    cached_divergence,
    fingerprint_teacher,
    fingerprint_tokenizer,
)

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()

# Every divergence of the library, with non-default parameters where it has some.
ALL_DIVERGENCES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.3}),
    ("jsd", {"beta": 0.5, "scaled": True}),
    ("tvd", {}),
    ("skew_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.2}),
    ("adaptive_kl", {"mu": 0.5}),
]


def _examples(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(2, 5))
        out.append(Example(prompt="Reverse: " + " ".join(words) + "\nAnswer:", response=" " + " ".join(reversed(words))))
    return out


@pytest.fixture(scope="module")
def setting():
    tokenizer = train_tokenizer([e.prompt + e.response for e in _examples(200, 0)], vocab_size=300)
    dataset = InstructionDataset(_examples(24, 1), tokenizer, max_length=40)
    vocab = len(tokenizer)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    teacher = build_model("llama", "tiny", vocab, max_positions=64, seed=1, **ids).eval()
    with torch.no_grad():  # a peaked teacher: random init gives near-uniform logits
        teacher.get_output_embeddings().weight.mul_(40.0)
    student = build_model("llama", "nano", vocab, max_positions=64, seed=2, **ids).eval()
    return {"tokenizer": tokenizer, "dataset": dataset, "teacher": teacher, "student": student, "vocab": vocab}


def _loader(setting, batch_size=5, shuffle=False, seed=0):
    return DataLoader(
        setting["dataset"], batch_size=batch_size, shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed), collate_fn=Collator(setting["tokenizer"].pad_token_id),
    )


def _mask(labels):
    return tc.batch_loss_mask(labels)


@pytest.fixture(scope="module")
def exact_cache(setting, tmp_path_factory):
    out = tmp_path_factory.mktemp("caches") / "exact"
    return build_teacher_cache(
        setting["teacher"], setting["dataset"], out, tokenizer=setting["tokenizer"], top_k=10**6,
        batch_size=7, positions_per_shard=50,
    )


@pytest.fixture(scope="module")
def topk_cache(setting, tmp_path_factory):
    out = tmp_path_factory.mktemp("caches") / "top8"
    return build_teacher_cache(
        setting["teacher"], setting["dataset"], out, tokenizer=setting["tokenizer"], top_k=8, batch_size=4,
        positions_per_shard=40,
    )


# ------------------------------------------------------------------------------------------------
# float64 references, written independently of okd.divergences and okd.teacher_cache
# ------------------------------------------------------------------------------------------------


def _ref_divergence(p: torch.Tensor, q: torch.Tensor, name: str, params: dict) -> torch.Tensor:
    """Per-row divergence of float64 probability vectors ``[n, m]`` (0 log 0 = 0)."""

    def kl(a, b):
        return torch.where(a > 0, a * (torch.log(a) - torch.log(b)), torch.zeros_like(a)).sum(-1)

    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "jsd":
        b = params["beta"]
        m = b * p + (1 - b) * q
        value = b * kl(p, m) + (1 - b) * kl(q, m)
        return value / (b * (1 - b)) if params.get("scaled") else value
    if name == "skew_kl":
        a = params["alpha"]
        return kl(p, a * p + (1 - a) * q)
    if name == "skew_reverse_kl":
        a = params["alpha"]
        return kl(q, (1 - a) * p + a * q)
    raise KeyError(name)


def _ref_bucketed(teacher_logits, student_logits, k, name, params):
    """float64 bucketed divergence: teacher top-k + tail vs the student's mass on the same buckets."""
    p = torch.softmax(teacher_logits.double(), -1)
    q = torch.softmax(student_logits.double(), -1)
    ids = torch.topk(p, k, dim=-1).indices
    p_k, q_k = p.gather(-1, ids), q.gather(-1, ids)
    p_b = torch.cat([p_k, (1 - p_k.sum(-1, keepdim=True)).clamp_min(0)], -1)
    q_b = torch.cat([q_k, (1 - q_k.sum(-1, keepdim=True)).clamp_min(0)], -1)
    return _ref_divergence(p_b, q_b, name, params).mean()


def _sparse(teacher_logits, k):
    values, ids, tail = tc._topk_rows(teacher_logits, k)
    n = teacher_logits.shape[0]
    return SparseTargets(values, ids.long(), tail, torch.ones(1, n, dtype=torch.bool), teacher_logits.shape[-1])


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name,params", ALL_DIVERGENCES)
def test_exact_cache_gives_the_live_teachers_losses(setting, exact_cache, name, params, temperature):
    """k = vocab: the cached loss equals the dense divergence on the live teacher's logits (value, gradient)."""
    cache = TeacherCache(exact_cache)
    assert cache.manifest["exact"] and cache.top_k == setting["vocab"]
    batch = next(iter(_loader(setting, batch_size=6)))
    with torch.no_grad():
        teacher_logits = setting["teacher"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        base = setting["student"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = _mask(batch["labels"])
    targets = cache.lookup(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert torch.equal(targets.mask, mask)

    s_dense = base.clone().requires_grad_(True)
    dense = get_divergence(name, **params)(teacher_logits, s_dense, mask, temperature=temperature)
    dense.backward()
    s_cached = base.clone().requires_grad_(True)
    cached = cached_divergence(s_cached, targets, name, temperature=temperature, **params)
    cached.backward()
    assert dense.item() > 1e-3  # a real difference between the models, not a trivial 0 = 0
    torch.testing.assert_close(cached, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_cached.grad, s_dense.grad, rtol=1e-4, atol=1e-8)
    if name != "adaptive_kl":  # and both equal an independent float64 reference (value and gradient)
        s64 = base.double().requires_grad_(True)
        p = torch.softmax(teacher_logits.double()[mask] / temperature, -1)
        q = torch.softmax(s64[mask] / temperature, -1)
        ref = _ref_divergence(p, q, name, params).mean()
        ref.backward()
        torch.testing.assert_close(cached.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s_cached.grad.double(), s64.grad, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("name,params", [d for d in ALL_DIVERGENCES if d[0] != "adaptive_kl"])
def test_topk_loss_is_the_bucketed_divergence(name, params):
    """k < vocab: the loss is the divergence of the k + 1 bucket distributions (float64 reference)."""
    torch.manual_seed(3)
    n, vocab, k = 12, 50, 5
    teacher_logits = torch.randn(n, vocab) * 3
    student_logits = torch.randn(n, vocab) * 2
    s = student_logits.clone().requires_grad_(True)
    loss = cached_divergence(s, _sparse(teacher_logits, k), name, **params)
    loss.backward()
    s64 = student_logits.double().requires_grad_(True)
    ref = _ref_bucketed(teacher_logits, s64, k, name, params)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)
    # The bucketed divergence is a coarsening of the full one: never larger (data processing).
    if name in ("forward_kl", "reverse_kl", "tvd"):
        full = get_divergence(name, **params)(teacher_logits, student_logits)
        assert loss.item() <= full.item() + 1e-6


def test_tail_bucket_prevents_a_false_zero():
    """A student that copies the teacher's top-k logits but not its tail mass gets a loss > 0; one that
    matches every bucket (top-k probs and the tail's total, whatever the tail's shape) gets 0."""
    torch.manual_seed(4)
    n, vocab, k = 6, 40, 4
    t = torch.randn(n, vocab) * 2
    targets = _sparse(t, k)
    ids = targets.token_ids
    # Same top-k logits, tail pushed down: renormalised top-k distributions are identical, so a loss on
    # the renormalised top-k alone would be exactly 0.
    pushed = t.clone()
    tail_mask = torch.ones_like(t, dtype=torch.bool).scatter(-1, ids, False)
    pushed[tail_mask] -= 6.0
    renorm_t = torch.log_softmax(t.gather(-1, ids), -1)
    renorm_s = torch.log_softmax(pushed.gather(-1, ids), -1)
    torch.testing.assert_close(renorm_t, renorm_s)
    for name, params in ALL_DIVERGENCES:
        assert cached_divergence(pushed, targets, name, **params).item() > 1e-3, name
    # Shuffle the tail logits within each row: the same mass per bucket, so the same bucket distribution.
    shuffled = t.clone()
    for row in range(n):
        cols = tail_mask[row].nonzero().squeeze(1)
        shuffled[row, cols] = t[row, cols[torch.randperm(len(cols))]]
    assert not torch.equal(shuffled, t)
    for name, params in ALL_DIVERGENCES:
        assert abs(cached_divergence(shuffled, targets, name, **params).item()) < 1e-6, name


def test_temperature_needs_an_exact_cache():
    t = torch.randn(3, 20)
    with pytest.raises(ValueError, match="temperature 2.0 needs an exact teacher cache") as err:
        cached_divergence(torch.randn(3, 20), _sparse(t, 4), "forward_kl", temperature=2.0)
    assert "\n" not in str(err.value)
    cached_divergence(torch.randn(3, 20), _sparse(t, 20), "forward_kl", temperature=2.0)  # exact: accepted


def test_every_divergence_is_covered():
    assert {name for name, _ in ALL_DIVERGENCES} == set(DIVERGENCES)


# ------------------------------------------------------------------------------------------------
# Reading by key
# ------------------------------------------------------------------------------------------------


def test_two_shuffled_epochs_read_the_right_entries(setting, topk_cache):
    """Each batch of two shuffled epochs reads, by key, the live teacher's top-k at its loss positions."""
    cache = TeacherCache(topk_cache)
    assert len(cache.manifest["shards"]) > 2  # entries spread over several shards
    loader = _loader(setting, batch_size=5, shuffle=True, seed=11)
    orders = []
    for _epoch in range(2):
        order = []
        for batch in loader:
            order += batch["index"].tolist()
            targets = cache.lookup(batch["input_ids"], batch["attention_mask"], batch["labels"])
            with torch.no_grad():
                live = setting["teacher"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            log_p = torch.log_softmax(live[_mask(batch["labels"])], -1)
            values, ids = torch.topk(log_p, 8, dim=-1)
            torch.testing.assert_close(targets.logprobs, values, rtol=0, atol=1e-5)
            assert torch.equal(targets.token_ids, ids)
            rest = log_p.scatter(-1, ids, -math.inf)
            torch.testing.assert_close(targets.tail_logprob, torch.logsumexp(rest, -1), rtol=0, atol=1e-5)
        orders.append(order)
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1]) == list(range(len(setting["dataset"])))


def test_duplicates_are_stored_once_and_missing_examples_are_named(setting, tmp_path):
    data = [setting["dataset"][i] for i in (0, 1, 0, 2, 1)]
    path = build_teacher_cache(setting["teacher"], data, tmp_path / "c", tokenizer=setting["tokenizer"], top_k=4, batch_size=2)
    cache = TeacherCache(path)
    assert len(cache) == 3 and cache.manifest["data"]["examples"] == 3
    cache.check_covers(data)
    with pytest.raises(CacheMismatchError, match=r"1 example\(s\) of the data are not in it \(first: example 1\)"):
        cache.check_covers([setting["dataset"][0], setting["dataset"][5]])
    item = setting["dataset"][7]
    with pytest.raises(KeyError, match="no entry for example key"):
        cache.entry(item["input_ids"], item["labels"])


def test_manifest_names_what_the_cache_holds(setting, topk_cache):
    m = json.loads((topk_cache / tc.MANIFEST_FILE).read_text())
    assert m["format"] == tc.FORMAT_NAME and m["format_version"] == tc.FORMAT_VERSION
    assert (m["store"], m["top_k"], m["vocab_size"], m["temperature"], m["dtype"], m["exact"]) == (
        "topk", 8, setting["vocab"], 1.0, "float32", False,
    )
    assert m["teacher"]["fingerprint"] == fingerprint_teacher(setting["teacher"])
    assert m["tokenizer"]["fingerprint"] == fingerprint_tokenizer(setting["tokenizer"])
    n_positions = sum(len(tc.loss_positions(item["labels"])) for item in setting["dataset"])
    assert m["data"]["positions"] == n_positions == sum(s["positions"] for s in m["shards"])


@pytest.mark.parametrize(
    "field,value",
    [("teacher_fingerprint", "0" * 16), ("tokenizer_fingerprint", "f" * 16), ("top_k", 64), ("store", "hidden"), ("vocab_size", 7)],
)
def test_a_mismatched_cache_is_refused_with_one_line(topk_cache, field, value):
    with pytest.raises(CacheMismatchError) as err:
        TeacherCache(topk_cache, expect={field: value})
    message = str(err.value)
    assert "\n" not in message and field in message and repr(value) in message


def test_matching_expectations_are_accepted(setting, topk_cache):
    TeacherCache(topk_cache, expect=tc.CacheExpectation(
        teacher_fingerprint=fingerprint_teacher(setting["teacher"]),
        tokenizer_fingerprint=fingerprint_tokenizer(setting["tokenizer"]), store="topk", top_k=8, vocab_size=setting["vocab"],
    ))
    TeacherCache(topk_cache, expect=tc.CacheExpectation.for_run(
        setting["teacher"], setting["tokenizer"], store="topk", top_k=8, vocab_size=setting["vocab"]
    ))


def test_another_format_version_is_refused(topk_cache, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(topk_cache, copy)
    manifest = json.loads((copy / tc.MANIFEST_FILE).read_text())
    manifest["format_version"] = tc.FORMAT_VERSION + 1
    (copy / tc.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CacheMismatchError, match="version 2, this okd reads") as err:
        TeacherCache(copy)
    assert "\n" not in str(err.value)


def test_fingerprints_tell_models_and_tokenizers_apart(setting, tmp_path):
    other = build_model("llama", "tiny", setting["vocab"], max_positions=64, seed=5)
    assert fingerprint_teacher(other) != fingerprint_teacher(setting["teacher"])
    setting["teacher"].save_pretrained(tmp_path / "a")
    other.save_pretrained(tmp_path / "b")
    assert fingerprint_teacher(tmp_path / "a") != fingerprint_teacher(tmp_path / "b")
    assert fingerprint_teacher(tmp_path / "a") == fingerprint_teacher(str(tmp_path / "a"))
    tok2 = train_tokenizer([e.prompt for e in _examples(50, 9)], vocab_size=280)
    assert fingerprint_tokenizer(tok2) != fingerprint_tokenizer(setting["tokenizer"])


# ------------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------------


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_an_interrupted_write_leaves_no_cache(setting, tmp_path, monkeypatch):
    calls = {"n": 0}
    flush = tc._ShardWriter.flush

    def failing_flush(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed mid-write")
        flush(self)

    monkeypatch.setattr(tc._ShardWriter, "flush", failing_flush)
    out = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(setting["teacher"], setting["dataset"], out, top_k=4, positions_per_shard=20)
    assert calls["n"] == 2 and not out.exists() and _leftovers(tmp_path) == []


def test_a_killed_write_leaves_nothing_that_reads_as_a_cache(setting, tmp_path, monkeypatch):
    """kill -9 mid-write: no cleanup runs. What is left is a hidden temp directory without a manifest."""
    flush = tc._ShardWriter.flush

    def dying_flush(self):
        flush(self)
        if len(self.shards) == 2:
            raise SystemExit("simulated kill")

    monkeypatch.setattr(tc._ShardWriter, "flush", dying_flush)
    import okd.io

    monkeypatch.setattr(okd.io.shutil, "rmtree", lambda *a, **k: None)  # as if the process died: no cleanup
    out = tmp_path / "cache"
    with pytest.raises(SystemExit):
        build_teacher_cache(setting["teacher"], setting["dataset"], out, top_k=4, positions_per_shard=20)
    assert not out.exists()
    (left,) = [tmp_path / name for name in _leftovers(tmp_path)]
    assert any(left.glob("shard-*.safetensors"))
    with pytest.raises(FileNotFoundError, match="not a complete okd teacher cache"):
        TeacherCache(left)


def test_overwrite_keeps_the_old_cache_until_the_new_one_is_complete(setting, tmp_path, monkeypatch):
    out = build_teacher_cache(setting["teacher"], setting["dataset"], tmp_path / "cache", top_k=4)
    before = (out / tc.MANIFEST_FILE).read_text()
    with pytest.raises(FileExistsError, match="already exists"):
        build_teacher_cache(setting["teacher"], setting["dataset"], out, top_k=6)

    def failing_flush(self):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tc._ShardWriter, "flush", failing_flush)
    with pytest.raises(RuntimeError, match="disk full"):
        build_teacher_cache(setting["teacher"], setting["dataset"], out, top_k=6, overwrite=True)
    assert (out / tc.MANIFEST_FILE).read_text() == before and _leftovers(tmp_path) == []
    TeacherCache(out, expect={"top_k": 4})
    monkeypatch.undo()
    build_teacher_cache(setting["teacher"], setting["dataset"], out, top_k=6, overwrite=True)
    TeacherCache(out, expect={"top_k": 6})
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# Hidden-state cache (OKD with the adapter module)
# ------------------------------------------------------------------------------------------------


def test_hidden_cache_with_the_adapter_reproduces_the_live_adapted_teacher(setting, tmp_path):
    from okd.config import OnlineModuleConfig
    from okd.teacher import Teacher

    path = build_teacher_cache(setting["teacher"], setting["dataset"], tmp_path / "h", store="hidden", positions_per_shard=30)
    cache = TeacherCache(path, expect={"store": "hidden"})
    assert cache.manifest["hidden_size"] == setting["teacher"].config.hidden_size
    live = Teacher(setting["teacher"], OnlineModuleConfig(kind="adapter", adapter_bottleneck=8), seed=0)
    with torch.no_grad():  # a trained-looking adapter: not the identity it starts as
        live.adapter.up.weight.normal_(0, 0.5)
        live.adapter.up.bias.normal_(0, 0.5)
    cached = CachedHiddenTeacher(cache, setting["teacher"].get_output_embeddings(), live.adapter)
    for batch in _loader(setting, batch_size=5, shuffle=True, seed=3):
        mask = _mask(batch["labels"])
        live_logits = live(batch["input_ids"], batch["attention_mask"], track_module_grad=True)[mask]
        logits, cached_mask = cached(batch["input_ids"], batch["attention_mask"], batch["labels"], track_module_grad=True)
        assert torch.equal(cached_mask, mask)
        torch.testing.assert_close(logits, live_logits, rtol=1e-5, atol=1e-5)
        # The module's gradient is the same from the cache as from the live teacher.
        targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)[mask]
        grads = []
        for out in (live_logits, logits):
            live.adapter.zero_grad()
            F.cross_entropy(out, targets).backward()
            grads.append(live.adapter.down.weight.grad.clone())
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
        dense = tc.scatter_to_batch(logits.detach(), mask)
        assert dense.shape == (*mask.shape, setting["vocab"]) and torch.equal(dense[mask], logits.detach())
    with pytest.raises(CacheMismatchError, match="needs 'hidden'"):
        topk = build_teacher_cache(setting["teacher"], [setting["dataset"][0]], tmp_path / "t", top_k=3)
        CachedHiddenTeacher(TeacherCache(topk), setting["teacher"].get_output_embeddings())


# ------------------------------------------------------------------------------------------------
# The entry point
# ------------------------------------------------------------------------------------------------


def test_cache_teacher_entry_point(setting, tmp_path, capsys):
    teacher_dir = tmp_path / "teacher"
    setting["teacher"].save_pretrained(teacher_dir)
    setting["tokenizer"].save_pretrained(teacher_dir)
    rows = [{"prompt": e.prompt, "response": e.response} for e in _examples(10, 1)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cache"
    tc.cache_teacher(str(teacher_dir), str(data), str(out), top_k=16, max_length=40, max_examples=6, device="cpu", progress=False)
    assert "wrote" in capsys.readouterr().out
    cache = TeacherCache(out, expect={"teacher_fingerprint": fingerprint_teacher(teacher_dir), "top_k": 16})
    assert cache.manifest["teacher"]["path"] == str(teacher_dir) and len(cache) == 6
    # The same examples, tokenised as in training, are found (dataset built like the trainer builds it).
    cache.check_covers([setting["dataset"][i] for i in range(6)])
    with pytest.raises(FileExistsError, match="--overwrite"):
        tc.cache_teacher(str(teacher_dir), str(data), str(out), device="cpu", progress=False)


def test_the_key_covers_the_labels(setting, tmp_path):
    """The same tokens with another prompt/response split have other loss positions: another entry."""
    item = setting["dataset"][0]
    other = dict(item, labels=[-100] * 3 + item["input_ids"][3:])
    assert tc.example_key(item["input_ids"], item["labels"]) != tc.example_key(other["input_ids"], other["labels"])
    cache = TeacherCache(build_teacher_cache(setting["teacher"], [item, other], tmp_path / "c", top_k=4))
    assert len(cache) == 2
    n = len(tc.loss_positions(item["labels"]))
    assert cache.entry(item["input_ids"], item["labels"])["logprobs"].shape == (n, 4)
    assert cache.entry(other["input_ids"], other["labels"])["logprobs"].shape == (len(item["input_ids"]) - 3, 4)


def test_the_entry_point_parses_as_a_cli(setting, tmp_path):
    """jsonargparse reads cache_teacher's signature and docstring (how `okd teacher cache` is registered)."""
    from jsonargparse import auto_cli

    teacher_dir = tmp_path / "teacher"
    setting["teacher"].save_pretrained(teacher_dir)
    setting["tokenizer"].save_pretrained(teacher_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in _examples(4, 1)))
    out = tmp_path / "cache"
    auto_cli(
        {"teacher": {"_help": "Teacher tools.", "cache": tc.cache_teacher}},
        args=["teacher", "cache", "--teacher", str(teacher_dir), "--data", str(data), "--out", str(out),
              "--top_k", "5", "--store", "topk", "--dtype", "float16", "--max_length", "40", "--device", "cpu",
              "--progress", "false"],
        as_positional=False,
    )
    cache = TeacherCache(out, expect={"top_k": 5})
    assert cache.manifest["dtype"] == "float16" and len(cache) == 4


def test_a_float16_cache_is_close_to_the_float32_one(setting, topk_cache, tmp_path):
    half = TeacherCache(build_teacher_cache(setting["teacher"], setting["dataset"], tmp_path / "h", top_k=8, dtype="float16"))
    full = TeacherCache(topk_cache)
    batch = next(iter(_loader(setting, batch_size=8)))
    a = full.lookup(batch["input_ids"], batch["attention_mask"], batch["labels"])
    b = half.lookup(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert b.logprobs.dtype == torch.float32  # upcast on reading
    torch.testing.assert_close(b.logprobs, a.logprobs, rtol=2e-3, atol=2e-3)
    with torch.no_grad():
        student = setting["student"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(cached_divergence(student, b), cached_divergence(student, a), rtol=1e-3, atol=1e-4)
