"""Data for distillation: instruction JSONL files, tokenisation, batching, and a built-in dataset.

* ``okd.data.instruction``: read/write JSONL (prompt/response, instruction/input/output and
  chat records), tokenise with loss labels on the response only, pad batches.
* ``okd.data.builtin``: a real offline dataset made from the standard library's docstrings.
* ``okd.data.wordnet``: a second one, WordNet 3.0 definitions (Debian's ``wordnet-base`` files).
* ``okd.data.tasks``: the registry of buildable tasks (``okd data build --task NAME``).
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
from .tasks import TASKS, build_task
from .wordnet import build_wordnet_dataset

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "PROMPT_TEMPLATE",
    "PROMPT_TEMPLATE_NO_INPUT",
    "Collator",
    "DataError",
    "Example",
    "InstructionDataset",
    "build_builtin_dataset",
    "build_task",
    "build_wordnet_dataset",
    "builtin_texts",
    "collate_prompts",
    "ensure_pad_token",
    "format_record",
    "load_dataset_file",
    "read_jsonl",
    "tokenize_example",
    "write_jsonl",
]
