"""The frozen teacher behind ``module_kl_from_frozen`` (a metric) is computed only on the steps whose
metrics are logged, unless the loss needs it (the anchor, ``teacher_mix``): a run logged every step and
a run logged every third step train the same student and log the same values on their common steps."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from engine_helpers import configs

from okd.config import OnlineModuleConfig
from okd.teacher_cache import cache_teacher
from okd.training import Distiller

STEPS, EXAMPLES = 6, 24
HEADS = {
    "full": dict(loss_positions_only=False),
    "positions": dict(loss_positions_only=True, fused_loss=False),
    "fused": dict(loss_positions_only=True, fused_loss=True, fused_min_logits_mib=0.0),
}


@pytest.fixture(scope="module")
def hidden_cache(tiny_setting, tmp_path_factory):
    out = tmp_path_factory.mktemp("frozen_metric_cache") / "hidden"
    cache_teacher(
        tiny_setting["teacher"], tiny_setting["train"], str(out), tokenizer=tiny_setting["tokenizer"], max_length=48,
        progress=False, store="hidden",
    )
    return str(out)


def _distiller(setting, out, heads, log_every, online=None, cache=None):
    fields = configs(setting, "okd", steps=STEPS, online=online)
    heads_fields = HEADS.get(heads, {})
    fields["train"] = dataclasses.replace(fields["train"], log_every=log_every, **heads_fields)
    fields["data"] = dataclasses.replace(fields["data"], max_train_examples=EXAMPLES)
    if cache is not None:
        fields["model"] = dataclasses.replace(fields["model"], teacher_cache=cache)
    return Distiller(output_dir=str(out), **fields)


def _rows(out):
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _head_calls_per_step(distiller):
    """Run ``distiller.train()``; the calls of the teacher's output head in each training step."""
    calls, per_step = [0], []

    def count(module, args, output):
        if output.numel():  # the body's own forward calls the head on no position (logits_to_keep empty)
            calls[0] += 1

    hook = distiller.teacher.head.register_forward_hook(count)
    original = distiller.training_step

    def counting(batch, update_module):
        calls[0] = 0
        losses = original(batch, update_module)
        per_step.append(calls[0])
        return losses

    distiller.training_step = counting
    try:
        distiller.train()
    finally:
        hook.remove()
    return per_step


LOGGED_TERMS = ("loss", "ce", "kd", "module_loss", "module_ce", "module_divergence", "module_accuracy", "module_kl_from_frozen")


@pytest.mark.parametrize("heads", ["full", "positions", "fused", "cached"])
def test_logging_less_often_changes_no_loss_and_no_weight(tiny_setting, tmp_path, heads, request):
    cache = request.getfixturevalue("hidden_cache") if heads == "cached" else None
    runs = {}
    for every in (1, 3):
        distiller = _distiller(tiny_setting, tmp_path / f"every{every}", heads, every, cache=cache)
        distiller.train()
        runs[every] = distiller, _rows(tmp_path / f"every{every}")
    (a, rows_a), (b, rows_b) = runs[1], runs[3]
    assert sorted(rows_b) == [3, 6] and sorted(rows_a) == list(range(1, STEPS + 1))
    for step in (3, 6):
        assert rows_b[step]["module_updated"]
        assert "module_kl_from_frozen" in rows_b[step]
        for term in LOGGED_TERMS:
            assert (term in rows_a[step]) == (term in rows_b[step]), (step, term)
            if term in rows_a[step]:
                assert rows_b[step][term] == rows_a[step][term], (step, term)
    for name, value in a.student.state_dict().items():
        assert torch.equal(value, b.student.state_dict()[name]), name
    for name, value in a.teacher.module.module_state_dict().items():
        assert torch.equal(value, b.teacher.module.module_state_dict()[name]), name


@pytest.mark.parametrize("heads", ["full", "positions", "cached"])
def test_frozen_head_runs_only_on_logged_steps(tiny_setting, tmp_path, heads, request):
    cache = request.getfixturevalue("hidden_cache") if heads == "cached" else None
    distiller = _distiller(tiny_setting, tmp_path / "run", heads, 3, cache=cache)
    # The adapted teacher's head on every step (the module updates on every step); the frozen
    # teacher's head too on steps 3 and 6 only, the logged ones.
    assert _head_calls_per_step(distiller) == [1, 1, 2, 1, 1, 2]


@pytest.mark.parametrize("online", [dict(anchor_weight=1.0), dict(teacher_mix=0.5)], ids=["anchor", "mix"])
def test_frozen_head_runs_on_every_step_when_the_loss_needs_it(tiny_setting, tmp_path, online):
    distiller = _distiller(tiny_setting, tmp_path / "run", "positions", 3, online=OnlineModuleConfig(**online))
    assert _head_calls_per_step(distiller) == [2] * STEPS
