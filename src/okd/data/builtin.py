"""A real, offline instruction dataset built from the running Python's standard library.

Task: given the qualified name and signature of a standard-library function, class or method,
write the first sentence of its docstring. For example::

    prompt:   "Describe the Python function `json.dumps(obj, *, skipkeys=False, ...)` in one sentence.\\n"
    response: "Serialize ``obj`` to a JSON formatted ``str``."

Why this source: the standard library (PSF-licensed) is present on every machine, so the dataset
needs no download, no hub access and no licence check, and it is real English written by people.

How it is built (``build_builtin_dataset``):

1. A *subprocess* (``python -I -S this_file.py OUT.json``) imports every public standard-library
   module and its public submodules and writes the raw (name, kind, signature, docstring)
   items to a JSON file. A subprocess, because importing ~300 modules has side effects that
   must not leak into the training process: some modules register signal or atexit handlers,
   touch the terminal (``readline``), replace ``sys.stdout`` or change ``warnings`` and
   ``logging`` state. Running this file as a bare script keeps the walk free of torch and the
   rest of okd (importing torch alone takes seconds); ``-I -S`` and an empty environment keep
   ``PYTHONPATH``, site-packages and environment variables out of it.
2. The parent turns the items into examples (``_make_example``), removes duplicates and splits
   them by a SHA-256 hash of the qualified name (~85% train / 5% validation / 10% test), so an
   item always lands in the same split.
3. ``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` and ``meta.json`` are written atomically.
   ``meta.json`` records the interpreter and the SHA-256 of each file; a later call with the
   same interpreter reuses the files instead of rebuilding.

Determinism: the same interpreter gives byte-identical files. Everything is sorted, nothing
depends on set order or on ``PYTHONHASHSEED`` (the walk runs under ``-I``, with a random hash
seed, so the byte-identity test would notice), and default values that are not plain
literals (objects with ``<...at 0x...>`` reprs, enum members, ``os.environ``, sets) or that
hold a path of this installation (``sys.executable``) are shown as ``...``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import io
import json
import logging
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

if __name__ != "__main__":
    # Normal use, as ``okd.data.builtin``. When the walker subprocess runs this file as a bare
    # script (see ``_walk_in_subprocess``) only the standard library may be imported.
    from okd.io import write_jsonl, write_text

    from .records import DataError

logger = logging.getLogger(__name__)

# Bump when the extraction rules change, so that files built by an older version are rebuilt.
FORMAT_VERSION = 1

SPLIT_NAMES = ("train", "validation", "test")
# Cumulative upper bounds of the hash buckets: [0, 0.85) train, [0.85, 0.90) validation, rest test.
SPLIT_BOUNDS = (0.85, 0.90, 1.0)
# build_builtin_dataset refuses to write a dataset smaller than this (too small to be useful).
MIN_TRAIN = 3000
MIN_TEST = 300

# Top-level modules never imported, and why.
DENY_MODULES = {
    "antigravity": "opens a web browser on import",
    "this": "prints the Zen of Python on import",
    "idlelib": "GUI (IDLE)",
    "tkinter": "GUI",
    "turtle": "GUI (imports tkinter)",
    "turtledemo": "GUI demos",
    "test": "CPython's own regression tests",
    "lib2to3": "deprecated; may write grammar cache files next to itself on import",
    "encodings": "codec tables: ~120 modules whose few docstrings are copies of each other",
    "distutils": "deprecated; setuptools replaces it with its own copy, so the result would "
    "depend on the installed setuptools",
    "ensurepip": "installer, bundles wheels",
    "venv": "tool, not a library",
    "pydoc_data": "data only",
    "readline": "changes terminal settings on import",
    "xxsubtype": "C-API example module",
    "xxlimited": "C-API example module",
    "xxlimited_35": "C-API example module",
}
# Submodule names (the last dotted part) never imported: test suites and ``python -m`` entry points.
DENY_SUBMODULES = {"test", "tests", "idle_test", "__main__"}
# How deep the walk goes below a top-level package: 2 reaches ``xml.etree.ElementTree``.
MAX_SUBMODULE_DEPTH = 2

MAX_SIGNATURE_CHARS = 200
MIN_WORDS = 3
MAX_WORDS = 40

PROMPT_TEMPLATE = "Describe the Python {kind} `{signature}` in one sentence.\n"


# ----------------------------------------------------------------------------------------------
# Part 1: the walk. Runs in the subprocess; uses only the standard library.
# ----------------------------------------------------------------------------------------------


def _public_module_names() -> list[str]:
    """Top-level standard-library modules to import, sorted."""
    return sorted(
        name
        for name in sys.stdlib_module_names
        if not name.startswith("_") and name not in DENY_MODULES
    )


def _import_quietly(name: str):
    """Import a module, or return None if that fails for any reason.

    What the import prints is swallowed, so ``walk_stdlib`` stays quiet even when called
    in-process (the subprocess discards its output anyway).
    """
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return importlib.import_module(name)
    except (Exception, SystemExit):  # ImportError, platform-specific failures...: all mean "skip"
        return None


def _iter_modules(name: str, depth: int = 0) -> Iterator:
    """Yield module ``name`` and its public submodules (``depth`` levels deep), sorted."""
    module = _import_quietly(name)
    if module is None:
        return
    yield module
    if depth >= MAX_SUBMODULE_DEPTH or not hasattr(module, "__path__"):
        return
    children = sorted(info.name for info in pkgutil.iter_modules(module.__path__))
    for child in children:
        if child.startswith("_") or child in DENY_SUBMODULES:
            continue
        yield from _iter_modules(f"{name}.{child}", depth + 1)


def _is_defined_in(obj, module_name: str) -> bool:
    """True if ``obj`` belongs to ``module_name``, not merely imported into it.

    C accelerators count as the module itself: ``heapq.heappush`` reports ``_heapq``.
    """
    owner = getattr(obj, "__module__", None)
    return owner in (module_name, "_" + module_name)


class _Ellipsis:
    """Stands in for a default value that must not be shown; its repr is ``...``."""

    def __repr__(self) -> str:
        return "..."


_ELLIPSIS = _Ellipsis()

# Default values shown as themselves: literals of exactly these types (subclasses such as
# enums and os.environ's mapping have reprs that are ugly, unstable or leak the environment).
_LITERAL_TYPES = (type(None), bool, int, float, complex, str, bytes)


def _is_plain_literal(value, depth: int = 0) -> bool:
    """True for literals and small tuples/lists/dicts of literals (no sets: hash-seed order)."""
    if type(value) in _LITERAL_TYPES:
        return True
    if depth >= 2:
        return False
    if type(value) in (tuple, list):
        return all(_is_plain_literal(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(_is_plain_literal(k, depth + 1) and _is_plain_literal(v, depth + 1)
                   for k, v in value.items())
    return False


@functools.lru_cache(maxsize=None)
def _machine_strings() -> tuple[str, ...]:
    """Paths of this installation that defaults such as ``sys.executable`` would reveal."""
    candidates = [sys.executable, sys.prefix, sys.base_prefix, sys.exec_prefix,
                  os.path.expanduser("~")]
    return tuple(sorted({c for c in candidates if c and len(c) > 1}))


def _safe_default(value):
    """``value`` if its repr is stable, machine-independent text; else a placeholder shown as ``...``.

    Replaced: anything but plain literals (objects, functions, enum members, ``os.environ``,
    sets) and strings holding a path of this installation (``sys.executable``, ``sys.prefix``).
    """
    if not _is_plain_literal(value):
        return _ELLIPSIS
    text = repr(value)
    if any(path in text for path in _machine_strings()):
        return _ELLIPSIS
    return value


def _signature_text(qualname: str, obj) -> str | None:
    """``qualname(params) -> ret`` with unstable defaults replaced, at most MAX_SIGNATURE_CHARS.

    Long signatures lose their last parameters (whole ones, so brackets and quotes stay
    balanced) and end in ``, ...)``. Returns None when ``inspect.signature`` fails.
    """
    try:
        sig = inspect.signature(obj)
    except Exception:  # noqa: BLE001 - ValueError/TypeError for many builtins, anything for odd objects
        return None
    params = [
        p.replace(default=_safe_default(p.default)) if p.default is not p.empty else p
        for p in sig.parameters.values()
    ]
    sig = sig.replace(parameters=params)
    text = qualname + str(sig)
    if len(text) <= MAX_SIGNATURE_CHARS:
        return text if " at 0x" not in text else None
    # Too long: keep as many leading parameters as fit, then "...".
    for keep in range(len(params) - 1, -1, -1):
        short = str(sig.replace(parameters=params[:keep], return_annotation=sig.empty))
        short = short[:-1] + (", ...)" if keep else "...)")
        text = qualname + short
        if len(text) <= MAX_SIGNATURE_CHARS:
            return text if " at 0x" not in text else None
    return None  # even "name(...)" is too long: a pathological name, skip it


def _items_of_module(module) -> Iterator[dict]:
    """Yield the public functions, classes and methods defined in ``module``."""
    mod_name = module.__name__
    for name, obj in sorted(vars(module).items()):
        # Only the canonical name: an alias (``bar = foo``) would duplicate ``foo`` under another name.
        if name.startswith("_") or getattr(obj, "__name__", None) != name:
            continue
        if not _is_defined_in(obj, mod_name):
            continue
        if inspect.isclass(obj):
            yield _raw_item(f"{mod_name}.{name}", "class", obj, obj)
            yield from _methods_of_class(f"{mod_name}.{name}", obj)
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            yield _raw_item(f"{mod_name}.{name}", "function", obj, obj)


def _methods_of_class(class_qualname: str, cls) -> Iterator[dict]:
    """Yield the public methods defined in ``cls`` itself (inherited ones belong to the base)."""
    for name, raw in sorted(vars(cls).items()):
        if name.startswith("_"):
            continue
        if isinstance(raw, (staticmethod, classmethod)):
            func = raw.__func__
        elif inspect.isroutine(raw):  # plain functions and C method descriptors
            func = raw
        else:  # properties, constants, nested classes
            continue
        if getattr(func, "__name__", None) != name:  # alias such as ``keys = iterkeys``
            continue
        try:
            bound = getattr(cls, name)  # drops ``cls`` from a classmethod's signature
        except Exception:  # noqa: BLE001
            continue
        yield _raw_item(f"{class_qualname}.{name}", "method", bound, func)


def _raw_item(qualname: str, kind: str, sig_obj, doc_obj) -> dict:
    """One walk result; signature None means inspect.signature failed (filtered by the parent)."""
    doc = getattr(doc_obj, "__doc__", None)  # not inspect.getdoc: that inherits base docstrings
    return {
        "name": qualname,
        "kind": kind,
        "signature": _signature_text(qualname, sig_obj),
        "doc": doc if isinstance(doc, str) else None,
    }


def walk_stdlib() -> list[dict]:
    """Import the public standard library and return raw items, sorted by qualified name.

    Meant to run in a throwaway process (see ``_walk_in_subprocess``): it imports hundreds of
    modules and leaves them imported.
    """
    items: dict[str, dict] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DeprecationWarnings of old modules (cgi, imp, ...)
        for top in _public_module_names():
            for module in _iter_modules(top):
                try:
                    found = list(_items_of_module(module))
                except Exception:  # noqa: BLE001 - an odd module must not stop the walk
                    continue
                for item in found:
                    items.setdefault(item["name"], item)
    return [items[name] for name in sorted(items)]


# ----------------------------------------------------------------------------------------------
# Part 2: from raw items to examples. Runs in the parent process.
# ----------------------------------------------------------------------------------------------

# A line that is a signature rather than prose, as many C docstrings start:
# "int(x, base=10) -> integer", "D.get(k[,d]) -> D[k] if k in D, else d.", "sort(self, /, *, key=None)".
_SIGNATURE_LINE = re.compile(r"^[A-Za-z_][\w.]*\(.*\)\s*(->.*)?$")
# A usage prefix before the prose: "S.append(value) -- append value to the end of the sequence".
_SIGNATURE_DASH_PREFIX = re.compile(r"^[A-Za-z_][\w.]*\(.*?\)\s*--\s*")
# A sentence end: ".", "!" or "?" followed by whitespace. "e.g." / "i.e." are handled below.
_SENTENCE_END = re.compile(r"[.!?](?=\s)")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.")


def first_sentence(doc: str) -> str | None:
    """The first sentence of a docstring, on one line; None if there is no usable one.

    Steps: ``inspect.cleandoc``; drop leading lines that look like a signature; take the first
    paragraph (up to the first blank line) joined into one line; cut after the first sentence
    end ("." followed by a space, skipping e.g./i.e.), or keep the whole paragraph when it has
    none. A "name(args) -- " usage prefix is removed. Rejected: fewer than MIN_WORDS or more
    than MAX_WORDS words, a paragraph that ends in ":" (it introduces a list that is not part
    of the sentence), and usage lines whose first word holds "(", "[", "<" or "=".
    """
    lines = inspect.cleandoc(doc).splitlines()
    while lines and (not lines[0].strip() or _SIGNATURE_LINE.match(lines[0].strip())):
        lines.pop(0)
    paragraph: list[str] = []
    for line in lines:
        if not line.strip():
            break
        paragraph.append(line.strip())
    text = " ".join(" ".join(paragraph).split())
    text = _SIGNATURE_DASH_PREFIX.sub("", text)
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
        if text[:end].lower().endswith(_ABBREVIATIONS):
            continue
        text = text[:end]
        break
    if not text or text.endswith(":"):
        return None
    # Usage lines rather than prose, e.g. pdb's "b(reak) [ ([filename:]lineno | function) ]"
    # or "(typ, [data]) = <instance>.getannotation(...)": the first word is not a word.
    if any(ch in text.split()[0] for ch in "([<="):
        return None
    if not MIN_WORDS <= len(text.split()) <= MAX_WORDS:
        return None
    return text


@dataclass
class BuiltinExample:
    """One record of the built-in dataset, as written to the JSONL files."""

    prompt: str
    response: str
    name: str


def _make_example(item: dict) -> BuiltinExample | None:
    """Turn one raw walk item into an example, or None if it has no usable signature or docstring."""
    if not item["signature"] or not item["doc"]:
        return None
    response = first_sentence(item["doc"])
    if response is None:
        return None
    # A "sentence" that only repeats the signature teaches nothing.
    if response.rstrip(".") in (item["signature"], item["name"]):
        return None
    prompt = PROMPT_TEMPLATE.format(kind=item["kind"], signature=item["signature"])
    return BuiltinExample(prompt=prompt, response=response, name=item["name"])


def split_of(name: str) -> str:
    """The split of a qualified name, from a SHA-256 hash (stable across runs and machines)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    for split, bound in zip(SPLIT_NAMES, SPLIT_BOUNDS):
        if position < bound:
            return split
    return SPLIT_NAMES[-1]


def examples_from_items(items: list[dict]) -> dict[str, list[BuiltinExample]]:
    """Filter, deduplicate and split raw items; each split sorted by name."""
    splits: dict[str, list[BuiltinExample]] = {name: [] for name in SPLIT_NAMES}
    seen_prompts: set[str] = set()
    seen_names: set[str] = set()
    for item in sorted(items, key=lambda it: it["name"]):
        example = _make_example(item)
        if example is None or example.prompt in seen_prompts or example.name in seen_names:
            continue
        seen_prompts.add(example.prompt)
        seen_names.add(example.name)
        splits[split_of(example.name)].append(example)
    return splits


# ----------------------------------------------------------------------------------------------
# Part 3: building, caching and reading the files.
# ----------------------------------------------------------------------------------------------


def _walk_in_subprocess() -> list[dict]:
    """Run ``walk_stdlib`` in a fresh ``python -I`` process and return its items.

    The result travels through a temporary file rather than stdout, so that anything a module
    prints while being imported cannot corrupt it.
    """
    with tempfile.TemporaryDirectory(prefix="okd-stdlib-") as tmp:
        out_path = Path(tmp) / "items.json"
        # -I: ignore PYTHON* variables, user site-packages and this file's folder;
        # -S: no site-packages or .pth files either: the walk sees the standard library only,
        #     and a venv gives the same result as its base interpreter;
        # -X utf8: encoding defaults do not depend on the locale.
        cmd = [sys.executable, "-I", "-S", "-X", "utf8", str(Path(__file__).resolve()), str(out_path)]
        # An almost empty environment, so that nothing computed at import time depends on it
        # (SYSTEMROOT: Windows cannot start Python without it).
        env = {key: os.environ[key] for key in ("SYSTEMROOT",) if key in os.environ}
        try:
            result = subprocess.run(
                cmd,
                cwd=tmp,  # no module can see or write the caller's working directory
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=600,  # it takes ~1 s; a hang means something is badly wrong
            )
        except subprocess.TimeoutExpired:
            raise DataError("standard-library walk did not finish within 600 s") from None
        if result.returncode != 0 or not out_path.exists():
            tail = result.stderr.decode("utf-8", "replace")[-2000:]
            raise DataError(f"standard-library walk failed (exit code {result.returncode}):\n{tail}")
        return json.loads(out_path.read_text(encoding="utf-8"))


def _interpreter_id() -> dict:
    """What the dataset depends on: the interpreter's version, implementation and platform."""
    return {
        "python": sys.version,
        "implementation": sys.implementation.name,
        "platform": sys.platform,
    }


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _paths(out_dir: Path) -> dict[str, Path]:
    return {split: out_dir / f"{split}.jsonl" for split in SPLIT_NAMES}


def _reusable(out_dir: Path) -> bool:
    """True if ``out_dir`` holds a complete build for this interpreter with intact files."""
    meta_path = out_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if meta.get("format_version") != FORMAT_VERSION or meta.get("interpreter") != _interpreter_id():
        return False
    for split, path in _paths(out_dir).items():
        if not path.exists() or meta.get("sha256", {}).get(split) != _sha256_file(path):
            return False
    return True


def build_builtin_dataset(out_dir: str | os.PathLike, force: bool = False) -> dict[str, Path]:
    """Build (or reuse) the standard-library docstring dataset in ``out_dir``.

    Returns ``{"train": Path, "validation": Path, "test": Path, "meta": Path}``. The JSONL
    records are ``{"prompt", "response", "name"}`` and load with ``okd.data.read_jsonl``.
    An existing build is reused when ``meta.json`` matches this interpreter and the files'
    hashes, unless ``force``. Raises ``DataError`` if the walk fails or yields fewer than
    MIN_TRAIN train / MIN_TEST test examples.
    """
    out_dir = Path(out_dir)
    paths = _paths(out_dir)
    meta_path = out_dir / "meta.json"
    if not force and _reusable(out_dir):
        logger.info("Reusing the built-in dataset in %s", out_dir)
        return {**paths, "meta": meta_path}

    logger.info("Building the built-in dataset from the standard library into %s ...", out_dir)
    start = time.perf_counter()
    items = _walk_in_subprocess()
    walk_seconds = time.perf_counter() - start
    splits = examples_from_items(items)
    counts = {split: len(examples) for split, examples in splits.items()}
    if counts["train"] < MIN_TRAIN or counts["test"] < MIN_TEST:
        raise DataError(
            f"the standard library of this Python ({sys.version.split()[0]}) gave only "
            f"{counts} examples; need at least {MIN_TRAIN} train and {MIN_TEST} test"
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    # meta.json is written last: it marks the build complete (see _reusable).
    with contextlib.suppress(FileNotFoundError):
        meta_path.unlink()
    for split, examples in splits.items():
        write_jsonl(paths[split], examples)
    meta = {
        "format_version": FORMAT_VERSION,
        "interpreter": _interpreter_id(),
        "counts": counts,
        "walked_items": len(items),
        "sha256": {split: _sha256_file(path) for split, path in paths.items()},
    }
    write_text(meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    logger.info(
        "Built-in dataset: %s examples from %d walked items in %.1f s (walk %.1f s)",
        counts, len(items), time.perf_counter() - start, walk_seconds,
    )
    return {**paths, "meta": meta_path}


def builtin_texts(out_dir: str | os.PathLike) -> Iterator[str]:
    """An iterator over ``prompt + response`` of every train example.

    Builds the dataset first if ``out_dir`` has no usable build (right away, not when the
    iteration starts). Meant for training a tokenizer on the text the model will see.
    """
    train_path = build_builtin_dataset(out_dir)["train"]

    def texts() -> Iterator[str]:
        with open(train_path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    yield record["prompt"] + record["response"]

    return texts()


if __name__ == "__main__":
    # The walker subprocess: ``python -I -S -X utf8 builtin.py OUT.json``.
    items = walk_stdlib()
    with open(sys.argv[1], "w", encoding="utf-8") as out:
        json.dump(items, out, ensure_ascii=False)
