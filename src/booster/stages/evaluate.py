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
from booster.stages.common import (
    is_main_process,
    main_process_first,
    wait_for_everyone,
    write_json_atomic,
    write_text_atomic,
)


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
    model: Any, tokenizer: Any, config: RunConfig, task_spec: str | None, progress: bool
) -> Answers:
    """Answer the harmful test prompts (and the task's test split). Under ``accelerate launch`` every
    process answers its share and gets all the answers (``generate_sharded``)."""
    from booster.data.sources import load_harmful_prompts, load_task, task_name
    from booster.data.template import format_prompts, stop_token_ids
    from booster.evaluation.generation import generate_sharded
    from booster.tasks import default_max_new_tokens

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
            **stop,
        )
    return result


def score_answers(
    answers: Answers, config: RunConfig, generations_path: Path, generator: str | None = None
) -> dict:
    """Judge the harmful answers, score the task and write the generations (one process)."""
    from booster.evaluation.harmful_score import harmful_score
    from booster.evaluation.judges import judging_on, shared_judge
    from booster.models import evaluation_device
    from booster.tasks import is_open_ended, score_task

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
        if is_open_ended(task):
            name = generator or generations_path.parent.name
            result.update(_export_alpaca_eval(examples, task_answers, generations_path, name))
        else:
            result["finetune_accuracy"] = score_task(task, task_answers, examples)
        result["task_samples"] = len(examples)
        result["task_max_new_tokens"] = answers.max_new_tokens
        rows += [
            {"task": task, "prompt": e.instruction, "input": e.input, "answer": a, "gold": e.output}
            for e, a in zip(examples, task_answers, strict=True)
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
) -> dict:
    """Generate on the harmful test prompts (and the task's test split), judge and score.

    The task's test set is ``evaluate.task_data`` when set (e.g. AlpacaEval for an Alpaca
    fine-tune from a local file), else ``task_spec``'s own test split. ``generator`` names the
    model in an alpaca-eval export (default: the folder the generations are written to).
    :func:`run_evaluate` runs the two halves itself, freeing the model in between.
    """
    answers = generate_answers(model, tokenizer, config, task_spec, progress)
    return score_answers(answers, config, generations_path, generator)


def evaluation_bf16(config: RunConfig, done: dict) -> bool:
    """Evaluate in bfloat16 when the model was trained under bf16 autocast (the stage's ``bf16``:
    align's for an aligned model, attack's for an attacked one) or loads in bfloat16."""
    section = config.attack if done.get("stage") == "attack" else config.align
    return section.bf16 or config.model.dtype == "bfloat16"


def run_evaluate(
    config: RunConfig, stage_dir: Path, root: Path, task_spec: str | None, progress: bool = True
) -> tuple[dict, bool]:
    """Evaluate the model a finished stage saved; returns (metrics, reused).

    The model runs on the evaluation device (``booster.models.evaluation_device``) and is freed
    before the judge loads. Under ``accelerate launch`` the processes share the generation, the main
    process judges and writes the files once, and the others wait and read them.
    """
    path = evaluation_file(config, stage_dir, task_spec)
    if path.exists():
        return json.loads(path.read_text()), True
    from booster.models import free_device_memory, load_for_evaluation

    done = json.loads((stage_dir / "done.json").read_text())
    with main_process_first():  # a GGUF is converted once, into a cache every rank shares
        model, tokenizer = load_for_evaluation(
            config.model, done["recipe"], root, seed=done["seed"], bf16=evaluation_bf16(config, done)
        )
    answers = generate_answers(model, tokenizer, config, task_spec, progress)
    del model
    free_device_memory()
    if is_main_process():
        generator = generator_name(config, stage_dir, path)
        result = score_answers(answers, config, generations_file(path), generator)
        write_json_atomic(path, result)
    wait_for_everyone()
    if not is_main_process():
        result = json.loads(path.read_text())
    return result, False
