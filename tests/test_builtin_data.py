"""Tests for okd.data.builtin: the standard-library docstring dataset.

The dataset is built once per test run (about a second or two); a second, forced build
checks that builds are byte-identical.
"""

import hashlib
import json

import pytest

from okd.data import DataError, build_builtin_dataset, builtin_texts, read_jsonl
from okd.data import builtin

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """Paths of one build, shared by the tests that only read it."""
    return build_builtin_dataset(tmp_path_factory.mktemp("builtin"))


def records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sizes(built):
    counts = {split: len(records(built[split])) for split in SPLITS}
    assert counts["train"] >= 3000
    assert counts["test"] >= 300
    assert counts["validation"] > 0
    meta = json.loads(built["meta"].read_text())
    assert meta["counts"] == counts


def test_records_are_clean(built):
    all_records = [r for split in SPLITS for r in records(built[split])]
    for r in all_records:
        assert set(r) == {"prompt", "response", "name"}
        assert r["response"].strip() and r["prompt"].strip()
        assert "\n" not in r["response"]
        assert f"`{r['name']}(" in r["prompt"]
        assert " at 0x" not in r["prompt"] + r["response"]
    prompts = [r["prompt"] for r in all_records]
    assert len(prompts) == len(set(prompts)), "duplicate prompts"


def test_no_name_in_two_splits(built):
    names = {split: [r["name"] for r in records(built[split])] for split in SPLITS}
    for split in SPLITS:
        assert len(names[split]) == len(set(names[split])), f"duplicate names in {split}"
        assert names[split] == sorted(names[split])
    assert not set(names["train"]) & set(names["test"])
    assert not set(names["train"]) & set(names["validation"])
    assert not set(names["validation"]) & set(names["test"])


def test_splits_follow_the_name_hash(built):
    for split in SPLITS:
        assert all(builtin.split_of(r["name"]) == split for r in records(built[split]))


def test_loads_as_instruction_data(built):
    examples = read_jsonl(built["test"])
    assert examples[0].prompt.startswith("Describe the Python ")


def test_known_example(built):
    by_name = {r["name"]: r for split in SPLITS for r in records(built[split])}
    record = by_name["json.dumps"]
    assert record["prompt"].startswith("Describe the Python function `json.dumps(obj, *, skipkeys=False")
    assert record["response"] == "Serialize ``obj`` to a JSON formatted ``str``."


def test_two_builds_are_byte_identical(built, tmp_path):
    again = build_builtin_dataset(tmp_path, force=True)
    for split in SPLITS:
        assert sha256(again[split]) == sha256(built[split]), split
    assert again["meta"].read_bytes() == built["meta"].read_bytes()


def test_reuse_does_not_rebuild(built, monkeypatch):
    def fail():
        raise AssertionError("rebuilt although the files are up to date")

    monkeypatch.setattr(builtin, "_walk_in_subprocess", fail)
    before = {split: built[split].stat().st_mtime_ns for split in SPLITS}
    again = build_builtin_dataset(built["train"].parent)
    assert again == built
    assert {split: built[split].stat().st_mtime_ns for split in SPLITS} == before


def test_stale_or_damaged_build_is_rebuilt(built, tmp_path, monkeypatch):
    class Rebuilt(Exception):
        pass

    def walk():
        raise Rebuilt

    monkeypatch.setattr(builtin, "_walk_in_subprocess", walk)
    out = tmp_path / "copy"
    out.mkdir()
    for path in built.values():
        (out / path.name).write_bytes(path.read_bytes())
    build_builtin_dataset(out)  # an intact copy is reused

    meta = json.loads((out / "meta.json").read_text())
    meta["interpreter"]["python"] = "2.7.18"
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(Rebuilt):  # another interpreter
        build_builtin_dataset(out)

    (out / "meta.json").write_bytes(built["meta"].read_bytes())
    with open(out / "test.jsonl", "a", encoding="utf-8") as f:
        f.write("{}\n")
    with pytest.raises(Rebuilt):  # a file that does not match its hash
        build_builtin_dataset(out)


def test_too_few_examples_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "_walk_in_subprocess", lambda: [])
    with pytest.raises(DataError, match="need at least 3000 train"):
        build_builtin_dataset(tmp_path)
    assert not (tmp_path / "meta.json").exists()


def test_builtin_texts(built):
    texts = list(builtin_texts(built["train"].parent))
    train = records(built["train"])
    assert len(texts) == len(train)
    assert texts[0] == train[0]["prompt"] + train[0]["response"]


@pytest.mark.parametrize(
    "doc, expected",
    [
        ("Return the sum.  More text here.", "Return the sum."),
        ("Return a list,\n    joined over lines.\n\n    Details.", "Return a list, joined over lines."),
        ("int(x, base=10) -> integer\n\nConvert a number to an integer.", "Convert a number to an integer."),
        ("S.append(value) -- append value to the end", "append value to the end"),
        ("Use e.g. this one. Then more.", "Use e.g. this one."),
        ("No final period in this one", "No final period in this one"),
        ("Too short.", None),
        ("The options are:\n\n  a, b", None),
        ("b(reak) [lineno] Set a breakpoint.", None),
        ("", None),
        (" ".join(["word"] * 41) + ".", None),
    ],
)
def test_first_sentence(doc, expected):
    assert builtin.first_sentence(doc) == expected


def test_signature_text_hides_unstable_defaults():
    sentinel = object()

    def f(a, b=sentinel, c=frozenset({"x", "y"}), d=(1, "two"), e=None):
        pass

    assert builtin._signature_text("m.f", f) == "m.f(a, b=..., c=..., d=(1, 'two'), e=None)"


def test_signature_text_truncates_at_whole_parameters():
    def g(alpha="a" * 50, beta="b" * 50, gamma="c" * 50, delta="d" * 50):
        pass

    text = builtin._signature_text("m.g", g)
    assert len(text) <= builtin.MAX_SIGNATURE_CHARS
    assert text.endswith(", ...)")
    assert text.count("'") % 2 == 0  # no string literal cut in half
