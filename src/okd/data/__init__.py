"""Data for distillation: instruction JSONL files, tokenisation, batching, and a built-in dataset.

* ``okd.data.instruction``: read/write JSONL (prompt/response, instruction/input/output and
  chat records), tokenise with loss labels on the response only, pad batches.
* ``okd.data.builtin``: a real offline dataset made from the standard library's docstrings.
"""

from .builtin import build_builtin_dataset, builtin_texts
from .instruction import (
    IGNORE_INDEX,
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_NO_INPUT,
    Collator,
    DataError,
    Example,
    InstructionDataset,
    collate_prompts,
    ensure_pad_token,
    format_record,
    load_dataset_file,
    read_jsonl,
    tokenize_example,
    write_jsonl,
)

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_TEMPLATE",
    "PROMPT_TEMPLATE_NO_INPUT",
    "Collator",
    "DataError",
    "Example",
    "InstructionDataset",
    "build_builtin_dataset",
    "builtin_texts",
    "collate_prompts",
    "ensure_pad_token",
    "format_record",
    "load_dataset_file",
    "read_jsonl",
    "tokenize_example",
    "write_jsonl",
]
