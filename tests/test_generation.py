"""okd's KV-cached decoding loop against Hugging Face ``generate``: same tokens (greedy), same draws (sampling)."""

from __future__ import annotations

import pytest
import torch

from okd.generation import _decode, generate_batched, resolve_backend
from okd.models import build_model

VOCAB = 97
# Different lengths, so the batch is left-padded; token 0 is padding.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18, 19, 20, 21, 22]]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    torch.manual_seed(0)
    return build_model(request.param, "nano", vocab_size=VOCAB, max_positions=64, seed=0).eval()


def _both(model, **kwargs):
    return [generate_batched(model, PROMPTS, pad_token_id=0, backend=b, **kwargs) for b in ("okd", "hf")]


def _eos_from_greedy(model):
    """Two EOS ids that greedy decoding emits mid-response, so that rows stop at different steps."""
    free = generate_batched(model, PROMPTS, pad_token_id=0, eos_token_id=[], max_new_tokens=12, do_sample=False, backend="hf")
    return [free[0][3], free[2][5]]


def test_greedy_same_tokens_as_generate_with_left_padding_and_several_eos(model):
    eos = _eos_from_greedy(model)
    ours, theirs = _both(model, eos_token_id=eos, max_new_tokens=12, do_sample=False)
    assert ours == theirs
    assert any(len(r) < 12 and r[-1] in eos for r in ours)  # EOS really stopped some rows (kept, then cut)
    ours, theirs = _both(model, eos_token_id=None, max_new_tokens=12, do_sample=False)  # no EOS: full budget
    assert ours == theirs


def test_raw_rows_pad_after_eos_and_stop_when_all_done(model):
    from okd.data.instruction import collate_prompts

    eos = _eos_from_greedy(model)
    batch = collate_prompts(PROMPTS, 0)
    with torch.no_grad():
        ours = _decode(model, batch["input_ids"], batch["attention_mask"], eos=set(eos), pad_token_id=0,
                       max_new_tokens=40, sample=False, temperature=1.0, top_p=1.0)
        theirs = model.generate(**batch, max_new_tokens=40, do_sample=False, pad_token_id=0, eos_token_id=eos)
    assert torch.equal(ours, theirs[:, batch["input_ids"].shape[1]:])


def test_top_p_filter_equals_transformers_warper():
    from transformers.generation.logits_process import TopPLogitsWarper

    from okd.generation import _top_p_filter

    torch.manual_seed(0)
    scores = torch.randn(6, VOCAB) * 3
    for top_p in (0.1, 0.5, 0.8, 0.95):
        assert torch.equal(_top_p_filter(scores, top_p), TopPLogitsWarper(top_p)(None, scores))


def test_sample_matches_probabilities_and_never_draws_zero_mass():
    from okd.generation import _sample

    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    scores = probs.log().expand(200_000, -1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        draws = _sample(scores)
    counts = torch.bincount(draws, minlength=len(probs)).double()
    expected = probs.double() * len(draws)
    assert (counts[probs == 0] == 0).all()
    assert ((counts - expected).abs() <= 5 * (expected * (1 - probs.double())).sqrt()).all()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampling_frequencies_match_generate_distribution(model, temperature, top_p):
    # The first token of many copies of one prompt, against softmax(top_p(logits / T)): the
    # distribution HF generate samples from (its draws differ: see okd.generation._sample).
    from transformers.generation.logits_process import TopPLogitsWarper

    prompt = [[5, 6, 7]] * 4000
    draws = generate_batched(model, prompt, pad_token_id=0, eos_token_id=None, max_new_tokens=1,
                             temperature=temperature, top_p=top_p, seed=3)
    with torch.no_grad():
        scores = model(torch.tensor([[5, 6, 7]])).logits[:, -1].float() / temperature
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    probs = torch.softmax(scores[0].double(), -1)
    counts = torch.bincount(torch.tensor([d[0] for d in draws]), minlength=VOCAB).double()
    expected = probs * len(draws)
    assert (counts[probs == 0] == 0).all()  # nothing outside the nucleus
    assert ((counts - expected).abs() <= 5 * (expected * (1 - probs)).sqrt() + 3).all()


def test_sampling_is_deterministic_given_the_seed(model):
    kwargs = dict(pad_token_id=0, eos_token_id=[3], max_new_tokens=16, temperature=0.9, backend="okd")
    first = generate_batched(model, PROMPTS, seed=11, **kwargs)
    assert generate_batched(model, PROMPTS, seed=11, **kwargs) == first
    assert generate_batched(model, PROMPTS, seed=12, **kwargs) != first


def test_group_by_length_keeps_prompt_order_and_greedy_tokens(model):
    kwargs = dict(pad_token_id=0, eos_token_id=None, max_new_tokens=6, do_sample=False, batch_size=2)
    plain = generate_batched(model, PROMPTS, **kwargs)
    grouped = generate_batched(model, PROMPTS, group_by_length=True, **kwargs)
    single = [generate_batched(model, [p], **kwargs)[0] for p in PROMPTS]
    assert grouped == plain == single  # greedy tokens do not depend on the batch (left padding is exact)


def test_backend_rule():
    class EncoderDecoder(torch.nn.Module):
        class config:
            is_encoder_decoder = True

        def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None):
            raise AssertionError

    assert resolve_backend(EncoderDecoder()) == "hf"
    with pytest.raises(ValueError, match="backend='hf'"):
        resolve_backend(EncoderDecoder(), "okd")
    with pytest.raises(ValueError, match="backend must be"):
        resolve_backend(EncoderDecoder(), "fast")
    assert resolve_backend(build_model("llama", "nano", vocab_size=VOCAB, max_positions=16)) == "okd"


def test_preallocated_cache_layer_returns_what_the_dynamic_layer_returns_also_past_its_capacity():
    from transformers.cache_utils import DynamicLayer

    from okd.generation import _PreallocatedLayer

    torch.manual_seed(0)
    ours, theirs = _PreallocatedLayer(capacity=5), DynamicLayer()
    for length in (3, 1, 1, 2, 4):  # a prompt, then tokens, then writes past the 5 positions (the buffers grow)
        k, v = torch.randn(2, 3, length, 4), torch.randn(2, 3, length, 4)
        got, expected = ours.update(k, v), theirs.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        assert ours.get_seq_length() == theirs.get_seq_length()
    assert ours._keys.shape[-2] >= 11


def test_preallocated_cache_replaces_only_full_attention_layers():
    from transformers import LlamaConfig
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from okd.generation import _PreallocatedLayer, _preallocated_cache

    config = LlamaConfig(num_hidden_layers=3, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=VOCAB)
    model = build_model("llama", "nano", vocab_size=VOCAB, max_positions=16)
    assert all(isinstance(layer, _PreallocatedLayer) for layer in _preallocated_cache(model, 20).layers)
    config.sliding_window, config.layer_types = 4, ["sliding_attention", "full_attention", "sliding_attention"]

    class Windowed:
        pass

    windowed = Windowed()
    windowed.config = config
    kinds = [type(layer) for layer in _preallocated_cache(windowed, 20).layers]
    assert kinds == [DynamicSlidingWindowLayer, _PreallocatedLayer, DynamicSlidingWindowLayer]


def test_generated_tokens_can_be_trained_on():
    # Generation runs under torch.inference_mode: what it returns must be usable in a training step.
    model = build_model("llama", "nano", vocab_size=VOCAB, max_positions=64).train()
    responses = generate_batched(model, PROMPTS, pad_token_id=0, eos_token_id=None, max_new_tokens=4, seed=0)
    assert model.training
    ids = torch.tensor([PROMPTS[0] + responses[0]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
