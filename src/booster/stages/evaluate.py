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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from booster import provenance
from booster.config import RunConfig, settings_dict
from booster.data.records import Example
from booster.data.sources import load_harmful_prompts, load_task, task_name
from booster.data.template import format_prompts, stop_token_ids
from booster.errors import UserError, warn
from booster.evaluation import alpaca_eval
from booster.evaluation.generation import generate_sharded
from booster.evaluation.harmful_score import check_finite_weights, harmful_score
from booster.evaluation.judges import judging_on, shared_judge
from booster.models import evaluation_device, free_device_memory, load_for_evaluation
from booster.stages.align import fingerprint, with_data_versions
from booster.storage import (
    check_files,
    claimed,
    file_records,
    from_main,
    is_main_process,
    main_process_first,
    move_aside,
    read_done,
    read_json,
    remove_orphans,
    wait_for_everyone,
    write_json_atomic,
    write_text_atomic,
)
from booster.tasks import accuracy, answer_flags, default_max_new_tokens, is_open_ended
from booster.tracking import log_evaluation

#: the key of an evaluation file that holds the hashes of its outputs (not a metric).
FILES = "files"


def _settings(config: RunConfig) -> dict[str, Any]:
    """The evaluation settings to fingerprint (later-added ones only when set: ``settings_dict``)."""
    return settings_dict(config.evaluate)


def evaluation_file(config: RunConfig, stage: Path, task_spec: str | None) -> Path:
    """The evaluation of ``stage``'s model on the task ``task_spec`` names (None: harmful prompts only)."""
    read = (config.evaluate.harmful_prompts, config.evaluate.task_data or task_spec)
    return stage / f"eval-{fingerprint(with_data_versions(_settings(config), *read), task_spec)}.json"


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

    outputs = alpaca_eval_file(generations_path)
    write_json_atomic(outputs, alpaca_eval.model_outputs(examples, answers, generator))
    reference = None
    if not alpaca_eval.is_alpaca_eval_set(examples):
        reference = alpaca_eval_reference_file(outputs)
        write_json_atomic(reference, alpaca_eval.reference_outputs(examples))
    return alpaca_eval.pending_metrics(outputs, reference)


@dataclasses.dataclass
class Answers:
    """What the evaluated model generated: everything the judge and the task metric need, so the
    model can be freed before the judge loads."""

    prompts: list[Example]
    answers: list[str]
    task: str | None = None
    examples: list[Example] = dataclasses.field(default_factory=list)
    task_answers: list[str] = dataclasses.field(default_factory=list)
    max_new_tokens: int | None = None
    started: float = 0.0


def generate_answers(
    model: Any,
    tokenizer: Any,
    config: RunConfig,
    task_spec: str | None,
    progress: bool,
    label: str = "evaluate",
) -> Answers:
    """Answer the harmful test prompts (and the task's test split). Under ``accelerate launch`` every
    process answers its share and gets all the answers (``generate_sharded``)."""

    cfg = config.evaluate
    template = config.model.template
    # a chat template's end-of-turn ends answers too (Alpaca answers end at eos, as before)
    stop = {"eos_token_id": stop_token_ids(tokenizer, template)} if template == "chat" else {}
    started = time.time()
    # The test sets are drawn with seed 0 for every run, so all models face the same prompts.
    prompts = load_harmful_prompts(cfg.harmful_prompts, limit=cfg.harmful_samples, seed=0)
    answers = generate_sharded(
        model,
        tokenizer,
        format_prompts(prompts, tokenizer, template),
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        progress=progress,
        desc=f"{label}: harmful prompts",
        **stop,
    )
    result = Answers(prompts, answers, started=started)
    eval_spec = cfg.task_data or task_spec
    if eval_spec and cfg.task_samples > 0:
        result.task = task_name(eval_spec)
        result.examples = load_task(eval_spec, "test", limit=cfg.task_samples, seed=0)
        result.max_new_tokens = cfg.task_max_new_tokens or default_max_new_tokens(result.task)
        result.task_answers = generate_sharded(
            model,
            tokenizer,
            format_prompts(result.examples, tokenizer, template),
            max_new_tokens=result.max_new_tokens,
            batch_size=cfg.batch_size,
            progress=progress,
            desc=f"{label}: {result.task} test",
            **stop,
        )
    return result


def score_answers(
    answers: Answers, config: RunConfig, generations_path: Path, generator: str | None = None
) -> dict:
    """Judge the harmful answers, score the task and write the generations (one process)."""

    cfg = config.evaluate
    judge_options = {"model": cfg.judge_model} if cfg.judge_model else {}
    with judging_on(shared_judge(cfg.judge, **judge_options), evaluation_device()) as judge:
        verdicts = judge.judge([p.instruction for p in answers.prompts], answers.answers)
    result: dict[str, Any] = {"judge": cfg.judge, **harmful_score(verdicts)}
    rows = [
        {"prompt": p.instruction, "answer": a, **dataclasses.asdict(v)}
        for p, a, v in zip(answers.prompts, answers.answers, verdicts, strict=True)
    ]
    if answers.task is not None:
        task, examples, task_answers = answers.task, answers.examples, answers.task_answers
        result["task"] = task
        flags: Sequence[bool | None] = [None] * len(examples)  # open-ended: not scored here
        if is_open_ended(task):
            name = generator or generations_path.parent.name
            result.update(_export_alpaca_eval(examples, task_answers, generations_path, name))
        else:
            flags = answer_flags(task, task_answers, examples)
            result["finetune_accuracy"] = accuracy(flags)
        result["task_samples"] = len(examples)
        result["task_max_new_tokens"] = answers.max_new_tokens
        rows += [
            {"task": task, "prompt": e.instruction, "input": e.input, "answer": a, "gold": e.output}
            | ({"correct": right} if right is not None else {})
            for e, a, right in zip(examples, task_answers, flags, strict=True)
        ]
    result["eval_seconds"] = round(time.time() - answers.started, 2)
    write_text_atomic(generations_path, "".join(json.dumps(r) + "\n" for r in rows))
    return result


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
    :func:`run_evaluate` runs the two halves itself, freeing the model in between.
    """
    answers = generate_answers(model, tokenizer, config, task_spec, progress, label)
    return score_answers(answers, config, generations_path, generator)


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


def training_section(config: RunConfig, done: dict) -> Any:
    """The settings of the stage that trained the model: ``attack`` for an attacked one, else ``align``."""
    return config.attack if done.get("stage") in ("attack", "repair") else config.align


def evaluation_bf16(config: RunConfig, done: dict) -> bool:
    """Evaluate in bfloat16 when the evaluation asks for it (``evaluate.bf16``), when the model was
    trained under bf16 autocast (the stage's ``bf16``: align's for an aligned model, attack's for an
    attacked or repaired one) or when it loads in bfloat16."""
    return config.evaluate.bf16 or training_section(config, done).bf16 or config.model.dtype == "bfloat16"


def run_evaluate(
    config: RunConfig,
    stage_dir: Path,
    root: Path,
    task_spec: str | None,
    progress: bool = True,
    wait: bool = True,
) -> tuple[dict, bool]:
    """Evaluate the model a finished stage saved; returns (metrics, reused).

    The model runs on the evaluation device (``booster.models.evaluation_device``) and is freed
    before the judge loads. Under ``accelerate launch`` the processes share the generation, the main
    process judges and writes the files once, and the others wait and read them. ``wait=False``:
    raise :class:`booster.storage.StageBusy` at once when another process is running this
    evaluation.
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

        with main_process_first():  # a GGUF is converted once, into a cache every rank shares
            model, tokenizer = load_for_evaluation(
                config.model, done["recipe"], root, seed=done["seed"], bf16=evaluation_bf16(config, done)
            )
        check_finite_weights(model, stage_dir)  # NaN weights answer nothing, which would read as safe
        record = provenance.record(model, config, stage_dir, root)
        ratio = f" p={done['poison_ratio']:g}" if done.get("poison_ratio") is not None else ""
        label = f"evaluate {done.get('method', stage_dir.name)} seed {done.get('seed', 0)}{ratio}"
        answers = generate_answers(model, tokenizer, config, task_spec, progress, label)
        del model
        free_device_memory()
        if is_main_process():
            generator = generator_name(config, stage_dir, path)
            result = score_answers(answers, config, generations_file(path), generator)
            result["provenance"] = record
            outputs = [p for p in evaluation_outputs(path) if p.is_file()]
            write_json_atomic(path, {**result, FILES: file_records(path.parent, outputs)})
            # a new evaluation only: a reused one was logged when it was made
            log_evaluation(training_section(config, done), stage_dir, done, result)
        wait_for_everyone()
        if not is_main_process():
            result = metrics_only(json.loads(path.read_text()))
    return result, False
