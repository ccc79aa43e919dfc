"""Evaluation stage: harmful score on held-out harmful prompts and fine-tune accuracy on the task.

Generations are stored next to the scores (``generations.jsonl``), never printed: they may hold
harmful text. A finished evaluation is reused when the model and the evaluation settings match.
An open-ended task (Alpaca / AlpacaEval) is not scored here: its answers are exported for
alpaca-eval and FA stays None, marked pending (see :mod:`booster.evaluation.alpaca_eval`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from booster.config import RunConfig, settings_dict
from booster.data.records import Example
from booster.stages.align import fingerprint
from booster.stages.common import write_json_atomic, write_text_atomic


def _settings(config: RunConfig) -> dict[str, Any]:
    """The evaluation settings to fingerprint (later-added ones only when set: ``settings_dict``)."""
    return settings_dict(config.evaluate)


def evaluation_file(config: RunConfig, stage: Path, task_spec: str | None) -> Path:
    return stage / f"eval-{fingerprint(_settings(config), task_spec)}.json"


def generations_file(evaluation: Path) -> Path:
    return evaluation.with_name(evaluation.stem.replace("eval-", "generations-") + ".jsonl")


def alpaca_eval_file(generations: Path) -> Path:
    """Where an open-ended task's answers go for alpaca-eval (it reads ``.json`` lists)."""
    return generations.with_name(f"alpaca_eval-{generations.stem.removeprefix('generations-')}.json")


def generator_name(config: RunConfig, stage: Path, evaluation: Path) -> str:
    """alpaca-eval's name for the evaluated model: base model, stage folder (method, seed, p, settings
    hash) and evaluation hash, so no two evaluated models share a leaderboard row."""
    model = Path(config.model.name).name or config.model.name
    return f"{model}-{stage.name}-{evaluation.stem}"


def _export_alpaca_eval(
    examples: list[Example], answers: list[str], generations_path: Path, generator: str
) -> dict:
    from booster.evaluation import alpaca_eval

    outputs = alpaca_eval_file(generations_path)
    write_json_atomic(outputs, alpaca_eval.model_outputs(examples, answers, generator))
    reference = None
    if not alpaca_eval.is_alpaca_eval_set(examples):
        reference = outputs.with_name(outputs.name.replace("alpaca_eval-", "alpaca_eval_reference-", 1))
        write_json_atomic(reference, alpaca_eval.reference_outputs(examples))
    return alpaca_eval.pending_metrics(outputs, reference)


def evaluate_model(
    model: Any,
    tokenizer: Any,
    config: RunConfig,
    task_spec: str | None,
    generations_path: Path,
    progress: bool,
    generator: str | None = None,
    label: str = "evaluate",
) -> dict:
    """Generate on the harmful test prompts (and the task's test split), judge and score.

    The task's test set is ``evaluate.task_data`` when set (e.g. AlpacaEval for an Alpaca
    fine-tune from a local file), else ``task_spec``'s own test split. ``generator`` names the
    model in an alpaca-eval export (default: the folder the generations are written to).
    """
    from booster.data.sources import load_harmful_prompts, load_task, task_name
    from booster.data.template import format_prompts, stop_token_ids
    from booster.evaluation.generation import generate
    from booster.evaluation.harmful_score import harmful_score
    from booster.evaluation.judges import get_judge
    from booster.tasks import default_max_new_tokens, is_open_ended, score_task

    cfg = config.evaluate
    template = config.model.template
    # a chat template's end-of-turn ends answers too (Alpaca answers end at eos, as before)
    stop = {"eos_token_id": stop_token_ids(tokenizer, template)} if template == "chat" else {}
    started = time.time()
    # The test sets are drawn with seed 0 for every run, so all models face the same prompts.
    prompts = load_harmful_prompts(cfg.harmful_prompts, limit=cfg.harmful_samples, seed=0)
    answers = generate(
        model,
        tokenizer,
        format_prompts(prompts, tokenizer, template),
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        progress=progress,
        desc=f"{label}: harmful prompts",
        **stop,
    )
    judge_options = {"model": cfg.judge_model} if cfg.judge_model else {}
    judge = get_judge(cfg.judge, **judge_options)
    verdicts = judge.judge([p.instruction for p in prompts], answers)
    result: dict[str, Any] = {"judge": cfg.judge, **harmful_score(verdicts)}
    rows = [
        {"prompt": p.instruction, "answer": a, **dataclasses.asdict(v)}
        for p, a, v in zip(prompts, answers, verdicts, strict=True)
    ]

    eval_spec = cfg.task_data or task_spec
    if eval_spec and cfg.task_samples > 0:
        task = task_name(eval_spec)
        examples = load_task(eval_spec, "test", limit=cfg.task_samples, seed=0)
        open_ended = is_open_ended(task)
        max_new_tokens = cfg.task_max_new_tokens or default_max_new_tokens(task)
        task_answers = generate(
            model,
            tokenizer,
            format_prompts(examples, tokenizer, template),
            max_new_tokens=max_new_tokens,
            batch_size=cfg.batch_size,
            progress=progress,
            desc=f"{label}: {task} test",
            **stop,
        )
        result["task"] = task
        if open_ended:
            name = generator or generations_path.parent.name
            result.update(_export_alpaca_eval(examples, task_answers, generations_path, name))
        else:
            result["finetune_accuracy"] = score_task(task, task_answers, examples)
        result["task_samples"] = len(examples)
        result["task_max_new_tokens"] = max_new_tokens
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
    from booster import provenance
    from booster.evaluation.harmful_score import check_finite_weights
    from booster.models import load_trained

    done = json.loads((stage_dir / "done.json").read_text())
    model, tokenizer = load_trained(config.model, done["recipe"], root, seed=done["seed"])
    check_finite_weights(model, stage_dir)  # NaN weights answer nothing, which would read as safe
    generator = generator_name(config, stage_dir, path)
    ratio = f" p={done['poison_ratio']:g}" if done.get("poison_ratio") is not None else ""
    label = f"evaluate {done['method']} seed {done['seed']}{ratio}"
    result = evaluate_model(
        model,
        tokenizer,
        config,
        task_spec,
        generations_file(path),
        progress,
        generator=generator,
        label=label,
    )
    result["provenance"] = provenance.record(model, config, stage_dir, root)
    write_json_atomic(path, result)
    return result, False
