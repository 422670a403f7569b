"""Training from cached teacher outputs (``model.teacher_cache``, okd.training.cached) equals training
from the live teacher, without the teacher in memory."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
import yaml
from engine_helpers import configs

import okd.models
from okd.config import OnlineModuleConfig
from okd.teacher_cache import cache_teacher
from okd.training import Distiller
from okd.training.cached import HeadOnlyTeacher

# 24 examples, batch 8: 3 steps per epoch, so 8 steps run 3 shuffled epochs (the source reshuffles
# every epoch): the cache must find entries by key, not by step.
EXAMPLES, STEPS = 24, 8
LOSS_TERMS = ("loss", "ce", "kd", "module_loss", "module_ce", "module_divergence", "module_accuracy", "module_kl_from_frozen")


def _build(setting, out, **kwargs):
    cache_teacher(setting["teacher"], setting["train"], str(out), tokenizer=setting["tokenizer"], max_length=48, progress=False, **kwargs)
    return str(out)


@pytest.fixture(scope="module")
def caches(tiny_setting, tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    return {
        "exact": _build(tiny_setting, root / "exact", top_k=10**6),
        "top8": _build(tiny_setting, root / "top8", top_k=8),
        "hidden": _build(tiny_setting, root / "hidden", store="hidden"),
    }


def _fields(setting, method="kd", cache=None, steps=STEPS, **overrides):
    c = configs(setting, method, steps=steps, online=overrides.pop("online", None), **overrides.pop("method_fields", {}))
    c["data"] = dataclasses.replace(c["data"], max_train_examples=EXAMPLES)
    if cache is not None:
        c["model"] = dataclasses.replace(c["model"], teacher_cache=cache)
    c.update(overrides)
    return c


def _no_teacher_loads(monkeypatch, setting):
    """Make loading the teacher's weights fail: a top-k cached run must never do it."""
    real = okd.models.load_model

    def guarded(path, *args, **kwargs):
        if str(path) == setting["teacher"]:
            raise AssertionError("the teacher was loaded")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(okd.models, "load_model", guarded)


def _run(tmp_path, name, fields):
    distiller = Distiller(output_dir=str(tmp_path / name), **fields)
    distiller.train()
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return distiller, records


def _assert_same_run(live, cached, live_records, cached_records, terms=LOSS_TERMS):
    assert len(live_records) == len(cached_records) == STEPS
    assert live_records[-1]["epoch"] >= 1  # several shuffled epochs were read
    for a, b in zip(live_records, cached_records):
        for term in terms:
            if term in a:
                assert b[term] == pytest.approx(a[term], rel=1e-5, abs=1e-6), (a["step"], term)
    # Float tolerance: Adam divides by sqrt(v), so a near-zero gradient's rounding (the cache sums its
    # buckets in another order) can move one weight by ~1e-5 after a few steps at lr 3e-3; a wrong entry
    # moves weights by ~lr per step (3e-3).
    live_weights, cached_weights = live.student.state_dict(), cached.student.state_dict()
    for name, value in live_weights.items():
        torch.testing.assert_close(cached_weights[name], value, rtol=1e-3, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("method", ["kd", "rkl"])
def test_an_exact_cache_trains_as_the_live_teacher_without_loading_it(tiny_setting, caches, tmp_path, monkeypatch, method):
    live, live_records = _run(tmp_path, "live", _fields(tiny_setting, method))
    _no_teacher_loads(monkeypatch, tiny_setting)
    cached, cached_records = _run(tmp_path, "cached", _fields(tiny_setting, method, caches["exact"]))
    assert cached.teacher is None and cached.teacher_cache is not None
    _assert_same_run(live, cached, live_records, cached_records)
    # The validation split is not in the cache: CE only, and the same CE.
    assert "validation_divergence" in live_records[-1] and "validation_divergence" not in cached_records[-1]
    assert cached_records[-1]["validation_ce"] == pytest.approx(live_records[-1]["validation_ce"], rel=1e-5)


def test_an_exact_cache_allows_a_temperature(tiny_setting, caches, tmp_path, monkeypatch):
    fields = dict(method_fields={"temperature": 2.0}, steps=STEPS)
    live, live_records = _run(tmp_path, "live", _fields(tiny_setting, "kd", **fields))
    _no_teacher_loads(monkeypatch, tiny_setting)
    cached, cached_records = _run(tmp_path, "cached", _fields(tiny_setting, "kd", caches["exact"], **fields))
    _assert_same_run(live, cached, live_records, cached_records)


def test_a_topk_cache_trains_and_refuses_a_temperature(tiny_setting, caches, tmp_path, monkeypatch):
    _no_teacher_loads(monkeypatch, tiny_setting)
    fields = _fields(tiny_setting, "kd", caches["top8"], steps=12)
    _, records = _run(tmp_path, "top8", fields)
    kd = [r["kd"] for r in records]
    assert all(v > 0 for v in kd)  # the tail bucket: no false zero
    assert sum(kd[-3:]) / 3 < 0.8 * sum(kd[:3]) / 3
    with pytest.raises(ValueError, match=r"temperature=2.0 needs an exact teacher cache") as err:
        Distiller(output_dir=str(tmp_path / "t2"), **_fields(tiny_setting, "kd", caches["top8"], method_fields={"temperature": 2.0}))
    assert "\n" not in str(err.value) and "model.teacher_cache" in str(err.value)


def test_a_hidden_cache_trains_okd_as_the_live_teacher(tiny_setting, caches, tmp_path):
    online = OnlineModuleConfig(kind="adapter", adapter_bottleneck=8, learning_rate=3e-3)
    live, live_records = _run(tmp_path, "live", _fields(tiny_setting, "okd", online=online))
    cached, cached_records = _run(tmp_path, "cached", _fields(tiny_setting, "okd", caches["hidden"], online=online))
    assert any(r["module_updated"] for r in cached_records) and "module_divergence" in cached_records[-1]
    _assert_same_run(live, cached, live_records, cached_records)
    live_module, cached_module = live.teacher.module_state_dict(), cached.teacher.module_state_dict()
    assert any(float(v.abs().sum()) > 0 for v in cached_module.values())  # the adapter moved
    for name, value in live_module.items():
        torch.testing.assert_close(cached_module[name], value, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    # Only the teacher's output head is in memory, not its body.
    assert isinstance(cached.teacher.model, HeadOnlyTeacher)
    head_params = sum(p.numel() for p in cached.teacher.model.parameters())
    assert head_params == cached.teacher.model.get_output_embeddings().weight.numel()
    assert head_params < sum(p.numel() for p in live.teacher.model.parameters()) / 2
    assert cached.heads == "positions"  # both heads on the loss positions only


@pytest.mark.parametrize("positions", [True, False], ids=["loss-positions", "full-logits"])
def test_a_hidden_cache_with_the_frozen_teacher_terms(tiny_setting, caches, tmp_path, positions):
    """The anchor and the teacher mix need the frozen teacher's logits: head(h) from the same cache; on
    the loss positions (the default) and with full logits scattered back (loss_positions_only off)."""
    online = OnlineModuleConfig(kind="adapter", adapter_bottleneck=8, learning_rate=3e-3, anchor_weight=0.5, teacher_mix=0.3)
    live, live_records = _run(tmp_path, "live", _fields(tiny_setting, "okd", online=online))
    fields = _fields(tiny_setting, "okd", caches["hidden"], online=online)
    fields["train"] = dataclasses.replace(fields["train"], loss_positions_only=positions)
    cached, cached_records = _run(tmp_path, "cached", fields)
    assert cached.heads == ("positions" if positions else "full")
    assert "module_kl_from_frozen" in cached_records[-1]
    _assert_same_run(live, cached, live_records, cached_records)


@pytest.mark.parametrize(
    ("method", "cache", "online", "needle"),
    [
        ("gkd", "exact", None, "method.source=on_policy"),
        ("distillm", "exact", None, "method.source=adaptive_replay"),
        ("seqkd", "exact", None, "learns nothing from a teacher"),
        ("sft", "exact", None, "learns nothing from a teacher"),
        ("okd", "exact", None, "OKD needs a store=hidden cache"),
        ("okd", "hidden", OnlineModuleConfig(kind="lora"), "needs online.kind=adapter"),
    ],
)
def test_what_a_cache_cannot_serve_is_refused_with_one_line(tiny_setting, caches, tmp_path, method, cache, online, needle):
    with pytest.raises(ValueError) as err:
        Distiller(output_dir=str(tmp_path / "run"), **_fields(tiny_setting, method, caches[cache], online=online))
    message = str(err.value)
    assert needle in message and "model.teacher_cache" in message and "\n" not in message
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_teacher_generated_is_refused_naming_the_source(tiny_setting, caches, tmp_path):
    with pytest.raises(ValueError, match=r"model.teacher_cache needs .*method.source=teacher_generated"):
        Distiller(output_dir=str(tmp_path / "run"), **_fields(tiny_setting, "kd", caches["exact"], method_fields={"source": "teacher_generated"}))


def test_a_cache_for_other_data_or_another_width_is_refused(tiny_setting, caches, tmp_path):
    from okd.teacher_cache import CacheMismatchError

    fields = _fields(tiny_setting, "kd", caches["exact"])
    fields["data"] = dataclasses.replace(fields["data"], train_file=tiny_setting["validation"])  # not cached
    with pytest.raises(CacheMismatchError, match="not in it"):
        Distiller(output_dir=str(tmp_path / "run"), **fields)
    narrow = _build(tiny_setting, tmp_path / "narrow", top_k=4, vocab_size=300)
    with pytest.raises(CacheMismatchError, match="vocab_size is 300"):
        Distiller(output_dir=str(tmp_path / "run"), **_fields(tiny_setting, "kd", narrow))


def test_resume_checks_the_cache(tiny_setting, caches, tmp_path):
    def fields(cache, steps):
        f = _fields(tiny_setting, "kd", cache, steps=steps)
        f["train"] = dataclasses.replace(f["train"], checkpoint_every=2)
        return f

    cache = _build(tiny_setting, tmp_path / "cache", top_k=8)
    first = Distiller(output_dir=str(tmp_path / "run"), **fields(cache, 4))
    first.train()
    assert first.run_config["teacher_cache"]["path"] == cache
    # Another cache at another path, or the same path rebuilt with other settings, is refused on resume.
    with pytest.raises(ValueError, match="cannot resume .*teacher_cache"):
        Distiller(output_dir=str(tmp_path / "run"), resume=True, **fields(caches["top8"], 6))
    cache_teacher(tiny_setting["teacher"], tiny_setting["train"], cache, tokenizer=tiny_setting["tokenizer"], max_length=48,
                  top_k=6, overwrite=True, progress=False)
    with pytest.raises(ValueError, match="cannot resume .*teacher_cache.manifest_fingerprint"):
        Distiller(output_dir=str(tmp_path / "run"), resume=True, **fields(cache, 6))
    _build(tiny_setting, tmp_path / "cache2", top_k=8)  # the original settings again
    shutil.rmtree(cache)
    shutil.move(str(tmp_path / "cache2"), cache)
    resumed = Distiller(output_dir=str(tmp_path / "run"), resume=True, **fields(cache, 6))
    assert resumed.step == 2
    resumed.train()
    assert resumed.step == 6


def test_the_commands_of_the_teacher_cache_guide(tiny_setting, tmp_path, monkeypatch):
    """`okd teacher cache ...` then `okd distill --model.teacher_cache DIR ...`, as docs/guide/teacher-cache.md shows them."""
    from okd.cli import main

    s = tiny_setting
    cache = tmp_path / "cache"
    main(["teacher", "cache", "--teacher", s["teacher"], "--tokenizer", s["tokenizer"], "--data", s["train"], "--out", str(cache),
          "--top-k", "16", "--max-length", "48", "--progress", "false"])
    _no_teacher_loads(monkeypatch, s)
    out = tmp_path / "run"
    main(["distill", "--model.teacher", s["teacher"], "--model.tokenizer", s["tokenizer"], "--model.student_size", "nano",
          "--model.teacher_cache", str(cache), "--data.train_file", s["train"], "--data.validation_file", s["validation"],
          "--data.max_length", "48", "--data.max_validation_examples", "8", "--train.max_steps", "2", "--train.batch_size", "4",
          "--output-dir", str(out), "--progress", "false"])
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["model"]["teacher_cache"] == str(cache) and saved["teacher_cache"]["path"] == str(cache)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and "validation_ce" in last and "kd" in last
