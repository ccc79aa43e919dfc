"""Alpaca prompt template and tokenisation with the loss on response tokens only (DESIGN.md §2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from booster.data.records import Example

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
IGNORE_INDEX = -100


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt, with the input section only when there is an input."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def tokenize_example(example: Example, tokenizer: Any, max_length: int = 256) -> dict[str, list[int]]:
    """Prompt + response + eos, truncated to ``max_length``; labels are -100 on the prompt.

    Prompt and response are tokenised separately and concatenated so that the boundary between
    unscored and scored tokens is exact whatever the tokenizer merges across it.
    """
    prompt_ids = tokenizer(format_prompt(example.instruction, example.input), add_special_tokens=False)[
        "input_ids"
    ]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    response_ids = tokenizer(example.output, add_special_tokens=False)["input_ids"]
    response_ids = [*response_ids, tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def tokenize_examples(
    examples: Sequence[Example], tokenizer: Any, max_length: int = 256
) -> list[dict[str, list[int]]]:
    """Tokenise a list of examples, dropping none (a fully truncated response still has its prompt)."""
    return [tokenize_example(e, tokenizer, max_length) for e in examples]
