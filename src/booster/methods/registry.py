"""Defenses by name: what each one changes and which trainer runs its alignment.

A method is a small record, not a class hierarchy: the alignment trainer to build, whether it
needs the harmful set, and (for fine-tuning-stage defenses) what it changes in the attack.
``booster run`` looks methods up here, so a new defense is one entry plus its module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TrainerFactory = Callable[..., Any]


@dataclass(frozen=True)
class Method:
    name: str
    #: one line for reports and ``--help``.
    summary: str
    #: the alignment stage trains on the harmful set too (Booster, RepNoise, ...).
    uses_harmful_data: bool
    #: builds the alignment Trainer: (model, tokenizer, args_kwargs, train_dataset, harmful_dataset, align_config).
    build_align_trainer: TrainerFactory


def _sft_trainer(model, tokenizer, args_kwargs, train_dataset, harmful_dataset, align_config):
    from transformers import TrainingArguments

    from booster.training import LMTrainer

    return LMTrainer(
        model=model,
        args=TrainingArguments(**args_kwargs),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )


def _booster_trainer(model, tokenizer, args_kwargs, train_dataset, harmful_dataset, align_config):
    from booster.training import BoosterConfig, BoosterTrainer

    args = BoosterConfig(
        **args_kwargs,
        lamb=align_config.lamb,
        alpha=align_config.alpha,
        harmful_batch_size=align_config.harmful_batch_size,
    )
    return BoosterTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        harmful_dataset=harmful_dataset,
        processing_class=tokenizer,
    )


METHODS: dict[str, Method] = {
    "sft": Method(
        "sft", "plain supervised alignment on refusals (the undefended baseline)", False, _sft_trainer
    ),
    "booster": Method(
        "booster",
        "Booster: alignment loss + lamb * harmful-loss reduction after a simulated harmful step",
        True,
        _booster_trainer,
    ),
}


def get_method(name: str) -> Method:
    return METHODS[name]
