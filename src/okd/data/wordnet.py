"""A second real, offline instruction dataset: WordNet 3.0 definitions.

Task: given an English word and its part of speech, write its dictionary definition. For example::

    prompt:   'Define "abaxial" (adjective).\\n'
    response: "facing away from the axis of an organ or organism"

Source: the WordNet 3.0 database files as Debian's ``wordnet-base`` package (version 1:3.0-37)
ships them: ``index.noun``/``verb``/``adj``/``adv`` (the senses of each word, most frequent
first) and ``data.noun``/``verb``/``adj``/``adv`` (the synsets, each with its gloss). The format
of both is documented in WordNet's ``wndb(5WN)`` manual page. ``make install`` downloads the
package without root (``apt-get download``, SHA-256 checked) and unpacks it under
``.cache/debian/``; ``find_source`` looks there, in ``/usr/share/wordnet`` (where
``apt-get install wordnet-base`` puts the files) or in a directory passed explicitly.

Licence: the WordNet 3.0 licence (Princeton University; use, copy, modify and distribute for any
purpose without fee, provided the copyright notice and disclaimer appear on all copies). Its
full text, taken from the header of ``data.noun``, is written into ``meta.json`` of every build.

Which examples (``examples_from_source``):

1. One example per (lemma, part of speech): the lemma's *first* sense in ``index.<pos>``,
   WordNet's most frequent sense. Adjective satellites count as adjectives.
2. Lemmas that are single lowercase words are kept: ASCII letters, inner hyphens allowed
   (``self-aware``); multi-word lemmas (``living_thing``), names (``Paris``) and lemmas with
   digits or other characters are skipped. The lemma must also appear, lowercase, among the
   words of that synset (else the first sense belongs to a capitalised name, ``Bank``).
3. Only lemmas with at least one sense tagged in WordNet's semantic concordance
   (``tagsense_cnt`` > 0 in the index): words that occur in ordinary text, not only in the
   dictionary (this drops most species names and rare technical terms).
4. The response is the definition part of the gloss: the text before the first quoted
   example sentence (``; "..."``). The examples stay out: they are quotations of varying
   length that cannot be predicted from the word, and they would make the responses several
   times longer than the built-in task's. Skipped: definitions of fewer than MIN_WORDS or
   more than MAX_WORDS words, and circular ones that use the lemma itself as a word
   (``air`` (verb): "expose to fresh air").
5. Split by lemma (a word never appears in two splits, so every test word is unseen in
   training): a SHA-256 hash of ``SPLIT_SEED:lemma`` places the lemma in a bucket
   (80% train / 10% validation / 10% test), and within each split the lemmas are taken in
   hash order, all their parts of speech together, up to the split's cap (``SPLIT_CAPS``).

Determinism: the same source files give byte-identical JSONL and ``meta.json`` files (no paths,
times or set order in them). ``meta.json`` records the SHA-256 of the source files it read; a
later call reuses an intact build made from the same files instead of rebuilding.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from okd.io import write_jsonl, write_text

from .records import DataError

logger = logging.getLogger(__name__)

# Bump when the selection or formatting rules change, so that older builds are rebuilt.
FORMAT_VERSION = 1

SPLIT_NAMES = ("train", "validation", "test")
# Cumulative upper bounds of the lemma hash buckets: [0, 0.8) train, [0.8, 0.9) validation, rest test.
SPLIT_BOUNDS = (0.8, 0.9, 1.0)
SPLIT_SEED = "okd-wordnet-1"
# At most this many examples per split: small enough to train on a CPU.
SPLIT_CAPS = {"train": 4000, "validation": 400, "test": 500}
# build_wordnet_dataset refuses to write a dataset smaller than this.
MIN_TRAIN = 2000
MIN_TEST = 400

MIN_WORDS = 2
MAX_WORDS = 25

# WordNet's part-of-speech letters: file suffix and the name shown in the prompt.
POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "r": "adverb"}
# ss_type in data.* lines: "s" is an adjective satellite.
SYNSET_TYPES = {"n", "v", "a", "s", "r"}
SOURCE_FILES = tuple(f"{kind}.{POS_FILES[pos]}" for pos in POS_FILES for kind in ("index", "data"))

PROMPT_TEMPLATE = 'Define "{word}" ({pos}).\n'

# The Debian package the files come from (``make install`` downloads and checks it).
DEBIAN_PACKAGE = "wordnet-base"
DEBIAN_VERSION = "1:3.0-37"
DEBIAN_DEB_SHA256 = "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752"
DEBIAN_POOL_URL = "https://deb.debian.org/debian/pool/main/w/wordnet/wordnet-base_3.0-37_all.deb"
# SHA-256 of the files of that package that a build reads: a source that differs is still used,
# with a warning, and meta.json says so.
PINNED_SOURCE_SHA256 = {
    "index.noun": "a490d99d93d017bf4822fe2f0ffa51fd73911ce271dc7535fade21f8814b5a04",
    "data.noun": "fea17d2f9656611334eac790e5d69e47645fa180c4aa481fb4cd9b3520754ca2",
    "index.verb": "e2ac24816c3a8289dcb72aaa9cf8db81fdf25ec34d792bfc96ac5b7a20c8b4ae",
    "data.verb": "adcf43e35b581e8036d8b5a52d63d9cd3d3b4870b2720d3c03c799df44777bc2",
    "index.adj": "c9865d7b4d1f805bdef82ccdcea5282436e23083e6f6f1b33e716327c4eda810",
    "data.adj": "c89120dfc1f046ddff4a631bf9b7e9fa1a36b5e86565a23bf82dbe14f30b88a7",
    "index.adv": "6f5465ed5758fe9c8a2f7ec17b1300f3aa875756c70ff7cba162f7e71bcf88ea",
    "data.adv": "444a63bf3955080ab7524f5079cfc07ff9bc682cb98bdb1db73b0fb9829f1139",
}
LICENSE_NAME = "WordNet 3.0 license (Princeton University)"
LICENSE_URL = "https://wordnet.princeton.edu/"

# Where the files are looked for when no directory is given: Debian's install location, then
# the project cache that ``make install`` fills (relative to the working directory, then to the
# source checkout this module belongs to).
SYSTEM_SOURCE = Path("/usr/share/wordnet")
CACHE_SOURCE = Path(".cache/debian/wordnet-base/usr/share/wordnet")
_CHECKOUT_ROOT = Path(__file__).resolve().parents[3]

# A lemma that is one lowercase word, inner hyphens allowed.
_LEMMA = re.compile(r"^[a-z]+(?:-[a-z]+)*$")
# The syntactic marker of some adjectives in data.adj: "galore(ip)", "outback(a)".
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")
# Where the quoted examples of a gloss start: '; "', or a quote at the very start.
_EXAMPLES_START = re.compile(r'(?:^|;)\s*"')


@dataclass(frozen=True)
class Synset:
    """One parsed ``data.*`` line: what the dataset needs of it."""

    offset: str
    ss_type: str
    words: tuple[str, ...]
    gloss: str


@dataclass(frozen=True)
class IndexEntry:
    """One parsed ``index.*`` line."""

    lemma: str
    pos: str
    tagsense_cnt: int
    offsets: tuple[str, ...]


@dataclass
class WordnetExample:
    """One example of the WordNet dataset, as written to the JSONL files. ``name`` is
    ``lemma.pos`` with WordNet's part-of-speech letter (n, v, a, r), e.g. ``bank.n``."""

    prompt: str
    response: str
    name: str


# ----------------------------------------------------------------------------------------------
# Parsing the WordNet files.
# ----------------------------------------------------------------------------------------------


def _is_license_line(line: str) -> bool:
    # The files start with the licence, each line indented by two spaces.
    return line.startswith("  ")


def parse_data_line(line: str, where: str = "data line") -> Synset:
    """Parse one line of a ``data.*`` file (see ``wndb(5WN)``).

    Layout: ``offset lex_filenum ss_type w_cnt (word lex_id){w_cnt} p_cnt (symbol offset pos
    source/target){p_cnt} [f_cnt (+ f_num w_num){f_cnt}] | gloss`` with ``w_cnt`` in hex and the
    frame list only in verb lines. Raises ``DataError`` naming ``where`` if the line does not
    fit that layout.
    """
    head, bar, gloss = line.partition("|")
    fields = head.split()

    def bad(reason: str) -> DataError:
        return DataError(f"{where}: {reason}: {line[:80].rstrip()!r}")

    if not bar:
        raise bad("no '|' before the gloss")
    if len(fields) < 6 or not fields[0].isdigit() or len(fields[0]) != 8:
        raise bad("does not start with an 8-digit synset offset")
    ss_type = fields[2]
    if ss_type not in SYNSET_TYPES:
        raise bad(f"unknown synset type {ss_type!r}")
    try:
        w_cnt = int(fields[3], 16)
        words = fields[4 : 4 + 2 * w_cnt : 2]
        at = 4 + 2 * w_cnt
        p_cnt = int(fields[at])
        at += 1 + 4 * p_cnt
        if ss_type == "v":
            f_cnt = int(fields[at])
            at += 1 + 3 * f_cnt
    except (ValueError, IndexError):
        raise bad("word, pointer or frame counts do not match the fields") from None
    if w_cnt == 0 or len(words) != w_cnt or at != len(fields):
        raise bad("word, pointer or frame counts do not match the fields")
    words = tuple(_ADJ_MARKER.sub("", word) for word in words)
    return Synset(offset=fields[0], ss_type=ss_type, words=words, gloss=" ".join(gloss.split()))


def parse_index_line(line: str, where: str = "index line") -> IndexEntry:
    """Parse one line of an ``index.*`` file: ``lemma pos synset_cnt p_cnt (symbol){p_cnt}
    sense_cnt tagsense_cnt (offset){synset_cnt}``; the offsets come most frequent sense first."""
    fields = line.split()
    try:
        synset_cnt = int(fields[2])
        p_cnt = int(fields[3])
        tagsense_cnt = int(fields[5 + p_cnt])
        offsets = tuple(fields[6 + p_cnt :])
    except (ValueError, IndexError):
        raise DataError(f"{where}: not an index line: {line[:80].rstrip()!r}") from None
    if synset_cnt < 1 or len(offsets) != synset_cnt or fields[1] not in POS_FILES:
        raise DataError(f"{where}: not an index line: {line[:80].rstrip()!r}")
    return IndexEntry(lemma=fields[0], pos=fields[1], tagsense_cnt=tagsense_cnt, offsets=offsets)


def definition_of(gloss: str) -> str:
    """The definition part of a gloss: the text before the first quoted example, trimmed of
    the separating ``;`` and whitespace. ``'a dog; "the dog barked"'`` gives ``'a dog'``."""
    match = _EXAMPLES_START.search(gloss)
    text = gloss[: match.start()] if match else gloss
    return " ".join(text.split()).rstrip(" ;")


def _lines(path: Path):
    """(line number, line) of a WordNet file, without the licence header."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip() and not _is_license_line(line):
                yield number, line


def read_data_file(path: Path) -> dict[str, Synset]:
    """All synsets of one ``data.*`` file, by offset."""
    return {
        synset.offset: synset
        for synset in (parse_data_line(line, f"{path.name} line {n}") for n, line in _lines(path))
    }


def read_index_file(path: Path) -> list[IndexEntry]:
    """All entries of one ``index.*`` file, in file order (sorted by lemma)."""
    return [parse_index_line(line, f"{path.name} line {n}") for n, line in _lines(path)]


def license_text(path: Path) -> str:
    """The licence header of a WordNet file, one line per licence line, numbers removed."""
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not _is_license_line(line):
                break
            # "  14 WordNet 3.0 Copyright ..." -> "WordNet 3.0 Copyright ..."
            lines.append(re.sub(r"^\s*\d+\s?", "", line.rstrip()))
    return "\n".join(lines).strip() + "\n"


# ----------------------------------------------------------------------------------------------
# Finding the source.
# ----------------------------------------------------------------------------------------------


def _missing_files(directory: Path) -> list[str]:
    return [name for name in SOURCE_FILES if not (directory / name).is_file()]


def default_source_dirs() -> list[Path]:
    """The directories ``find_source`` tries when none is given, in order."""
    dirs = [SYSTEM_SOURCE, CACHE_SOURCE, _CHECKOUT_ROOT / CACHE_SOURCE]
    unique: list[Path] = []
    for d in dirs:
        if all(d.resolve() != u.resolve() for u in unique):
            unique.append(d)
    return unique


def find_source(source: str | os.PathLike | None = None) -> Path:
    """The directory holding the WordNet ``index.*`` and ``data.*`` files.

    ``source`` if given (it must hold all of them), else the first of ``default_source_dirs()``
    that does. Raises ``DataError`` (one line, saying how to get the files) if none does.
    """
    if source is not None:
        directory = Path(source)
        if not directory.is_dir():
            raise DataError(f"WordNet source {directory} is not a directory")
        missing = _missing_files(directory)
        if missing:
            raise DataError(
                f"WordNet source {directory} lacks {', '.join(missing)}; "
                f"pass the directory of WordNet 3.0's dict files (Debian: /usr/share/wordnet)"
            )
        return directory
    tried = default_source_dirs()
    for directory in tried:
        if not _missing_files(directory):
            return directory
    raise DataError(
        f"WordNet 3.0 files not found in {', '.join(str(d) for d in tried)}; run `make install` "
        f"(it downloads Debian's {DEBIAN_PACKAGE} {DEBIAN_VERSION} into .cache/debian/), "
        f"`apt-get install {DEBIAN_PACKAGE}`, or pass --source DIR"
    )


# ----------------------------------------------------------------------------------------------
# From the files to examples.
# ----------------------------------------------------------------------------------------------


def _make_example(entry: IndexEntry, synsets: dict[str, Synset]) -> WordnetExample | None:
    """The example of an index entry's first sense, or None if the rules above skip it."""
    if not _LEMMA.match(entry.lemma) or entry.tagsense_cnt < 1:
        return None
    synset = synsets.get(entry.offsets[0])
    if synset is None:
        raise DataError(
            f"index.{POS_FILES[entry.pos]}: {entry.lemma!r} points at synset {entry.offsets[0]}, "
            f"which data.{POS_FILES[entry.pos]} lacks"
        )
    if entry.lemma not in synset.words:  # the first sense is a name ("Bank") or a phrase
        return None
    response = definition_of(synset.gloss)
    n_words = len(response.split())
    if not MIN_WORDS <= n_words <= MAX_WORDS or '"' in response:
        return None
    if re.search(rf"(?<![\w-]){re.escape(entry.lemma)}(?![\w-])", response):  # circular
        return None
    prompt = PROMPT_TEMPLATE.format(word=entry.lemma, pos=POS_NAMES[entry.pos])
    return WordnetExample(prompt=prompt, response=response, name=f"{entry.lemma}.{entry.pos}")


def lemma_of(name: str) -> str:
    """The lemma of an example name: ``bank.n`` -> ``bank``."""
    return name.rsplit(".", 1)[0]


def _position(lemma: str) -> float:
    digest = hashlib.sha256(f"{SPLIT_SEED}:{lemma}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)


def split_of(lemma: str) -> str:
    """The split of a lemma, from a seeded SHA-256 hash (stable across runs and machines)."""
    position = _position(lemma)
    for split, bound in zip(SPLIT_NAMES, SPLIT_BOUNDS):
        if position < bound:
            return split
    return SPLIT_NAMES[-1]


def candidate_examples(source: Path) -> list[WordnetExample]:
    """Every example the selection rules allow, before the split caps, sorted by name."""
    examples = []
    for pos, suffix in POS_FILES.items():
        synsets = read_data_file(source / f"data.{suffix}")
        for entry in read_index_file(source / f"index.{suffix}"):
            if entry.pos != pos:
                raise DataError(f"index.{suffix}: {entry.lemma!r} has part of speech {entry.pos!r}")
            example = _make_example(entry, synsets)
            if example is not None:
                examples.append(example)
    return sorted(examples, key=lambda e: e.name)


def split_examples(
    examples: list[WordnetExample], caps: dict[str, int] | None = None
) -> dict[str, list[WordnetExample]]:
    """Split ``examples`` by lemma and cap each split; each split sorted by name.

    The lemmas of a split are taken in hash order; a lemma's examples (its parts of speech) are
    all taken or none, and a lemma that would overflow the cap is passed over for a smaller one.
    """
    caps = SPLIT_CAPS if caps is None else caps
    by_lemma: dict[str, list[WordnetExample]] = {}
    for example in sorted(examples, key=lambda e: e.name):
        by_lemma.setdefault(lemma_of(example.name), []).append(example)
    splits: dict[str, list[WordnetExample]] = {name: [] for name in SPLIT_NAMES}
    for lemma in sorted(by_lemma, key=lambda lemma: (_position(lemma), lemma)):
        split = split_of(lemma)
        if len(splits[split]) + len(by_lemma[lemma]) <= caps[split]:
            splits[split].extend(by_lemma[lemma])
    return {split: sorted(found, key=lambda e: e.name) for split, found in splits.items()}


# ----------------------------------------------------------------------------------------------
# Building, caching and reading the files.
# ----------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _paths(out_dir: Path) -> dict[str, Path]:
    return {split: out_dir / f"{split}.jsonl" for split in SPLIT_NAMES}


def _source_id(source: Path) -> dict[str, str]:
    """SHA-256 of each source file a build reads: what the dataset depends on."""
    return {name: _sha256_file(source / name) for name in SOURCE_FILES}


def _reusable(out_dir: Path, source_id: dict[str, str]) -> bool:
    """True if ``out_dir`` holds a complete build from these source files with intact files."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if meta.get("format_version") != FORMAT_VERSION or meta.get("source", {}).get("sha256") != source_id:
        return False
    for split, path in _paths(out_dir).items():
        if not path.exists() or meta.get("sha256", {}).get(split) != _sha256_file(path):
            return False
    return True


def build_wordnet_dataset(
    out_dir: str | os.PathLike, force: bool = False, source: str | os.PathLike | None = None
) -> dict[str, Path]:
    """Build (or reuse) the WordNet definition dataset in ``out_dir``.

    ``source`` is the directory of the WordNet files (see ``find_source`` for the default).
    Returns ``{"train": Path, "validation": Path, "test": Path, "meta": Path}``; the JSONL
    records are ``{"prompt", "response", "name"}`` and load with ``okd.data.read_jsonl``. An
    existing build is reused when ``meta.json`` matches the source files' and the outputs'
    hashes, unless ``force``. Raises ``DataError`` if the source is missing or malformed, or
    gives fewer than MIN_TRAIN train / MIN_TEST test examples.
    """
    out_dir = Path(out_dir)
    paths = _paths(out_dir)
    meta_path = out_dir / "meta.json"
    source_dir = find_source(source)
    source_id = _source_id(source_dir)
    if not force and _reusable(out_dir, source_id):
        logger.info("Reusing the WordNet dataset in %s", out_dir)
        return {**paths, "meta": meta_path}

    logger.info("Building the WordNet dataset from %s into %s ...", source_dir, out_dir)
    start = time.perf_counter()
    matches = source_id == {name: PINNED_SOURCE_SHA256[name] for name in SOURCE_FILES}
    if not matches:
        logger.warning(
            "The WordNet files in %s differ from those of Debian's %s %s; building from them anyway",
            source_dir, DEBIAN_PACKAGE, DEBIAN_VERSION,
        )
    candidates = candidate_examples(source_dir)
    splits = split_examples(candidates)
    counts = {split: len(examples) for split, examples in splits.items()}
    if counts["train"] < MIN_TRAIN or counts["test"] < MIN_TEST:
        raise DataError(
            f"the WordNet files in {source_dir} gave only {counts} examples; "
            f"need at least {MIN_TRAIN} train and {MIN_TEST} test"
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    # meta.json is written last: it marks the build complete (see _reusable).
    with contextlib.suppress(FileNotFoundError):
        meta_path.unlink()
    for split, examples in splits.items():
        write_jsonl(paths[split], examples)
    meta = {
        "format_version": FORMAT_VERSION,
        "task": "wordnet",
        "counts": counts,
        "candidates": len(candidates),
        "selection": {
            "sense": "first sense of each lemma and part of speech in index.*",
            "lemmas": "single lowercase words (a-z, inner hyphens), with a sense tagged in the concordance",
            "response": "definition part of the gloss, without the quoted examples, not circular",
            "min_words": MIN_WORDS,
            "max_words": MAX_WORDS,
        },
        "split": {"by": "lemma", "seed": SPLIT_SEED, "bounds": list(SPLIT_BOUNDS), "caps": SPLIT_CAPS},
        "sha256": {split: _sha256_file(path) for split, path in paths.items()},
        "source": {
            "name": "WordNet 3.0",
            "debian_package": DEBIAN_PACKAGE,
            "debian_version": DEBIAN_VERSION,
            "debian_deb_sha256": DEBIAN_DEB_SHA256,
            "debian_url": DEBIAN_POOL_URL,
            "matches_debian_package": matches,
            "sha256": source_id,
        },
        "license": {
            "name": LICENSE_NAME,
            "url": LICENSE_URL,
            "text": license_text(source_dir / "data.noun"),
        },
    }
    write_text(meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    logger.info(
        "WordNet dataset: %s examples from %d candidates in %.1f s",
        counts, len(candidates), time.perf_counter() - start,
    )
    return {**paths, "meta": meta_path}
