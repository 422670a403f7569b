"""Reading training data from any source: JSONL, JSON, Parquet, Arrow, ``save_to_disk`` folders, the hub.

``read_examples(source, tokenizer, fields=...)`` is the one entry point. ``source`` is what
``data.train_file`` / ``data.validation_file`` hold:

==================================  ===============================================================
``data.jsonl``                      JSON lines: ``read_jsonl``, unchanged (errors name file and line)
``data.json``                       a JSON list of records, or JSON lines
``data.parquet``                    a Parquet file
``data.arrow``                      an Arrow file as ``datasets`` writes it (``Dataset.from_file``);
                                    an Arrow IPC file (Feather v2) works too
``folder`` / ``folder@split``       a folder written by ``Dataset.save_to_disk`` or
                                    ``DatasetDict.save_to_disk``; a DatasetDict needs ``@split``
``hub:NAME[:CONFIG][@SPLIT]``       a Hugging Face hub data set, e.g.
                                    ``hub:databricks/databricks-dolly-15k@train`` or
                                    ``hub:openai/gsm8k:main@test``; ``SPLIT`` may use ``datasets``'
                                    slicing, ``@train[:90%]`` / ``@train[90%:]``, to hold out a
                                    validation set. A data set with several splits needs ``@SPLIT``.
==================================  ===============================================================

The hub name is parsed from the right: the split is what follows the last ``@``, the config what
follows the first ``:`` after the name (so a split slice such as ``train[:100]`` is safe). With
``HF_DATASETS_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) a hub data set comes from the local
``datasets`` cache (``HF_DATASETS_CACHE``, filled by an earlier online ``load_dataset``); one that is
not there is a one-line ``DataError`` saying so, as is an unreachable hub.

Every record goes through ``format_record``, exactly as a JSONL line does: same layouts
(prompt/response, instruction/input/output, messages), same chat template handling, same
``Example``. Rows are named ``SOURCE, row I`` in errors, ``I`` counted from 0 as in ``dataset[I]``.

``fields`` maps okd's field names to the data set's columns, like ``Dataset.rename_columns``
(``{"prompt": "question", "response": "answer"}`` reads columns ``question`` and ``answer`` as
prompt and response; unmapped columns keep their names), or names a preset of ``FIELD_PRESETS``:

* ``"dolly"``: Dolly as published (``databricks/databricks-dolly-15k``: instruction / context /
  response) read as instruction / input / output, i.e. with the ``PROMPT_TEMPLATE``;
* ``"prompt_output"``: DistiLLM's / MiniLLM's processed layout (prompt / output), the prompt as-is.

DistiLLM's instruction / input / output layout needs no mapping.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from okd.data.records import DataError, Example, format_record, json_lines, read_bytes, read_json_lines

HUB_PREFIX = "hub:"

# okd's field names, as format_record reads them.
OKD_FIELDS = ("prompt", "response", "instruction", "input", "output", "messages")

FIELD_PRESETS: dict[str, dict[str, str]] = {
    "dolly": {"instruction": "instruction", "input": "context", "output": "response"},
    "prompt_output": {"prompt": "prompt", "response": "output"},
}

_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_LOADER_SUFFIXES = (".json", ".parquet", ".arrow")
# owner/name or a canonical name; hub names are letters, digits, '-', '_' and '.'.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_HUB_SYNTAX = "hub:NAME[:CONFIG][@SPLIT], e.g. hub:databricks/databricks-dolly-15k@train"


@dataclass(frozen=True)
class HubName:
    """A parsed ``hub:NAME[:CONFIG][@SPLIT]``."""

    name: str
    config: str | None = None
    split: str | None = None


def parse_hub_name(source: str) -> HubName:
    """Parse ``hub:NAME[:CONFIG][@SPLIT]``; ``DataError`` naming the source if it is malformed."""
    if not source.startswith(HUB_PREFIX):
        raise DataError(f"{source}: not a hub name (expected {_HUB_SYNTAX})")
    rest = source[len(HUB_PREFIX):]
    rest, at, split = rest.rpartition("@") if "@" in rest else (rest, "", None)
    name, colon, config = rest.partition(":")
    if not _HUB_NAME.fullmatch(name) or (colon and not config) or (at and not split):
        raise DataError(f"{source}: malformed hub name (expected {_HUB_SYNTAX})")
    return HubName(name, config or None, split)


def is_loader_source(source: str | os.PathLike) -> bool:
    """Whether ``source`` needs this module rather than ``read_jsonl`` (used by ``read_jsonl``).

    True for hub names, folders (``save_to_disk``, with or without ``@split``) and .json /
    .parquet / .arrow files; everything else stays with ``read_jsonl`` as before.
    """
    text = os.fspath(source)
    if text.startswith(HUB_PREFIX):
        return True
    path = Path(text)
    if path.is_dir() or (not path.exists() and "@" in text and Path(text.rpartition("@")[0]).is_dir()):
        return True
    return path.suffix.lower() in _LOADER_SUFFIXES


def resolve_fields(fields: str | Mapping[str, str] | None) -> dict[str, str] | None:
    """``fields`` (a mapping or a preset name) as a checked ``{okd field: column}`` dict, or None."""
    if fields is None:
        return None
    if isinstance(fields, str):
        if fields not in FIELD_PRESETS:
            raise DataError(f"data.fields: unknown preset {fields!r}; presets: {sorted(FIELD_PRESETS)}")
        return dict(FIELD_PRESETS[fields])
    if not isinstance(fields, Mapping):
        raise DataError(f"data.fields must be a mapping or a preset name, got {type(fields).__name__}")
    for key, column in fields.items():
        if key not in OKD_FIELDS:
            raise DataError(f"data.fields: unknown field {key!r}; okd's fields are {list(OKD_FIELDS)}")
        if not isinstance(column, str) or not column:
            raise DataError(f"data.fields[{key!r}] must be a column name, got {column!r}")
    return dict(fields)


def read_examples(
    source: str | os.PathLike,
    tokenizer=None,
    *,
    fields: str | Mapping[str, str] | None = None,
) -> list[Example]:
    """Read ``source`` (see the module docstring for the accepted kinds) into ``Example``s.

    ``fields``: column mapping or preset (see ``resolve_fields``). ``tokenizer`` is only used to
    render chat records with its chat template. Every problem raises a one-line ``DataError``
    naming the source (and the row or line): a missing file, an unknown file type, a
    DatasetDict without a split, a mapped column that does not exist (the available ones are
    listed), a bad record, an empty data set, a hub data set that cannot be loaded.
    """
    mapping = resolve_fields(fields)
    text = os.fspath(source)
    if text.startswith(HUB_PREFIX):
        return _to_examples(text, *_load_hub(text), mapping, tokenizer)
    path, split = Path(text), None
    if not path.exists() and "@" in text and Path(text.rpartition("@")[0]).is_dir():
        dir_text, _, split = text.rpartition("@")
        path = Path(dir_text)
    if path.is_dir():
        return _to_examples(text, *_load_saved(path, split, text), mapping, tokenizer)
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        if mapping is None:
            return read_json_lines(path, tokenizer)  # the plain JSONL reader, byte for byte
        return _json_lines_examples(path, read_bytes(path), mapping, tokenizer)
    if suffix not in _LOADER_SUFFIXES:
        kind = f"file type {suffix!r}" if suffix else "file without a suffix"
        raise DataError(
            f"{path}: unknown {kind}; expected .jsonl, .json, .parquet, .arrow, "
            f"a save_to_disk folder or {_HUB_SYNTAX}"
        )
    raw = read_bytes(path)
    if suffix == ".json":
        return _json_examples(path, raw, mapping, tokenizer)
    if suffix == ".parquet":
        return _to_examples(text, *_parquet_rows(path), mapping, tokenizer)
    return _to_examples(text, *_arrow_rows(path), mapping, tokenizer)


# ----------------------------------------------------------------------------------------------
# Records -> Examples, for every source
# ----------------------------------------------------------------------------------------------


def _check_columns(source: str, columns: list[str], mapping: dict[str, str] | None) -> None:
    for key, column in (mapping or {}).items():
        if column not in columns:
            raise DataError(
                f"{source}: no column {column!r} (data.fields maps {key!r} to it); "
                f"available columns: {columns}"
            )


def _apply_fields(record: dict, mapping: dict[str, str] | None) -> dict:
    """``record`` with the mapped columns renamed to okd's field names (rename_columns-like)."""
    if not mapping:
        return record
    renamed = {k: v for k, v in record.items() if k not in mapping.values()}
    for key, column in mapping.items():
        if column in record:
            renamed[key] = record[column]
    return renamed


def _format(record: dict, where: str, mapping: dict[str, str] | None, tokenizer) -> Example:
    """``format_record`` with the row named in its error (and a hint for raw Dolly records)."""
    for key, column in (mapping or {}).items():
        if column not in record:
            raise DataError(
                f"{where}: no column {column!r} (data.fields maps {key!r} to it); "
                f"this record has {sorted(record)}"
            )
    try:
        example = format_record(_apply_fields(record, mapping), tokenizer)
    except DataError as err:
        hint = ""
        if mapping is None and {"instruction", "context", "response"} <= set(record):
            hint = " (Dolly's layout instruction/context/response: set data.fields to 'dolly')"
        raise DataError(f"{where}: {err}{hint}") from None
    example.source = where
    return example


def _to_examples(
    label: str, columns: list[str], rows: Iterable[dict], mapping: dict[str, str] | None, tokenizer
) -> list[Example]:
    """Examples of a column-based data set (Parquet, Arrow, save_to_disk, hub)."""
    _check_columns(label, columns, mapping)
    examples = [
        # A table has every column in every row: a null there means the record lacks the field
        # (a prompt/response row beside chat rows has messages = null).
        _format({k: v for k, v in row.items() if v is not None}, f"{label}, row {i}", mapping, tokenizer)
        for i, row in enumerate(rows)
    ]
    if not examples:
        raise DataError(f"{label}: no examples (the data set is empty)")
    return examples


# ----------------------------------------------------------------------------------------------
# JSON and JSON lines
# ----------------------------------------------------------------------------------------------


def _json_lines_examples(path: Path, raw: bytes, mapping, tokenizer) -> list[Example]:
    records = list(json_lines(path, raw))
    _check_columns(str(path), _union_keys(r for _, r in records), mapping)
    examples = [_format(record, where, mapping, tokenizer) for where, record in records]
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty or has only blank lines)")
    return examples


def _json_examples(path: Path, raw: bytes, mapping, tokenizer) -> list[Example]:
    """A .json file: a list of records if it starts with '[', else JSON lines."""
    if not raw.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"["):  # (after a BOM)
        return _json_lines_examples(path, raw, mapping, tokenizer)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 (byte {err.start + 1})") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a list of records, got {type(records).__name__}")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}, row {i}: expected a JSON object, got {type(record).__name__}")
    _check_columns(str(path), _union_keys(records), mapping)
    examples = [_format(record, f"{path}, row {i}", mapping, tokenizer) for i, record in enumerate(records)]
    if not examples:
        raise DataError(f"{path}: no examples (the data set is empty)")
    return examples


def _union_keys(records: Iterable[dict]) -> list[str]:
    """Every key of the records, in order of first appearance: a JSON file's "columns"."""
    return list(dict.fromkeys(key for record in records for key in record))


# ----------------------------------------------------------------------------------------------
# Parquet, Arrow, save_to_disk, hub (through pyarrow and datasets, imported only when needed)
# ----------------------------------------------------------------------------------------------


def _parquet_rows(path: Path) -> tuple[list[str], list[dict]]:
    # pyarrow (a dependency of datasets) reads the file in place; Dataset.from_parquet would
    # first copy it into the datasets cache, for the same rows.
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({_one_line(err)})") from None
    return table.column_names, table.to_pylist()


def _arrow_rows(path: Path) -> tuple[list[str], Iterable[dict]]:
    import pyarrow as pa
    from datasets import Dataset

    try:
        dataset = Dataset.from_file(str(path))  # datasets' own (stream) format, memory-mapped
        return dataset.column_names, dataset
    except (pa.ArrowException, OSError):
        pass
    try:  # an Arrow IPC file (pyarrow.feather / ipc.new_file)
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Arrow file ({_one_line(err)})") from None
    return table.column_names, table.to_pylist()


def _pick_split(dataset, split: str | None, label: str):
    """A Dataset from a Dataset or DatasetDict, given the split asked for (or None)."""
    from datasets import DatasetDict, IterableDatasetDict

    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        splits = list(dataset)
        if split is None:
            raise DataError(f"{label}: a DatasetDict with splits {splits}: name one as {label}@SPLIT")
        if split not in dataset:
            raise DataError(f"{label}: no split {split!r}; splits: {splits}")
        return dataset[split]
    if split is not None and (dataset.split is None or str(dataset.split) != split):
        raise DataError(f"{label}: a single Dataset, not a DatasetDict: it has no split {split!r}")
    return dataset


def _load_saved(path: Path, split: str | None, label: str) -> tuple[list[str], Iterable[dict]]:
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(
            f"{path}: a folder, but not one written by save_to_disk (no dataset_info.json or "
            "dataset_dict.json)"
        ) from None
    dataset = _pick_split(dataset, split, label if split is None else str(path))
    return dataset.column_names, dataset


def _load_hub(source: str) -> tuple[list[str], Iterable[dict]]:
    import datasets

    hub = parse_hub_name(source)
    offline = bool(datasets.config.HF_HUB_OFFLINE)
    try:
        dataset = datasets.load_dataset(hub.name, hub.config, split=hub.split)
    except ConnectionError:
        if offline:
            raise DataError(
                f"{source}: data set {hub.name!r} is not in the local Hugging Face cache "
                "(offline: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set); load it once online first"
            ) from None
        raise DataError(
            f"{source}: the Hugging Face hub is unreachable and data set {hub.name!r} is not in "
            "the local cache"
        ) from None
    except datasets.exceptions.DatasetNotFoundError as err:
        raise DataError(f"{source}: {_one_line(err)}") from None
    except (ValueError, KeyError, FileNotFoundError) as err:  # unknown config or split, no data files
        raise DataError(f"{source}: {_one_line(err)}") from None
    if hub.split is None:  # datasets returns a DatasetDict: fine only with one split named
        dataset = _pick_split(dataset, None, source)
    return dataset.column_names, dataset


def _one_line(err: BaseException) -> str:
    """An exception's message on one line (datasets' messages span several)."""
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


__all__ = [
    "FIELD_PRESETS",
    "HUB_PREFIX",
    "OKD_FIELDS",
    "HubName",
    "is_loader_source",
    "parse_hub_name",
    "read_examples",
    "resolve_fields",
]
