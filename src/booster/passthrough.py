"""Settings passed through to transformers and peft, checked when the config loads, and the
``TrainingArguments`` a stage section becomes (:func:`training_kwargs`).

``align.trainer`` / ``attack.trainer`` reach ``transformers.TrainingArguments`` and
``model.lora.extra`` reaches ``peft.LoraConfig`` as given. Each key is checked against the real
class's fields (an unknown one gets the same did-you-mean line as an unknown config key), a key
booster already sets from one of its own settings is refused with the setting to use, and the
values are tried on the class itself, so a bad value stops the run before any model loads.
``report_to`` names transformers' experiment trackers; a tracker whose package is missing is
refused with the package to install.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from booster.errors import UserError
from booster.models import lora_kwargs

#: TrainingArguments fields booster sets from a setting of the section, by that setting.
TRAINER_FIELDS_FROM_SECTION = {
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "learning_rate": "learning_rate",
    "weight_decay": "weight_decay",
    "num_train_epochs": "epochs",
    "max_steps": "max_steps",
    "lr_scheduler_type": "lr_scheduler",
    "warmup_steps": "warmup_ratio",
    "max_grad_norm": "max_grad_norm",
    "optim": "optim",
    "bf16": "bf16",
    "train_sampling_strategy": "group_by_length",
    "torch_compile": "compile",
    "activation_checkpointing": "gradient_checkpointing",
    "activation_checkpointing_kwargs": "gradient_checkpointing",
    "gradient_checkpointing": "gradient_checkpointing",
    "gradient_checkpointing_kwargs": "gradient_checkpointing",
    "logging_steps": "logging_steps",
    "save_steps": "save_steps",
    "save_strategy": "save_steps",
    "report_to": "report_to",
    "run_name": "run_name",
}
#: TrainingArguments fields booster owns for another reason: the reason, with what to do instead.
TRAINER_FIELDS_REFUSED = {
    "output_dir": "booster trains in the stage folder; set output_dir (or --output-dir) instead",
    "seed": "set seeds (the run's list) instead",
    "data_seed": "set seeds (the run's list) instead",
    "fp16": "fp16 is refused (its loss scaler would mis-scale Booster's correction); set {section}.bf16 instead",
    "disable_tqdm": "use --no-progress or --quiet instead",
    "remove_unused_columns": "booster's datasets need it off",
    "resume_from_checkpoint": "booster resumes an interrupted stage from its last checkpoint by itself",
    "eval_strategy": "booster evaluates after training (booster evaluate), not during it",
    "eval_steps": "booster evaluates after training (booster evaluate), not during it",
    "eval_on_start": "booster evaluates after training (booster evaluate), not during it",
    "load_best_model_at_end": "booster evaluates after training (booster evaluate), not during it",
    "metric_for_best_model": "booster evaluates after training (booster evaluate), not during it",
    "deepspeed": "launch with accelerate instead (configs/accelerate/; Booster runs under DDP or FSDP2)",
    "fsdp": "launch with accelerate instead (configs/accelerate/fsdp2.yaml)",
    "fsdp_config": "launch with accelerate instead (configs/accelerate/fsdp2.yaml)",
    "hub_token": "log in with `hf auth login` or set HF_TOKEN: no token goes into a config file",
}
#: LoraConfig fields booster sets: the setting to use, or why it is fixed.
LORA_FIELDS_REFUSED = {
    "r": "set model.lora.r instead",
    "lora_alpha": "set model.lora.alpha instead",
    "target_modules": "set model.lora.target_modules instead",
    "lora_dropout": "set model.lora.dropout instead",
    "task_type": "booster trains causal language models (CAUSAL_LM)",
    "peft_type": "model.lora is a LoRA adapter",
    "inference_mode": "booster trains the adapter",
    "base_model_name_or_path": "set model.name instead",
    "revision": "set model.revision instead",
}
#: tracker name -> (transformers' availability check, the package to install).
TRACKER_PACKAGES = {
    "azure_ml": ("is_azureml_available", "azureml-core"),
    "comet_ml": ("is_comet_available", "comet_ml"),
    "mlflow": ("is_mlflow_available", "mlflow"),
    "neptune": ("is_neptune_available", "neptune"),
    "tensorboard": ("is_tensorboard_available", "tensorboard"),
    "trackio": ("is_trackio_available", "trackio"),
    "wandb": ("is_wandb_available", "wandb"),
    "codecarbon": ("is_codecarbon_available", "codecarbon"),
    "clearml": ("is_clearml_available", "clearml"),
    "dagshub": ("is_dagshub_available", "dagshub"),
    "flyte": ("is_flytekit_available", "flytekit"),
    "dvclive": ("is_dvclive_available", "dvclive"),
    "swanlab": ("is_swanlab_available", "swanlab"),
    "kubeflow": ("is_kubeflow_available", "kubeflow"),
}
#: the folder of a stage that TensorBoard logs go to (checkpoints/ is removed when a stage ends).
TENSORBOARD_DIR = "tensorboard"


def _unknown(where: str, key: str, name: str, known: list[str], what: str) -> UserError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{key}.{close[0]}'?" if close else ""
    return UserError(f"{where}: unknown key '{key}.{name}'{hint} (valid here: the fields of {what})")


def _plain_types(tp: Any) -> bool:
    """Whether an annotation is made only of int, float, bool, str and None (checked like a config
    field); anything richer (enums, mappings, nested configs) is left to the class itself."""
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return all(_plain_types(a) for a in typing.get_args(tp))
    return tp in (int, float, bool, str, type(None))


#: the config loader's value check: ``coerce(value, annotation, key, where)`` returns the value
#: converted or raises a one-line UserError (passed in, so this module needs nothing from the config).
Coerce = Callable[[Any, Any, str, str], Any]


def _check_options(
    where: str, key: str, options: dict[str, Any], cls: type, what: str, coerce: Coerce
) -> dict[str, Any]:
    """Each key a field of ``cls``; plain-typed values checked and converted as config values are."""
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation this Python cannot resolve: leave the values to the class
        hints = {}
    checked = {}
    for name, value in options.items():
        if name not in fields:
            raise _unknown(where, key, name, fields, what)
        tp = hints.get(name)
        checked[name] = coerce(value, tp, f"{key}.{name}", where) if _plain_types(tp) else value
    return checked


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_trainer_options(where: str, section_name: str, section: Any, coerce: Coerce) -> None:
    """``<section>.trainer``: TrainingArguments fields booster does not set, with valid values."""
    from transformers import TrainingArguments  # heavy: loaded when a config has trainer options

    key = f"{section_name}.trainer"
    for name in section.trainer:
        if name in TRAINER_FIELDS_FROM_SECTION:
            own = f"{section_name}.{TRAINER_FIELDS_FROM_SECTION[name]}"
            raise UserError(f"{where}: {key}.{name}: booster sets it from {own}; set {own} instead")
        if name in TRAINER_FIELDS_REFUSED:
            reason = TRAINER_FIELDS_REFUSED[name].format(section=section_name)
            raise UserError(f"{where}: {key}.{name}: booster sets it itself; {reason}")
    section.trainer = _check_options(
        where, key, section.trainer, TrainingArguments, "transformers.TrainingArguments", coerce
    )
    if not section.trainer:
        return
    try:  # the values together, as the stage will pass them (a folder is only named, not created)
        TrainingArguments(**training_kwargs(section, _PROBE_DIR, 0, progress=False))
    except (ValueError, TypeError, ImportError) as err:
        raise UserError(f"{where}: {key}: transformers refuses these settings: {_first_line(err)}") from None


#: the checkpoint folder named when trying TrainingArguments at load time (nothing is written).
_PROBE_DIR = "booster-settings-check/align/stage/checkpoints"


def check_lora_extra(where: str, lora: Any, coerce: Coerce) -> None:
    """``model.lora.extra``: LoraConfig fields booster does not set, with valid values."""
    from peft import LoraConfig  # heavy: loaded when a config has LoRA options

    for name in lora.extra:
        if name in LORA_FIELDS_REFUSED:
            raise UserError(f"{where}: model.lora.extra.{name}: booster sets it; {LORA_FIELDS_REFUSED[name]}")
    lora.extra = _check_options(where, "model.lora.extra", lora.extra, LoraConfig, "peft.LoraConfig", coerce)
    if not lora.extra:
        return
    try:
        LoraConfig(**lora_kwargs(lora))
    except (ValueError, TypeError, ImportError) as err:
        raise UserError(
            f"{where}: model.lora.extra: peft refuses these settings: {_first_line(err)}"
        ) from None


def check_report_to(where: str, section_name: str, trackers: list[str]) -> None:
    """Each tracker a transformers integration (or ``all`` / ``none``) whose package is installed."""
    if not trackers:
        return
    from transformers.integrations import integration_utils  # heavy: loaded when trackers are named

    known = list(integration_utils.INTEGRATION_TO_CALLBACK)
    key = f"{section_name}.report_to"
    for name in trackers:
        if name in ("all", "none"):
            continue
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(
                f"{where}: {key} has {name!r}{hint} (known: {', '.join(['none', 'all', *known])})"
            )
        check, package = TRACKER_PACKAGES.get(name, (None, name))
        available = getattr(integration_utils, check, None) if check else None
        if available is not None and not available():
            raise UserError(
                f"{where}: {key}: {name} is not installed; pip install {package} (or remove it from {key})"
            )


def tracked_run_name(run_name: str | None, checkpoint_dir: Any) -> str:
    """The trackers' name of a stage's run: ``[<run_name>/]<align|attack>/<stage folder>``."""
    stage = Path(checkpoint_dir).parent
    name = f"{stage.parent.name}/{stage.name}"
    return f"{run_name}/{name}" if run_name else name


def point_trackers_at(trainer: Any, stage: Any) -> None:
    """TensorBoard writes into the stage's ``tensorboard/`` (its default, inside ``checkpoints/``,
    is removed when the stage ends), unless ``TENSORBOARD_LOGGING_DIR`` names another folder."""
    if os.environ.get("TENSORBOARD_LOGGING_DIR"):
        return
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "TensorBoardCallback" and getattr(callback, "tb_writer", None) is None:
            callback.logging_dir = str(Path(stage) / TENSORBOARD_DIR)


def training_kwargs(section: Any, checkpoint_dir: Path | str, seed: int, progress: bool) -> dict:
    """TrainingArguments keyword arguments for a stage section (same mapping for every stage), with
    the section's ``trainer`` pass-through on top (its keys never override these: see
    :mod:`booster.passthrough`)."""
    use_cuda = torch.cuda.is_available()
    kwargs = {
        "output_dir": str(checkpoint_dir),
        "per_device_train_batch_size": section.batch_size,
        "gradient_accumulation_steps": section.gradient_accumulation_steps,
        "learning_rate": section.learning_rate,
        "weight_decay": section.weight_decay,
        "num_train_epochs": section.epochs,
        "max_steps": section.max_steps,
        "lr_scheduler_type": section.lr_scheduler,
        "warmup_steps": section.warmup_ratio,  # transformers >= 5: a float < 1 is a ratio
        "max_grad_norm": section.max_grad_norm,
        "optim": section.optim,
        "bf16": section.bf16,
        "train_sampling_strategy": "group_by_length" if section.group_by_length else "random",
        "activation_checkpointing": section.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False}
        if section.gradient_checkpointing
        else None,
        "logging_steps": section.logging_steps,
        "save_strategy": "steps" if section.save_steps > 0 else "no",
        "save_steps": max(section.save_steps, 1),
        "save_total_limit": 1,
        "seed": seed,
        "data_seed": seed,
        "report_to": list(section.report_to),
        "run_name": tracked_run_name(section.run_name, checkpoint_dir),
        "disable_tqdm": not progress,
        "use_cpu": not use_cuda,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
    }
    return {**kwargs, **section.trainer}
