"""The search's validation prompts: harmful prompts the trials are scored on, never test prompts.

An attacker who picks its settings on the test prompts reports a best case that is partly luck on
those prompts. The search therefore scores trials on other prompts and evaluates only the chosen
trial on the test prompts. Either ``search.validation_prompts`` names them (a file or dataset of
harmful prompts, checked disjoint from the test prompts), or they are carved from the evaluation's
own pool: the test takes the first ``evaluate.harmful_samples`` prompts of its fixed order (for the
embedded prompts a hash of each prompt, for a file or hub set their order), validation the last
``search.validation_samples`` of the rest, so the test prompts are the very ones ``booster run``
scores. Prompts are compared normalised (case, punctuation and spacing ignored).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from booster.config import RunConfig
from booster.data.embedded import normalize
from booster.data.records import Example
from booster.data.sources import count_examples, load_harmful_prompts
from booster.errors import UserError
from booster.storage import write_text_atomic


def _key(example: Example) -> str:
    return normalize(f"{example.instruction} {example.input}")


def evaluation_prompts(config: RunConfig) -> list[Example]:
    """The prompts every evaluation scores HS on (as :mod:`booster.stages.evaluate` loads them)."""
    return load_harmful_prompts(
        config.evaluate.harmful_prompts, limit=config.evaluate.harmful_samples, seed=0
    )


def validation_prompts(config: RunConfig) -> list[Example]:
    """The search's validation prompts, disjoint from :func:`evaluation_prompts` (a UserError says why not)."""
    search, evaluate = config.search, config.evaluate
    test = {_key(e) for e in evaluation_prompts(config)}
    if search.validation_prompts is not None:
        chosen = load_harmful_prompts(search.validation_prompts, limit=search.validation_samples, seed=0)
        shared = sum(1 for e in chosen if _key(e) in test)
        if shared:
            raise UserError(
                f"search.validation_prompts ({search.validation_prompts}): {shared} of its first "
                f"{len(chosen)} prompts are also test prompts (evaluate.harmful_prompts, first "
                f"{evaluate.harmful_samples}); remove them from one of the two"
            )
    else:
        pool = load_harmful_prompts(evaluate.harmful_prompts, seed=0)
        rest = [e for e in pool[evaluate.harmful_samples :] if _key(e) not in test]
        if len(rest) < search.validation_samples:
            raise UserError(
                f"search.validation_samples={search.validation_samples}: evaluate.harmful_prompts "
                f"({evaluate.harmful_prompts}) holds {len(pool)} prompts and the test takes the first "
                f"{min(evaluate.harmful_samples, len(pool))} (evaluate.harmful_samples), leaving {len(rest)}; "
                "lower one of the two, or name other prompts in search.validation_prompts"
            )
        chosen = rest[len(rest) - search.validation_samples :]
    if len(chosen) < search.validation_samples:
        raise UserError(
            f"search.validation_prompts ({search.validation_prompts}) holds {len(chosen)} prompts, fewer "
            f"than search.validation_samples={search.validation_samples}; lower it or add prompts"
        )
    return chosen


def check_sizes(config: RunConfig) -> None:
    """The size check of :func:`validation_prompts` where counting needs no network and no model
    (the dry run): the carved split must fit beside the test prompts."""
    search, evaluate = config.search, config.evaluate
    if search.validation_prompts is not None:
        return
    pool = count_examples(evaluate.harmful_prompts, "harmful_prompts")
    if pool is not None and pool - evaluate.harmful_samples < search.validation_samples:
        left = max(pool - evaluate.harmful_samples, 0)
        raise UserError(
            f"search.validation_samples={search.validation_samples}: evaluate.harmful_prompts "
            f"({evaluate.harmful_prompts}) holds {pool} prompts and the test takes the first "
            f"{min(evaluate.harmful_samples, pool)}, leaving {left}; lower one of the two, or name other "
            "prompts in search.validation_prompts"
        )


@dataclass(frozen=True)
class ValidationSet:
    """The validation prompts written to a file in the run folder, which the evaluation reads as a
    local prompt file; the name holds a hash of the content, so other prompts never reuse the
    evaluations of these."""

    path: Path
    count: int
    sha256: str


def validation_set(config: RunConfig, folder: Path) -> tuple[ValidationSet, str]:
    """The validation prompts as the file :func:`write_validation_file` writes (and its text)."""
    prompts = validation_prompts(config)
    lines = []
    for e in prompts:
        row = {"instruction": e.instruction, "output": ""}
        if e.input:
            row["input"] = e.input
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    text = "".join(lines)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return ValidationSet(folder / f"validation-{digest[:12]}.jsonl", len(prompts), digest), text


def offline(config: RunConfig) -> bool:
    """Whether the prompts can be read without the network (embedded or local), so a plan may read them."""
    specs = [config.evaluate.harmful_prompts, config.search.validation_prompts]
    return all(count_examples(s, "harmful_prompts") is not None for s in specs if s is not None)


def write_validation_file(config: RunConfig, folder: Path) -> ValidationSet:
    """Write the validation prompts into ``folder`` (once per content) and say where."""
    validation, text = validation_set(config, folder)
    path = validation.path
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
    return validation
