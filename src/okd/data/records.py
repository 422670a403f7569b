"""Records -> ``Example``s: the accepted record layouts, prompt templates, and JSON-lines files.

Accepted JSONL record layouts (one JSON object per line; extra fields are ignored):

* ``{"prompt": str, "response": str}`` -- the prompt is used as-is.
* ``{"instruction": str, "input": str (optional), "output": str}`` -- the Dolly / DistiLLM
  layout. The prompt is ``PROMPT_TEMPLATE`` (or ``PROMPT_TEMPLATE_NO_INPUT`` when the input
  is missing or blank)::

      ### Instruction:
      {instruction}

      ### Input:
      {input}

      ### Response:

* ``{"messages": [{"role": str, "content": str}, ...]}`` -- a chat. The last message must
  come from the ``assistant``: it is the response. The earlier messages form the prompt,
  rendered with the tokenizer's chat template when the tokenizer has one, else as plain
  ``"<role>: <content>\\n"`` lines followed by ``"assistant: "``.

With a tokenizer that has a chat template (an instruct model's), the prompt of the first two
layouts becomes the user turn of that template, ending with the assistant's header: the model sees
its own chat format in training, generation and evaluation alike.

All of this lives in ``format_record``: it is the one place to change how records become text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


class DataError(ValueError):
    """Bad input data: the message says which file, line or example, and what is wrong."""


@dataclass
class Example:
    """One training example as text.

    ``prompt`` is the full text shown to the model before the response, already formatted
    (template or chat template applied); ``response`` is the text the model should produce.
    """

    prompt: str
    response: str
    source: str | None = field(default=None, compare=False)
    """Where the example came from (``file, line N``), used in error messages."""


# ----------------------------------------------------------------------------------------------
# Records -> Examples
# ----------------------------------------------------------------------------------------------


def _require_str(record: dict, field: str, *, optional: bool = False) -> str:
    """Return ``record[field]`` if it is a string; DataError naming the field otherwise.

    With ``optional``, a missing field or ``null`` gives "".
    """
    if field not in record or (optional and record[field] is None):
        if optional:
            return ""
        raise DataError(f"missing field {field!r}")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"field {field!r} must be a string, got {type(value).__name__}")
    return value


def _format_chat(messages: Any, tokenizer) -> tuple[str, str]:
    """(prompt, response) of a chat record; see the module docstring for the rules."""
    if not isinstance(messages, list):
        raise DataError(f"field 'messages' must be a list, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"messages[{i}] must be an object, got {type(message).__name__}")
        for field in ("role", "content"):
            try:
                _require_str(message, field)
            except DataError as err:
                raise DataError(f"messages[{i}]: {err}") from None
    if len(messages) < 2:
        raise DataError("'messages' needs at least one message before the assistant's reply")
    for i, message in enumerate(messages):
        if not message["content"].strip():
            raise DataError(f"messages[{i}] ({message['role']}) has empty content")
    *history, last = messages
    if last["role"] != "assistant":
        raise DataError(f"the last message must have role 'assistant', got {last['role']!r}")

    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in history],
            tokenize=False,
            add_generation_prompt=True,  # ends the prompt with the assistant turn's header
        )
    else:
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in history) + "assistant: "
    return prompt, last["content"]


def format_record(record: dict, tokenizer=None) -> Example:
    """Turn one JSON record (any accepted layout) into an ``Example``.

    Raises ``DataError`` (without a location; ``read_jsonl`` adds file and line) for missing
    fields, wrong types, or an empty prompt or response.
    """
    if "messages" in record:
        prompt, response = _format_chat(record["messages"], tokenizer)
    elif "prompt" in record or "response" in record:
        prompt, response = _require_str(record, "prompt"), _require_str(record, "response")
    elif "instruction" in record or "output" in record:
        instruction = _require_str(record, "instruction")
        input_text = _require_str(record, "input", optional=True)
        response = _require_str(record, "output")
        if not instruction.strip():
            raise DataError("field 'instruction' is empty")
        if input_text.strip():
            prompt = PROMPT_TEMPLATE.format(instruction=instruction, input=input_text)
        else:
            prompt = PROMPT_TEMPLATE_NO_INPUT.format(instruction=instruction)
    else:
        raise DataError(
            "missing fields: expected 'prompt' and 'response', or 'instruction' and 'output', "
            f"or 'messages'; got {sorted(record)}"
        )
    if not prompt.strip():
        raise DataError("empty prompt")
    if not response.strip():
        raise DataError("empty response")
    if "messages" not in record and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        # An instruct model sees its prompts in its own chat format: a plain prompt becomes the user
        # turn, so training, generation and evaluation (all of which read data through here) agree.
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return Example(prompt=prompt, response=response)


# ----------------------------------------------------------------------------------------------
# JSONL files
# ----------------------------------------------------------------------------------------------



def read_bytes(path: Path) -> bytes:
    """The file's bytes, or a one-line ``DataError`` naming it."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None


def json_lines(path: Path, raw: bytes) -> Iterator[tuple[str, dict]]:
    """(``"file, line N"``, record) per non-blank line of a JSON-lines file; errors name the line."""
    # Split the bytes, not decoded text: str.splitlines() would also split at characters such
    # as U+2028 that are legal inside a JSON string. Decoding per line lets us name the bad line.
    for lineno, line_bytes in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}, line {lineno}"
        try:
            line = line_bytes.decode("utf-8-sig" if lineno == 1 else "utf-8")  # tolerate a BOM
        except UnicodeDecodeError as err:
            raise DataError(f"{where}: not valid UTF-8 (byte {err.start + 1})") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: malformed JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def read_json_lines(path: str | os.PathLike, tokenizer=None) -> list[Example]:
    """The records of a JSON-lines file as ``Example``s: ``okd.data.read_jsonl`` of a ``.jsonl`` file.

    Blank lines are skipped; every problem raises a one-line ``DataError`` naming the file and line.
    """
    path = Path(path)
    examples = []
    for where, record in json_lines(path, read_bytes(path)):
        try:
            example = format_record(record, tokenizer)
            example.source = where
            examples.append(example)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty or has only blank lines)")
    return examples
