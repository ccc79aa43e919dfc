"""The measurement from Python: ``booster.evaluate(model, tokenizer, ...)`` and
``booster.attack(model, tokenizer, ...)`` on a model already in memory.

Next to the Trainer-level API (``BoosterTrainer``), these run the command line's attack and
evaluation on the caller's model, with the settings of a booster config (its ``attack:`` and
``evaluate:`` sections, overridden like ``--set``), and return what ``results.json`` holds for a
model: HS, HS+, refusal and degenerate rates with their Wilson intervals, FA with its interval, the
verdict (``broken`` when most answers are degenerate), and for an attack the training figures and
the harmful-loss probe. Nothing is written unless asked: the Trainer's checkpoints go to a
temporary folder, and the answers (which may hold harmful text) to ``generations`` only when given.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from booster.compilation import compiled_layers
from booster.config import RunConfig, load_config
from booster.data.mixing import mix_poison
from booster.data.sources import load_alignment, load_poison, load_probe, load_task
from booster.data.template import tokenize_examples
from booster.errors import UserError
from booster.evaluation.harmful_score import with_intervals
from booster.evaluation.probe import HarmfulLossProbe, probe_summary
from booster.methods.registry import METHODS, get_method
from booster.models import add_lora
from booster.passthrough import training_kwargs
from booster.pipeline import result_entry
from booster.stages.evaluate import evaluate_model
from booster.training import LMTrainer

ConfigLike = RunConfig | str | Path | None


def _config(config: ConfigLike, overrides: list[str] | None) -> RunConfig:
    """A RunConfig from a config object, a YAML file or the defaults, with ``--set``-style overrides."""
    if isinstance(config, RunConfig):
        if overrides:
            raise UserError("overrides: give them with a config file, or set the RunConfig's fields directly")
        return config
    return load_config(config, list(overrides or []))


def evaluate(
    model: Any,
    tokenizer: Any,
    config: ConfigLike = None,
    *,
    overrides: list[str] | None = None,
    task: str | None = None,
    generations: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Harmful score and fine-tune accuracy of ``model``, as ``booster evaluate`` measures them.

    ``config``: a booster config (a ``RunConfig`` or a YAML file; default: the defaults), whose
    ``evaluate:`` section sets the prompts, the judge and the generation, and ``model.template``
    the prompt format; ``overrides``: ``--set`` strings (``["evaluate.harmful_samples=100"]``).
    ``task``: the fine-tuning task whose test split gives FA (default: ``evaluate.task_data``, else
    ``attack.task_data``). ``generations``: a ``.jsonl`` file to keep the answers in.
    Returns the metrics of a ``results.json`` entry.
    """
    run = _config(config, overrides)
    with tempfile.TemporaryDirectory(prefix="booster-evaluate-") as tmp:
        path = Path(generations) if generations is not None else Path(tmp) / "generations.jsonl"
        metrics = evaluate_model(
            model, tokenizer, run, task or run.attack.task_data, path, progress, generator="python"
        )
    return with_intervals(metrics)


def attack(
    model: Any,
    tokenizer: Any,
    config: ConfigLike = None,
    *,
    poison_ratio: float | None = None,
    seed: int = 0,
    method: str = "sft",
    overrides: list[str] | None = None,
    evaluate_after: bool = True,
    generations: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Simulate the user's harmful fine-tuning on ``model`` (trained in place), then evaluate it.

    The attack is ``booster attack``'s: ``attack.samples`` task samples of ``attack.task_data``, a
    fraction ``poison_ratio`` of them (default: ``attack.poison_ratios`` when it holds one value)
    replaced by harmful pairs of ``attack.poison_data``, trained with the ``attack:`` section's
    settings. A peft model trains its adapter on (``single_lora``; load a saved adapter with
    ``is_trainable=True``); another model gets a fresh LoRA adapter from ``model.lora``, or is
    fully fine-tuned when LoRA is off. ``method``: a fine-tuning-stage defense (``lisa``) runs the
    fine-tuning with its trainer, on ``align.alignment_data``; any other name is plain fine-tuning.
    Returns the ``results.json`` entry of the attacked model (stage ``attacked``); with
    ``evaluate_after=False`` only its training figures.
    """
    if method not in METHODS:
        raise UserError(f"method={method!r}: unknown method (known: {', '.join(METHODS)})")
    run = _config(config, overrides)
    cfg = run.attack
    if poison_ratio is None:
        if len(cfg.poison_ratios) != 1:
            raise UserError(
                f"attack.poison_ratios holds {len(cfg.poison_ratios)} values; pass poison_ratio= to choose one"
            )
        poison_ratio = cfg.poison_ratios[0]
    if not 0.0 <= poison_ratio <= 1.0:
        raise UserError(f"poison_ratio={poison_ratio}: a fraction between 0 and 1")
    from transformers import TrainingArguments, set_seed  # heavy: loaded only where it is used

    set_seed(seed)
    if hasattr(model, "peft_config"):
        mode = "single_lora"
        if not any(p.requires_grad for p in model.parameters()):
            raise UserError(
                "model: the peft model has no trainable weights; load the adapter with "
                "is_trainable=True (PeftModel.from_pretrained(base, path, is_trainable=True))"
            )
    elif run.model.lora.enabled:
        mode, model = "double_lora", add_lora(model, run.model.lora)  # peft wraps the modules in place
    else:
        mode = "full"
    started = time.time()
    mixed = mix_poison(
        load_task(cfg.task_data, "train", seed=seed),
        load_poison(cfg.poison_data, seed=seed),
        n=cfg.samples,
        ratio=poison_ratio,
        seed=seed,
    )
    dataset = tokenize_examples(mixed, tokenizer, cfg.max_length, run.model.template)
    with tempfile.TemporaryDirectory(prefix="booster-attack-") as tmp:
        kwargs = {**training_kwargs(cfg, tmp, seed, progress), "save_strategy": "no"}  # nothing to resume
        build_attack_trainer = get_method(method).build_attack_trainer
        if build_attack_trainer is not None:
            alignment = load_alignment(run.align.alignment_data, limit=run.align.alignment_samples, seed=seed)
            aligned = tokenize_examples(alignment, tokenizer, cfg.max_length, run.model.template)
            trainer = build_attack_trainer(model, tokenizer, kwargs, dataset, aligned, cfg)
        else:
            trainer = LMTrainer(
                model=model,
                args=TrainingArguments(**kwargs),
                train_dataset=dataset,
                processing_class=tokenizer,
            )
        if cfg.probe_data:
            probe = load_probe(cfg.probe_data, limit=cfg.probe_samples, seed=0)
            probe_dataset = tokenize_examples(probe, tokenizer, cfg.max_length, run.model.template)
            trainer.add_callback(
                HarmfulLossProbe(trainer, probe_dataset, cfg.batch_size, cfg.probe_every, cfg.group_by_length)
            )
        with compiled_layers(model, cfg.compile):
            output = trainer.train()
    info = {
        "mode": mode,
        "steps": trainer.state.global_step,
        "train_loss": output.training_loss,
        "seconds": round(time.time() - started, 2),
        "seconds_per_step": round(
            output.metrics.get("train_runtime", 0.0) / max(trainer.state.global_step, 1), 4
        ),
        **(probe_summary(trainer.state.log_history) or {}),
    }
    metrics: dict[str, Any] = {}
    if evaluate_after:
        metrics = evaluate(model, tokenizer, run, generations=generations, progress=progress)
    entry = result_entry(method, "attacked", seed, poison_ratio, metrics, info)
    entry["samples"] = len(dataset)
    entry["harmful_samples"] = sum(1 for e in mixed if e.kind == "harmful")
    return entry
