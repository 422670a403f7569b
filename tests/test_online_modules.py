"""Online modules behind one interface: each registered kind round-trips, and a new kind needs no change to Teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from okd.config import OnlineModuleConfig
from okd.online import ONLINE_MODULES, OnlineModule, register_online_module, with_online_module
from okd.teacher import Teacher


def _inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


def _plain_logits(path, ids, mask):
    from okd.models import load_model

    with torch.no_grad():
        return load_model(path)(input_ids=ids, attention_mask=mask).logits


def _move_away_from_identity(teacher: Teacher, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in teacher.module_parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))


def _round_trip(path: str, config: OnlineModuleConfig, tmp_path: Path) -> None:
    """Identity at init; state dict -> a fresh teacher gives equal logits; save -> fold gives equal logits."""
    from okd.models import load_model

    ids, mask = _inputs()
    plain = _plain_logits(path, ids, mask)
    teacher = Teacher(load_model(path), config, seed=0)
    assert teacher.module_parameters(), f"{config.kind}: no trainable parameters"
    for track in (False, True):
        assert torch.equal(teacher(ids, mask, track_module_grad=track).detach(), plain), config.kind

    _move_away_from_identity(teacher)
    expected = teacher(ids, mask).detach()
    assert not torch.allclose(expected, plain, atol=1e-3), f"{config.kind}: the module does not change the teacher"
    # A gradient reaches the module's parameters (and only them) when tracked.
    teacher(ids, mask, track_module_grad=True).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in teacher.module_parameters())
    trainable = {id(p) for p in teacher.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in teacher.module_parameters()}

    fresh = Teacher(load_model(path), config, seed=1)
    fresh.load_module_state_dict({k: v.detach().clone() for k, v in teacher.module_state_dict().items()})
    assert torch.equal(fresh(ids, mask), expected)

    teacher.save_module(tmp_path / "online_module")
    folded = with_online_module(load_model(path), tmp_path / "online_module").eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-5)

    # The body never trains: dropout stays off while the module is in training mode.
    teacher.train()
    assert not teacher.model.training and teacher.training


@pytest.mark.parametrize("kind", ["adapter", "lora"])
def test_every_registered_kind_round_trips(tiny_setting, tmp_path, kind):
    assert set(ONLINE_MODULES) >= {"adapter", "lora"}
    _round_trip(tiny_setting["teacher"], OnlineModuleConfig(kind=kind, lora_top_layers=1), tmp_path)


class _LogitScale(OnlineModule):
    """A third kind, for this test only: ``logits * exp(s)`` with one learned scalar ``s`` (0 at init)."""

    kind = "test_logit_scale"

    def __init__(self, model, config):
        super().__init__(model, config)
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask, *, track_grad):
        with torch.no_grad():
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        with torch.set_grad_enabled(track_grad):
            return logits * self.log_scale.exp()

    def trainable_parameters(self):
        return [self.log_scale]

    def module_state_dict(self):
        return {"log_scale": self.log_scale}

    def load_module_state_dict(self, state):
        with torch.no_grad():
            self.log_scale.copy_(state["log_scale"])

    def save(self, directory):
        torch.save({"log_scale": self.log_scale.detach()}, directory / "scale.pt")
        self.write_meta(directory)

    @classmethod
    def fold(cls, model, directory, meta):
        log_scale = torch.load(directory / "scale.pt")["log_scale"]

        class Scaled(nn.Module):
            def __init__(self, head):
                super().__init__()
                self.head = head

            def forward(self, hidden):
                return self.head(hidden) * log_scale.exp()

        model.set_output_embeddings(Scaled(model.get_output_embeddings()))
        return model


def test_a_new_kind_is_one_class_and_a_registry_entry(tiny_setting, tmp_path, monkeypatch):
    monkeypatch.setitem(ONLINE_MODULES, _LogitScale.kind, _LogitScale)
    _round_trip(tiny_setting["teacher"], OnlineModuleConfig(kind=_LogitScale.kind), tmp_path)


def test_registry_errors_name_the_kind():
    from okd.online import build_online_module

    with pytest.raises(ValueError, match="'nope'.*adapter"):
        build_online_module(nn.Linear(1, 1), OnlineModuleConfig(kind="nope"))
    with pytest.raises(ValueError, match="non-empty"):
        register_online_module(type("Nameless", (OnlineModule,), {}))


def test_config_checks_the_kind_against_the_registry(monkeypatch):
    """online.kind is validated against ONLINE_MODULES (one line with a suggestion), so a kind
    registered at run time is accepted by the config without editing it."""
    from okd.online import ONLINE_MODULES

    with pytest.raises(ValueError, match=r"unknown online.kind 'adaptr'; did you mean 'adapter'\?") as error:
        OnlineModuleConfig(kind="adaptr")
    assert "\n" not in str(error.value)
    monkeypatch.setitem(ONLINE_MODULES, "my_kind", object)
    assert OnlineModuleConfig(kind="my_kind").kind == "my_kind"
