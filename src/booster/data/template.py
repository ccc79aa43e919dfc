"""Prompt templates and tokenisation with the loss on answer tokens only.

Two templates (``model.template``): ``alpaca``, the paper's, for every model; and ``chat``, the
tokenizer's own chat template (``apply_chat_template``), for chat models: the prompt is a user
turn, the answer the assistant turn, ending with the template's end-of-turn token (``<|im_end|>``
for ChatML), and generation stops there. Training and evaluation format prompts with the same
functions, so the model is scored on exactly the prompts it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from booster.data.records import Example
from booster.errors import UserError

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
#: the values of ``model.template``.
TEMPLATES = ("alpaca", "chat")
#: stands in for an answer when the chat template is rendered to find what follows an answer.
_ANSWER_PROBE = "\x00booster-answer\x00"


def check_template_name(template: str) -> None:
    if template not in TEMPLATES:
        raise UserError(f"model.template={template!r}; use {' or '.join(TEMPLATES)}")


def user_message(instruction: str, input: str = "") -> str:
    """The user turn of a chat: the instruction, then the input after a blank line when there is one."""
    return f"{instruction}\n\n{input}" if input else instruction


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def format_prompt(instruction: str, input: str = "", tokenizer: Any = None, template: str = "alpaca") -> str:
    """The prompt text the model answers: Alpaca's (input section only when there is an input), or
    with ``template="chat"`` the tokenizer's chat template for one user turn plus the assistant header."""
    if template == "chat":
        messages = [{"role": "user", "content": user_message(instruction, input)}]
        return _render(tokenizer, messages, add_generation_prompt=True)
    check_template_name(template)
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def format_prompts(examples: Sequence[Example], tokenizer: Any, template: str = "alpaca") -> list[str]:
    """:func:`format_prompt` for each example (its instruction and input)."""
    return [format_prompt(e.instruction, e.input, tokenizer, template) for e in examples]


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Prompt token ids as training and generation both build them: the tokenizer's bos only when it
    adds one and the text does not already start with it (chat templates write their own), never an eos."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and getattr(tokenizer, "add_bos_token", False) and (ids[:1] != [bos]):
        ids = [bos, *ids]
    return ids


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if getattr(token, "special", False))
    return ids


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes an assistant turn in the tokenizer's chat template: the first special
    token the template writes after an answer (``<|im_end|>`` for ChatML); eos when it writes none.

    Raises a :class:`UserError` when the tokenizer has no chat template or it drops the answer.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "model.template=chat: this model's tokenizer has no chat template; "
            "use model.template=alpaca or a chat model"
        )
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _ANSWER_PROBE}]
    rendered = _render(tokenizer, messages, add_generation_prompt=False)
    if _ANSWER_PROBE not in rendered:
        raise UserError(
            "model.template=chat: the tokenizer's chat template does not write the assistant's answer; "
            "use model.template=alpaca"
        )
    after = rendered.split(_ANSWER_PROBE, 1)[1]
    specials = _special_ids(tokenizer)
    for token in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if token in specials:
            return int(token)
    if tokenizer.eos_token_id is None:
        raise UserError(
            "model.template=chat: the chat template ends an answer with no special token and the "
            "tokenizer has no eos; use model.template=alpaca"
        )
    return int(tokenizer.eos_token_id)


def stop_token_ids(tokenizer: Any, template: str = "alpaca") -> list[int]:
    """Tokens that end an answer beside the tokenizer's eos: the chat template's end-of-turn."""
    return [end_of_turn_id(tokenizer)] if template == "chat" else []


def _alpaca_ids(example: Example, tokenizer: Any) -> tuple[list[int], list[int]]:
    prompt_ids = encode_prompt(tokenizer, format_prompt(example.instruction, example.input))
    response_ids = tokenizer(example.output, add_special_tokens=False)["input_ids"]
    return prompt_ids, [*response_ids, tokenizer.eos_token_id]


def _chat_ids(example: Example, tokenizer: Any, end_id: int) -> tuple[list[int], list[int]]:
    """The prompt (every token up to and including the assistant header) and the assistant turn
    (the answer and its end-of-turn token; what the template writes after that is left out)."""
    messages = [{"role": "user", "content": user_message(example.instruction, example.input)}]
    return _chat_turn_ids(messages, example.output, tokenizer, end_id)


def _chat_turn_ids(
    messages: list[dict[str, str]], answer: str, tokenizer: Any, end_id: int
) -> tuple[list[int], list[int]]:
    """:func:`_chat_ids` for any conversation before the answer (a system turn, earlier turns)."""
    prompt = _render(tokenizer, messages, add_generation_prompt=True)
    full = _render(tokenizer, [*messages, {"role": "assistant", "content": answer}], False)
    if not full.startswith(prompt):
        raise UserError(
            "model.template=chat: the tokenizer's chat template renders a conversation that does not "
            "start with its generation prompt, so the answer cannot be split off; use model.template=alpaca"
        )
    answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    if end_id in answer_ids:
        answer_ids = answer_ids[: answer_ids.index(end_id) + 1]
    else:  # the template closes answers with no special token: the answer ends with eos
        answer_ids = [*tokenizer(full[len(prompt) :].rstrip(), add_special_tokens=False)["input_ids"], end_id]
    return encode_prompt(tokenizer, prompt), answer_ids


def tokenize_example(
    example: Example,
    tokenizer: Any,
    max_length: int = 256,
    template: str = "alpaca",
    end_id: int | None = None,
) -> dict[str, list[int]]:
    """Prompt + answer (+ eos, or the chat template's end-of-turn), truncated to ``max_length``;
    labels are -100 on the prompt.

    Prompt and answer are tokenised separately and concatenated so that the boundary between
    unscored and scored tokens is exact whatever the tokenizer merges across it. ``end_id`` saves
    looking up the chat template's end-of-turn token for every example.
    """
    if template == "chat":
        end = end_of_turn_id(tokenizer) if end_id is None else end_id
        prompt_ids, answer_ids = _chat_ids(example, tokenizer, end)
    else:
        check_template_name(template)
        prompt_ids, answer_ids = _alpaca_ids(example, tokenizer)
    return _join(prompt_ids, answer_ids, max_length)


def _join(prompt_ids: list[int], answer_ids: list[int], max_length: int) -> dict[str, list[int]]:
    input_ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def tokenize_conversation(
    messages: list[dict[str, str]],
    tokenizer: Any,
    max_length: int = 256,
    end_id: int | None = None,
) -> dict[str, list[int]]:
    """A chat (``role``/``content`` dicts, the last one the assistant's answer) with the tokenizer's
    chat template; only the last answer and its end-of-turn token are scored, everything before
    it (a system turn, earlier turns) is prompt."""
    end = end_of_turn_id(tokenizer) if end_id is None else end_id
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    return _join(*_chat_turn_ids(prompt, messages[-1]["content"], tokenizer, end), max_length)


def tokenize_examples(
    examples: Sequence[Example], tokenizer: Any, max_length: int = 256, template: str = "alpaca"
) -> list[dict[str, list[int]]]:
    """Tokenise a list of examples, dropping none (a fully truncated answer still has its prompt)."""
    end_id = end_of_turn_id(tokenizer) if template == "chat" else None
    return [tokenize_example(e, tokenizer, max_length, template, end_id) for e in examples]
