"""Typed configuration for every stage: YAML in, validated, ``key=value`` overrides.

One ``RunConfig`` holds the sections ``model``, ``methods``, ``seeds``, ``output_dir``,
``align``, ``attack`` and ``evaluate``. Each field has a type and a default; loading checks every
key and value against them, so a typo is an error that names the key and suggests the right one.

A config file may also be a *sweep*: any scalar field of ``align`` or ``attack`` given as a list
(``lamb: [1, 5, 10]``). :func:`load_sweep` keeps the dataclasses scalar: it returns a
:class:`Sweep`, the concrete ``RunConfig`` at the first values plus the lists, and every
combination is validated like a plain config.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from booster.errors import UserError
from booster.fields import ADDED_LATER, added_later
from booster.models import LoraSettings, ModelConfig

__all__ = [
    "AlignConfig",
    "AttackConfig",
    "EvaluateConfig",
    "LoraSettings",
    "ModelConfig",
    "RunConfig",
    "Sweep",
    "load_config",
    "load_sweep",
]


def settings_dict(obj: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` minus later-added fields left at their defaults (see ``ADDED_LATER``):
    what a stage's fingerprint hashes."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get(ADDED_LATER):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if value == default:
                continue
        out[f.name] = settings_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


@dataclass
class AlignConfig:
    """Alignment stage (the provider's): defaults are the paper's (DESIGN.md §1)."""

    #: refusal data: ``embedded``, a local file/folder, a hub id or a shortcut (``beavertails_refusals``).
    alignment_data: str = "embedded"
    #: harmful pairs Booster simulates the attack with (same spec forms).
    harmful_data: str = "embedded"
    #: use at most this many alignment / harmful samples (null: all).
    alignment_samples: int | None = 5000
    harmful_samples: int | None = 5000
    max_length: int = 256
    learning_rate: float = 5e-4
    weight_decay: float = 0.1
    epochs: float = 20.0
    #: if > 0, train this many optimizer steps instead of ``epochs``.
    max_steps: int = -1
    batch_size: int = 10
    #: harmful micro-batch size (null: same as batch_size).
    harmful_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "constant"
    warmup_ratio: float = 0.0
    #: gradient clipping; 0 disables it.
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    #: Booster's lambda and alpha.
    lamb: float = 5.0
    alpha: float = 0.1
    #: Vaccine's rho: global L2 norm of the hidden-state perturbation (Vaccine's scripts: 2; Booster's: 5).
    vaccine_rho: float = 2.0
    #: Vaccine perturbs each ``attention`` output (the reference code) or each ``decoder`` layer output.
    vaccine_target: str = "attention"
    #: RepNoise's alpha: weight of -log(harmful loss + 1), the gradient-ascent term.
    repnoise_alpha: float = 0.1
    #: RepNoise's beta: weight of the MMD between harmful hidden states and Gaussian noise.
    repnoise_beta: float = 0.001
    bf16: bool = False
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    #: checkpoint every N steps so an interrupted run resumes (0: only at the end).
    save_steps: int = 100


@dataclass
class AttackConfig:
    """The user's harmful fine-tuning (DESIGN.md §2); defaults are the reference attack's."""

    #: benign task: ``embedded:sentiment``, ``embedded:math``, ``sst2``, ``agnews``, ``gsm8k``, ``alpaca`` or a path.
    task_data: str = "embedded:sentiment"
    #: pool of harmful pairs mixed into the task data (disjoint from alignment data).
    poison_data: str = "embedded"
    #: n: number of fine-tuning samples.
    samples: int = 1000
    #: p: fractions of the n samples that are harmful.
    poison_ratios: list[float] = field(default_factory=lambda: [0.1])
    #: ``single_lora`` continues the aligned adapter (the paper's setting); ``double_lora`` merges it and trains a new one.
    mode: str = "single_lora"
    max_length: int = 256
    learning_rate: float = 1e-5
    weight_decay: float = 0.1
    epochs: float = 20.0
    max_steps: int = -1
    batch_size: int = 10
    gradient_accumulation_steps: int = 1
    #: as in the reference: a constant schedule (transformers' ``constant`` ignores warmup).
    lr_scheduler: str = "constant"
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    bf16: bool = False
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    save_steps: int = 100
    #: Lisa: optimizer steps per alignment state (null: the reference's 100, shrunk for runs under 2000 steps).
    lisa_alignment_steps: int | None = None
    #: Lisa: optimizer steps per fine-tune state (null: the reference's 900, shrunk likewise).
    lisa_finetune_steps: int | None = None
    #: Lisa: rho of the proximal term rho/2 * ||w - w_other||^2 toward the other state's weights.
    lisa_rho: float = 0.01


@dataclass
class EvaluateConfig:
    """Harmful score on held-out prompts and fine-tune accuracy on the task's test split."""

    #: held-out harmful prompts: ``embedded``, ``beavertails`` or a path.
    harmful_prompts: str = "embedded"
    harmful_samples: int = 1000
    #: the task's test set (null: attack.task_data's test split); e.g. ``alpacaeval`` or an AlpacaEval file.
    task_data: str | None = added_later(None)
    #: task test samples for fine-tune accuracy (0 skips FA).
    task_samples: int = 1000
    #: new tokens for answers to harmful prompts (the reference: 512).
    max_new_tokens: int = 512
    #: new tokens for task answers (null: the task's own, evaluation/metrics.py: a label 8, GSM8K 256,
    #: AlpacaEval 1024).
    task_max_new_tokens: int | None = None
    batch_size: int = 16
    #: judge from the registry: ``embedded``, ``keyword``, ``beaver-dam``.
    judge: str = "embedded"
    #: model for judges that load one (e.g. beaver-dam's hub id or folder).
    judge_model: str | None = None


@dataclass
class RunConfig:
    """Everything ``booster run`` needs; ``booster align``/``attack``/``evaluate`` use their parts."""

    model: ModelConfig = field(default_factory=ModelConfig)
    #: defenses to compare, by name (``sft``, ``booster``, ``vaccine``, ``repnoise``, ``lisa``,
    #: ``booster+vaccine``, ``booster+lisa``).
    methods: list[str] = field(default_factory=lambda: ["sft", "booster"])
    seeds: list[int] = field(default_factory=lambda: [0])
    output_dir: str = "runs/default"
    align: AlignConfig = field(default_factory=AlignConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- loading -------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true/false",
        type(None): "null",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


#: PyYAML (YAML 1.1) reads ``1e-3`` (no dot) as a string; a float field takes it as the number.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

#: which YAML values each scalar field accepts (no "True"/"False" strings for booleans).
_SCALARS: dict[type, Any] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: _is_number(v) or (isinstance(v, str) and _FLOAT_TEXT.fullmatch(v.strip()) is not None),
    str: lambda v: isinstance(v, str) or _is_number(v),
}


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where that is lossless."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except UserError:
                continue
    elif origin is list:
        (item,) = typing.get_args(tp)
        items = value if isinstance(value, list) else [value]  # a scalar is a one-item list
        return [_coerce(v, item, f"{key}[{i}]", where) for i, v in enumerate(items)]
    elif dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: {key} must be a mapping of its fields, got {value!r}")
        return _build(tp, value, key, where)
    elif tp in _SCALARS and _SCALARS[tp](value):
        return tp(value) if tp in (float, str) else value
    hint = ""
    if isinstance(value, list) and "[" not in key and not key.startswith(SWEEPABLE):
        hint = f"; a list sweeps a setting only under {' or '.join(s + ':' for s in SWEEPABLE)}"
    raise UserError(f"{where}: {key} must be {_type_name(tp)}, got {value!r}{hint}")


def _build(cls: type, data: dict[str, Any], prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
            raise UserError(f"{where}: unknown key '{full}'{hint} (valid here: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], full, where)
    return cls(**kwargs)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    if dotted == "model" and isinstance(value, str) and isinstance(data.get("model"), dict):
        dotted = "model.name"  # `--set model=embedded` swaps the model, keeping its LoRA settings
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if part == "model" and isinstance(child, str):
            child = {"name": child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """``key.sub=value`` strings to (key, YAML-parsed value) pairs."""
    parsed = []
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set {pair!r}: expected key=value, e.g. --set align.lamb=10")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise UserError(f"--set {pair!r}: value is not valid YAML ({err.__class__.__name__})") from err
        parsed.append((key.strip(), value))
    return parsed


def config_from_dict(data: dict[str, Any], where: str = "config") -> RunConfig:
    data = dict(data)
    if isinstance(data.get("model"), str):
        data["model"] = {"name": data["model"]}
    config = _build(RunConfig, data, "", where)
    validate(config, where)
    return config


def _read(path: str | Path | None, overrides: list[str] | None) -> tuple[dict[str, Any], str]:
    """The YAML mapping at ``path`` (empty for None) with the ``--set`` overrides applied, and a
    name for it in error messages."""
    data: dict[str, Any] = {}
    where = str(path) if path else "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {str(path)!r} not found; pass an existing YAML file (see configs/)")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: the top level must be a mapping (model:, methods:, align:, ...)")
        data = loaded
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    if overrides:
        where += " (with --set)"
    return data, where


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply ``--set`` overrides.

    For one concrete config: a sweep (a list where a setting takes one value) is an error here;
    :func:`load_sweep` reads those.
    """
    sweep = load_sweep(path, overrides)
    if sweep.variables:
        listed = ", ".join(sweep.variables)
        verb = "lists" if len(sweep.variables) == 1 else "list"
        raise UserError(
            f"{sweep.where}: {listed} {verb} several values (a sweep); give one value each, "
            "or use `booster run`, which runs every combination"
        )
    return sweep.base


# -- sweeps ----------------------------------------------------------------------------------------

#: sections whose scalar fields may be given as a list of values to sweep.
SWEEPABLE = ("align", "attack")


def _sweepable_fields(section: str) -> dict[str, Any]:
    """Field name -> type of the section's scalar fields (a list-typed field such as
    ``poison_ratios`` already takes a list and is not swept)."""
    cls = typing.get_type_hints(RunConfig)[section]
    hints = typing.get_type_hints(cls)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(cls)
        if typing.get_origin(hints[f.name]) is not list and not dataclasses.is_dataclass(hints[f.name])
    }


@dataclass
class Sweep:
    """A config with swept settings: the concrete config at the first values, and the value lists.

    Seeds, methods and poison ratios are lists in ``RunConfig`` itself; ``variables`` holds the
    other swept settings by dotted key (``align.lamb``), in field order (align before attack), so
    the grid's order does not depend on how the file was written.
    """

    base: RunConfig
    #: dotted key -> the values to run, each already checked against the field's type.
    variables: dict[str, list[Any]] = field(default_factory=dict)
    #: where the config came from, for error messages.
    where: str = "config"

    def at(self, point: dict[str, Any]) -> RunConfig:
        """The concrete config with the settings in ``point`` (dotted key -> value) set; every other
        swept setting stays at its first value."""
        config = copy.deepcopy(self.base)
        for key, value in point.items():
            section, name = key.split(".", 1)
            setattr(getattr(config, section), name, value)
        return config

    def points(self) -> Iterator[dict[str, Any]]:
        """Every combination of the swept values (the cartesian product; the last key varies fastest)."""
        keys = list(self.variables)
        for values in itertools.product(*self.variables.values()):
            yield dict(zip(keys, values, strict=True))

    def to_dict(self) -> dict[str, Any]:
        """The config as YAML data, the lists back in place: reading it again gives this sweep."""
        data = self.base.to_dict()
        for key, values in self.variables.items():
            section, name = key.split(".", 1)
            data[section][name] = list(values)
        return data

    def validate(self) -> None:
        """Range checks for every combination (a value may be fine alone and not with another)."""
        for point in self.points():
            validate(self.at(point), self.where)


def sweep_from_dict(data: dict[str, Any], where: str = "config") -> Sweep:
    """Split the lists out of ``align``/``attack``, check each value as the field's type, build the
    config at the first values and validate every combination."""
    data = copy.deepcopy(data)
    variables: dict[str, list[Any]] = {}
    for section in SWEEPABLE:
        raw = data.get(section)
        if not isinstance(raw, dict):
            continue
        for name, tp in _sweepable_fields(section).items():
            values = raw.get(name)
            if not isinstance(values, list):
                continue
            key = f"{section}.{name}"
            if not values:
                raise UserError(
                    f"{where}: {key} is an empty list; give one value, or a list of values to sweep"
                )
            coerced = [_coerce(v, tp, f"{key}[{i}]", where) for i, v in enumerate(values)]
            for i, value in enumerate(coerced):
                if value in coerced[:i]:
                    raise UserError(
                        f"{where}: {key} lists {value!r} twice; each swept value must be different"
                    )
            variables[key] = coerced
            raw[name] = coerced[0]
    sweep = Sweep(config_from_dict(data, where), variables, where)
    if variables:
        sweep.validate()
    return sweep


def load_sweep(path: str | Path | None, overrides: list[str] | None = None) -> Sweep:
    """Read a YAML config that may sweep settings (lists under ``align``/``attack``); see :class:`Sweep`."""
    return sweep_from_dict(*_read(path, overrides))


def format_value(value: Any) -> str:
    """A swept value as YAML would write it (``5``, ``0.0005``, ``true``, ``null``)."""
    if isinstance(value, bool) or value is None:
        return yaml.safe_dump(value).removesuffix("\n...\n").strip()
    return f"{value:g}" if isinstance(value, float) else str(value)


def short_names(keys: Any) -> dict[str, str]:
    """``align.lamb`` -> ``lamb`` where the field name is unique among ``keys``, else the dotted key
    (``align.learning_rate`` and ``attack.learning_rate`` keep their sections)."""
    keys = list(keys)
    fields = [k.split(".", 1)[-1] for k in keys]
    return {k: f if fields.count(f) == 1 else k for k, f in zip(keys, fields, strict=True)}


def format_point(point: dict[str, Any], names: dict[str, str] | None = None) -> str:
    """``lamb=5, attack.learning_rate=1e-05``: the swept values of one cell."""
    names = names or short_names(point)
    return ", ".join(f"{names.get(k, k)}={format_value(v)}" for k, v in point.items())


KNOWN_METHODS = ("sft", "booster", "vaccine", "repnoise", "lisa", "booster+vaccine", "booster+lisa")


def validate(config: RunConfig, where: str) -> None:
    """Range checks that types alone cannot express."""
    for ratio in config.attack.poison_ratios:
        if not 0.0 <= ratio <= 1.0:
            raise UserError(f"{where}: attack.poison_ratios has {ratio}; each ratio must be in [0, 1]")
    if config.model.template not in ("alpaca", "chat"):
        raise UserError(f"{where}: model.template={config.model.template!r}; use alpaca or chat")
    if config.attack.mode not in ("single_lora", "double_lora"):
        raise UserError(f"{where}: attack.mode={config.attack.mode!r}; use single_lora or double_lora")
    if config.attack.mode == "double_lora" and not config.model.lora.enabled:
        raise UserError(f"{where}: attack.mode=double_lora needs model.lora.enabled=true")
    if not config.methods:
        raise UserError(f"{where}: methods is empty; list at least one, e.g. [sft, booster]")
    from booster.methods import registry

    for method in config.methods:
        if method not in registry.METHODS:
            close = difflib.get_close_matches(method, list(registry.METHODS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(
                f"{where}: unknown method {method!r}{hint} (known: {', '.join(registry.METHODS)})"
            )
    for name, section in (("align", config.align), ("attack", config.attack)):
        if section.batch_size < 1 or section.gradient_accumulation_steps < 1:
            raise UserError(f"{where}: {name}.batch_size and gradient_accumulation_steps must be >= 1")
        if section.learning_rate <= 0:
            raise UserError(f"{where}: {name}.learning_rate must be > 0, got {section.learning_rate}")
    align, attack = config.align, config.attack
    if align.vaccine_rho < 0 or align.repnoise_alpha < 0 or align.repnoise_beta < 0 or attack.lisa_rho < 0:
        raise UserError(
            f"{where}: align.vaccine_rho, align.repnoise_alpha, align.repnoise_beta and attack.lisa_rho must be >= 0"
        )
    if align.vaccine_target not in ("attention", "decoder"):
        raise UserError(f"{where}: align.vaccine_target={align.vaccine_target!r}; use attention or decoder")
    lisa_steps = (attack.lisa_alignment_steps, attack.lisa_finetune_steps)
    if (lisa_steps[0] is None) != (lisa_steps[1] is None):
        raise UserError(
            f"{where}: set both attack.lisa_alignment_steps and attack.lisa_finetune_steps, or neither"
        )
    if lisa_steps[0] is not None and (min(lisa_steps) < 0 or sum(lisa_steps) == 0):
        raise UserError(
            f"{where}: attack.lisa_alignment_steps and lisa_finetune_steps must be >= 0, not both 0"
        )
    if config.attack.samples < 1:
        raise UserError(f"{where}: attack.samples must be >= 1, got {config.attack.samples}")
    evaluate = config.evaluate
    if evaluate.max_new_tokens < 1 or (
        evaluate.task_max_new_tokens is not None and evaluate.task_max_new_tokens < 1
    ):
        raise UserError(
            f"{where}: evaluate.max_new_tokens and task_max_new_tokens must be >= 1 "
            "(task_max_new_tokens: null takes the task's own)"
        )


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
