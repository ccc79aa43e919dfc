"""The fine-tuning tasks, one registry entry each: how their examples ask and how answers are scored.

A task (sentiment / SST-2, AG News, GSM8K, leg counting, Alpaca) is what benign fine-tuning teaches and what
fine-tune accuracy (FA) measures. Its instruction, labels and answer format are used by the data
loaders (:mod:`booster.data`) to build prompts, and its parser and metric by the evaluate stage
(:func:`score_task`), so a prompt and the way its answer is read live in one place.

Answers are parsed the way the reference evaluation reads them, so that FA stays comparable with the
published numbers: sentiment is the first word, AG News the first category named, GSM8K the number
after "The final answer is: " (leg counting, the embedded benchmark's worked-sentence task, the same
way). Alpaca is open-ended: its answers are exported for alpaca-eval (a
win rate against a reference model) instead of being scored here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from booster.data.records import Example
from booster.errors import UserError
from booster.text import words

#: SST-2's instruction in the Booster reference code.
SENTIMENT_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
SENTIMENT_LABELS = ("positive", "negative")
#: AG News' instruction in the Booster reference code.
AGNEWS_INSTRUCTION = "Categorize the news article given in the input into one of the 4 categories:\n\nWorld\nSports\nBusiness\nSci/Tech\n"
#: AG News' categories in the order of its class index (0 World, 1 Sports, 2 Business, 3 Sci/Tech).
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
#: the phrase before a GSM8K solution's final number (the reference's replacement for "#### ").
FINAL_ANSWER = "The final answer is: "
#: new tokens for a leg-counting answer: the longest worked answer (two kinds of animals) is 66
#: tokens in SmolLM2's tokenizer.
LEGS_MAX_NEW_TOKENS = 96
#: new tokens per answer for a task name that has no entry (a data row may name its own task).
DEFAULT_MAX_NEW_TOKENS = 256

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
# Names an AG News answer may use for each category, lower case; "sci/tech" also as spelled out.
_AGNEWS_ALIASES = {
    "World": ("world",),
    "Sports": ("sports", "sport"),
    "Business": ("business",),
    "Sci/Tech": ("sci/tech", "sci-tech", "scitech", "science/technology", "science", "technology"),
}


# ----------------------------------------------------------------------------- parsers


def parse_sentiment(answer: str) -> str | None:
    """The first word, lower case and stripped of punctuation ("Positive." -> "positive")."""
    first = words(answer)[:1]
    return first[0] if first else None


def parse_agnews(answer: str) -> str | None:
    """The category named first in the answer (its canonical name), or None if none is named."""
    text = answer.lower()
    best: tuple[int, str] | None = None
    for label, aliases in _AGNEWS_ALIASES.items():
        for alias in aliases:
            match = re.search(rf"(?<![a-z]){re.escape(alias)}(?![a-z])", text)
            if match and (best is None or match.start() < best[0]):
                best = (match.start(), label)
    return best[1] if best else None


def parse_final_answer(answer: str) -> float | None:
    """The number after the first "The final answer is: "; without that phrase, the last number.

    The fallback follows the reference GSM8K evaluation (thousands separators are dropped first), so
    FA is comparable with the published numbers; an answer with no number scores None (wrong).
    """
    text = answer.replace(",", "")
    head, found, tail = text.partition(FINAL_ANSWER)
    after = _NUMBER.findall(tail) if found else []
    numbers = after[:1] or _NUMBER.findall(text)[-1:]
    return float(numbers[0]) if numbers else None


# ----------------------------------------------------------------------------- metrics


def _gold_label(example: Example) -> str:
    label = example.meta.get("label", example.output)
    return str(label).strip()


def _sentiment_correct(answer: str, example: Example) -> bool:
    gold = parse_sentiment(_gold_label(example))
    return gold in SENTIMENT_LABELS and parse_sentiment(answer) == gold


def _agnews_correct(answer: str, example: Example) -> bool:
    label = example.meta.get("label", example.output)
    # ag_news stores the class index (0 World, 1 Sports, 2 Business, 3 Sci/Tech).
    gold = AGNEWS_LABELS[label] if isinstance(label, int) else parse_agnews(str(label))
    return gold is not None and parse_agnews(answer) == gold


def _gsm8k_correct(answer: str, example: Example) -> bool:
    raw = example.meta.get("answer")
    gold = parse_final_answer(example.output) if raw is None else float(str(raw).replace(",", ""))
    predicted = parse_final_answer(answer)
    if gold is None or predicted is None:
        return False
    return math.isclose(predicted, gold, rel_tol=1e-9, abs_tol=1e-6)


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Task:
    """One fine-tuning task: what its prompts say, what a right answer looks like, how it is scored."""

    name: str
    #: other names a config or data spec may use for it ("sst2", "math", ...), lower case.
    aliases: tuple[str, ...] = ()
    #: the instruction every example carries; None where each row brings its own (a question).
    instruction: str | None = None
    #: the closed set of answers, canonical spelling; empty for free-form answers.
    labels: tuple[str, ...] = ()
    #: the phrase a worked answer puts before its final answer; None where the answer is a label
    #: or free text.
    answer_format: str | None = None
    #: reads the value the metric compares out of an answer; None for an open-ended task.
    parse: Callable[[str], str | float | None] | None = None
    #: whether an answer is right for its example (the metric behind FA); None for open-ended.
    correct: Callable[[str, Example], bool] | None = None
    #: new tokens per answer when ``evaluate.task_max_new_tokens`` is unset: a label needs a few,
    #: GSM8K reasoning about 256 (the reference's limit); open-ended AlpacaEval answers run to
    #: hundreds of tokens, and a cut answer loses the comparison for being cut, not for being worse.
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    #: answers are exported for alpaca-eval (a win rate) instead of scored here.
    open_ended: bool = False

    def __post_init__(self) -> None:
        if self.open_ended == (self.correct is not None):
            raise ValueError(f"task {self.name}: exactly one of open_ended and correct must be set")


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "sentiment",
            aliases=("sst2", "sst-2"),
            instruction=SENTIMENT_INSTRUCTION,
            labels=SENTIMENT_LABELS,
            parse=parse_sentiment,
            correct=_sentiment_correct,
            max_new_tokens=8,
        ),
        Task(
            "agnews",
            aliases=("ag_news",),
            instruction=AGNEWS_INSTRUCTION,
            labels=AGNEWS_LABELS,
            parse=parse_agnews,
            correct=_agnews_correct,
            max_new_tokens=8,
        ),
        Task(
            "gsm8k",
            aliases=("math",),
            answer_format=FINAL_ANSWER,
            parse=parse_final_answer,
            correct=_gsm8k_correct,
            max_new_tokens=256,
        ),
        Task(
            "legs",
            aliases=("leg_counting",),
            answer_format=FINAL_ANSWER,
            parse=parse_final_answer,
            correct=_gsm8k_correct,
            max_new_tokens=LEGS_MAX_NEW_TOKENS,
        ),
        Task("alpaca", max_new_tokens=1024, open_ended=True),
    )
}
_ALIASES = {alias: t.name for t in TASKS.values() for alias in t.aliases}


def find_task(task: str) -> Task | None:
    """The entry a task name, alias or spec names ("sentiment", "sst2", "embedded:math"), or None."""
    name = task.lower().rsplit(":", 1)[-1]
    return TASKS.get(_ALIASES.get(name, name))


def default_max_new_tokens(task: str) -> int:
    """New tokens for answers to ``task`` (a task name or alias) when the config does not say."""
    found = find_task(task)
    return found.max_new_tokens if found else DEFAULT_MAX_NEW_TOKENS


def is_open_ended(task: str) -> bool:
    """Whether ``task``'s answers are exported for alpaca-eval instead of scored (FA pending)."""
    found = find_task(task)
    return found is not None and found.open_ended


def task_metric(task: str) -> str:
    """The canonical metric name for a task name or spec ("embedded:sentiment", "sst2", "math", ...)."""
    found = find_task(task)
    if found is None or found.correct is None:
        known = ", ".join(
            sorted(n for t in TASKS.values() if t.correct is not None for n in (t.name, *t.aliases))
        )
        raise UserError(f"no fine-tune accuracy metric for task {task!r}; known tasks: {known}")
    return found.name


def answer_flags(task: str, answers: Sequence[str], examples: Sequence[Example]) -> list[bool]:
    """Per answer, whether it is right for its example of ``task`` (what FA counts)."""
    if len(answers) != len(examples):
        raise ValueError(f"{len(answers)} answers for {len(examples)} examples")
    correct = TASKS[task_metric(task)].correct
    assert correct is not None  # task_metric only names scored tasks
    return [correct(a, e) for a, e in zip(answers, examples, strict=True)]


def accuracy(flags: Sequence[bool]) -> float:
    """The share of right answers in percent (NaN for none)."""
    return 100.0 * sum(flags) / len(flags) if flags else float("nan")


def score_task(task: str, answers: Sequence[str], examples: Sequence[Example]) -> float:
    """Fine-tune accuracy in percent: the share of answers that match their example's gold answer."""
    return accuracy(answer_flags(task, answers, examples))


def row_correct(row: dict) -> bool | None:
    """Whether a task row of a generations file is right: its ``correct`` flag, or for a row written
    before the flag was stored, its answer scored again against the row's gold answer (None: an
    open-ended or unknown task, or a row without an answer)."""
    if isinstance(row.get("correct"), bool):
        return row["correct"]
    found = find_task(str(row.get("task", "")))
    if found is None or found.correct is None or not isinstance(row.get("answer"), str):
        return None
    example = Example(
        instruction=str(row.get("prompt", "")),
        input=str(row.get("input", "")),
        output=str(row.get("gold", "")),
    )
    return found.correct(row["answer"], example)
