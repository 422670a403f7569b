"""Tests for okd.data.wordnet (WordNet 3.0 definitions) and the task registry of `okd data build`.

Parsing and selection are checked on hand-written lines in the exact ``data.*``/``index.*``
layout; sizes, splits and determinism on the real files of Debian's wordnet-base package, which
``make install`` downloads into .cache/debian/ (these tests fail, not skip, without them).
"""

import hashlib
import json
import re
from pathlib import Path

import pytest

from okd.cli import main
from okd.data import TASKS, DataError, build_task, build_wordnet_dataset, read_jsonl
from okd.data import tasks, wordnet

SPLITS = ("train", "validation", "test")
REPO = Path(__file__).resolve().parents[1]

LICENSE_HEADER = (
    "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    "  2 Princeton University under the following license.  \n"
    "  3   \n"
    "  4 WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.  \n"
)

# Hand-written lines in the layout of WordNet 3.0's data.* files.
NOUN_LINE = (
    "00003553 03 n 02 whole 0 unit 0 003 @ 00002684 n 0000 + 01462023 v 0204 ~ 00003993 n 0000 "
    '| an assemblage of parts that is regarded as a single entity; "how big is that part compared '
    'to the whole?"; "the team is a unit"  \n'
)
VERB_LINE = (
    "00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 002 $ 00002325 v 0000 "
    "~ 00002573 v 0000 02 + 02 00 + 08 00 | draw air into, and expel out of, the lungs; "
    '"I can breathe better when the air is clean"; "The patient is respiring"  \n'
)
ADJ_LINE = (
    "00014358 00 s 02 abounding 0 galore(ip) 0 001 & 00013887 a 0000 "
    '| existing in abundance; "food galore"  \n'
)


def test_parse_noun_line():
    synset = wordnet.parse_data_line(NOUN_LINE)
    assert synset.offset == "00003553"
    assert synset.ss_type == "n"
    assert synset.words == ("whole", "unit")
    assert synset.gloss.startswith("an assemblage of parts") and synset.gloss.endswith('"the team is a unit"')
    assert wordnet.definition_of(synset.gloss) == "an assemblage of parts that is regarded as a single entity"


def test_parse_verb_line_with_frames():
    synset = wordnet.parse_data_line(VERB_LINE)
    assert synset.words == ("breathe", "take_a_breath", "respire", "suspire")
    assert wordnet.definition_of(synset.gloss) == "draw air into, and expel out of, the lungs"


def test_parse_adjective_satellite_drops_the_marker():
    synset = wordnet.parse_data_line(ADJ_LINE)
    assert synset.ss_type == "s"
    assert synset.words == ("abounding", "galore")


def test_word_count_is_hexadecimal():
    words = " ".join(f"w{i} 0" for i in range(16))
    synset = wordnet.parse_data_line(f"00000001 03 n 10 {words} 000 | sixteen words here  \n")
    assert len(synset.words) == 16


@pytest.mark.parametrize(
    "line, reason",
    [
        (NOUN_LINE.replace("|", ""), "no '|'"),
        (NOUN_LINE.replace(" 003 @", " 004 @"), "counts do not match"),
        (NOUN_LINE.replace(" n 02 ", " x 02 "), "unknown synset type"),
        (VERB_LINE.replace(" 02 + 02 00", " 03 + 02 00"), "counts do not match"),
        ("hello world | a gloss\n", "8-digit synset offset"),
    ],
)
def test_malformed_data_line_names_file_and_line(line, reason):
    with pytest.raises(DataError, match=re.escape(reason)) as raised:
        wordnet.parse_data_line(line, "data.noun line 7")
    assert str(raised.value).startswith("data.noun line 7: ")
    assert "\n" not in str(raised.value)


def test_parse_index_line():
    entry = wordnet.parse_index_line("bank n 3 7 @ ~ #m %p + ; - 3 4 09213565 08420278 09213434  \n")
    assert entry.lemma == "bank" and entry.pos == "n" and entry.tagsense_cnt == 4
    assert entry.offsets == ("09213565", "08420278", "09213434")
    with pytest.raises(DataError, match="index.noun line 3"):
        wordnet.parse_index_line("bank n 3 0 3 1 09213565\n", "index.noun line 3")


@pytest.mark.parametrize(
    "gloss, expected",
    [
        ('a dog; "the dog barked"', "a dog"),
        ('a dog;"the dog barked"; "woof"', "a dog"),
        ("a dog; a hound", "a dog; a hound"),
        ("(usually followed by `to') having the means", "(usually followed by `to') having the means"),
        ('"quoted" only', ""),
    ],
)
def test_definition_of(gloss, expected):
    assert wordnet.definition_of(gloss) == expected


# A small source directory in the real layout, one case per selection rule.
SYNTHETIC = {
    "n": (
        [
            "00000010 03 n 01 dog 0 000 | a domesticated carnivorous mammal; \"the dog barked\"  ",
            "00000020 03 n 01 dog 0 000 | a dull unattractive unpleasant girl or woman  ",
            "00000030 03 n 01 living_thing 0 000 | a living entity  ",
            "00000040 03 n 01 Paris 0 000 | the capital of France  ",
            "00000050 03 n 01 zyzzyva 0 000 | a tropical weevil  ",
            "00000060 03 n 01 air 0 000 | a mixture of gases required for breathing  ",
            "00000070 03 n 01 long 0 000 | " + " ".join(["word"] * 26) + "  ",
            "00000080 03 n 02 mark 0 Mark 0 000 | a written symbol  ",
            "00000090 03 n 01 Mercury 0 000 | the smallest planet  ",
        ],
        [
            "air n 1 0 1 1 00000060  ",
            "dog n 2 0 2 2 00000010 00000020  ",
            "living_thing n 1 0 1 1 00000030  ",
            "long n 1 0 1 1 00000070  ",
            "mark n 1 0 1 1 00000080  ",
            "mercury n 1 0 1 1 00000090  ",
            "paris n 1 0 1 1 00000040  ",
            "zyzzyva n 1 0 1 0 00000050  ",
        ],
    ),
    "v": (
        [
            "00000110 29 v 01 dog 0 000 01 + 08 00 | go after with the intent to catch  ",
            "00000120 29 v 01 air 0 000 01 + 08 00 | expose to fresh air  ",
        ],
        ["air v 1 0 1 1 00000120  ", "dog v 1 0 1 1 00000110  "],
    ),
    "a": (
        ["00000210 00 s 01 galore(ip) 0 000 | in abundance; \"food galore\"  "],
        ["galore a 1 0 1 1 00000210  "],
    ),
    "r": (
        ["00000310 02 r 01 well 0 000 | in a good manner  "],
        ["well r 1 0 1 1 00000310  "],
    ),
}


def write_source(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for pos, (data_lines, index_lines) in SYNTHETIC.items():
        suffix = wordnet.POS_FILES[pos]
        (directory / f"data.{suffix}").write_text(LICENSE_HEADER + "".join(ln + "\n" for ln in data_lines))
        (directory / f"index.{suffix}").write_text(LICENSE_HEADER + "".join(ln + "\n" for ln in index_lines))
    return directory


def test_selection_rules_on_synthetic_files(tmp_path):
    examples = wordnet.candidate_examples(write_source(tmp_path))
    got = {e.name: (e.prompt, e.response) for e in examples}
    assert got == {
        "air.n": ('Define "air" (noun).\n', "a mixture of gases required for breathing"),
        "dog.n": ('Define "dog" (noun).\n', "a domesticated carnivorous mammal"),  # the first sense only
        "dog.v": ('Define "dog" (verb).\n', "go after with the intent to catch"),
        "galore.a": ('Define "galore" (adjective).\n', "in abundance"),  # satellite, marker dropped
        "mark.n": ('Define "mark" (noun).\n', "a written symbol"),
        "well.r": ('Define "well" (adverb).\n', "in a good manner"),
    }
    # Skipped: living_thing (multi-word), paris and mercury (only capitalised names in the synset),
    # zyzzyva (no tagged sense), air.v (circular), long (too many words).


def test_license_text_from_the_header(tmp_path):
    text = wordnet.license_text(write_source(tmp_path) / "data.noun")
    assert text.startswith("This software and database is being provided")
    assert "WordNet 3.0 Copyright 2006 by Princeton University." in text
    assert not re.search(r"^\s*\d", text, re.M)


def test_missing_synset_is_a_clear_error(tmp_path):
    source = write_source(tmp_path)
    with open(source / "index.adv", "a") as f:
        f.write("badly r 1 0 1 1 00000999  \n")
    with pytest.raises(DataError, match=r"'badly' points at synset 00000999, which data.adv lacks"):
        wordnet.candidate_examples(source)


def test_split_keeps_a_lemma_together_and_respects_caps():
    examples = [
        wordnet.WordnetExample(prompt=f"{lemma} {pos}", response="x y", name=f"{lemma}.{pos}")
        for lemma in (f"w{i:04d}" for i in range(600))
        for pos in ("n", "v")[: 1 + (int(lemma[1:]) % 2)]
    ]
    caps = {"train": 101, "validation": 20, "test": 30}
    splits = wordnet.split_examples(examples, caps)
    assert {split: len(found) for split, found in splits.items()} == caps
    lemmas = {split: {wordnet.lemma_of(e.name) for e in found} for split, found in splits.items()}
    assert not lemmas["train"] & lemmas["test"]
    assert not lemmas["train"] & lemmas["validation"]
    assert not lemmas["validation"] & lemmas["test"]
    for split, found in splits.items():
        names = [e.name for e in found]
        assert names == sorted(names)
        for lemma in lemmas[split]:  # every part of speech of a taken lemma is taken
            assert sum(1 for e in examples if wordnet.lemma_of(e.name) == lemma) == sum(
                1 for e in found if wordnet.lemma_of(e.name) == lemma
            )
        assert all(wordnet.split_of(lemma) == split for lemma in lemmas[split])


def test_too_few_examples_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="need at least 2000 train"):
        build_wordnet_dataset(tmp_path / "out", source=write_source(tmp_path / "src"))
    assert not (tmp_path / "out" / "meta.json").exists()


# ----------------------------------------------------------------------------------------------
# Finding the source.
# ----------------------------------------------------------------------------------------------


def test_explicit_source_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match="is not a directory") as raised:
        wordnet.find_source(tmp_path / "missing")
    assert "\n" not in str(raised.value)
    source = write_source(tmp_path / "partial")
    (source / "data.verb").unlink()
    with pytest.raises(DataError, match="lacks data.verb;") as raised:
        wordnet.find_source(source)
    assert "\n" not in str(raised.value)


def test_default_lookup_order(tmp_path, monkeypatch):
    system, cache = tmp_path / "system", tmp_path / "cache"
    monkeypatch.setattr(wordnet, "default_source_dirs", lambda: [system, cache])
    with pytest.raises(DataError, match="run `make install`") as raised:
        wordnet.find_source()
    assert str(system) in str(raised.value) and "--source DIR" in str(raised.value)
    assert "\n" not in str(raised.value)
    write_source(cache)
    assert wordnet.find_source() == cache
    write_source(system)
    assert wordnet.find_source() == system
    explicit = write_source(tmp_path / "explicit")
    assert wordnet.find_source(explicit) == explicit


def test_default_dirs_are_the_system_then_the_project_cache():
    dirs = wordnet.default_source_dirs()
    assert dirs[0] == Path("/usr/share/wordnet")
    assert wordnet.CACHE_SOURCE in dirs or REPO / wordnet.CACHE_SOURCE in dirs


def test_makefile_pins_the_same_package():
    makefile = (REPO / "Makefile").read_text()
    assert f"WORDNET_SHA256 := {wordnet.DEBIAN_DEB_SHA256}" in makefile
    assert f"wordnet-base={wordnet.DEBIAN_VERSION}" in makefile
    assert f"WORDNET        := {wordnet.CACHE_SOURCE}/data.noun" in makefile


# ----------------------------------------------------------------------------------------------
# The real files.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def source():
    try:
        return wordnet.find_source()
    except DataError as error:
        pytest.fail(f"the WordNet files are missing (`make install` downloads them): {error}", pytrace=False)


@pytest.fixture(scope="session")
def built(source, tmp_path_factory):
    return build_wordnet_dataset(tmp_path_factory.mktemp("wordnet"), source=source)


def records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_real_files_are_the_pinned_package(source):
    for name in wordnet.SOURCE_FILES:
        assert sha256(source / name) == wordnet.PINNED_SOURCE_SHA256[name], name


def test_sizes(built):
    counts = {split: len(records(built[split])) for split in SPLITS}
    assert counts == wordnet.SPLIT_CAPS
    assert counts["train"] >= 2000 and counts["test"] >= 400 and counts["validation"] >= 200
    meta = json.loads(built["meta"].read_text())
    assert meta["counts"] == counts
    assert meta["candidates"] > sum(counts.values())


def test_records_are_clean(built):
    all_records = [r for split in SPLITS for r in records(built[split])]
    for r in all_records:
        assert set(r) == {"prompt", "response", "name"}
        lemma, pos = r["name"].rsplit(".", 1)
        assert r["prompt"] == f'Define "{lemma}" ({wordnet.POS_NAMES[pos]}).\n'
        assert re.fullmatch(r"[a-z]+(-[a-z]+)*", lemma)
        words = r["response"].split()
        assert wordnet.MIN_WORDS <= len(words) <= wordnet.MAX_WORDS
        assert '"' not in r["response"] and "\n" not in r["response"]
        assert r["response"] == r["response"].strip()
        assert not re.search(rf"(?<![\w-]){lemma}(?![\w-])", r["response"]), "circular definition"
    names = [r["name"] for r in all_records]
    assert len(names) == len(set(names))


def test_no_lemma_in_two_splits(built):
    lemmas = {split: {r["name"].rsplit(".", 1)[0] for r in records(built[split])} for split in SPLITS}
    assert not lemmas["train"] & lemmas["test"]
    assert not lemmas["train"] & lemmas["validation"]
    assert not lemmas["validation"] & lemmas["test"]
    for split in SPLITS:
        assert all(wordnet.split_of(lemma) == split for lemma in lemmas[split])
        names = [r["name"] for r in records(built[split])]
        assert names == sorted(names)


def test_known_example(built):
    by_name = {r["name"]: r for split in SPLITS for r in records(built[split])}
    record = by_name["accountant.n"]
    assert record == {
        "prompt": 'Define "accountant" (noun).\n',
        "response": "someone who maintains and audits business accounts",
        "name": "accountant.n",
    }


def test_meta_records_source_and_license(built):
    meta = json.loads(built["meta"].read_text())
    assert meta["source"]["debian_package"] == "wordnet-base"
    assert meta["source"]["debian_version"] == "1:3.0-37"
    assert meta["source"]["debian_deb_sha256"] == wordnet.DEBIAN_DEB_SHA256
    assert meta["source"]["matches_debian_package"] is True
    assert meta["license"]["name"].startswith("WordNet 3.0 license")
    assert "WordNet 3.0 Copyright 2006 by Princeton University." in meta["license"]["text"]
    assert meta["sha256"] == {split: sha256(built[split]) for split in SPLITS}
    assert str(built["meta"].parent) not in built["meta"].read_text()  # no paths: the same on every machine


def test_loads_as_instruction_data(built):
    examples = read_jsonl(built["test"])
    assert len(examples) == wordnet.SPLIT_CAPS["test"]
    assert examples[0].prompt.startswith('Define "')


def test_two_builds_are_byte_identical(built, source, tmp_path):
    again = build_wordnet_dataset(tmp_path, force=True, source=source)
    for split in SPLITS:
        assert sha256(again[split]) == sha256(built[split]), split
    assert again["meta"].read_bytes() == built["meta"].read_bytes()


def test_reuse_does_not_rebuild(built, source, monkeypatch):
    def fail(_source):
        raise AssertionError("rebuilt although the files are up to date")

    monkeypatch.setattr(wordnet, "candidate_examples", fail)
    before = {split: built[split].stat().st_mtime_ns for split in SPLITS}
    assert build_wordnet_dataset(built["train"].parent, source=source) == built
    assert {split: built[split].stat().st_mtime_ns for split in SPLITS} == before


def test_damaged_or_other_source_build_is_rebuilt(built, source, tmp_path, monkeypatch):
    class Rebuilt(Exception):
        pass

    def rebuild(_source):
        raise Rebuilt

    monkeypatch.setattr(wordnet, "candidate_examples", rebuild)
    out = tmp_path / "copy"
    out.mkdir()
    for path in built.values():
        (out / path.name).write_bytes(path.read_bytes())
    build_wordnet_dataset(out, source=source)  # an intact copy is reused

    meta = json.loads((out / "meta.json").read_text())
    meta["source"]["sha256"]["data.noun"] = "0" * 64
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(Rebuilt):  # built from other files
        build_wordnet_dataset(out, source=source)

    (out / "meta.json").write_bytes(built["meta"].read_bytes())
    with open(out / "test.jsonl", "a", encoding="utf-8") as f:
        f.write("{}\n")
    with pytest.raises(Rebuilt):  # a file that does not match its hash
        build_wordnet_dataset(out, source=source)


# ----------------------------------------------------------------------------------------------
# The registry and the command line.
# ----------------------------------------------------------------------------------------------


def test_registry():
    assert set(TASKS) >= {"builtin", "wordnet"}
    assert tasks.default_out_dir("wordnet") == "runs/data/wordnet"
    with pytest.raises(DataError, match="unknown data task 'nope'; valid tasks: builtin, wordnet"):
        build_task("nope")
    with pytest.raises(DataError, match="reads no source directory"):
        build_task("builtin", source="somewhere")


def test_cli_default_is_the_builtin_task(monkeypatch, capsys):
    calls = []

    def fake(out_dir, force=False, source=None):
        calls.append((out_dir, force, source))
        return {"train": Path(out_dir) / "train.jsonl"}

    monkeypatch.setitem(TASKS, "builtin", tasks.Task(build=fake, description="stub"))
    main(["data", "build"])
    main(["data", "build", "--task", "builtin", "--out-dir", "elsewhere", "--force"])
    assert calls == [("runs/data/builtin", False, None), ("elsewhere", True, None)]


def test_cli_help_lists_every_task(capsys):
    with pytest.raises(SystemExit):
        main(["data", "build", "--help"])
    out = capsys.readouterr().out
    for name in TASKS:
        assert name in out


def test_cli_builds_wordnet(source, tmp_path, capsys):
    out = tmp_path / "wordnet"
    main(["data", "build", "--task", "wordnet", "--out-dir", str(out), "--source", str(source)])
    printed = capsys.readouterr().out
    for split in SPLITS:
        assert len(records(out / f"{split}.jsonl")) == wordnet.SPLIT_CAPS[split]
        assert f"{split}: {out / f'{split}.jsonl'}" in printed
    assert json.loads((out / "meta.json").read_text())["task"] == "wordnet"


def _one_line_error(capsys, *argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        main(list(argv))
    assert raised.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("okd: error: ")
    return err


def test_cli_unknown_task_lists_valid_tasks(capsys, tmp_path):
    err = _one_line_error(capsys, "data", "build", "--task", "nope", "--out-dir", str(tmp_path / "x"))
    assert err == "okd: error: unknown data task 'nope'; valid tasks: builtin, wordnet"
    assert not (tmp_path / "x").exists()


def test_cli_missing_source_is_one_line(capsys, tmp_path):
    missing = tmp_path / "missing"
    err = _one_line_error(capsys, "data", "build", "--task", "wordnet", "--source", str(missing),
                          "--out-dir", str(tmp_path / "x"))
    assert str(missing) in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _one_line_error(capsys, "data", "build", "--task", "wordnet", "--source", str(empty),
                          "--out-dir", str(tmp_path / "x"))
    assert f"{empty} lacks index.noun" in err
    assert not (tmp_path / "x").exists()


def test_cli_no_source_anywhere_says_how_to_get_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(wordnet, "default_source_dirs", lambda: [tmp_path / "a", tmp_path / "b"])
    err = _one_line_error(capsys, "data", "build", "--task", "wordnet", "--out-dir", str(tmp_path / "x"))
    assert "make install" in err and "wordnet-base" in err
