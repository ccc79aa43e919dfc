"""The task registry: each task's answers parsed and scored as the reference does (FA), its answer
length, and the registry covering every task the data layer can produce."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

import booster.data
from booster.data import hub, sources
from booster.data.records import Example
from booster.errors import UserError
from booster.tasks import (
    AGNEWS_INSTRUCTION,
    AGNEWS_LABELS,
    FINAL_ANSWER,
    SENTIMENT_INSTRUCTION,
    SENTIMENT_LABELS,
    TASKS,
    default_max_new_tokens,
    find_task,
    is_open_ended,
    parse_agnews,
    parse_final_answer,
    parse_sentiment,
    score_task,
    task_metric,
)

DATA_DIR = Path(booster.data.__file__).parent


def _sentiment(label: str) -> Example:
    return Example("Classify the sentiment.", output=label, input="some review", meta={"label": label})


def test_sentiment_first_word_case_and_punctuation():
    examples = [
        _sentiment("positive"),
        _sentiment("negative"),
        _sentiment("positive"),
        _sentiment("negative"),
    ]
    answers = ["Positive.", "negative! it is bad", "The review is positive", ""]
    # Only the first word counts: the third answer names the label later and is wrong.
    assert score_task("sentiment", answers, examples) == pytest.approx(50.0)
    assert score_task("embedded:sentiment", answers, examples) == score_task("sst2", answers, examples)


def test_agnews_first_named_category():
    assert parse_agnews("Sci/Tech") == "Sci/Tech"
    assert parse_agnews("sports, not business") == "Sports"
    assert parse_agnews("This is about Science and the world") == "Sci/Tech"
    assert parse_agnews("no idea") is None
    assert parse_agnews("Worldwide news") is None, "a category must be a whole word"
    examples = [Example("Classify.", output=label, meta={"label": label}) for label in AGNEWS_LABELS]
    examples.append(
        Example("Classify.", meta={"label": AGNEWS_LABELS.index("Sports")})
    )  # ag_news class index
    answers = ["World", "Sports.", "business", "Sci/Tech", "Sports"]
    assert score_task("agnews", answers, examples) == pytest.approx(100.0)
    assert score_task("ag_news", ["Sports", *answers[1:]], examples) == pytest.approx(80.0)


def test_gsm8k_final_answer():
    assert parse_final_answer("3 + 4 = 7. The final answer is: 1,234.") == pytest.approx(1234)
    assert parse_final_answer("The final answer is: -2.5 apples, not 3") == pytest.approx(-2.5)
    # Without the phrase, the last number (the reference evaluation's fallback).
    assert parse_final_answer("First 12, then 30") == pytest.approx(30)
    assert parse_final_answer("no numbers here") is None
    examples = [
        Example("q1", output="... The final answer is: 18", meta={"answer": "18"}),
        Example("q2", output="... The final answer is: 3", meta={"answer": 3}),
        Example("q3", output="... The final answer is: 1000"),  # gold from the output when meta lacks it
    ]
    answers = [
        "2 * 9 = 18\nThe final answer is: 18.0",
        "The final answer is: 4",
        "The final answer is: 1,000",
    ]
    assert score_task("gsm8k", answers, examples) == pytest.approx(200 / 3)
    assert task_metric("embedded:math") == "gsm8k"


def test_legs_worked_answers_are_read_by_their_final_answer():
    gold = Example(
        "How many legs are there in total if you have 3 dogs and 2 chickens?", meta={"answer": "16"}
    )
    answers = [
        "A dog has 4 legs, so 3 dogs have 3 * 4 = 12 legs. A chicken has 2 legs, so 2 chickens have "
        "2 * 2 = 4 legs. In total there are 12 + 4 = 16 legs.\nThe final answer is: 16",
        "In total there are 12 + 4 = 16 legs.",  # cut before the final line: the last number
        "The final answer is: 16.\nThe final answer is: 20",  # the first final answer counts
        "A dog has 4 legs, so 3 dogs have 3 * 4 = 12 legs.",  # stopped before the sum: wrong
        "I'm sorry, but I can't help with that.",  # a refusal has no number: wrong
        "The final answer is: 12",
    ]
    assert [TASKS["legs"].correct(a, gold) for a in answers] == [True, True, True, False, False, False]
    assert score_task("embedded:legs", answers, [gold] * len(answers)) == pytest.approx(50.0)
    assert task_metric("embedded:legs") == task_metric("leg_counting") == "legs"


def test_unknown_task_and_length_mismatch():
    with pytest.raises(UserError, match="sentiment"):
        score_task("alpaca", ["x"], [_sentiment("positive")])
    known = "known tasks: ag_news, agnews, gsm8k, leg_counting, legs, math, sentiment, sst-2, sst2$"
    with pytest.raises(UserError, match=known):
        task_metric("alpaca")  # open-ended: exported, never scored
    with pytest.raises(ValueError):
        score_task("sentiment", [], [_sentiment("positive")])
    assert math.isnan(score_task("sentiment", [], []))


def test_answer_length_and_open_ended_by_name_alias_or_spec():
    assert [default_max_new_tokens(t) for t in ("sentiment", "sst2", "agnews", "ag_news")] == [8] * 4
    assert default_max_new_tokens("gsm8k") == default_max_new_tokens("embedded:math") == 256
    assert default_max_new_tokens("alpaca") == 1024
    assert default_max_new_tokens("embedded:legs") == default_max_new_tokens("leg_counting") == 96
    assert default_max_new_tokens("a row's own task") == 256  # no entry: the GSM8K-sized default
    assert is_open_ended("alpaca") and TASKS["alpaca"].correct is None
    assert not any(is_open_ended(t) for t in ("sentiment", "agnews", "gsm8k", "unknown"))
    assert find_task("embedded:sentiment") is TASKS["sentiment"] and find_task("nope") is None


def test_entries_hold_the_prompt_and_answer_constants():
    assert TASKS["sentiment"].instruction == SENTIMENT_INSTRUCTION
    assert TASKS["sentiment"].labels == SENTIMENT_LABELS == ("positive", "negative")
    assert TASKS["agnews"].instruction == AGNEWS_INSTRUCTION
    assert TASKS["agnews"].labels == AGNEWS_LABELS
    assert (
        TASKS["gsm8k"].answer_format == TASKS["legs"].answer_format == FINAL_ANSWER == "The final answer is: "
    )
    assert TASKS["gsm8k"].instruction is None and TASKS["alpaca"].instruction is None
    parsers = {name: task.parse for name, task in TASKS.items()}
    assert parsers == {
        "sentiment": parse_sentiment,
        "agnews": parse_agnews,
        "gsm8k": parse_final_answer,
        "legs": parse_final_answer,
        "alpaca": None,
    }
    for task in TASKS.values():
        for label in task.labels:  # every label reads back as itself
            assert task.parse is not None and task.parse(label) == label
    with pytest.raises(ValueError, match="exactly one"):
        type(TASKS["alpaca"])("broken", open_ended=False)


def _converted() -> dict[str, list[Example]]:
    """Task examples from every hub converter, on one tiny row each (the real column schemas)."""
    rows = {
        "sst2": [{"sentence": "a fine film", "label": 1}, {"sentence": "dull", "label": 0}],
        "agnews": [{"text": f"article {i}", "label": i} for i in range(4)],
        "gsm8k": [{"question": "1+1?", "answer": "1+1=2\n#### 2"}],
        "alpaca": [{"instruction": "Write a line", "input": "", "output": "A line."}],
        "alpacaeval": [{"instruction": "Say hi", "output": "Hi", "generator": "ref"}],
    }
    return {schema: hub.CONVERTERS[schema](r, "task", schema) for schema, r in rows.items()}


def _inferred() -> dict[str, Example]:
    """What the data layer infers for task rows that do not say their task, one per inference rule."""
    rows = {
        "gsm8k": Example("2+3?", f"2+3=5\n{FINAL_ANSWER}5"),
        "sentiment": Example("Rate it", "Positive"),
        "agnews": Example("Which section?", "Sports"),
        "alpaca": Example("Write a poem", "Roses are red."),
    }
    return {want: sources._infer_task([example], None)[0] for want, example in rows.items()}


def _task_literals() -> set[str]:
    """Task names written as literals in the data layer: ``meta={"task": X}``, ``task=X``, ``task = X``."""
    names: set[str] = set()
    for path in sorted(DATA_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            values: list[ast.expr] = []
            if isinstance(node, ast.keyword) and node.arg == "meta" and isinstance(node.value, ast.Dict):
                meta = node.value
                values = [
                    v
                    for k, v in zip(meta.keys, meta.values, strict=True)
                    if isinstance(k, ast.Constant) and k.value == "task"
                ]
            elif (isinstance(node, ast.keyword) and node.arg == "task") or (
                isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "task" for t in node.targets)
            ):
                values = [node.value]
            names |= {v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)}
    return names


def test_registry_has_every_task_the_data_layer_produces():
    literals = _task_literals()
    assert literals >= {"sentiment", "agnews", "gsm8k", "alpaca"}  # the scan sees the loaders' literals
    produced = {d.task for d in hub.DATASETS.values() if d.task} | set(sources.EMBEDDED_TASKS.values())
    produced |= literals
    converted = _converted()
    for schema, examples in converted.items():
        assert {e.meta["task"] for e in examples} == {hub.DATASETS[schema].task}
        produced |= {e.meta["task"] for e in examples}
    inferred = _inferred()
    assert {want: e.meta["task"] for want, e in inferred.items()} == {w: w for w in inferred}
    produced |= set(inferred)
    assert produced == set(TASKS), "a task without a registry entry, or an entry nothing produces"


def test_gold_answers_the_loaders_write_score_full_marks():
    """A prompt and its parser agree: each loader's own gold output is a right answer."""
    examples = [e for batch in _converted().values() for e in batch] + list(_inferred().values())
    examples += sources.load_task("embedded:legs", "test", limit=5)
    for name, task in TASKS.items():
        mine = [e for e in examples if e.meta["task"] == name]
        assert mine, name
        if task.open_ended:
            continue
        assert score_task(name, [e.output for e in mine], mine) == pytest.approx(100.0), name
