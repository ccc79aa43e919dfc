"""Attack stage: the user's fine-tuning on n task samples, a fraction p of them harmful.

``single_lora`` (the paper's setting) keeps training the aligned adapter; ``double_lora`` folds
the aligned adapter into the weights and trains a fresh one. Same outputs as the align stage.
A fine-tuning-stage defense changes this stage: Lisa's trainer, or the provider's refusal pairs
mixed into the user's data (``+mix``). A post-fine-tuning defense (``+antidote``) runs the attack
of the method it extends and repairs its model afterwards (:mod:`booster.stages.repair`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from booster.config import RunConfig, dump_config, settings_dict
from booster.data.mixing import mix_poison, mix_safety
from booster.data.sources import load_alignment, load_poison, load_probe, load_task
from booster.data.template import tokenize_examples
from booster.errors import warn
from booster.evaluation.probe import HarmfulLossProbe, probe_summary
from booster.methods.registry import attack_method, attack_mode, get_method, method_settings
from booster.models import add_lora, load_trained
from booster.passthrough import training_kwargs
from booster.stages.align import align_dir, fingerprint, model_recipe, run_align, with_data_versions
from booster.stages.common import (
    StageResult,
    finish_stage,
    run_after,
    save_trained,
    train_stage,
    watch_training,
)
from booster.storage import (
    CHECKPOINTS,
    in_stage,
    is_main_process,
    main_process_first,
    resume_checkpoint,
    training_speed,
    write_text_atomic,
)
from booster.training import LMTrainer


def attack_settings(config: RunConfig, ratio: float, method: str | None = None) -> dict:
    attack = settings_dict(config.attack)
    if method is not None:  # a method's own attack hyperparameters (Lisa's) enter only its fingerprint
        method = attack_method(method)
        attack = method_settings(attack, method)
        # the mode that runs: `reference` shares the stage of the mode it resolves to
        attack["mode"] = attack_mode(config.attack.mode, method)
    attack.pop("poison_ratios")
    attack["poison_ratio"] = ratio
    read = (config.attack.task_data, config.attack.poison_data, config.attack.probe_data)
    # the safety mix's and Lisa's alignment data: in the aligned stage's fingerprint, which this one holds
    return with_data_versions(attack, *read)


def attack_dir(config: RunConfig, method: str, seed: int, ratio: float, root: Path | None = None) -> Path:
    root = Path(root or config.output_dir)
    method = attack_method(method)
    aligned = align_dir(config, method, seed, root).name
    return (
        root
        / "attack"
        / f"{method}-seed{seed}-p{ratio:g}-{fingerprint(aligned, attack_settings(config, ratio, method))}"
    )


def run_attack(
    config: RunConfig,
    method: str,
    seed: int,
    ratio: float,
    root: Path | None = None,
    progress: bool = True,
    wait: bool = True,
) -> StageResult:
    """Fine-tune the aligned model of (method, seed) on task data with poison ratio ``ratio``.

    The alignment is run (or its reuse checked) first. ``wait=False``: raise
    :class:`booster.storage.StageBusy` at once when another process is running this stage or
    the alignment it needs.
    """

    root = Path(root or config.output_dir)
    method = attack_method(method)
    stage = attack_dir(config, method, seed, ratio, root)

    def reused(done: dict[str, Any]) -> None:
        if config.attack.probe_data and "probe_loss_start" not in done and is_main_process():
            # the probe only measures, so it is not in the stage's fingerprint
            warn(
                f"{stage}: trained without the harmful-loss probe, so its probe values are missing; "
                "move the folder aside to train it again with the probe"
            )

    return run_after(
        stage,
        wait,
        lambda: run_align(config, method, seed, root, progress, wait),
        lambda aligned: _attack(config, method, seed, ratio, root, stage, aligned, progress),
        reused,
    )


def _attack(
    config: RunConfig,
    method: str,
    seed: int,
    ratio: float,
    root: Path,
    stage: Path,
    aligned: dict[str, Any],
    progress: bool,
) -> dict[str, Any]:
    """Train the stage (its lock held), resuming from its last checkpoint; returns its done info."""
    from transformers import set_seed  # heavy: loaded only where it is used, so light commands stay fast

    cfg = config.attack
    mode = attack_mode(cfg.mode, method)
    started = time.time()
    set_seed(seed)
    recipe = aligned["recipe"]
    with main_process_first():  # a GGUF is converted once, into a cache every rank shares
        if mode == "single_lora" or "full" in recipe:
            model, tokenizer = load_trained(config.model, recipe, root, seed=seed, trainable=True)
            merged: list[str] = list(recipe.get("merge", []))
        else:
            base_recipe = {"merge": [*recipe.get("merge", []), recipe["adapter"]]}
            model, tokenizer = load_trained(config.model, base_recipe, root, seed=seed)
            model = add_lora(model, config.model.lora)
            merged = base_recipe["merge"]

    task = load_task(cfg.task_data, "train", seed=seed)
    poison = load_poison(cfg.poison_data, seed=seed)
    mixed = mix_poison(task, poison, n=cfg.samples, ratio=ratio, seed=seed)
    spec = get_method(method)
    safety = 0
    if spec.mixes_safety_data:  # the provider's refusal pairs, added to the user's n samples
        pool = load_alignment(config.align.alignment_data, limit=config.align.alignment_samples, seed=seed)
        mixed = mix_safety(mixed, pool, cfg.safety_mix_ratio, seed)
        safety = len(mixed) - cfg.samples
    dataset = tokenize_examples(mixed, tokenizer, cfg.max_length, config.model.template)

    if is_main_process():
        stage.mkdir(parents=True, exist_ok=True)
        write_text_atomic(stage / "config.yaml", dump_config(config))
    checkpoints = stage / CHECKPOINTS
    from transformers import (
        TrainingArguments,  # heavy: loaded only where it is used, so light commands stay fast
    )

    build_attack_trainer = spec.build_attack_trainer
    if build_attack_trainer is not None:  # a fine-tuning-stage defense (Lisa) also trains on alignment data
        alignment = load_alignment(
            config.align.alignment_data, limit=config.align.alignment_samples, seed=seed
        )
        trainer = build_attack_trainer(
            model,
            tokenizer,
            training_kwargs(cfg, checkpoints, seed, progress),
            dataset,
            tokenize_examples(alignment, tokenizer, cfg.max_length, config.model.template),
            cfg,
        )
    else:
        trainer = LMTrainer(
            model=model,
            args=TrainingArguments(**training_kwargs(cfg, checkpoints, seed, progress)),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    watch_training(trainer, stage, f"attack {method} seed {seed} p={ratio:g}", progress)
    if cfg.probe_data:
        probe = load_probe(cfg.probe_data, limit=cfg.probe_samples, seed=0)  # the same pairs for every run
        probe_dataset = tokenize_examples(probe, tokenizer, cfg.max_length, config.model.template)
        trainer.add_callback(
            HarmfulLossProbe(trainer, probe_dataset, cfg.batch_size, cfg.probe_every, cfg.group_by_length)
        )
    resume = resume_checkpoint(stage)
    output = train_stage(trainer, resume, cfg.compile)

    save_trained(trainer, tokenizer, stage / "model")
    info = {
        "stage": "attack",
        "method": method,
        "seed": seed,
        "poison_ratio": ratio,
        "mode": mode,
        "samples": len(dataset) - safety,  # the user's n; the provider's refusal pairs are counted apart
        "harmful_samples": sum(1 for e in mixed if e.kind == "harmful"),
        "safety_samples": safety,
        "steps": trainer.state.global_step,
        "train_loss": output.training_loss,
        "seconds": round(time.time() - started, 2),
        **training_speed(output.metrics.get("train_runtime", 0.0), trainer.state.global_step, resume),
        "resumed_from": in_stage(resume, stage),
        "recipe": model_recipe(config, stage / "model", root, merge=merged),
    }

    info.update(probe_summary(trainer.state.log_history) or {})
    return finish_stage(trainer, stage, info, depends=[root / m for m in merged])
