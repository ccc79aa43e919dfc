"""AlpacaEval export: FA on open-ended instructions is a judge's win rate, computed outside booster.

The paper's FA for Alpaca fine-tuning is the AlpacaEval win rate, which needs a paid LLM judge
(AlpacaEval 2.0 defaults to GPT-4 Turbo). Evaluation therefore writes the answers in the file the
``alpaca-eval`` package reads as ``--model_outputs`` (a JSON list of objects with ``instruction``,
``output``, ``generator`` and, where the eval set has it, ``dataset``), records FA as pending and
gives the command that computes it. No number is made up here.

An eval set in AlpacaEval's schema is judged against the package's own reference outputs. Any other
open-ended test split (e.g. held-out rows of a local Alpaca file) gets a second file with its gold
outputs as the reference, since the package pairs the two files by instruction; an ``input`` is
folded into the instruction there so that the judge sees it and the pairing stays one-to-one.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from booster.data.records import Example

#: AlpacaEval 2.0's default annotator (length-controlled win rate against GPT-4 Turbo's outputs).
ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
#: what ``finetune_accuracy_pending`` says is missing.
PENDING = "alpaca-eval win rate"


def is_alpaca_eval_set(examples: Sequence[Example]) -> bool:
    """Rows in AlpacaEval's schema (each carries the ``generator`` of its reference output)."""
    return bool(examples) and all("generator" in e.meta for e in examples)


def _instruction(example: Example, fold_input: bool) -> str:
    if fold_input and example.input.strip():
        return f"{example.instruction}\n\n{example.input}"
    return example.instruction


def model_outputs(
    examples: Sequence[Example], answers: Sequence[str], generator: str
) -> list[dict[str, Any]]:
    """The ``--model_outputs`` rows: one per example, in order, all with the same ``generator``.

    alpaca-eval names the model on its leaderboard after the single ``generator`` of the file, and
    skips a name it has already judged, so ``generator`` must name this model and evaluation only.
    """
    if len(answers) != len(examples):
        raise ValueError(f"{len(answers)} answers for {len(examples)} examples")
    fold = not is_alpaca_eval_set(examples)
    rows = []
    for example, answer in zip(examples, answers, strict=True):
        row: dict[str, Any] = {
            "instruction": _instruction(example, fold),
            "output": answer.strip(),
            "generator": generator,
        }
        if example.meta.get("dataset") is not None:
            row["dataset"] = example.meta["dataset"]
        rows.append(row)
    return rows


def reference_outputs(examples: Sequence[Example]) -> list[dict[str, Any]]:
    """The eval set's own gold outputs as ``--reference_outputs`` (for sets other than AlpacaEval)."""
    return [
        {"instruction": _instruction(e, True), "output": e.output.strip(), "generator": "reference"}
        for e in examples
    ]


def command(outputs: Path | str, reference: Path | str | None = None) -> str:
    """The shell command that computes the win rate (needs ``pip install alpaca-eval`` and a judge key)."""
    parts = ["alpaca_eval", "--model_outputs", str(outputs)]
    if reference is not None:
        parts += ["--reference_outputs", str(reference)]
    parts += ["--annotators_config", ANNOTATOR]
    return shlex.join(parts)


def pending_metrics(outputs: Path | str, reference: Path | str | None = None) -> dict[str, Any]:
    """Metrics of an exported evaluation: FA is None until the judge has run."""
    metrics: dict[str, Any] = {
        "finetune_accuracy": None,
        "finetune_accuracy_pending": PENDING,
        "alpaca_eval_outputs": str(outputs),
    }
    if reference is not None:
        metrics["alpaca_eval_reference"] = str(reference)
    metrics["alpaca_eval_command"] = command(outputs, reference)
    return metrics


def pending_note(metrics: dict[str, Any]) -> str | None:
    """One line for the console when FA waits for alpaca-eval, else None."""
    cmd = metrics.get("alpaca_eval_command")
    if not cmd:
        return None
    return f"  FA pending ({metrics.get('finetune_accuracy_pending', PENDING)}); with a judge key (OPENAI_API_KEY) run: {cmd}"
