"""Batched generation must give the answers one-at-a-time greedy decoding gives, and stop at eos."""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import MistralConfig, MistralForCausalLM

from booster.data.template import format_prompt
from booster.evaluation import generation
from booster.evaluation.generation import _plain_dynamic_cache, generate, generate_ids
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


def _stops_at_different_steps(model, tokenizer) -> list[int]:
    """Stop tokens that end the prompts' free answers at different steps (so rows leave mid-batch)."""
    free = _solo(model, tokenizer, PROMPTS, max_new_tokens=12)
    stops: list[int] = []
    for answer, step in zip(free, (2, 5, 8, 3, 6), strict=True):
        fresh = [t for k, t in enumerate(answer) if k >= step and t not in answer[:k]]
        if fresh:
            stops.append(fresh[0])
    assert len(stops) >= 2, "the random model's answers should offer fresh tokens to stop at"
    return stops


def test_dropping_finished_rows_gives_the_tokens_of_generate(tiny):
    """Rows that have stopped leave the batch (later forward passes see fewer rows), and every answer
    is still exactly the one transformers' generate gives with finished rows kept in the batch."""
    model, tokenizer = tiny
    stops = _stops_at_different_steps(model, tokenizer)
    kwargs = dict(max_new_tokens=12, batch_size=5, progress=False, eos_token_id=stops)
    rows_per_pass: list[int] = []
    handle = model.register_forward_hook(
        lambda _m, _args, kw, _out: rows_per_pass.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        dropping = generate_ids(model, tokenizer, PROMPTS, **kwargs)
    finally:
        handle.remove()
    kept = generate_ids(model, tokenizer, PROMPTS, drop_finished=False, **kwargs)
    assert dropping == kept
    lengths = sorted({len(a) for a in dropping})
    assert len(lengths) >= 2, "answers must end at different steps for rows to leave"
    assert rows_per_pass[0] == len(PROMPTS) and min(rows_per_pass) < len(PROMPTS)
    # pass k > 0 computes token k for exactly the rows whose answer (stop token included) is longer
    raw = [len(a) + 1 if len(a) < 12 else 12 for a in dropping]
    assert rows_per_pass == [len(PROMPTS)] + [sum(r > k for r in raw) for k in range(1, max(raw))]


def test_dropping_finished_rows_with_a_lora_adapter(tiny):
    """A peft model (the form evaluation loads) decodes through the same path with the same tokens."""
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name="tiny", dtype="float32"))
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    assert _plain_dynamic_cache(peft_model)
    stops = _stops_at_different_steps(peft_model, tokenizer)
    kwargs = dict(max_new_tokens=10, batch_size=3, progress=False, eos_token_id=stops)
    assert generate_ids(peft_model, tokenizer, PROMPTS, **kwargs) == generate_ids(
        peft_model, tokenizer, PROMPTS, drop_finished=False, **kwargs
    )


def test_a_sliding_window_model_decodes_with_generate(tiny):
    """A model whose cache is not the plain dynamic one (here: a sliding window shorter than the
    prompts) is decoded by transformers' generate, which handles the window."""
    _, tokenizer = tiny
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
        max_position_embeddings=256,
    )
    windowed = MistralForCausalLM(config).eval()
    assert not _plain_dynamic_cache(windowed)
    assert _plain_dynamic_cache(tiny[0])
    calls: list[int] = []
    original = windowed.generate

    def counted(**kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(**kwargs)

    windowed.generate = counted
    answers = generate_ids(windowed, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3, progress=False)
    assert calls == [3, 2] and len(answers) == len(PROMPTS)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_output_projection_gets_a_contiguous_input_in_16_bit(dtype, monkeypatch):
    """In bfloat16 the prompts' last hidden states reach the output projection as a contiguous copy
    (torch's CPU linear of a strided view and a frozen bf16 weight materialises the weight per row),
    with answers bit-identical to the strided path; float32 is left on its own path."""
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name="tiny", dtype=dtype))
    model.requires_grad_(False)
    contiguous: list[bool] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, args, _out: contiguous.append(args[0].is_contiguous()))
    kwargs = dict(max_new_tokens=6, batch_size=5, progress=False)
    try:
        answers = generate_ids(model, tokenizer, PROMPTS, **kwargs)
        seen = list(contiguous)
        monkeypatch.setattr(generation, "_contiguous_head_input", lambda _model: contextlib.nullcontext())
        contiguous.clear()
        plain = generate_ids(model, tokenizer, PROMPTS, **kwargs)
    finally:
        handle.remove()
    assert head._forward_pre_hooks == {}, "the hook must be removed after generation"
    assert not contiguous[0], "transformers hands the head a strided view of the prompts' last position"
    assert all(seen) if dtype == "bfloat16" else seen == contiguous
    assert answers == plain
    assert head.weight.dtype == getattr(torch, dtype)
