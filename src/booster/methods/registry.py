"""Defenses by name: what each one changes at each of the provider's three stages.

A method is a small record, not a class hierarchy: the alignment trainer to build, whether it
needs the harmful set, what it changes in the user's fine-tuning (Lisa's trainer, or safety data
mixed in) and what it does after it (Antidote's pruning). ``booster run`` looks methods up here,
so a new defense is one entry plus its module. The fine-tuning and post-fine-tuning defenses
combine with the alignment-stage ones by name (``booster+mix``, ``sft+antidote``,
``booster+lisa+antidote``): those entries are derived below, each sharing the stages it does not
change with the method it extends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from booster.errors import UserError
from booster.methods.booster import BoosterConfig, BoosterTrainer
from booster.methods.booster_vaccine import BoosterVaccineConfig, BoosterVaccineTrainer
from booster.methods.lisa import LisaConfig, LisaTrainer
from booster.methods.repnoise import RepNoiseConfig, RepNoiseTrainer
from booster.methods.vaccine import VaccineConfig, VaccineTrainer
from booster.training import LMTrainer

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
    #: fine-tuning-stage defenses (Lisa) build the attack Trainer instead of plain SFT:
    #: (model, tokenizer, args_kwargs, train_dataset, alignment_dataset, attack_config).
    build_attack_trainer: TrainerFactory | None = None
    #: config fields (of ``align`` or ``attack``) that only this method reads; the other methods'
    #: stage fingerprints leave them out, so tuning one method never reruns another.
    params: tuple[str, ...] = ()
    #: forward/backward passes per alignment step, relative to SFT's one (``booster run --dry-run``'s
    #: cost estimate): Booster adds two harmful passes, Vaccine one perturbation pass, RepNoise one
    #: harmful pass beside the retain pass.
    align_passes: int = 1
    #: the method whose alignment stage this one's is (Lisa aligns like SFT, Booster+Lisa like
    #: Booster): a run that has both trains that aligned model once and shares it.
    aligns_like: str | None = None
    #: how the reference scripts attacked this method's aligned model (``attack.mode: reference``):
    #: ``double_lora`` (the aligned adapter merged, a fresh one trained) for the SFT, Vaccine and
    #: RepNoise baselines; ``single_lora`` (the aligned adapter trained on) for Booster, its
    #: combinations and Lisa.
    attack_mode: str = "single_lora"
    #: the method whose finished alignment (same seed and settings) this one's alignment starts
    #: from instead of the base model (``booster-from-sft``: ``sft``); that stage runs first.
    init_from: str | None = None
    #: a fine-tuning-stage defense: the provider adds refusal pairs of its alignment data to the
    #: user's fine-tuning data (``attack.safety_mix_ratio``; the ``+mix`` methods).
    mixes_safety_data: bool = False
    #: the post-fine-tuning repair run on the fine-tuned model before it is evaluated (``antidote``:
    #: the ``+antidote`` methods, ``stages/repair.py``), or None.
    repair: str | None = None
    #: the method whose fine-tuning (attack) stage this one's is (``sft+antidote`` repairs the model
    #: of SFT's attack): a run that has both trains that attack once and shares it.
    attacks_like: str | None = None
    #: its alignment may train with compiled decoder layers (``align.compile``); Vaccine's
    #: perturbation hooks and RepNoise's hidden-state noise act on the layers' outputs, which the
    #: compiled layers do not support.
    compiles: bool = True

    @property
    def stages(self) -> str:
        """The stages the defense acts at, for listings: ``alignment, post-fine-tuning``, ..."""
        acts = [
            ("alignment", (self.aligns_like or self.name) != "sft"),
            ("fine-tuning", self.build_attack_trainer is not None or self.mixes_safety_data),
            ("post-fine-tuning", self.repair is not None),
        ]
        return ", ".join(stage for stage, acted in acts if acted) or "none (the baseline)"


def _sft_trainer(model, tokenizer, args_kwargs, train_dataset, harmful_dataset, align_config):
    from transformers import (
        TrainingArguments,  # heavy: loaded only where it is used, so light commands stay fast
    )

    return LMTrainer(
        model=model,
        args=TrainingArguments(**args_kwargs),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )


_BOOSTER = ("lamb", "alpha")
_VACCINE = ("vaccine_rho", "vaccine_target")
_REPNOISE = ("repnoise_alpha", "repnoise_beta")
_LISA = ("lisa_alignment_steps", "lisa_finetune_steps", "lisa_rho")
_ASCENT = ("ascent_weight", "ascent_target")


def _trainer(
    config_class: type, trainer_class: type, settings: tuple[str, ...], second: str | None = "harmful_dataset"
) -> TrainerFactory:
    """A trainer factory: ``config_class`` of the Trainer's arguments plus the stage config's
    ``settings`` (same names), and ``trainer_class`` given the second dataset as its argument
    ``second`` (None: the method reads none). A defense's entry then says what it reads in one line."""

    def build(model, tokenizer, args_kwargs, train_dataset, second_dataset, stage_config):
        args = config_class(**args_kwargs, **{name: getattr(stage_config, name) for name in settings})
        data = {} if second is None else {second: second_dataset}
        return trainer_class(
            model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer, **data
        )

    return build


_booster_trainer = _trainer(BoosterConfig, BoosterTrainer, (*_BOOSTER, "harmful_batch_size"))
_booster_ascent_trainer = _trainer(BoosterConfig, BoosterTrainer, (*_BOOSTER, "harmful_batch_size", *_ASCENT))
_vaccine_trainer = _trainer(VaccineConfig, VaccineTrainer, _VACCINE, second=None)
_repnoise_trainer = _trainer(RepNoiseConfig, RepNoiseTrainer, (*_REPNOISE, "harmful_batch_size"))
_booster_vaccine_trainer = _trainer(
    BoosterVaccineConfig, BoosterVaccineTrainer, (*_BOOSTER, "harmful_batch_size", *_VACCINE)
)
_lisa_attack_trainer = _trainer(LisaConfig, LisaTrainer, _LISA, second="alignment_dataset")


METHODS: dict[str, Method] = {
    "sft": Method(
        "sft",
        "plain supervised alignment on refusals (the undefended baseline)",
        False,
        _sft_trainer,
        attack_mode="double_lora",
    ),
    "booster": Method(
        "booster",
        "Booster: alignment loss + lamb * harmful-loss reduction after a simulated harmful step",
        True,
        _booster_trainer,
        params=_BOOSTER,
        align_passes=3,
    ),
    "vaccine": Method(
        "vaccine",
        "Vaccine: alignment gradient taken with the layer outputs perturbed (norm rho) along their gradient",
        False,
        _vaccine_trainer,
        params=_VACCINE,
        align_passes=2,
        attack_mode="double_lora",
        compiles=False,
    ),
    "repnoise": Method(
        "repnoise",
        "RepNoise: alignment loss + beta * MMD(harmful hidden states, noise) - alpha * log(harmful loss)",
        True,
        _repnoise_trainer,
        params=_REPNOISE,
        align_passes=2,
        attack_mode="double_lora",
        compiles=False,
    ),
    "lisa": Method(
        "lisa",
        "Lisa: SFT alignment; the fine-tuning alternates alignment and user steps with a proximal pull",
        False,
        _sft_trainer,
        build_attack_trainer=_lisa_attack_trainer,
        params=_LISA,
        aligns_like="sft",
    ),
    "booster+vaccine": Method(
        "booster+vaccine",
        "Booster with its alignment pass done Vaccine-style (the reference's perturb_aware)",
        True,
        _booster_vaccine_trainer,
        params=_BOOSTER + _VACCINE,
        align_passes=4,
        compiles=False,
    ),
    "booster+lisa": Method(
        "booster+lisa",
        "Booster alignment, then Lisa during the fine-tuning",
        True,
        _booster_trainer,
        build_attack_trainer=_lisa_attack_trainer,
        params=_BOOSTER + _LISA,
        align_passes=3,
        aligns_like="booster",
    ),
    "booster-from-sft": Method(
        "booster-from-sft",
        "Booster started from the SFT-aligned adapter of the same seed, so it flattens the harmful "
        "loss where SFT raised it",
        True,
        _booster_trainer,
        params=_BOOSTER,
        align_passes=3,
        init_from="sft",
    ),
    "booster+ascent": Method(
        "booster+ascent",
        "Booster plus a bounded ascent on the harmful loss: - ascent_weight * min(h, ascent_target)",
        True,
        _booster_ascent_trainer,
        params=_BOOSTER + _ASCENT,
        align_passes=3,
    ),
}


#: methods that act only at alignment: each combines with a fine-tuning-stage defense (``+mix``).
ALIGNMENT_ONLY = ("sft", "booster", "vaccine", "repnoise", "booster+vaccine")


def _with_safety_mix(name: str) -> Method:
    base = METHODS[name]
    return replace(
        base,
        name=f"{name}+mix",
        summary=f"{name} alignment; the provider mixes refusal pairs into the user's fine-tuning data",
        params=(*base.params, "safety_mix_ratio"),
        aligns_like=base.aligns_like or name,
        mixes_safety_data=True,
    )


def _with_antidote(name: str) -> Method:
    base = METHODS[name]
    return replace(
        base,
        name=f"{name}+antidote",
        summary=f"{name}; after the fine-tuning, Antidote zeroes the weights most important on harmful data",
        aligns_like=base.aligns_like or name,
        repair="antidote",
        attacks_like=name,
    )


METHODS.update({f"{name}+mix": _with_safety_mix(name) for name in ALIGNMENT_ONLY})
METHODS.update({f"{name}+antidote": _with_antidote(name) for name in list(METHODS)})


def alignment_method(method: str) -> str:
    """The method whose alignment stage ``method`` runs (itself unless it aligns like another)."""
    return get_method(method).aligns_like or method


def attack_method(method: str) -> str:
    """The method whose attack stage ``method`` runs (itself unless it repairs another's attack)."""
    return get_method(method).attacks_like or method


def check_compiles(method: str, where: str) -> None:
    """``align.compile`` is refused for a method whose alignment cannot train compiled layers."""
    method = alignment_method(method)
    if not get_method(method).compiles:
        raise UserError(
            f"{where}align.compile: {method}'s alignment acts on the decoder layers' outputs, which "
            f"compiled layers do not support; set align.compile: false to align {method}"
        )


def init_adapter(method: str, configured: str | None) -> str | None:
    """Where ``method``'s alignment starts: the method's own starting point (``init_from``), else
    ``configured`` (``align.init_adapter``: a method name or an adapter folder); None: the base
    model. The method ``configured`` names starts from the base model itself (it is the start)."""
    method = alignment_method(method)
    own = get_method(method).init_from
    if own is not None:
        return own
    if configured is None or (configured in METHODS and alignment_method(configured) == method):
        return None
    return configured


def method_settings(settings: dict[str, Any], method: str) -> dict[str, Any]:
    """``settings`` (a stage section as a dict) without the fields that only other methods read."""
    own = set(get_method(method).params)
    foreign = {key for m in METHODS.values() for key in m.params} - own
    return {key: value for key, value in settings.items() if key not in foreign}


def attack_mode(mode: str, method: str) -> str:
    """The attack mode a method runs under: ``mode``, or with ``reference`` the method's own."""
    return get_method(method).attack_mode if mode == "reference" else mode


def get_method(name: str) -> Method:
    return METHODS[name]
