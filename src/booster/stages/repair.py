"""Repair stage (post-fine-tuning): Antidote's pruning of the fine-tuned model, for the ``+antidote``
methods (:mod:`booster.methods.antidote`).

It runs after the attack of the method it extends (``sft+antidote`` repairs the model of SFT's
attack, which both share) and writes into ``repair/<method>-seed<s>-p<p>-<hash>``: the mask of the
zeroed weights (``mask.safetensors``, one bit per weight of the pruned layers, :mod:`booster.pruning`),
``config.yaml`` and ``done.json``. Its recipe is the attacked model's plus the mask, so evaluation
and export rebuild the repaired model from the attack's files and zero the masked weights: the stage
stores no copy of the model. ``done.json`` vouches for the mask and for the attacked model's files,
so a changed attack makes the repair run again; a finished repair is reused like any stage.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from booster.config import RunConfig, dump_config, settings_dict
from booster.data.sources import load_harmful
from booster.data.template import tokenize_examples
from booster.methods.antidote import antidote_masks, has_adapter
from booster.methods.registry import get_method
from booster.models import DTYPES, evaluation_device, free_device_memory, load_trained, merge_adapter
from booster.pruning import MASK_FILE, mask_bytes
from booster.stages.align import fingerprint, with_data_versions
from booster.stages.attack import attack_dir, run_attack
from booster.stages.common import StageResult, run_after
from booster.stages.evaluate import evaluation_bf16
from booster.storage import (
    DONE,
    file_records,
    folder_files,
    from_main,
    is_main_process,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from booster.training import default_collator


def repair_targets(config: RunConfig) -> list[str]:
    """The linear layers the repair prunes: ``repair.target_modules``, else the layers LoRA trains."""
    return list(config.repair.target_modules or config.model.lora.target_modules)


def repair_settings(config: RunConfig) -> dict[str, Any]:
    """What a repair depends on besides the attacked model (the layers as resolved)."""
    settings = settings_dict(config.repair)
    settings["target_modules"] = repair_targets(config)
    # merged was the only rule before the scope existed: its stages keep their folders
    if settings["scope"] == "merged":
        del settings["scope"]
    return with_data_versions(settings, config.repair.harmful_data)


def repair_dir(config: RunConfig, method: str, seed: int, ratio: float, root: Path | None = None) -> Path:
    root = Path(root or config.output_dir)
    attacked = attack_dir(config, method, seed, ratio, root).name
    repair = get_method(method).repair
    return (
        root
        / "repair"
        / f"{method}-seed{seed}-p{ratio:g}-{fingerprint(attacked, repair, repair_settings(config))}"
    )


def final_dir(config: RunConfig, method: str, seed: int, ratio: float, root: Path | None = None) -> Path:
    """The stage folder of the model a method leaves after the user's fine-tuning: the repair's for a
    post-fine-tuning defense, else the attack's. Its evaluation is the method's "attacked" entry."""
    if get_method(method).repair is not None:
        return repair_dir(config, method, seed, ratio, root)
    return attack_dir(config, method, seed, ratio, root)


def run_repair(
    config: RunConfig,
    method: str,
    seed: int,
    ratio: float,
    root: Path | None = None,
    progress: bool = True,
    wait: bool = True,
) -> StageResult:
    """Repair the attacked model of (method, seed, p); the attack is run (or its reuse checked) first.

    ``wait=False``: raise :class:`booster.storage.StageBusy` at once when another process is running
    this stage or the stages it needs.
    """
    root = Path(root or config.output_dir)
    stage = repair_dir(config, method, seed, ratio, root)
    return run_after(
        stage,
        wait,
        lambda: run_attack(config, method, seed, ratio, root, progress, wait),
        lambda attacked: from_main(
            _repair(config, method, seed, ratio, root, stage, attacked, progress)
            if is_main_process()
            else None
        ),
    )


def _repair(
    config: RunConfig,
    method: str,
    seed: int,
    ratio: float,
    root: Path,
    stage: Path,
    attacked: dict[str, Any],
    progress: bool,
) -> dict[str, Any]:
    """Score and mask the attacked model (main process, the stage's lock held); returns its done info."""
    cfg = config.repair
    started = time.time()
    recipe = attacked["recipe"]
    # The weights the evaluation of the repaired model sees (load_for_evaluation with a mask): the
    # adapter folded in at the load dtype, then cast. Only the main process runs this (the others
    # wait in from_main), so there is no rank-wide barrier here.
    model, tokenizer = load_trained(config.model, recipe, root, seed=seed)
    # adapter scope keeps the adapter apart (its own matrices are scored); merged folds it in
    scope = "adapter" if cfg.scope == "adapter" and has_adapter(model) else "merged"
    if scope == "merged":
        model = merge_adapter(model)
    dtype = torch.bfloat16 if evaluation_bf16(config, attacked) else DTYPES[config.model.dtype]
    model.to(device=evaluation_device(), dtype=dtype)
    model.eval()
    pairs = load_harmful(cfg.harmful_data, limit=cfg.harmful_samples, seed=seed)
    data = tokenize_examples(pairs, tokenizer, cfg.max_length, config.model.template)
    collate = default_collator(tokenizer)
    starts = range(0, len(data), cfg.batch_size)
    label = f"repair {method} seed {seed} p={ratio:g}"
    batches = (collate(data[i : i + cfg.batch_size]) for i in starts)
    bar = tqdm(batches, total=len(starts), desc=label, unit="batch", disable=not progress, leave=False)
    scoring = time.time()
    masks = antidote_masks(model, bar, repair_targets(config), cfg.prune_ratio, scope)
    scoring = time.time() - scoring
    del model
    free_device_memory()

    stage.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stage / "config.yaml", dump_config(config))
    write_bytes_atomic(stage / MASK_FILE, mask_bytes(masks))
    model_dirs = [recipe.get("full") or recipe["adapter"], *recipe.get("merge", [])]
    info = {
        "stage": "repair",
        "method": method,
        "seed": seed,
        "poison_ratio": ratio,
        "repair": get_method(method).repair,
        "prune_ratio": cfg.prune_ratio,
        "scope": scope,
        "realignment_samples": len(data),
        "pruned_layers": len(masks),
        "pruned_weights": sum(int(m.sum()) for m in masks.values()),
        "scored_weights": sum(m.numel() for m in masks.values()),
        "steps": len(starts),  # forward batches: what `booster ls` and the dry run's timing count
        "seconds": round(time.time() - started, 2),
        "seconds_per_step": round(scoring / max(len(starts), 1), 4),
        "recipe": {**recipe, "prune": str((stage / MASK_FILE).relative_to(root)), "prune_scope": scope},
    }
    files = [stage / MASK_FILE, *(p for folder in model_dirs for p in folder_files(root / folder))]
    info["files"] = file_records(stage, files)
    write_json_atomic(stage / DONE, info)
    return info
