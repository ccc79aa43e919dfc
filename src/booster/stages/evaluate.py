"""Evaluation stage: harmful score on held-out harmful prompts and fine-tune accuracy on the task.

Generations are stored next to the scores (``generations.jsonl``), never printed: they may hold
harmful text. A finished evaluation is reused when the model and the evaluation settings match.
An open-ended task (Alpaca / AlpacaEval) is not scored here: its answers are exported for
alpaca-eval and FA stays None, marked pending (see :mod:`booster.evaluation.alpaca_eval`).

The evaluation file records the size and sha256 of the files the evaluation wrote (``files``); an
evaluation file that is cut or unreadable, or whose generations changed, is moved aside with one
warning line and the model is evaluated again. One process at a time evaluates a model with given
settings (a lock per evaluation file).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from booster.config import RunConfig, settings_dict
from booster.data.records import Example
from booster.errors import UserError
from booster.stages.align import fingerprint
from booster.stages.common import (
    check_files,
    claimed,
    file_records,
    from_main,
    is_main_process,
    move_aside,
    read_done,
    read_json,
    remove_orphans,
    warn,
    write_json_atomic,
    write_text_atomic,
)

#: the key of an evaluation file that holds the hashes of its outputs (not a metric).
FILES = "files"


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


def alpaca_eval_reference_file(outputs: Path) -> Path:
    return outputs.with_name(outputs.name.replace("alpaca_eval-", "alpaca_eval_reference-", 1))


def evaluation_outputs(evaluation: Path) -> list[Path]:
    """The files an evaluation may write next to its evaluation file."""
    generations = generations_file(evaluation)
    outputs = alpaca_eval_file(generations)
    return [generations, outputs, alpaca_eval_reference_file(outputs)]


def evaluation_lock(evaluation: Path) -> Path:
    return evaluation.with_name(f".{evaluation.stem}.lock")


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
        reference = alpaca_eval_reference_file(outputs)
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


def metrics_only(result: dict) -> dict:
    """An evaluation file's content without the hashes of its outputs."""
    return {k: v for k, v in result.items() if k != FILES}


def read_evaluation(config: RunConfig, stage_dir: Path, task_spec: str | None) -> dict | None:
    """The stored metrics of a finished evaluation as written (None: none, or unreadable)."""
    result = read_json(evaluation_file(config, stage_dir, task_spec))
    return metrics_only(result) if isinstance(result, dict) else None


def verified_evaluation(path: Path) -> dict | None:
    """The evaluation file when it is whole and the outputs it vouches for check out, else None.

    Main process, evaluation lock held. A damaged evaluation is moved aside (with its outputs) with
    one warning line. A file from before hashes were recorded is trusted and gets them now.
    """
    if not path.exists():
        return None
    result = read_json(path)
    if not isinstance(result, dict):
        problem = f"{path.name} is empty, cut or unreadable"
    elif FILES in result:
        problem = check_files(path.parent, result[FILES])
    else:
        result[FILES] = file_records(path.parent, [p for p in evaluation_outputs(path) if p.is_file()])
        write_json_atomic(path, result)
        return result
    if problem is None:
        return result
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = [move_aside(p, stamp=stamp) for p in [path, *evaluation_outputs(path)] if p.exists()]
    warn(f"{path}: {problem}; moved it aside to {aside[0].name} and evaluating again")
    return None


def run_evaluate(
    config: RunConfig,
    stage_dir: Path,
    root: Path,
    task_spec: str | None,
    progress: bool = True,
    wait: bool = True,
) -> tuple[dict, bool]:
    """Evaluate the model a finished stage saved; returns (metrics, reused).

    ``wait=False``: raise :class:`booster.stages.common.StageBusy` at once when another process is
    running this evaluation.
    """
    path = evaluation_file(config, stage_dir, task_spec)
    with claimed(evaluation_lock(path), path, wait):
        result = from_main(verified_evaluation(path) if is_main_process() else None)
        if result is not None:
            return metrics_only(result), True
        done = read_done(stage_dir)
        if done is None:
            raise UserError(f"{stage_dir}: the stage is not finished; run `booster run` to finish it")
        if is_main_process():
            for output in [path, *evaluation_outputs(path)]:
                remove_orphans(path.parent, f".{output.name}.*.tmp")
        from booster.evaluation.harmful_score import check_finite_weights
        from booster.models import load_trained

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
        from booster import provenance

        result["provenance"] = provenance.record(model, config, stage_dir, root)
        if is_main_process():
            outputs = [p for p in evaluation_outputs(path) if p.is_file()]
            write_json_atomic(path, {**result, FILES: file_records(path.parent, outputs)})
    return result, False
