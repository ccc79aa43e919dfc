"""Raw rows in the shapes Hugging Face datasets use, tokenised with booster's templates.

The trainers (:class:`booster.training.LMTrainer` and every defense's subclass) take a
``datasets.Dataset`` or a list of dicts in any of these shapes, row by row:

- Alpaca: ``instruction``, ``input`` (optional), ``output``;
- prompt/completion: ``prompt`` and ``completion`` as text (the prompt is the instruction), or
  TRL's conversational form, both lists of messages;
- chat: ``messages``, a list of ``role``/``content`` dicts whose last one is the assistant's answer;
- already tokenised: ``input_ids`` and ``labels`` (-100 = not scored), used as they are.

Raw rows are tokenised by :mod:`booster.data.template` with the loss on the answer only, exactly as
the command line's stages do. A field that holds None counts as absent, as ``datasets`` fills the
columns a row lacks with None.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from booster.data.records import Example
from booster.data.template import end_of_turn_id, tokenize_conversation, tokenize_example
from booster.errors import UserError

#: the shapes :func:`row_shape` tells apart.
SHAPES = ("alpaca", "prompt_completion", "messages", "tokenized")
ROLES = ("system", "user", "assistant")
_KNOWN = (
    "instruction/output (Alpaca, input optional), prompt/completion, messages (a list of role/content "
    "dicts) or tokenised input_ids/labels"
)


def _present(row: Mapping[str, Any], key: str) -> bool:
    return row.get(key) is not None


def _check_messages(messages: Any, where: str, field: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: {field} must be a non-empty list of role/content dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise UserError(f"{where}: {field}[{i}] must be a dict with role and content")
        missing = [k for k in ("role", "content") if not _present(message, k)]
        if missing:
            raise UserError(f"{where}: {field}[{i}] is missing {' and '.join(missing)}")
        if message["role"] not in ROLES:
            raise UserError(f"{where}: {field}[{i}] has role {message['role']!r}; use {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise UserError(f"{where}: {field}[{i}] content must be text")


def _conversation(row: Mapping[str, Any], where: str) -> list[dict[str, str]] | None:
    """The messages of a chat row or a conversational prompt/completion row (None for text)."""
    if _present(row, "messages"):
        messages = row["messages"]
        _check_messages(messages, where, "messages")
    elif isinstance(row.get("prompt"), list) or isinstance(row.get("completion"), list):
        _check_messages(row["prompt"], where, "prompt")
        _check_messages(row["completion"], where, "completion")
        messages = [*row["prompt"], *row["completion"]]
    else:
        return None
    if messages[-1]["role"] != "assistant":
        raise UserError(
            f"{where}: the last message must be the assistant's answer (the scored part), "
            f"got role {messages[-1]['role']!r}"
        )
    if len(messages) < 2:
        raise UserError(f"{where}: a conversation needs a user turn before the assistant's answer")
    return list(messages)


def row_shape(row: Any, index: int, dataset: str = "") -> str:
    """Which of :data:`SHAPES` a row has; a row that has none, or lacks a field of its shape, is a
    :class:`UserError` naming the dataset, the row index and the missing fields."""
    where = f"{dataset + ' ' if dataset else ''}row {index}"
    if not isinstance(row, Mapping):
        raise UserError(f"{where}: expected a dict of fields, got {type(row).__name__}")
    if _present(row, "input_ids"):
        if not _present(row, "labels"):
            raise UserError(f"{where}: a tokenised row needs labels beside input_ids (-100 = not scored)")
        return "tokenized"
    if _present(row, "messages"):
        _conversation(row, where)
        return "messages"
    for shape, fields, what in (
        ("alpaca", ("instruction", "output"), "an Alpaca row has instruction, output and optionally input"),
        ("prompt_completion", ("prompt", "completion"), "a prompt/completion row has both"),
    ):
        if not any(_present(row, k) for k in fields):
            continue
        missing = [k for k in fields if not _present(row, k)]
        if missing:
            raise UserError(f"{where}: missing field {', '.join(map(repr, missing))} ({what})")
        if shape == "prompt_completion" and _conversation(row, where) is not None:
            return shape
        for key in (*fields, "input"):
            if _present(row, key) and not isinstance(row[key], str):
                raise UserError(f"{where}: field {key!r} must be text, got {type(row[key]).__name__}")
        return shape
    fields = ", ".join(sorted(str(k) for k, v in row.items() if v is not None)) or "none with a value"
    raise UserError(f"{where} has none of the known fields (it has: {fields}); give {_KNOWN}")


def tokenize_row(
    row: Mapping[str, Any],
    shape: str,
    tokenizer: Any,
    max_length: int,
    template: str,
    end_id: int | None,
    where: str,
) -> dict[str, list[int]]:
    """One raw row (shape from :func:`row_shape`) as ``input_ids``/``labels``/``attention_mask``."""

    messages = _conversation(row, where) if shape in ("messages", "prompt_completion") else None
    if messages is None:
        if shape == "alpaca":
            example = Example(row["instruction"], row["output"], row.get("input") or "")
        else:
            example = Example(row["prompt"], row["completion"])
        return tokenize_example(example, tokenizer, max_length, template, end_id)
    if template == "chat":
        return tokenize_conversation(messages, tokenizer, max_length, end_id)
    if [m["role"] for m in messages] != ["user", "assistant"]:
        raise UserError(
            f"{where}: the Alpaca template takes one user turn and its answer; a system turn or "
            "several turns need template='chat'"
        )
    example = Example(messages[0]["content"], messages[1]["content"])
    return tokenize_example(example, tokenizer, max_length, template, end_id)


def prepare_dataset(
    data: Any, tokenizer: Any, max_length: int = 256, template: str = "alpaca", name: str = "dataset"
) -> Any:
    """``data`` ready for the trainers: raw rows tokenised (a list), tokenised data unchanged.

    A ``datasets.Dataset`` with an ``input_ids`` column, a list whose rows are all tokenised and any
    other dataset object (e.g. a torch ``Dataset`` of tokenised items) come back as they are.
    """
    if data is None:
        return None
    columns = getattr(data, "column_names", None)
    if isinstance(columns, dict) or type(data).__name__ in ("DatasetDict", "IterableDatasetDict"):
        raise UserError(
            f"{name}: got several splits ({', '.join(data)}); pass one, e.g. {name}=data['train']"
        )
    if columns is not None:
        if "input_ids" in columns:
            return data
        rows: Any = data
    elif isinstance(data, list | tuple):
        rows = data
    else:
        return data

    out: list[dict[str, Any]] = []
    raw = False
    end_id: int | None = None
    for index, row in enumerate(rows):
        shape = row_shape(row, index, name)
        if shape == "tokenized":
            out.append(row)
            continue
        if tokenizer is None:
            raise UserError(f"{name}: raw rows need a tokenizer; pass processing_class=<tokenizer>")
        if template == "chat" and end_id is None:
            end_id = end_of_turn_id(tokenizer)
        raw = True
        out.append(tokenize_row(row, shape, tokenizer, max_length, template, end_id, f"{name} row {index}"))
    return out if raw else data
