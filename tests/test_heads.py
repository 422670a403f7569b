"""Output heads on the loss positions only, and the fused loss in the loop: the same run as full logits.

``train.loss_positions_only`` / ``train.fused_loss`` (okd.heads, okd.fused) change where the heads run,
never what is computed: per-step losses and final weights must equal the full-logits run.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from engine_helpers import configs

from okd.config import OnlineModuleConfig, SamplingConfig
from okd.heads import final_hidden_at, head_on_positions_supported, loss_positions
from okd.losses import next_token_targets
from okd.training import Distiller

# "fused": on every micro-batch (by default only where the loss positions' logits exceed 256 MiB).
MODES = {"full": dict(loss_positions_only=False), "positions": dict(fused_loss=False), "fused": dict(fused_min_logits_mib=0.0)}


def run(setting, tmp_path, mode, method, online=None, steps=3, sampling=None, **method_fields):
    kwargs = configs(setting, method, steps=steps, online=online, **method_fields)
    if sampling is not None:
        kwargs["sampling"] = sampling
    kwargs["data"] = dataclasses.replace(kwargs["data"], validation_file=None)
    kwargs["train"] = dataclasses.replace(kwargs["train"], **MODES[mode])
    distiller = Distiller(output_dir=str(tmp_path / mode), **kwargs)
    distiller.train()
    records = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    return distiller, records


def assert_same_run(a, b, terms=("loss", "ce", "kd", "module_loss", "module_ce", "module_divergence", "module_accuracy", "module_kl_from_frozen")):
    (da, ra), (db, rb) = a, b
    assert len(ra) == len(rb) > 0
    for x, y in zip(ra, rb):
        for term in terms:
            if term in x or term in y:
                assert x[term] == pytest.approx(y[term], rel=1e-5, abs=1e-6), (term, x["step"])
    for (name, p), q in zip(da.student.named_parameters(), db.student.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    if da.online_config is not None:
        for p, q in zip(da.teacher.module_parameters(), db.teacher.module_parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# lr 1e-3: Adam turns a float32-rounding difference in a near-zero gradient entry into up to lr, and
# the default module divergence (JSD) has more rounding than KL; a wrong gradient still shows.
ADAPTER = OnlineModuleConfig(kind="adapter", update_every=1, learning_rate=1e-3)


@pytest.mark.parametrize(
    "method, online, fields, fused_expected",
    [
        ("kd", None, {}, True),
        ("rkl", None, {}, True),
        ("jsd", None, {}, True),
        ("sft", None, {}, True),
        ("okd", ADAPTER, {}, True),
        ("okd", dataclasses.replace(ADAPTER, divergence="same", learning_rate=1e-2), {}, True),
        ("okd", dataclasses.replace(ADAPTER, anchor_weight=0.5, teacher_mix=0.3), {}, False),
        ("kd", None, {"kd_ratio": 0.5, "temperature": 2.0}, True),
    ],
    ids=["kd", "rkl", "jsd", "sft", "okd-adapter-jsd", "okd-module-same", "okd-anchor-mix", "kd-mixed-ce-T2"],
)
def test_positions_and_fused_equal_full_logits(tiny_setting, tmp_path, method, online, fields, fused_expected):
    full = run(tiny_setting, tmp_path, "full", method, online, **fields)
    positions = run(tiny_setting, tmp_path, "positions", method, online, **fields)
    fused = run(tiny_setting, tmp_path, "fused", method, online, **fields)
    assert (full[0].heads, positions[0].heads) == ("full", "positions")
    assert fused[0].heads == ("fused" if fused_expected else "positions")
    if fused_expected:  # every micro-batch really took the fused loss
        assert fused[0].loss_path_batches == {"fused": 3, "positions": 0}
    assert_same_run(positions, full)
    if fused_expected:
        assert_same_run(fused, full)
    if method == "okd":  # the module really moved, so its gradient was compared too
        assert any(r.get("module_updated") for r in full[1])


def test_positions_equal_full_logits_for_lora_and_generated_sequences(tiny_setting, tmp_path):
    lora = OnlineModuleConfig(kind="lora", update_every=1, learning_rate=1e-3, anchor_weight=0.2)
    assert_same_run(run(tiny_setting, tmp_path / "a", "positions", "okd", lora), run(tiny_setting, tmp_path / "a", "full", "okd", lora))
    gkd = [run(tiny_setting, tmp_path / "b", mode, "gkd", steps=2, sampling=SamplingConfig(on_policy_ratio=1.0)) for mode in ("full", "fused")]
    assert gkd[1][0].heads == "fused"
    assert_same_run(gkd[1], gkd[0])


@pytest.mark.parametrize("tied", [True, False])
def test_head_on_gathered_hidden_states_equals_logits_and_gradients(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=tied,
    ))
    ids = torch.randint(0, 40, (3, 9))
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0  # right padding
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[attention == 0] = -100
    rows, targets = loss_positions(labels)
    full_targets, mask = next_token_targets(labels)
    assert rows.numel() == int(mask.sum()) and torch.equal(targets, full_targets.reshape(-1)[rows])

    logits = model(input_ids=ids, attention_mask=attention).logits
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, 40)[rows], targets)
    reference_grads = torch.autograd.grad(reference, list(model.parameters()))
    gathered = model.get_output_embeddings()(final_hidden_at(model, ids, attention, rows))
    torch.testing.assert_close(gathered, logits.reshape(-1, 40)[rows].detach())
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(gathered, targets), list(model.parameters()))
    for g, r in zip(grads, reference_grads):
        torch.testing.assert_close(g, r)


def test_post_processed_logits_fall_back_to_full_logits():
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    small = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, head_dim=8)
    assert head_on_positions_supported(LlamaForCausalLM(LlamaConfig(**small)))
    assert not head_on_positions_supported(Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=30.0)))
    assert not head_on_positions_supported(torch.nn.Linear(4, 4))


def test_the_fused_loss_takes_only_micro_batches_with_large_logits(tiny_setting, tmp_path):
    """``train.fused_min_logits_mib``: a micro-batch takes the fused loss when its loss positions' float32
    logits exceed the threshold, the dense loss on those positions otherwise; the run is the same."""
    kwargs = configs(tiny_setting, "kd", steps=4)
    kwargs["data"] = dataclasses.replace(kwargs["data"], validation_file=None)
    probe = Distiller(output_dir=str(tmp_path / "probe"), **kwargs)  # the 4 batches every run below sees
    vocab = probe.accelerator.unwrap_model(probe.student).get_output_embeddings().weight.shape[0]
    sizes = []
    for _ in range(4):
        _, targets = loss_positions(probe.source.next_batch()["labels"])
        sizes.append(targets.numel() * vocab * 4 / 2**20)  # MiB of this batch's loss-position logits
    threshold = sorted(sizes)[1]  # some batches above, some at or below
    runs = {}
    for name, mib in (("default", None), ("split", threshold), ("dense", 1e9)):
        fields = {} if mib is None else {"fused_min_logits_mib": mib}
        kwargs = configs(tiny_setting, "kd", steps=4)
        kwargs["data"] = dataclasses.replace(kwargs["data"], validation_file=None)
        kwargs["train"] = dataclasses.replace(kwargs["train"], **fields)
        distiller = Distiller(output_dir=str(tmp_path / name), **kwargs)
        distiller.train()
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (distiller, records)
    assert runs["default"][0].loss_path_batches == {"fused": 0, "positions": 4}  # tiny logits: all dense
    assert runs["split"][0].loss_path_batches == {"fused": sum(s > threshold for s in sizes), "positions": sum(s <= threshold for s in sizes)}
    assert 0 < runs["split"][0].loss_path_batches["fused"] < 4
    assert_same_run(runs["split"], runs["dense"])
    with pytest.raises(ValueError, match="fused_min_logits_mib"):
        kwargs["train"] = dataclasses.replace(kwargs["train"], fused_min_logits_mib=-1.0)
        Distiller(output_dir=str(tmp_path / "bad"), **kwargs)


def _tiny_causal_lms():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
    ))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0))
    return {"llama": llama, "gpt2": gpt2}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("wrap", ["plain", "peft", "module_wrapper"])
def test_final_hidden_is_the_last_hidden_state_and_leaves_no_hook(arch, wrap):
    """okd.heads.final_hidden takes the base model's last_hidden_state by a hook: the same tensor as
    ``hidden_states[-1]`` of ``output_hidden_states=True`` (bit for bit, after the final norm, what the head
    reads), through peft and through a DDP-like ``.module`` wrapper, and the hook is gone afterwards."""
    from okd.heads import decoder_of, final_hidden

    model = _tiny_causal_lms()[arch].eval()
    ids = torch.randint(0, 40, (2, 7))
    attention = torch.ones_like(ids)
    attention[1, 5:] = 0
    expected = model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(model.get_output_embeddings()(expected), model(input_ids=ids, attention_mask=attention).logits, rtol=0, atol=0)
    wrapped = model
    if wrap == "peft":
        from peft import LoraConfig, get_peft_model

        target = ["q_proj", "v_proj"] if arch == "llama" else ["c_attn"]
        wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=target, init_lora_weights=True))
    elif wrap == "module_wrapper":  # the shape of DDP / DeepSpeed: the model under .module, forward delegated

        class Wrapper(torch.nn.Module):
            def __init__(self, module):
                super().__init__()
                self.module = module

            def forward(self, **kwargs):
                return self.module(**kwargs)

        wrapped = Wrapper(model)
    decoder = decoder_of(wrapped)
    assert decoder is model.get_decoder()
    torch.testing.assert_close(final_hidden(wrapped, ids, attention), expected, rtol=0, atol=0)
    assert not decoder._forward_hooks


def test_final_hidden_falls_back_to_all_hidden_states_without_a_base_model():
    from okd.heads import decoder_of, final_hidden

    model = _tiny_causal_lms()["llama"].eval()

    class Opaque(torch.nn.Module):  # no .module, not peft, not a PreTrainedModel
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    ids = torch.randint(0, 40, (2, 7))
    assert decoder_of(Opaque()) is None
    expected = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(final_hidden(Opaque(), ids, None), expected, rtol=0, atol=0)
