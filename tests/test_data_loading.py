"""Tests for okd.data.loading: JSON, Parquet, Arrow, save_to_disk and hub sources, field mapping.

Every fixture is written here, in tmp_path; each source must give exactly the ``Example``s that
the equivalent JSONL file gives through ``read_jsonl``. The hub path runs offline against a
datasets cache filled here (the layout ``load_dataset`` reloads from when offline).
"""

import glob
import json
import shutil

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

import datasets
from okd.data import DataError, Example, InstructionDataset, read_jsonl
from okd.data.loading import FIELD_PRESETS, HubName, is_loader_source, parse_hub_name, read_examples
from test_data import char_tokenizer

datasets.disable_progress_bars()  # save_to_disk's bars would fill the test log

# The three layouts format_record reads, mixed in one data set (a table then has nulls).
RECORDS = [
    {"prompt": "Q: 2+2?\nA: ", "response": "4"},
    {"instruction": "Add.", "input": "2 and 2", "output": "4"},
    {"instruction": "Greet.", "input": "", "output": "Hello"},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
]
# The same data as published Dolly rows (instruction / context / response).
DOLLY = [
    {"instruction": "Add.", "context": "2 and 2", "response": "4", "category": "closed_qa"},
    {"instruction": "Greet.", "context": "", "response": "Hello", "category": "open_qa"},
]
DOLLY_AS_OKD = [{"instruction": r["instruction"], "input": r["context"], "output": r["response"]} for r in DOLLY]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(chat_template="{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}[assistant]")


def table_rows(records):
    """Every key in every row (None where a record lacks it): pyarrow and datasets take the
    columns from the first row alone."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    return [{k: r.get(k) for k in keys} for r in records]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path, records):
    pq.write_table(pa.Table.from_pylist(table_rows(records)), path)
    return path


def write_datasets_arrow(path, records):
    """An .arrow file in datasets' own format: the one save_to_disk writes, copied out."""
    datasets.Dataset.from_list(table_rows(records)).save_to_disk(str(path.parent / "saved_for_arrow"))
    (arrow,) = glob.glob(str(path.parent / "saved_for_arrow" / "*.arrow"))
    shutil.copy(arrow, path)
    return path


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A datasets cache holding 'okd-test/tiny_dolly' (splits train and test), as a past online load would.

    Built with datasets' own Parquet builder, then put where the offline reload looks:
    ``CACHE/okd-test___tiny_dolly/CONFIG/VERSION/HASH/``.
    """
    from datasets.packaged_modules.parquet.parquet import Parquet

    files = {"train": str(write_parquet(tmp_path / "train.parquet", DOLLY)),
             "test": str(write_parquet(tmp_path / "test.parquet", DOLLY[:1]))}
    builder = Parquet(cache_dir=str(tmp_path / "build"), data_files=files, dataset_name="tiny_dolly", config_name="default")
    builder.download_and_prepare()
    (built,) = glob.glob(str(tmp_path / "build" / "tiny_dolly" / "*" / "0.0.0"))
    cache = tmp_path / "hf_datasets_cache"
    shutil.copytree(built, cache / "okd-test___tiny_dolly" / "default" / "0.0.0" / "0123456789abcdef",
                    ignore=shutil.ignore_patterns("*.lock"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


def one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(DataError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# ----------------------------------------------------------------------------------------------
# Every source gives the JSONL examples
# ----------------------------------------------------------------------------------------------


def test_json_parquet_arrow_and_save_to_disk_equal_jsonl(tmp_path, tok):
    expected = read_jsonl(write_jsonl(tmp_path / "data.jsonl", RECORDS), tok)
    assert expected[3] == Example("[user]Hi\n[assistant]", "Yo")  # the chat template was used

    (tmp_path / "list.json").write_text(json.dumps(RECORDS, indent=2), encoding="utf-8")
    write_jsonl(tmp_path / "lines.json", RECORDS)
    write_parquet(tmp_path / "data.parquet", RECORDS)
    write_datasets_arrow(tmp_path / "data.arrow", RECORDS)
    feather.write_feather(pa.Table.from_pylist(table_rows(RECORDS)), tmp_path / "ipc.arrow")  # Arrow IPC file
    datasets.Dataset.from_list(table_rows(RECORDS)).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(table_rows(RECORDS)),
                          "test": datasets.Dataset.from_list(RECORDS[:1])}).save_to_disk(str(tmp_path / "saved_dict"))

    for source in ["list.json", "lines.json", "data.parquet", "data.arrow", "ipc.arrow", "saved", "saved_dict@train"]:
        got = read_examples(tmp_path / source if "@" not in source else f"{tmp_path}/{source}", tok)
        assert got == expected, source
        assert read_jsonl(tmp_path / source if "@" not in source else f"{tmp_path}/{source}", tok) == expected
    assert read_examples(f"{tmp_path}/saved_dict@test", tok) == expected[:1]
    # Rows are named by source and index (0-based), as lines are by file and line number.
    assert read_examples(tmp_path / "data.parquet", tok)[2].source == f"{tmp_path / 'data.parquet'}, row 2"
    assert expected[2].source == f"{tmp_path / 'data.jsonl'}, line 3"


def test_jsonl_goes_to_read_jsonl_unchanged(tmp_path, tok):
    path = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    assert not is_loader_source(path) and not is_loader_source(tmp_path / "data.txt")
    assert read_examples(path, tok) == read_jsonl(path, tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n', encoding="utf-8")
    with pytest.raises(DataError) as via_jsonl:
        read_jsonl(bad)
    assert str(via_jsonl.value) == f"{bad}, line 2: missing field 'response'"
    with pytest.raises(DataError) as via_loader:
        read_examples(bad)
    assert str(via_loader.value) == str(via_jsonl.value)


def test_json_lines_reader_keeps_read_jsonl_messages(tmp_path):
    """A .json file of JSON lines, and a .jsonl file read with a field mapping, go through
    loading's own line reader: its messages must be read_jsonl's, word for word."""
    cases = ['{"prompt": "a", "response": "b"}\n{"prompt": "a", ', '{"prompt": "a", "response": "b"}\n[1]\n', '"text"\n', b'\xff\n']
    for i, content in enumerate(cases):
        jsonl, as_json = tmp_path / f"c{i}.jsonl", tmp_path / f"c{i}.json"
        for path in (jsonl, as_json):
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(DataError) as reference:
            read_jsonl(jsonl)
        for source, kwargs in ((as_json, {}), (jsonl, {"fields": {"prompt": "prompt"}})):
            with pytest.raises(DataError) as got:
                read_examples(source, **kwargs)
            assert str(got.value) == str(reference.value).replace(str(jsonl), str(source)), content


def test_instruction_dataset_from_parquet(tmp_path, tok):
    write_parquet(tmp_path / "data.parquet", RECORDS)
    from_parquet = InstructionDataset(read_jsonl(tmp_path / "data.parquet", tok), tok, 64)
    from_jsonl = InstructionDataset(read_jsonl(write_jsonl(tmp_path / "d.jsonl", RECORDS), tok), tok, 64)
    assert from_parquet.features == from_jsonl.features


# ----------------------------------------------------------------------------------------------
# Field mapping and presets
# ----------------------------------------------------------------------------------------------


def test_field_mapping_renames_columns(tmp_path, tok):
    rows = [{"question": "Q: 2+2?\nA: ", "answer": "4", "id": 7}]
    expected = read_jsonl(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: 2+2?\nA: ", "response": "4"}]))
    fields = {"prompt": "question", "response": "answer"}
    write_parquet(tmp_path / "qa.parquet", rows)
    write_jsonl(tmp_path / "qa.jsonl", rows)
    assert read_examples(tmp_path / "qa.parquet", fields=fields) == expected
    assert read_examples(tmp_path / "qa.jsonl", fields=fields) == expected
    # Chat columns under another name.
    chats = [{"conversation": RECORDS[3]["messages"]}]
    write_parquet(tmp_path / "chat.parquet", chats)
    assert read_examples(tmp_path / "chat.parquet", tok, fields={"messages": "conversation"}) == [
        Example("[user]Hi\n[assistant]", "Yo")
    ]


def test_dolly_and_distillm_layouts(tmp_path):
    expected = read_jsonl(write_jsonl(tmp_path / "okd.jsonl", DOLLY_AS_OKD))
    write_parquet(tmp_path / "dolly.parquet", DOLLY)
    write_jsonl(tmp_path / "dolly.jsonl", DOLLY)
    assert read_examples(tmp_path / "dolly.parquet", fields="dolly") == expected
    assert read_examples(tmp_path / "dolly.jsonl", fields=FIELD_PRESETS["dolly"]) == expected
    # DistiLLM's instruction/input/output needs nothing; its processed prompt/output has a preset.
    write_parquet(tmp_path / "distillm.parquet", DOLLY_AS_OKD)
    assert read_examples(tmp_path / "distillm.parquet") == expected
    processed = [{"prompt": e.prompt, "output": e.response} for e in expected]
    (tmp_path / "processed.json").write_text(json.dumps(processed), encoding="utf-8")
    assert read_examples(tmp_path / "processed.json", fields="prompt_output") == expected
    # Raw Dolly without the preset: the error says what to set.
    one_line_error(r"row 0: .*set data.fields to 'dolly'", read_examples, tmp_path / "dolly.parquet")


# ----------------------------------------------------------------------------------------------
# Hub names, offline from the local cache
# ----------------------------------------------------------------------------------------------


def test_parse_hub_name():
    assert parse_hub_name("hub:databricks/databricks-dolly-15k") == HubName("databricks/databricks-dolly-15k")
    assert parse_hub_name("hub:openai/gsm8k:main@test") == HubName("openai/gsm8k", "main", "test")
    assert parse_hub_name("hub:squad@train[:90%]") == HubName("squad", None, "train[:90%]")
    assert parse_hub_name("hub:a/b:c@train[10:20]") == HubName("a/b", "c", "train[10:20]")
    for bad in ["hub:", "hub:a/b/c", "hub:a/b:@train", "hub:a/b@", "hub:/b", "hub:a b"]:
        one_line_error("malformed hub name", parse_hub_name, bad)


def test_hub_name_reads_the_local_cache_offline(hub_cache, tmp_path):
    expected = read_jsonl(write_jsonl(tmp_path / "okd.jsonl", DOLLY_AS_OKD))
    assert read_examples("hub:okd-test/tiny_dolly@train", fields="dolly") == expected
    assert read_examples("hub:okd-test/tiny_dolly:default@test", fields="dolly") == expected[:1]
    assert read_examples("hub:okd-test/tiny_dolly@train[1:]", fields="dolly") == expected[1:]
    # read_jsonl (what training calls) hands hub names on: raw Dolly rows without the preset.
    one_line_error(r"^hub:okd-test/tiny_dolly@train, row 0: .*set data.fields to 'dolly'",
                   read_jsonl, "hub:okd-test/tiny_dolly@train")


def test_hub_errors(hub_cache, monkeypatch):
    one_line_error(r"^hub:okd-test/tiny_dolly: a DatasetDict with splits \['train', 'test'\]: name one",
                   read_examples, "hub:okd-test/tiny_dolly", fields="dolly")
    one_line_error(r"hub:okd-test/tiny_dolly@validation: .*validation", read_examples, "hub:okd-test/tiny_dolly@validation")
    one_line_error(r"config 'other'.*(?i:available) configs in the cache: \['default'\]",
                   read_examples, "hub:okd-test/tiny_dolly:other@train")
    one_line_error(r"^hub:okd-test/missing@train: data set 'okd-test/missing' is not in the local Hugging Face cache",
                   read_examples, "hub:okd-test/missing@train")

    # Online but unreachable (datasets raises ConnectionError): simulated, this machine has no network.
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'okd-test/missing' on the Hub (ConnectError)")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    one_line_error(r"^hub:okd-test/missing: the Hugging Face hub is unreachable and data set 'okd-test/missing' "
                   r"is not in the local cache", read_examples, "hub:okd-test/missing")


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the culprit
# ----------------------------------------------------------------------------------------------


def test_missing_column_names_the_available_ones(tmp_path):
    write_parquet(tmp_path / "qa.parquet", [{"question": "q", "answer": "a"}])
    message = one_line_error("no column 'output'", read_examples, tmp_path / "qa.parquet",
                             fields={"prompt": "question", "response": "output"})
    assert message == (f"{tmp_path / 'qa.parquet'}: no column 'output' (data.fields maps 'response' to it); "
                       "available columns: ['question', 'answer']")
    (tmp_path / "qa.json").write_text(json.dumps([{"question": "q", "answer": "a"}, {"question": "q2"}]))
    one_line_error(r"qa.json: no column 'reply' .*available columns: \['question', 'answer'\]",
                   read_examples, tmp_path / "qa.json", fields={"response": "reply"})
    # A column some records lack: the record is named, with the keys it has.
    one_line_error(r"qa.json, row 1: no column 'answer' .*this record has \['question'\]",
                   read_examples, tmp_path / "qa.json", fields={"prompt": "question", "response": "answer"})


def test_bad_fields_option(tmp_path):
    one_line_error(r"unknown preset 'alpacca'; presets: \['dolly', 'prompt_output'\]",
                   read_examples, tmp_path / "x.parquet", fields="alpacca")
    one_line_error("unknown field 'question'", read_examples, tmp_path / "x.parquet", fields={"question": "q"})
    one_line_error(r"data.fields\['prompt'\] must be a column name", read_examples, tmp_path / "x.parquet",
                   fields={"prompt": 3})


def test_unknown_file_type_and_missing_files(tmp_path):
    (tmp_path / "data.csv").write_text("prompt,response\na,b\n")
    one_line_error(r"data.csv: unknown file type '.csv'; expected .jsonl, .json, .parquet, .arrow",
                   read_examples, tmp_path / "data.csv")
    one_line_error("no such file", read_examples, tmp_path / "nope.parquet")
    one_line_error("no such file", read_jsonl, tmp_path / "nope.json")
    (tmp_path / "fake.parquet").write_text("not parquet")
    one_line_error("fake.parquet: not a readable Parquet file", read_examples, tmp_path / "fake.parquet")
    (tmp_path / "fake.arrow").write_text("not arrow")
    one_line_error("fake.arrow: not a readable Arrow file", read_examples, tmp_path / "fake.arrow")
    (tmp_path / "folder").mkdir()
    one_line_error("folder: a folder, but not one written by save_to_disk", read_examples, tmp_path / "folder")
    (tmp_path / "obj.json").write_text('{\n"data": []\n}')
    one_line_error(r"obj.json, line 1: malformed JSON", read_examples, tmp_path / "obj.json")


def test_dataset_dict_needs_a_split(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS[:1]),
                               "test": datasets.Dataset.from_list(RECORDS[:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    one_line_error(r"dd: a DatasetDict with splits \['train', 'test'\]: name one as .*dd@SPLIT",
                   read_examples, tmp_path / "dd")
    one_line_error(r"dd: no split 'valid'; splits: \['train', 'test'\]", read_examples, f"{tmp_path}/dd@valid")
    datasets.Dataset.from_list(RECORDS[:1]).save_to_disk(str(tmp_path / "single"))
    one_line_error("single: a single Dataset, not a DatasetDict: it has no split 'train'",
                   read_examples, f"{tmp_path}/single@train")


def test_empty_data_sets(tmp_path):
    schema = pa.schema([("prompt", pa.string()), ("response", pa.string())])
    pq.write_table(schema.empty_table(), tmp_path / "empty.parquet")
    one_line_error(r"empty.parquet: no examples \(the data set is empty\)", read_examples, tmp_path / "empty.parquet")
    (tmp_path / "empty.json").write_text("[]")
    one_line_error("empty.json: no examples", read_examples, tmp_path / "empty.json")
    (tmp_path / "blank.json").write_text("\n\n")
    one_line_error("blank.json: no examples", read_examples, tmp_path / "blank.json")
    # (datasets 5.2 cannot save_to_disk an empty Dataset: IndexError in its own code; Arrow instead.)
    feather.write_feather(schema.empty_table(), tmp_path / "empty.arrow")
    one_line_error("empty.arrow: no examples", read_examples, tmp_path / "empty.arrow")


def test_bad_row_is_named(tmp_path):
    write_parquet(tmp_path / "d.parquet", [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": " "}])
    assert one_line_error("row 1", read_examples, tmp_path / "d.parquet") == f"{tmp_path / 'd.parquet'}, row 1: empty response"
    write_parquet(tmp_path / "n.parquet", [{"prompt": "a", "response": 3}])
    one_line_error(r"n.parquet, row 0: field 'response' must be a string, got int", read_examples, tmp_path / "n.parquet")


def test_distill_trains_on_a_parquet_file_with_mapped_columns(tiny_setting, tmp_path):
    """End to end: `data.train_file` a Parquet file whose columns are named otherwise, mapped by
    `data.fields`, gives the same run (losses) as the JSONL file it was made from."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from engine_helpers import configs

    from okd.training import distill

    rows = [json.loads(line) for line in open(tiny_setting["train"])]
    table = pa.table({"question": [r["prompt"] for r in rows], "answer": [r["response"] for r in rows]})
    parquet = tmp_path / "train.parquet"
    pq.write_table(table, parquet)

    runs = {}
    for name, train_file, fields in (("jsonl", tiny_setting["train"], None), ("parquet", str(parquet), {"prompt": "question", "response": "answer"})):
        kwargs = configs(tiny_setting, "kd", steps=3)
        kwargs["data"].train_file, kwargs["data"].fields, kwargs["data"].validation_file = train_file, fields, None
        result = distill(**kwargs, output_dir=str(tmp_path / name))
        runs[name] = [json.loads(line)["loss"] for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(runs["jsonl"]) == 3
    assert runs["parquet"] == runs["jsonl"]
