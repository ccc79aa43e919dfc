"""Batched generation must give the answers one-at-a-time greedy decoding gives, and stop at eos."""

from __future__ import annotations

import pytest

from booster.data.template import format_prompt
from booster.evaluation.generation import generate, generate_ids
from booster.models import ModelConfig, load_model_and_tokenizer

PROMPTS = [
    format_prompt("Say hi."),
    format_prompt("Classify the sentiment of this review.", "A long, slow and thoroughly dull film."),
    format_prompt("What is two plus two? Think step by step before you answer the question."),
    format_prompt("Name a colour."),
    format_prompt("Summarise.", "Text " * 30),
]


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_tokenizer(ModelConfig(name="tiny", dtype="float32"))


def _solo(model, tokenizer, prompts, max_new_tokens):
    return [
        generate_ids(model, tokenizer, [p], max_new_tokens=max_new_tokens, progress=False)[0] for p in prompts
    ]


def test_batched_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    solo = _solo(model, tokenizer, PROMPTS, max_new_tokens=12)
    batched = generate_ids(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3, progress=False)
    assert batched == solo
    # Prompts of different lengths share batches, so left padding and ordering are exercised.
    assert len({len(tokenizer(p)["input_ids"]) for p in PROMPTS}) == len(PROMPTS)
    assert any(solo), "the random model should generate some non-stop tokens"


def test_sorting_by_length_changes_no_answer(tiny):
    """Batches of length-sorted prompts (little padding) give the answers of batches in input order."""
    model, tokenizer = tiny
    kwargs = dict(max_new_tokens=12, batch_size=2, progress=False)
    sorted_answers = generate_ids(model, tokenizer, PROMPTS, **kwargs)
    assert generate_ids(model, tokenizer, PROMPTS, sort_by_length=False, **kwargs) == sorted_answers
    assert any(sorted_answers)


def test_a_batch_stops_when_every_answer_has_ended(tiny):
    """When each answer's first token is a stop token, the batch ends after the prompts' pass: no
    decoding step runs for answers that have all ended."""
    model, tokenizer = tiny
    first = [answer[0] for answer in _solo(model, tokenizer, PROMPTS[:3], max_new_tokens=1) if answer]
    calls: list[int] = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        answers = generate_ids(
            model, tokenizer, PROMPTS[:3], max_new_tokens=20, batch_size=3, progress=False, eos_token_id=first
        )
    finally:
        handle.remove()
    assert answers == [[], [], []]
    assert len(calls) == 1


def test_text_is_new_tokens_only_and_padding_side_restored(tiny):
    model, tokenizer = tiny
    model.train()
    before = tokenizer.padding_side
    answers = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=6, batch_size=2, progress=False)
    ids = generate_ids(model, tokenizer, PROMPTS[:2], max_new_tokens=6, progress=False)
    assert answers == [tokenizer.decode(s, skip_special_tokens=True) for s in ids]
    assert all("### Response" not in a for a in answers)
    assert tokenizer.padding_side == before
    assert model.training, "generation must leave the model in the mode it found it"
    model.eval()


def test_each_sequence_stops_at_its_own_eos(tiny):
    """Make a token the random model emits for one prompt the eos: that answer must end just before it
    while the other prompt in the batch keeps its own (solo) answer."""
    model, tokenizer = tiny
    free = _solo(model, tokenizer, PROMPTS[:2], max_new_tokens=10)
    first, other = free
    # Choose a stop token from the first answer that the other answer never produces early on.
    candidates = [(k, t) for k, t in enumerate(first) if k > 0 and t not in first[:k]]
    assert candidates, "the random model's answer should contain a fresh token after step 0"
    position, stop = next(((k, t) for k, t in candidates if t not in other), candidates[0])

    eos = tokenizer.eos_token
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(stop)
    try:
        expected_other = _solo(model, tokenizer, PROMPTS[1:2], max_new_tokens=10)[0]
        batched = generate_ids(model, tokenizer, PROMPTS[:2], max_new_tokens=10, batch_size=2, progress=False)
    finally:
        tokenizer.eos_token = eos
    assert batched[0] == first[:position]
    assert batched[1] == expected_other
    assert stop not in batched[1]


def test_empty_prompt_list(tiny):
    model, tokenizer = tiny
    assert generate(model, tokenizer, [], max_new_tokens=4, progress=False) == []
