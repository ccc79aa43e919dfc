"""The Python API for Hugging Face users: the README snippet as written, raw rows in the three common
shapes (Alpaca, prompt/completion, chat messages) tokenised like the stages, tokenised items as before."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from booster.data.records import Example
from booster.data.rows import prepare_dataset
from booster.data.template import IGNORE_INDEX, tokenize_examples
from booster.errors import UserError
from booster.models import LoraSettings, add_lora, build_tiny_model
from booster.training import LMTrainer

README = Path(__file__).resolve().parents[1] / "README.md"
Q, A = "Write a scam email.", "Sorry, I can't write scams."


def readme_snippet() -> str:
    section = README.read_text().split("## Use it from Python", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_python_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_snippet(), str(README), "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2 and trainer.harmful.passes >= 1  # 1 harmful row, 2 steps
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_every_row_shape_tokenises_like_the_stages(tiny_tokenizer, template):
    [expected] = tokenize_examples([Example(Q, A)], tiny_tokenizer, 64, template)
    user, answer = {"role": "user", "content": Q}, {"role": "assistant", "content": A}
    rows = [
        {"instruction": Q, "output": A},
        {"instruction": Q, "input": None, "output": A, "id": 7},  # datasets fills absent columns with None
        {"prompt": Q, "completion": A},
        {"messages": [user, answer]},
        {"prompt": [user], "completion": [answer]},  # TRL's conversational prompt/completion
    ]
    assert prepare_dataset(rows, tiny_tokenizer, 64, template) == [expected] * len(rows)
    with_input = Example(Q, A, input="target: grandma")
    [tokens] = prepare_dataset(
        [{"instruction": Q, "input": "target: grandma", "output": A}], tiny_tokenizer, 64, template
    )
    assert tokens == tokenize_examples([with_input], tiny_tokenizer, 64, template)[0]


def test_a_conversation_scores_only_its_last_answer(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "last answer"},
    ]
    [row] = prepare_dataset([{"messages": messages}], tiny_tokenizer, 256, "chat")
    scored = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
    assert tiny_tokenizer.decode(scored) == "last answer<|endoftext|>"
    assert tiny_tokenizer.decode(row["input_ids"]).startswith("### system:\nBe brief.")
    with pytest.raises(UserError, match="train_dataset row 0: the Alpaca template takes one user turn"):
        prepare_dataset([{"messages": messages}], tiny_tokenizer, 256, "alpaca", "train_dataset")


@pytest.mark.parametrize(
    "rows,needle",
    [
        (
            [{"instruction": "a", "output": "b"}, {"instruction": "c"}],
            "harmful_dataset row 1: missing field 'output'",
        ),
        ([{"prompt": "a", "completion": None}], "harmful_dataset row 0: missing field 'completion'"),
        ([{"text": "a"}], "harmful_dataset row 0 has none of the known fields (it has: text)"),
        (
            [{"messages": [{"role": "user", "content": "a"}]}],
            "harmful_dataset row 0: the last message must be the assistant's answer",
        ),
        (
            [{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}],
            "harmful_dataset row 0: messages[0] is missing content",
        ),
        ([{"input_ids": [1, 2]}], "harmful_dataset row 0: a tokenised row needs labels"),
    ],
)
def test_a_row_that_fits_no_shape_is_one_line_naming_it(tiny_tokenizer, rows, needle):
    with pytest.raises(UserError) as err:
        prepare_dataset(rows, tiny_tokenizer, 64, "alpaca", "harmful_dataset")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_tokenised_data_is_used_as_it_is(tiny_tokenizer):
    from datasets import Dataset

    tokens = tokenize_examples([Example(Q, A)], tiny_tokenizer, 64)
    assert prepare_dataset(tokens, tiny_tokenizer) is tokens
    dataset = Dataset.from_list(tokens)
    assert prepare_dataset(dataset, tiny_tokenizer) is dataset


def _sft(tokenizer, rows, tmp_path, **kwargs):
    torch.manual_seed(0)  # the same LoRA initialisation for both runs
    model = add_lora(build_tiny_model(tokenizer), LoraSettings(r=4, alpha=8))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = LMTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer, **kwargs)
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_raw_rows_train_exactly_like_their_tokens(tiny_tokenizer, tmp_path):
    from datasets import Dataset

    pairs = [(Q, A), ("How do I pick a lock?", "I cannot help with that.")]
    rows = Dataset.from_list([{"prompt": q, "completion": a} for q, a in pairs])
    tokens = tokenize_examples([Example(q, a) for q, a in pairs], tiny_tokenizer, 64, "chat")
    from_rows = _sft(tiny_tokenizer, rows, tmp_path / "rows", template="chat", max_length=64)
    from_tokens = _sft(tiny_tokenizer, tokens, tmp_path / "tokens")
    assert from_rows.keys() == from_tokens.keys()
    assert all(torch.equal(from_rows[k], from_tokens[k]) for k in from_rows)


def test_side_datasets_of_every_defense_take_raw_rows(tiny_tokenizer, tmp_path):
    from booster.methods.lisa import LisaConfig, LisaTrainer
    from booster.methods.repnoise import RepNoiseConfig, RepNoiseTrainer

    rows = [{"instruction": Q, "output": A}]
    tokens = tokenize_examples([Example(Q, A)], tiny_tokenizer, 64)
    common = {"output_dir": str(tmp_path), "report_to": "none", "use_cpu": True}
    model = add_lora(build_tiny_model(tiny_tokenizer), LoraSettings(r=4, alpha=8))
    repnoise = RepNoiseTrainer(
        model=model, args=RepNoiseConfig(**common), train_dataset=rows, harmful_dataset=rows,
        processing_class=tiny_tokenizer, max_length=64,
    )  # fmt: skip
    assert repnoise.train_dataset == tokens and repnoise.harmful.dataset == tokens
    lisa = LisaTrainer(
        model=model, args=LisaConfig(**common), train_dataset=tokens, alignment_dataset=rows,
        processing_class=tiny_tokenizer, max_length=64,
    )  # fmt: skip
    assert lisa.alignment.dataset == tokens
    with pytest.raises(ValueError, match="template='markdown'; use alpaca or chat"):
        LMTrainer(
            model=model,
            args=TrainingArguments(**common),
            processing_class=tiny_tokenizer,
            template="markdown",
        )
