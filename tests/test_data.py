"""Tests for okd.data.instruction: JSONL reading, tokenisation with truncation, collation.

The tokenizer is built here, offline: one token per character (a WordLevel model over
printable ASCII), so token counts equal character counts and expectations are easy to read.
"""

import json

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from okd.data import (
    IGNORE_INDEX,
    Collator,
    DataError,
    Example,
    InstructionDataset,
    collate_prompts,
    ensure_pad_token,
    load_dataset_file,
    read_jsonl,
    tokenize_example,
    write_jsonl,
)

SPECIALS = ["<unk>", "<pad>", "<bos>", "<eos>"]


def char_tokenizer(*, pad: bool = True, adds_bos: bool = False, chat_template: str | None = None):
    """A character-level tokenizer: token id of "a" is a fixed number, one token per character."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in [chr(c) for c in range(32, 127)] + ["\n"]:
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    if adds_bos:  # like Llama: plain text gets a BOS token in front
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<eos>",
        bos_token="<bos>",
        pad_token="<pad>" if pad else None,
    )
    if chat_template:
        tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# JSONL: good input
# ----------------------------------------------------------------------------------------------


def test_reads_all_three_layouts_and_skips_blank_lines(tmp_path):
    path = write_lines(
        tmp_path / "data.jsonl",
        [
            json.dumps({"prompt": "Q: 2+2?\nA: ", "response": "4", "extra": 1}),
            "",
            "   ",
            json.dumps({"instruction": "Add.", "input": "2 and 2", "output": "4"}),
            json.dumps({"instruction": "Say hi.", "output": "hi"}),
            json.dumps({"instruction": "Say hi.", "input": "  ", "output": "hi"}),
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"},
                    ]
                }
            ),
        ],
    )
    examples = read_jsonl(path)
    assert examples[0] == Example("Q: 2+2?\nA: ", "4")
    assert examples[1] == Example(
        "### Instruction:\nAdd.\n\n### Input:\n2 and 2\n\n### Response:\n", "4"
    )
    # No input, or a blank one: the Input block is left out.
    assert examples[2] == Example("### Instruction:\nSay hi.\n\n### Response:\n", "hi")
    assert examples[3] == examples[2]
    assert examples[4] == Example("system: Be brief.\nuser: Hi\nassistant: ", "Hello")
    assert len(examples) == 5


def test_chat_records_use_the_tokenizer_chat_template(tmp_path):
    template = (
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    tok = char_tokenizer(chat_template=template)
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps(record)])
    assert read_jsonl(path, tok) == [Example("[user]Hi\n[assistant]", "Yo")]
    # A tokenizer without a chat template falls back to plain "role: content" lines.
    assert read_jsonl(path, char_tokenizer()) == [Example("user: Hi\nassistant: ", "Yo")]


def test_write_jsonl_round_trips_and_is_atomic(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    examples = [Example("p1 ", "r1"), Example("p2 \u2028 é ", "r2")]  # U+2028 must not split lines
    write_jsonl(path, examples)
    assert read_jsonl(path) == examples
    write_jsonl(path, [{"prompt": "a", "response": "b"}])
    assert read_jsonl(path) == [Example("a", "b")]
    assert [p.name for p in path.parent.iterdir()] == ["out.jsonl"]  # no temporary files left


def test_tolerates_a_utf8_bom_and_crlf(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "p", "response": "r"}\r\n')
    assert read_jsonl(path) == [Example("p", "r")]


# ----------------------------------------------------------------------------------------------
# JSONL: bad input gives one-line errors naming the file and line
# ----------------------------------------------------------------------------------------------

GOOD = json.dumps({"prompt": "p", "response": "r"})

BAD_LINES = {
    "malformed_json": ('{"prompt": "p", "response": ', "malformed JSON"),
    "not_an_object": ('["p", "r"]', "expected a JSON object, got list"),
    "missing_response": ('{"prompt": "p"}', "missing field 'response'"),
    "missing_prompt": ('{"response": "r"}', "missing field 'prompt'"),
    "missing_output": ('{"instruction": "i"}', "missing field 'output'"),
    "no_known_fields": ('{"text": "t"}', "missing fields"),
    "wrong_type": ('{"prompt": "p", "response": 3}', "field 'response' must be a string, got int"),
    "wrong_input_type": ('{"instruction": "i", "input": 1, "output": "o"}', "'input' must be a string"),
    "empty_prompt": ('{"prompt": " \\n ", "response": "r"}', "empty prompt"),
    "empty_response": ('{"prompt": "p", "response": "  "}', "empty response"),
    "empty_instruction": ('{"instruction": " ", "output": "o"}', "'instruction' is empty"),
    "chat_not_list": ('{"messages": "hi"}', "'messages' must be a list"),
    "chat_last_not_assistant": (
        '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]}',
        "last message must have role 'assistant'",
    ),
    "chat_only_assistant": ('{"messages": [{"role": "assistant", "content": "a"}]}', "at least one"),
    "chat_missing_content": (
        '{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}',
        "messages[0]: missing field 'content'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_names_file_and_line(tmp_path, case):
    bad, expected = BAD_LINES[case]
    path = write_lines(tmp_path / "bad_data.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert "bad_data.jsonl, line 3:" in message
    assert expected in message
    assert "\n" not in message


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + '{"prompt": "caf\xe9", "response": "r"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r"latin1\.jsonl, line 2: not valid UTF-8"):
        read_jsonl(path)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        read_jsonl(tmp_path / "nope.jsonl")
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="empty.jsonl: no examples"):
        read_jsonl(empty)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


# ----------------------------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------------------------


def test_labels_mask_the_prompt_and_cover_response_and_eos(tok):
    out = tokenize_example(tok, Example("abc", "xy"), max_length=64)
    assert out["input_ids"] == ids(tok, "abc") + ids(tok, "xy") + [tok.eos_token_id]
    assert out["labels"] == [IGNORE_INDEX] * 3 + ids(tok, "xy") + [tok.eos_token_id]
    assert out["prompt_ids"] == ids(tok, "abc")
    assert out["truncated"] is False


def test_without_eos(tok):
    out = tokenize_example(tok, Example("abc", "xy"), max_length=64, eos=False)
    assert out["input_ids"] == ids(tok, "abcxy")
    assert out["labels"] == [IGNORE_INDEX] * 3 + ids(tok, "xy")


def test_truncation_cuts_the_prompt_from_the_left_first(tok):
    # 20 prompt + 4 response + EOS = 25 tokens into 12: the whole response and EOS fit
    # (5 <= min_response_tokens=8), so only the prompt is cut, keeping its last 7 characters.
    prompt = "0123456789abcdefghij"
    out = tokenize_example(tok, Example(prompt, "WXYZ"), max_length=12)
    assert out["truncated"] is True
    assert len(out["input_ids"]) == 12
    assert out["prompt_ids"] == ids(tok, "defghij")
    assert out["input_ids"] == ids(tok, "defghijWXYZ") + [tok.eos_token_id]
    assert out["labels"] == [IGNORE_INDEX] * 7 + ids(tok, "WXYZ") + [tok.eos_token_id]


def test_truncation_keeps_min_response_tokens_then_cuts_the_response(tok):
    # Long prompt and long response into 16 tokens: the response keeps its first 8 tokens
    # (min_response_tokens), the prompt keeps its last 8; the EOS is cut with the response tail.
    prompt, response = "P" * 10 + "abcdefgh", "0123456789" * 3
    out = tokenize_example(tok, Example(prompt, response), max_length=16, min_response_tokens=8)
    assert out["prompt_ids"] == ids(tok, "abcdefgh")
    assert out["input_ids"] == ids(tok, "abcdefgh01234567")
    assert out["labels"][:8] == [IGNORE_INDEX] * 8
    assert out["labels"][8:] == ids(tok, "01234567")
    assert tok.eos_token_id not in out["input_ids"]


def test_short_prompt_leaves_room_for_more_response(tok):
    out = tokenize_example(tok, Example("ab", "0123456789" * 3), max_length=16)
    assert out["prompt_ids"] == ids(tok, "ab")  # prompt fits: untouched
    assert out["input_ids"] == ids(tok, "ab" + ("0123456789" * 3)[:14])


def test_impossible_truncation_raises_naming_the_example(tok):
    # max_length 8 = the 8 guaranteed response tokens, leaving nothing for the prompt.
    with pytest.raises(DataError, match="example 7: max_length=8"):
        tokenize_example(tok, Example("prompt", "a long response"), max_length=8, index=7)


def test_bos_is_prepended_when_the_tokenizer_adds_one_and_survives_truncation():
    tok = char_tokenizer(adds_bos=True)
    out = tokenize_example(tok, Example("abc", "xy"), max_length=64)
    assert out["prompt_ids"] == [tok.bos_token_id] + ids(tok, "abc")
    assert out["labels"][:4] == [IGNORE_INDEX] * 4
    # A prompt that already starts with BOS (as chat templates write it) does not get a second one.
    out = tokenize_example(tok, Example("<bos>abc", "xy"), max_length=64)
    assert out["prompt_ids"] == [tok.bos_token_id] + ids(tok, "abc")
    # Cut from the left: BOS stays in front, then the END of the prompt.
    out = tokenize_example(tok, Example("0123456789", "xy"), max_length=8)
    assert out["prompt_ids"] == [tok.bos_token_id] + ids(tok, "6789")
    assert len(out["input_ids"]) == 8


def test_dataset_items_and_truncation_count(tok):
    examples = [Example("abc", "xy"), Example("0123456789abcdefghij", "WXYZ")]
    ds = InstructionDataset(examples, tok, max_length=12)
    assert len(ds) == 2
    assert ds.num_truncated == 1
    assert ds.examples == examples
    item = ds[1]
    assert set(item) == {"input_ids", "labels", "prompt_ids", "index"}
    assert item["index"] == 1
    assert item["prompt_ids"] == ids(tok, "defghij")


def test_empty_dataset_raises(tok):
    with pytest.raises(DataError, match="empty"):
        InstructionDataset([], tok, max_length=12)


def test_load_dataset_file(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [Example("abc", "xy")])
    ds = load_dataset_file(path, tok, max_length=32)
    assert ds[0]["input_ids"] == ids(tok, "abcxy") + [tok.eos_token_id]


def test_ensure_pad_token_uses_eos():
    tok = char_tokenizer(pad=False)
    assert tok.pad_token is None
    ensure_pad_token(tok)
    assert tok.pad_token == "<eos>" and tok.pad_token_id == tok.eos_token_id
    tok2 = char_tokenizer()
    assert ensure_pad_token(tok2).pad_token == "<pad>"  # an existing pad token is kept


# ----------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------


def test_collator_right_pads(tok):
    ds = InstructionDataset([Example("abc", "xy"), Example("a", "x")], tok, max_length=32)
    batch = Collator(pad_token_id=tok.pad_token_id)([ds[0], ds[1]])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "index"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].shape == (2, 6)
    assert batch["input_ids"][1].tolist() == ids(tok, "ax") + [tok.eos_token_id] + [tok.pad_token_id] * 3
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] + ids(tok, "x") + [tok.eos_token_id] + [IGNORE_INDEX] * 3
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert batch["index"].tolist() == [0, 1]


def test_collator_pad_to_multiple_of(tok):
    ds = InstructionDataset([Example("abc", "xy")], tok, max_length=32)
    batch = Collator(pad_token_id=tok.pad_token_id, pad_to_multiple_of=8)([ds[0]])
    assert batch["input_ids"].shape == (1, 8)
    assert batch["attention_mask"][0].tolist() == [1] * 6 + [0] * 2


def test_collate_prompts_left_pads(tok):
    prompts = [ids(tok, "abcd"), ids(tok, "x"), ids(tok, "pq")]
    batch = collate_prompts(prompts, pad_token_id=tok.pad_token_id)
    assert batch["input_ids"].shape == (3, 4)
    # The last column is every prompt's last token: generation continues right after it.
    assert batch["input_ids"][:, -1].tolist() == [p[-1] for p in prompts]
    assert batch["input_ids"][1].tolist() == [tok.pad_token_id] * 3 + ids(tok, "x")
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]]
