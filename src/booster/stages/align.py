"""Alignment stage: train the provider's adapter with a defense (``sft``, ``booster``, ...).

Writes into its stage folder: ``model/`` (adapter or full weights, safetensors), ``metrics.jsonl``,
``config.yaml`` and ``done.json``. A finished stage is reused while its files check out; an
interrupted one resumes from its last loadable checkpoint (see :mod:`booster.storage`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from booster.config import RunConfig, dump_config, settings_dict
from booster.data.sources import embedded_versions, load_alignment, load_harmful
from booster.data.template import tokenize_examples
from booster.errors import UserError
from booster.methods.registry import (
    METHODS,
    alignment_method,
    check_compiles,
    get_method,
    init_adapter,
    method_settings,
)
from booster.models import add_lora, load_model_and_tokenizer, load_trained
from booster.passthrough import training_kwargs
from booster.stages.common import StageResult, finish_stage, save_trained, train_stage, watch_training
from booster.storage import (
    CHECKPOINTS,
    claim_stage,
    file_record,
    in_stage,
    is_main_process,
    main_process_first,
    resume_checkpoint,
    training_speed,
    write_text_atomic,
)


def fingerprint(*parts: Any) -> str:
    """Short stable hash of the settings a stage depends on, so changed settings get a new folder."""
    blob = json.dumps(
        [settings_dict(p) if dataclasses.is_dataclass(p) else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def with_data_versions(settings: dict[str, Any], *specs: str | None) -> dict[str, Any]:
    """``settings`` plus, under ``data_versions``, the versions above 1 of the embedded datasets that
    ``specs`` name (the data the stage reads): a stage trained on an older form of generated data is
    not reused, and while every version is 1 the settings and so the fingerprint are as before."""
    versions = embedded_versions(*specs)
    return {**settings, "data_versions": versions} if versions else settings


def align_settings(config: RunConfig, method: str) -> list[Any]:
    """What an aligned model depends on: a method's own hyperparameters enter only its fingerprint.

    A method that aligns like another (Lisa like SFT) has that method's settings, so both share one
    stage folder.
    """
    method = alignment_method(method)
    align = method_settings(settings_dict(config.align), method)
    read = [config.align.alignment_data]
    if get_method(method).uses_harmful_data:
        read.append(config.align.harmful_data)
    else:
        for key in ("harmful_data", "harmful_samples", "harmful_batch_size"):
            align.pop(key)
    align = with_data_versions(align, *read)
    align.pop("init_adapter", None)
    start = init_adapter(method, config.align.init_adapter)
    if start is not None:  # the starting adapter's identity: its stage's settings hash, or its files' sha256
        align["init_adapter"] = start_identity(config, start)
    return [config.model, align, method]


def start_identity(config: RunConfig, start: str) -> str:
    """What a stage that starts from ``start`` (a method name or an adapter folder) depends on: the
    method's stage settings hash (with the seed, which the stage's own hash holds, that names its
    stage folder), or the sha256 of the folder's adapter files, so a changed adapter gets a new stage."""
    if start in METHODS:
        return f"{alignment_method(start)}:{fingerprint(*align_settings(config, start))}"
    files = _adapter_files(Path(start).expanduser())
    if not all(p.is_file() for p in files):  # not on this machine (a dry run); training refuses it
        return f"missing:{start}"
    return ",".join(f"{p.name}:{file_record(p)['sha256']}" for p in files)


#: the files of a saved LoRA adapter (peft's ``save_pretrained``).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _adapter_files(folder: Path) -> list[Path]:
    return [folder / name for name in ADAPTER_FILES]


def adapter_folder(spec: str) -> Path:
    """The adapter folder ``align.init_adapter`` names, checked: one line naming what is missing."""
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"align.init_adapter: {spec} is not a folder; give a method name (e.g. sft) or the folder of a "
            "saved LoRA adapter (adapter_config.json + adapter_model.safetensors)"
        )
    missing = [p.name for p in _adapter_files(folder) if not p.is_file()]
    if missing:
        raise UserError(
            f"align.init_adapter: {spec} has no {' or '.join(missing)}; give the folder of a saved LoRA "
            "adapter (e.g. an aligned stage's model/ folder, or `booster export` output)"
        )
    return folder.resolve()


def align_dir(config: RunConfig, method: str, seed: int, root: Path | None = None) -> Path:
    root = Path(root or config.output_dir)
    settings = align_settings(config, method)
    return root / "align" / f"{alignment_method(method)}-seed{seed}-{fingerprint(*settings, seed)}"


def model_recipe(
    config: RunConfig, model_dir: Path, root: Path, merge: list[str] | None = None
) -> dict[str, Any]:
    """How to rebuild the stage's model (see :func:`booster.models.load_trained`), relative to ``root``."""
    relative = str(model_dir.relative_to(root))
    if not config.model.lora.enabled:
        return {"full": relative}
    return {"merge": merge or [], "adapter": relative}


def run_align(
    config: RunConfig,
    method: str,
    seed: int,
    root: Path | None = None,
    progress: bool = True,
    wait: bool = True,
) -> StageResult:
    """Align one model with ``method`` and ``seed``; reuse the stage when it is already done.

    ``wait=False``: raise :class:`booster.storage.StageBusy` at once when another process is
    running this stage, instead of waiting for it.
    """
    method = alignment_method(method)
    stage = align_dir(config, method, seed, root)
    with claim_stage(stage, wait) as done:
        if done is not None:
            return StageResult(stage, True, done)
        start = init_adapter(method, config.align.init_adapter)
        if start is not None and start not in METHODS and not config.model.lora.enabled:
            raise UserError(
                f"align.init_adapter: {start} is a LoRA adapter, but model.lora.enabled is false; enable "
                "LoRA, or name a method whose aligned model to start from"
            )
        if start in METHODS:  # the alignment it starts from runs (or is reused) first
            init = run_align(config, start, seed, root, progress, wait)
            initial = Start(init.info["recipe"], init.path, Path(root or config.output_dir))
        elif start is not None:
            initial = Start({"merge": [], "adapter": str(adapter_folder(start))}, None, Path("/"))
        else:
            initial = None
        info = _align(config, method, seed, stage, progress, initial)
    return StageResult(stage, False, info)


@dataclass
class Start:
    """The adapter an alignment starts from: a stage's recipe (paths relative to ``root``) and, for
    an aligned stage of the run, its folder (the new stage is redone when that model's files change)."""

    recipe: dict[str, Any]
    stage: Path | None
    root: Path


def _align(
    config: RunConfig, method: str, seed: int, stage: Path, progress: bool, start: Start | None = None
) -> dict[str, Any]:
    """Train the stage (its lock held), resuming from its last checkpoint; returns its done info."""
    from transformers import set_seed  # heavy: loaded only where it is used, so light commands stay fast

    spec = get_method(method)
    cfg = config.align
    if cfg.compile:
        check_compiles(method, "")
    started = time.time()
    set_seed(seed)
    with main_process_first():  # a GGUF is converted once, into a cache every rank shares
        if start is None:
            model, tokenizer = load_model_and_tokenizer(config.model, seed=seed)
        else:  # the starting adapter, trained on (a full-weights stage: its weights)
            model, tokenizer = load_trained(config.model, start.recipe, start.root, seed=seed, trainable=True)
    if start is None:
        model = add_lora(model, config.model.lora)
    alignment = load_alignment(cfg.alignment_data, limit=cfg.alignment_samples, seed=seed)
    template = config.model.template
    train_dataset = tokenize_examples(alignment, tokenizer, cfg.max_length, template)
    harmful_dataset = None
    if spec.uses_harmful_data:
        harmful = load_harmful(cfg.harmful_data, limit=cfg.harmful_samples, seed=seed)
        harmful_dataset = tokenize_examples(harmful, tokenizer, cfg.max_length, template)

    if is_main_process():
        stage.mkdir(parents=True, exist_ok=True)
        write_text_atomic(stage / "config.yaml", dump_config(config))
    checkpoints = stage / CHECKPOINTS
    trainer = spec.build_align_trainer(
        model,
        tokenizer,
        training_kwargs(cfg, checkpoints, seed, progress),
        train_dataset,
        harmful_dataset,
        cfg,
    )
    watch_training(trainer, stage, f"align {method} seed {seed}", progress)
    resume = resume_checkpoint(stage)
    output = train_stage(trainer, resume, cfg.compile)

    save_trained(trainer, tokenizer, stage / "model")
    history = [e for e in trainer.state.log_history if "loss" in e]
    info = {
        "stage": "align",
        "method": method,
        "seed": seed,
        "steps": trainer.state.global_step,
        "alignment_samples": len(train_dataset),
        "harmful_samples": len(harmful_dataset) if harmful_dataset is not None else 0,
        "train_loss": output.training_loss,
        "final_log": history[-1] if history else {},
        "seconds": round(time.time() - started, 2),
        **training_speed(output.metrics.get("train_runtime", 0.0), trainer.state.global_step, resume),
        "resumed_from": in_stage(resume, stage),
        "recipe": model_recipe(config, stage / "model", stage.parent.parent),
    }
    depends: list[Path] = []
    if start is not None:
        info["init_adapter"] = (
            str(start.stage.relative_to(stage.parent.parent)) if start.stage else start.recipe["adapter"]
        )
        depends = [start.stage / "model"] if start.stage else []
    return finish_stage(trainer, stage, info, depends=depends)
