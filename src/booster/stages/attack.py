"""Attack stage: the user's fine-tuning on n task samples, a fraction p of them harmful.

``single_lora`` (the paper's setting) keeps training the aligned adapter; ``double_lora`` folds
the aligned adapter into the weights and trains a fresh one. Same outputs as the align stage.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from booster.config import RunConfig, dump_config
from booster.data.template import tokenize_examples
from booster.stages.align import StageResult, align_dir, fingerprint, model_recipe
from booster.stages.common import (
    JsonlMetrics,
    last_checkpoint,
    read_done,
    replace_dir,
    training_kwargs,
    write_json_atomic,
    write_text_atomic,
)


def attack_settings(config: RunConfig, ratio: float) -> dict:
    attack = dataclasses.asdict(config.attack)
    attack.pop("poison_ratios")
    attack["poison_ratio"] = ratio
    return attack


def attack_dir(config: RunConfig, method: str, seed: int, ratio: float, root: Path | None = None) -> Path:
    root = Path(root or config.output_dir)
    aligned = align_dir(config, method, seed, root).name
    return (
        root
        / "attack"
        / f"{method}-seed{seed}-p{ratio:g}-{fingerprint(aligned, attack_settings(config, ratio))}"
    )


def run_attack(
    config: RunConfig, method: str, seed: int, ratio: float, root: Path | None = None, progress: bool = True
) -> StageResult:
    """Fine-tune the aligned model of (method, seed) on task data with poison ratio ``ratio``."""
    root = Path(root or config.output_dir)
    stage = attack_dir(config, method, seed, ratio, root)
    done = read_done(stage)
    if done is not None:
        return StageResult(stage, True, done)
    aligned = read_done(align_dir(config, method, seed, root))
    if aligned is None:
        from booster.stages.align import run_align

        aligned = run_align(config, method, seed, root, progress).info

    from transformers import set_seed

    from booster.data.mixing import mix_poison
    from booster.data.sources import load_poison, load_task
    from booster.models import add_lora, load_trained, save_model
    from booster.training import LMTrainer

    cfg = config.attack
    started = time.time()
    set_seed(seed)
    recipe = aligned["recipe"]
    if cfg.mode == "single_lora" or "full" in recipe:
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
    dataset = tokenize_examples(mixed, tokenizer, cfg.max_length)

    stage.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stage / "config.yaml", dump_config(config))
    checkpoints = stage / "checkpoints"
    from transformers import TrainingArguments

    trainer = LMTrainer(
        model=model,
        args=TrainingArguments(**training_kwargs(cfg, checkpoints, seed, progress)),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.add_callback(JsonlMetrics(stage / "metrics.jsonl"))
    resume = last_checkpoint(checkpoints)
    output = trainer.train(resume_from_checkpoint=resume)

    tmp = stage / "model.tmp"
    save_model(trainer.model, tokenizer, tmp)
    replace_dir(tmp, stage / "model")
    shutil.rmtree(checkpoints, ignore_errors=True)
    info = {
        "stage": "attack",
        "method": method,
        "seed": seed,
        "poison_ratio": ratio,
        "mode": cfg.mode,
        "samples": len(dataset),
        "harmful_samples": sum(1 for e in mixed if e.kind == "harmful"),
        "steps": trainer.state.global_step,
        "train_loss": output.training_loss,
        "seconds": round(time.time() - started, 2),
        "seconds_per_step": round(
            output.metrics.get("train_runtime", 0.0) / max(trainer.state.global_step, 1), 4
        ),
        "resumed_from": resume,
        "recipe": model_recipe(config, stage / "model", root, merge=merged),
    }
    write_json_atomic(stage / "done.json", info)
    return StageResult(stage, False, info)
