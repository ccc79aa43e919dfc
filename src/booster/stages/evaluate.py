"""Evaluation stage: harmful score on held-out harmful prompts and fine-tune accuracy on the task.

Generations are stored next to the scores (``generations.jsonl``), never printed: they may hold
harmful text. A finished evaluation is reused when the model and the evaluation settings match.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from booster.config import RunConfig
from booster.stages.align import fingerprint
from booster.stages.common import write_json_atomic, write_text_atomic


def evaluation_file(config: RunConfig, stage: Path, task_spec: str | None) -> Path:
    return stage / f"eval-{fingerprint(config.evaluate, task_spec)}.json"


def generations_file(evaluation: Path) -> Path:
    return evaluation.with_name(evaluation.stem.replace("eval-", "generations-") + ".jsonl")


def evaluate_model(
    model: Any,
    tokenizer: Any,
    config: RunConfig,
    task_spec: str | None,
    generations_path: Path,
    progress: bool,
) -> dict:
    """Generate on the harmful test prompts (and the task's test split), judge and score."""
    from booster.data.sources import load_harmful_prompts, load_task, task_name
    from booster.data.template import format_prompt
    from booster.evaluation.generation import generate
    from booster.evaluation.harmful_score import harmful_score
    from booster.evaluation.judges import get_judge
    from booster.evaluation.metrics import score_task

    cfg = config.evaluate
    started = time.time()
    # The test sets are drawn with seed 0 for every run, so all models face the same prompts.
    prompts = load_harmful_prompts(cfg.harmful_prompts, limit=cfg.harmful_samples, seed=0)
    answers = generate(
        model,
        tokenizer,
        [format_prompt(p.instruction, p.input) for p in prompts],
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        progress=progress,
    )
    judge_options = {"model": cfg.judge_model} if cfg.judge_model else {}
    judge = get_judge(cfg.judge, **judge_options)
    verdicts = judge.judge([p.instruction for p in prompts], answers)
    result: dict[str, Any] = {"judge": cfg.judge, **harmful_score(verdicts)}
    rows = [
        {"prompt": p.instruction, "answer": a, **dataclasses.asdict(v)}
        for p, a, v in zip(prompts, answers, verdicts, strict=True)
    ]

    if task_spec and cfg.task_samples > 0:
        task = task_name(task_spec)
        examples = load_task(task_spec, "test", limit=cfg.task_samples, seed=0)
        task_answers = generate(
            model,
            tokenizer,
            [format_prompt(e.instruction, e.input) for e in examples],
            max_new_tokens=cfg.task_max_new_tokens,
            batch_size=cfg.batch_size,
            progress=progress,
        )
        result["task"] = task
        result["finetune_accuracy"] = score_task(task, task_answers, examples)
        result["task_samples"] = len(examples)
        rows += [
            {"task": task, "prompt": e.instruction, "input": e.input, "answer": a, "gold": e.output}
            for e, a in zip(examples, task_answers, strict=True)
        ]
    result["eval_seconds"] = round(time.time() - started, 2)
    write_text_atomic(generations_path, "".join(json.dumps(r) + "\n" for r in rows))
    return result


def run_evaluate(
    config: RunConfig, stage_dir: Path, root: Path, task_spec: str | None, progress: bool = True
) -> tuple[dict, bool]:
    """Evaluate the model a finished stage saved; returns (metrics, reused)."""
    path = evaluation_file(config, stage_dir, task_spec)
    if path.exists():
        return json.loads(path.read_text()), True
    from booster.models import load_trained

    done = json.loads((stage_dir / "done.json").read_text())
    model, tokenizer = load_trained(config.model, done["recipe"], root, seed=done["seed"])
    result = evaluate_model(model, tokenizer, config, task_spec, generations_file(path), progress)
    write_json_atomic(path, result)
    return result, False
