"""Typed configuration for every stage: YAML in, validated, ``key=value`` overrides.

One ``RunConfig`` holds the sections ``model``, ``methods``, ``seeds``, ``output_dir``,
``align``, ``attack``, ``repair`` and ``evaluate``. Each field has a type and a default; loading checks every
key and value against them, so a typo is an error that names the key and suggests the right one.

A config file may also be a *sweep*: any scalar field of ``align``, ``attack`` or ``repair`` given as a list
(``lamb: [1, 5, 10]``). :func:`load_sweep` keeps the dataclasses scalar: it returns a
:class:`Sweep`, the concrete ``RunConfig`` at the first values plus the lists, and every
combination is validated like a plain config.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import itertools
import math
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from booster import passthrough
from booster.data import hub
from booster.data.local import read_text
from booster.errors import UserError
from booster.fields import ADDED_LATER, NOT_FINGERPRINTED, added_later
from booster.methods import registry
from booster.models import DTYPES, LoraSettings, ModelConfig

__all__ = [
    "AlignConfig",
    "AttackConfig",
    "EvaluateConfig",
    "RepairConfig",
    "LoraSettings",
    "ModelConfig",
    "RunConfig",
    "SearchConfig",
    "Sweep",
    "load_config",
    "load_sweep",
]


def settings_dict(obj: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` minus later-added fields left at their defaults (see ``ADDED_LATER``)
    and settings that never change a stage's result (``NOT_FINGERPRINTED``): what a stage's
    fingerprint hashes."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get(NOT_FINGERPRINTED):
            continue
        if f.metadata.get(ADDED_LATER):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if value == default:
                continue
        out[f.name] = settings_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


@dataclass
class AlignConfig:
    """Alignment stage (the provider's): defaults are the paper's (docs/method.md §1)."""

    #: refusal data: ``embedded``, a local file/folder, a hub id or a shortcut (``beavertails_refusals``).
    alignment_data: str = "embedded"
    #: harmful pairs Booster simulates the attack with (same spec forms).
    harmful_data: str = "embedded"
    #: use at most this many alignment / harmful samples (null: all).
    alignment_samples: int | None = 5000
    harmful_samples: int | None = 5000
    #: tokens per sample (prompt + answer + end-of-sequence); longer samples are cut.
    max_length: int = 256
    learning_rate: float = 5e-4
    #: 0: no weight decay.
    weight_decay: float = 0.1
    epochs: float = 20.0
    #: if >= 1, train this many optimizer steps instead of ``epochs`` (-1: train for ``epochs``).
    max_steps: int = -1
    batch_size: int = 10
    #: harmful micro-batch size (null: same as batch_size).
    harmful_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    #: a transformers scheduler name (``constant``, ``linear``, ``cosine``, ...).
    lr_scheduler: str = "constant"
    #: fraction of the steps spent warming up, in [0, 1).
    warmup_ratio: float = 0.0
    #: gradient clipping; 0 disables it.
    max_grad_norm: float = 1.0
    #: a transformers optimizer name (``adamw_torch``, ``sgd``, ``adafactor``, ...).
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
    #: booster+ascent: weight w of the bounded ascent term - w * min(harmful loss, ascent_target).
    ascent_weight: float = added_later(0.1)
    #: booster+ascent: the harmful loss (nats per token) at and above which the ascent stops.
    ascent_target: float = added_later(5.0)
    #: where every alignment starts instead of the base model: a method name (its finished alignment
    #: of the same seed and settings, trained first when missing) or a saved LoRA adapter folder
    #: (null: the base model). The method named here starts from the base model itself, and a
    #: method with its own starting point (booster-from-sft: sft) keeps it.
    init_adapter: str | None = added_later(None)
    bf16: bool = False
    gradient_checkpointing: bool = False
    #: batches of rows of similar length (less padding, faster steps; Booster's harmful batches too),
    #: in a seeded order that resumes exactly. Changes which rows share a batch, so the numbers differ
    #: from random batches: off by default.
    group_by_length: bool = added_later(False)
    #: run the decoder layers compiled by ``torch.compile`` while training (booster/compilation.py):
    #: faster steps with ``bf16`` once compiled, the numbers rounded differently: off by default.
    compile: bool = added_later(False)
    #: log the loss every N optimizer steps (>= 1).
    logging_steps: int = 10
    #: checkpoint every N steps so an interrupted run resumes (0: only at the end).
    save_steps: int = 100
    #: experiment trackers the Trainer logs to (transformers' ``report_to``: ``tensorboard``,
    #: ``wandb``, ``mlflow``, ...; empty: none). TensorBoard logs go to the stage's ``tensorboard/``.
    #: Not part of the stage's fingerprint: a finished stage is reused, not logged again.
    report_to: list[str] = added_later(default_factory=list, fingerprinted=False)
    #: prefix of the trackers' run names; each stage's run is ``<run_name>/align/<stage folder>``
    #: (null: ``align/<stage folder>``). Not part of the fingerprint.
    run_name: str | None = added_later(None, fingerprinted=False)
    #: any other ``transformers.TrainingArguments`` field, passed through as given (e.g.
    #: ``{adam_beta2: 0.95, lr_scheduler_kwargs: {min_lr: 1.0e-6}}``); a field booster sets from its
    #: own setting is refused with the setting to use.
    trainer: dict[str, Any] = added_later(default_factory=dict)


@dataclass
class AttackConfig:
    """The user's harmful fine-tuning (docs/method.md §2); defaults are the reference attack's."""

    #: benign task: ``embedded:sentiment``, ``embedded:math``, ``embedded:legs``, ``sst2``, ``agnews``, ``gsm8k``, ``alpaca`` or a path.
    task_data: str = "embedded:sentiment"
    #: pool of harmful pairs mixed into the task data (disjoint from alignment data).
    poison_data: str = "embedded"
    #: n: number of fine-tuning samples.
    samples: int = 1000
    #: p: fractions of the n samples that are harmful.
    poison_ratios: list[float] = field(default_factory=lambda: [0.1])
    #: ``single_lora`` continues the aligned adapter (the paper's setting); ``double_lora`` merges it and
    #: trains a new one; ``reference``: each method's mode in the reference scripts (methods/registry.py).
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
    #: gradient clipping; 0 disables it.
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    bf16: bool = False
    gradient_checkpointing: bool = False
    #: batches of rows of similar length, as ``align.group_by_length`` (the probe's batches too).
    group_by_length: bool = added_later(False)
    #: the decoder layers compiled while training, as ``align.compile``.
    compile: bool = added_later(False)
    logging_steps: int = 10
    #: checkpoint every N steps (0: only at the end).
    save_steps: int = 100
    #: Lisa: optimizer steps per alignment state (null: the reference's 100, shrunk for runs under 2000 steps).
    lisa_alignment_steps: int | None = None
    #: Lisa: optimizer steps per fine-tune state (null: the reference's 900, shrunk likewise).
    lisa_finetune_steps: int | None = None
    #: Lisa: rho of the proximal term rho/2 * ||w - w_other||^2 toward the other state's weights.
    lisa_rho: float = 0.01
    #: safety data mixing (the ``+mix`` methods): the provider adds round(ratio x samples) refusal
    #: pairs of ``align.alignment_data`` to the user's n samples (n + that many rows in all).
    safety_mix_ratio: float = added_later(0.1)
    #: held-out harmful pairs whose mean loss is logged during the attack (the harmful-loss probe,
    #: evaluation/probe.py): ``embedded``, a data spec with a probe split, or null for none.
    probe_data: str | None = added_later("embedded")
    #: how many probe pairs (the same ones for every seed and method).
    probe_samples: int = added_later(100)
    #: steps between probe points (null: about 4 points per attack, plus step 0 and the last).
    probe_every: int | None = added_later(None)
    #: experiment trackers, as ``align.report_to`` (TensorBoard logs in the stage's ``tensorboard/``).
    report_to: list[str] = added_later(default_factory=list, fingerprinted=False)
    #: prefix of the trackers' run names: ``<run_name>/attack/<stage folder>``.
    run_name: str | None = added_later(None, fingerprinted=False)
    #: other ``transformers.TrainingArguments`` fields, as ``align.trainer``.
    trainer: dict[str, Any] = added_later(default_factory=dict)


@dataclass
class RepairConfig:
    """Post-fine-tuning repair (the ``+antidote`` methods, docs/method.md §5): after the attack,
    zero the weights most important on harmful data (Antidote, Huang et al. 2024)."""

    #: fraction of each pruned layer's weights set to zero: the top ``prune_ratio`` of every output
    #: row by the Wanda score |W_ij| * ||X_j||_2 (the reference scripts: 0.1; 0.05 for GSM8K).
    prune_ratio: float = 0.1
    #: the re-alignment set the input activations X are measured on: harmful prompt -> harmful answer
    #: pairs (``embedded``: Booster's harmful split, disjoint from the test prompts and the poison).
    harmful_data: str = "embedded"
    #: use at most this many pairs (null: all; the reference: 2000).
    harmful_samples: int | None = 2000
    #: linear layers to prune, by the last part of their name (null: ``model.lora.target_modules``,
    #: the layers the fine-tuning changed).
    target_modules: list[str] | None = None
    #: which weights of those layers are scored and zeroed: ``adapter``, the fine-tuned adapter's own
    #: lora_A / lora_B matrices, each scored with its own input (the reference code with LoRA; the
    #: full weights when the fine-tuning trained no adapter), or ``merged``, the weights of the
    #: merged fine-tuned model (the base model's included).
    scope: str = "adapter"
    #: tokens per pair (longer pairs are cut) and pairs per forward pass.
    max_length: int = 256
    batch_size: int = 10


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
    #: new tokens for task answers (null: the task's own, tasks.py: a label 8, GSM8K 256,
    #: AlpacaEval 1024).
    task_max_new_tokens: int | None = None
    #: prompts per generation batch, or ``auto``: the largest that fits, halved on out-of-memory.
    batch_size: int | str = 16
    #: generate in bfloat16 (the model cast, adapters included) even when its stages trained in
    #: float32: faster matrix products on CPUs with bf16 units and on GPUs; answers may differ from
    #: float32's. A model trained under bf16 (``align.bf16`` / ``attack.bf16``) is evaluated in bf16 anyway.
    bf16: bool = added_later(False)
    #: judge from the registry: ``embedded-lm`` (a probe on the embedded model's hidden states; it
    #: agrees with human labels more often), ``embedded`` (MiniLM, the default before it),
    #: ``keyword``, ``beaver-dam``.
    judge: str = "embedded-lm"
    #: model for judges that load one (e.g. beaver-dam's hub id or folder).
    judge_model: str | None = None
    #: measure the harmful-loss probe (``attack.probe_data`` pairs: their loss and its gradient norm)
    #: on every aligned model, before any attack; false: only during attacks.
    probe_aligned: bool = added_later(True, fingerprinted=False)


@dataclass
class SearchConfig:
    """``booster search``: an attacker who tunes the attack's learning rate and epochs (Optuna TPE),
    scored on validation prompts disjoint from the test prompts (docs/method.md §5)."""

    #: finished trials per aligned model (method, seed); rerunning with more adds only the new ones.
    trials: int = 20
    #: trials drawn at random before TPE models the results (TPE picks the rest).
    startup_trials: int = 5
    #: the attack's learning rate, [low, high], sampled on a log scale.
    learning_rate: list[float] = field(default_factory=lambda: [1e-5, 1e-3])
    #: the attack's epochs, [low, high], whole epochs (a trial trains for epochs: max_steps -1).
    epochs: list[int] = field(default_factory=lambda: [1, 20])
    #: the poison ratio p of every trial and of the fixed attack (null: the first of attack.poison_ratios).
    poison_ratio: float | None = None
    #: the aligned models to attack (null: every method of ``methods``), each at every seed.
    methods: list[str] | None = None
    #: the sampler's seed: the same seed and the same finished trials give the same next trial.
    sampler_seed: int = 0
    #: harmful prompts the trials are scored on (null: the last ``validation_samples`` prompts of
    #: evaluate.harmful_prompts in its fixed order, after the test's first harmful_samples).
    validation_prompts: str | None = None
    #: how many validation prompts.
    validation_samples: int = 100


@dataclass
class RunConfig:
    """Everything ``booster run`` needs; ``booster align``/``attack``/``evaluate`` use their parts."""

    model: ModelConfig = field(default_factory=ModelConfig)
    #: defenses to compare, by name (``sft``, ``booster``, ``vaccine``, ``repnoise``, ``lisa``,
    #: ``booster+vaccine``, ``booster+lisa``, ``booster-from-sft``, ``booster+ascent``; ``+mix`` and
    #: ``+antidote`` combine with them, e.g. ``sft+mix``, ``booster+antidote``; ``booster methods``
    #: lists them all).
    methods: list[str] = field(default_factory=lambda: ["sft", "booster"])
    seeds: list[int] = field(default_factory=lambda: [0])
    output_dir: str = "runs/default"
    align: AlignConfig = field(default_factory=AlignConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    repair: RepairConfig = field(default_factory=RepairConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

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
    elif origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: {key} must be a mapping of names to values, got {value!r}")
        return {str(k): copy.deepcopy(v) for k, v in value.items()}
    elif dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: {key} must be a mapping of its fields, got {value!r}")
        return _build(tp, value, key, where)
    elif tp in _SCALARS and _SCALARS[tp](value):
        if tp is float:
            try:
                return float(value)
            except OverflowError:  # an integer too large for a float (10**400)
                raise UserError(f"{where}: {key} must be a finite number, got {value}") from None
        return str(value) if tp is str else value
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


def parse_yaml(text: str, path: str | Path, fix: str = "") -> Any:
    """YAML read safely (plain data only: a ``!!python`` tag is an error, never run), with a one-line
    error naming the file, the line and ``fix``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)}){fix}") from None


def _read(path: str | Path | None, overrides: list[str] | None) -> tuple[dict[str, Any], str]:
    """The YAML mapping at ``path`` (empty for None) with the ``--set`` overrides applied, and a
    name for it in error messages."""
    data: dict[str, Any] = {}
    where = str(path) if path else "defaults"
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise UserError(f"config file {str(path)!r} is a folder; pass a YAML file (see configs/)")
        if not path.is_file():
            raise UserError(f"config file {str(path)!r} not found; pass an existing YAML file (see configs/)")
        try:
            text = read_text(path, str(path))
        except OSError as err:
            raise UserError(f"config file {str(path)!r}: cannot read it ({err.strerror})") from None
        loaded = parse_yaml(text, path)
        if loaded is None:
            raise UserError(
                f"{path} is empty (nothing but blank lines or comments); write the settings in it, "
                "e.g. start from a copy of configs/tiny.yaml"
            )
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: the top level must be a mapping (model:, methods:, align:, ...)")
        data = resolve_relative_paths(loaded, path.parent)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    if overrides:
        where += " (with --set)"
    return data, where


#: settings that name files or folders (a data spec, a model, a judge model), by section.
PATH_SETTINGS = {
    "model": ("name",),
    "align": ("alignment_data", "harmful_data", "init_adapter"),
    "attack": ("task_data", "poison_data", "probe_data"),
    "repair": ("harmful_data",),
    "evaluate": ("harmful_prompts", "task_data", "judge_model"),
    "search": ("validation_prompts",),
}
#: names that are never paths (a model or data keyword is looked up before any file).
_KEYWORDS = ("tiny", "embedded")


def resolve_relative_paths(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A config file's relative paths, read against the file's folder when the path exists there, else
    left to the working directory: a config can name its data next to itself and still run from any
    folder, and older configs written relative to the repository root keep working from there.
    Absolute paths, keywords (``tiny``, ``embedded``, dataset shortcuts) and hub ids that are not a
    path there keep their meaning; ``output_dir`` stays relative to the working directory."""

    def resolve(value: Any, data_spec: bool) -> Any:
        if isinstance(value, list):
            return [resolve(v, data_spec) for v in value]
        if not isinstance(value, str) or not value.strip():
            return value
        text = value.strip()
        lowered = text.lower()
        if lowered in _KEYWORDS or lowered.startswith("embedded:") or (data_spec and lowered in hub.DATASETS):
            return value
        prefix, colon, rest = text.partition(":")
        if data_spec and colon and prefix.lower() in hub.DATASETS and rest.strip():  # NAME:PATH
            return f"{prefix}:{resolve(rest.strip(), False)}"
        if text.startswith("~") or Path(text).is_absolute():
            return value
        candidate = folder / text
        return str(candidate) if candidate.exists() else value

    data = dict(data)
    for section, names in PATH_SETTINGS.items():
        raw = data.get(section)
        if section == "model" and isinstance(raw, str):
            data[section] = resolve(raw, False)
            continue
        if not isinstance(raw, dict):
            continue
        raw = data[section] = dict(raw)
        for name in names:
            if name in raw:
                raw[name] = resolve(raw[name], section != "model" and name != "judge_model")
    return data


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
SWEEPABLE = ("align", "attack", "repair")


def sweepable_fields(section: str) -> dict[str, Any]:
    """Field name -> type of the section's scalar fields (a list-typed field such as
    ``poison_ratios`` already takes a list and is not swept; a mapping such as ``trainer`` and a
    setting outside the fingerprint such as ``run_name`` are not swept either)."""
    cls = typing.get_type_hints(RunConfig)[section]
    hints = typing.get_type_hints(cls)

    def scalar(tp: Any) -> bool:  # ``list[str] | None`` (``repair.target_modules``) is a list too
        options = typing.get_args(tp) if typing.get_origin(tp) in (types.UnionType, typing.Union) else (tp,)
        return all(
            typing.get_origin(o) not in (list, dict) and not dataclasses.is_dataclass(o) for o in options
        )

    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(cls)
        if scalar(hints[f.name]) and not f.metadata.get(NOT_FINGERPRINTED)
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
        for name, tp in sweepable_fields(section).items():
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


#: ``repair.scope`` values (:mod:`booster.methods.antidote`).
REPAIR_SCOPES = ("adapter", "merged")

#: ``attack.mode`` values; ``reference`` resolves per method (``Method.attack_mode``).
ATTACK_MODES = ("single_lora", "double_lora", "reference")

KNOWN_METHODS = tuple(registry.METHODS)

#: transformers schedulers that need what booster never passes (an evaluation during training, or
#: ``lr_scheduler_kwargs``), with what they need: they would fail only when training starts.
SCHEDULERS_NEEDING_MORE = {
    "reduce_lr_on_plateau": "an evaluation during training",
    "greedy": "an evaluation during training",
    "cosine_with_min_lr": "lr_scheduler_kwargs (min_lr)",
    "cosine_warmup_with_min_lr": "lr_scheduler_kwargs (min_lr)",
    "warmup_stable_decay": "lr_scheduler_kwargs (num_decay_steps)",
}

#: the largest seed numpy (and so transformers' set_seed) accepts.
MAX_SEED = 2**32 - 1


def _shown(value: Any) -> str:
    """A value in an error message: numbers as Python prints them, text quoted."""
    return repr(value) if isinstance(value, str) else str(value)


def _require(where: str, key: str, value: Any, ok: bool, rule: str) -> None:
    """``<where>: <key> must be <rule>, got <value>`` unless ``ok``."""
    if not ok:
        raise UserError(f"{where}: {key} must be {rule}, got {_shown(value)}")


def _one_of(where: str, key: str, value: str, known: list[str], what: str) -> None:
    """A name from a fixed list, with a did-you-mean suggestion like the unknown-key errors."""
    if value in known:
        return
    close = [k for k in known if k.startswith(value)][:1] or difflib.get_close_matches(value, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close and value else ""
    raise UserError(f"{where}: {key} must be {what}, got {value!r}{hint} (known: {', '.join(known)})")


def _floats(obj: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every float setting of a config (nested sections and list items too), by dotted key."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _floats(value, f"{key}.")
        elif isinstance(value, float):
            yield key, value
        elif isinstance(value, list):
            yield from ((f"{key}[{i}]", v) for i, v in enumerate(value) if isinstance(v, float))


def _no_duplicates(where: str, key: str, values: list[Any]) -> None:
    """A repeated seed, method or ratio would be averaged with itself and show as "± 0.0"."""
    for i, value in enumerate(values):
        if value in values[:i]:
            raise UserError(f"{where}: {key} lists {_shown(value)} twice; give each value once")


def _check_training(where: str, name: str, section: AlignConfig | AttackConfig) -> None:
    """The Trainer settings both training stages share."""
    from transformers.trainer_utils import (
        SchedulerType,  # heavy: loaded only where it is used, so light commands stay fast
    )
    from transformers.training_args import (
        OptimizerNames,  # heavy: loaded only where it is used, so light commands stay fast
    )

    need = functools.partial(_require, where)
    need(f"{name}.batch_size", section.batch_size, section.batch_size >= 1, ">= 1")
    steps = section.gradient_accumulation_steps
    need(f"{name}.gradient_accumulation_steps", steps, steps >= 1, ">= 1")
    need(f"{name}.learning_rate", section.learning_rate, section.learning_rate > 0, "> 0")
    need(f"{name}.max_length", section.max_length, section.max_length >= 1, ">= 1 (tokens per sample)")
    need(f"{name}.weight_decay", section.weight_decay, section.weight_decay >= 0, ">= 0 (0: no decay)")
    need(f"{name}.max_grad_norm", section.max_grad_norm, section.max_grad_norm >= 0, ">= 0 (0: no clipping)")
    need(f"{name}.warmup_ratio", section.warmup_ratio, 0 <= section.warmup_ratio < 1, "in [0, 1)")
    need(f"{name}.logging_steps", section.logging_steps, section.logging_steps >= 1, ">= 1")
    need(f"{name}.save_steps", section.save_steps, section.save_steps >= 0, ">= 0 (0: save only at the end)")
    need(
        f"{name}.max_steps",
        section.max_steps,
        section.max_steps == -1 or section.max_steps >= 1,
        "-1 (train for epochs) or >= 1",
    )
    if section.max_steps == -1:
        need(f"{name}.epochs", section.epochs, section.epochs > 0, "> 0 when max_steps is -1")
    usable = [s.value for s in SchedulerType if s.value not in SCHEDULERS_NEEDING_MORE]
    if section.lr_scheduler in SCHEDULERS_NEEDING_MORE:
        raise UserError(
            f"{where}: {name}.lr_scheduler={section.lr_scheduler!r} needs "
            f"{SCHEDULERS_NEEDING_MORE[section.lr_scheduler]}, which booster does not pass; "
            f"use one of {', '.join(usable)}"
        )
    _one_of(where, f"{name}.lr_scheduler", section.lr_scheduler, usable, "a transformers scheduler")
    optimizers = [o.value for o in OptimizerNames]
    _one_of(where, f"{name}.optim", section.optim, optimizers, "a transformers optimizer")


def _is_path_spec(value: str) -> bool:
    """Whether ``align.init_adapter`` names a folder rather than a method (a path has a separator,
    starts with ``.`` or ``~``, or exists)."""
    return "/" in value or "\\" in value or value.startswith((".", "~")) or Path(value).exists()


def _check_init_adapter(where: str, value: str | None) -> None:
    """A method name that starts from the base model, or something that reads as a folder (whether it
    holds an adapter is checked before training, by :mod:`booster.preflight`)."""
    if value is None or value in registry.METHODS:
        if value is not None and registry.get_method(value).init_from is not None:
            start = registry.get_method(value).init_from
            raise UserError(
                f"{where}: align.init_adapter={value!r} itself starts from {start}'s alignment; name a "
                f"method that starts from the base model (e.g. {start}) or an adapter folder"
            )
        return
    if not _is_path_spec(value):
        known = list(registry.METHODS)
        close = difflib.get_close_matches(value, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(
            f"{where}: align.init_adapter={value!r} is not a method ({hint}known: {', '.join(known)}) "
            "nor an adapter folder (give its path, e.g. ./adapters/sft)"
        )


def validate(config: RunConfig, where: str) -> None:
    """Range checks that types alone cannot express: every number that would make a run fail late
    or quietly measure nothing (a NaN weight, no end-of-sequence token, zero training) stops here."""
    for key, value in _floats(config):
        _require(where, key, value, math.isfinite(value), "a finite number")
    align, attack, evaluate, lora = config.align, config.attack, config.evaluate, config.model.lora
    need = functools.partial(_require, where)

    if not config.seeds:
        raise UserError(f"{where}: seeds is empty; list at least one, e.g. [0]")
    for seed in config.seeds:
        need("seeds", seed, 0 <= seed <= MAX_SEED, f"in [0, {MAX_SEED}]")
    _no_duplicates(where, "seeds", config.seeds)
    if not config.methods:
        raise UserError(f"{where}: methods is empty; list at least one, e.g. [sft, booster]")

    for method in config.methods:
        if method not in registry.METHODS:
            close = difflib.get_close_matches(method, list(registry.METHODS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            known = ", ".join(m for m in registry.METHODS if not m.endswith(("+mix", "+antidote")))
            raise UserError(
                f"{where}: unknown method {method!r}{hint} (known: {known}; +mix and +antidote combine "
                "with them, `booster methods` lists every name)"
            )
    _no_duplicates(where, "methods", config.methods)

    _one_of(where, "model.dtype", config.model.dtype, list(DTYPES), "a dtype")
    need("model.lora.r", lora.r, lora.r >= 1, ">= 1")
    need("model.lora.alpha", lora.alpha, lora.alpha > 0, "> 0")
    need("model.lora.dropout", lora.dropout, 0 <= lora.dropout < 1, "in [0, 1)")
    if lora.enabled and not lora.target_modules:
        raise UserError(
            f"{where}: model.lora.target_modules is empty; name the modules, e.g. [q_proj, v_proj]"
        )

    for ratio in attack.poison_ratios:
        if not 0.0 <= ratio <= 1.0:
            raise UserError(f"{where}: attack.poison_ratios has {ratio}; each ratio must be in [0, 1]")
    _no_duplicates(where, "attack.poison_ratios", attack.poison_ratios)
    if config.model.template not in ("alpaca", "chat"):
        raise UserError(f"{where}: model.template={config.model.template!r}; use alpaca or chat")
    if attack.mode not in ATTACK_MODES:
        raise UserError(f"{where}: attack.mode={attack.mode!r}; use single_lora, double_lora or reference")
    if attack.mode != "single_lora" and not lora.enabled:
        raise UserError(
            f"{where}: attack.mode={attack.mode} needs model.lora.enabled=true "
            "(with full fine-tuning use single_lora)"
        )

    _check_training(where, "align", align)
    _check_training(where, "attack", attack)

    for name, section in (("align", align), ("attack", attack)):
        passthrough.check_report_to(where, name, section.report_to)
        passthrough.check_trainer_options(where, name, section, _coerce)
    passthrough.check_lora_extra(where, lora, _coerce)
    for key in ("alignment_samples", "harmful_samples", "harmful_batch_size"):
        value = getattr(align, key)
        need(f"align.{key}", value, value is None or value >= 1, ">= 1 or null")
    need("align.lamb", align.lamb, align.lamb >= 0, ">= 0")
    need("align.alpha", align.alpha, align.alpha >= 0, ">= 0")
    for key in ("vaccine_rho", "repnoise_alpha", "repnoise_beta", "ascent_weight"):
        need(f"align.{key}", getattr(align, key), getattr(align, key) >= 0, ">= 0")
    _check_init_adapter(where, align.init_adapter)
    need("attack.lisa_rho", attack.lisa_rho, attack.lisa_rho >= 0, ">= 0")
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
    need("attack.samples", attack.samples, attack.samples >= 1, ">= 1")
    need("attack.safety_mix_ratio", attack.safety_mix_ratio, attack.safety_mix_ratio >= 0, ">= 0")
    repair = config.repair
    need("repair.prune_ratio", repair.prune_ratio, 0 < repair.prune_ratio < 1, "in (0, 1), e.g. 0.1")
    samples = repair.harmful_samples
    need("repair.harmful_samples", samples, samples is None or samples >= 1, ">= 1 or null")
    need("repair.max_length", repair.max_length, repair.max_length >= 1, ">= 1 (tokens per pair)")
    need("repair.batch_size", repair.batch_size, repair.batch_size >= 1, ">= 1")
    need("repair.scope", repair.scope, repair.scope in REPAIR_SCOPES, "adapter or merged")
    if repair.target_modules is not None and not repair.target_modules:
        raise UserError(
            f"{where}: repair.target_modules is empty; name the layers, e.g. [q_proj, v_proj], or null"
        )
    need("attack.probe_samples", attack.probe_samples, attack.probe_samples >= 1, ">= 1")
    if attack.probe_every is not None:
        need("attack.probe_every", attack.probe_every, attack.probe_every >= 1, ">= 1 (null: about 4 points)")

    need("evaluate.harmful_samples", evaluate.harmful_samples, evaluate.harmful_samples >= 1, ">= 1")
    need("evaluate.task_samples", evaluate.task_samples, evaluate.task_samples >= 0, ">= 0 (0 skips FA)")
    batch = evaluate.batch_size
    need(
        "evaluate.batch_size",
        batch,
        batch == "auto" or (isinstance(batch, int) and batch >= 1),
        ">= 1 or auto",
    )
    need("evaluate.max_new_tokens", evaluate.max_new_tokens, evaluate.max_new_tokens >= 1, ">= 1")
    tokens = evaluate.task_max_new_tokens
    need(
        "evaluate.task_max_new_tokens",
        tokens,
        tokens is None or tokens >= 1,
        ">= 1 or null (the task's own)",
    )
    _check_search(where, config)


def _check_search(where: str, config: RunConfig) -> None:
    """The search's budget and ranges: each range is [low, high] with low <= high."""
    search = config.search
    need = functools.partial(_require, where)
    need("search.trials", search.trials, search.trials >= 1, ">= 1")
    need("search.startup_trials", search.startup_trials, search.startup_trials >= 0, ">= 0")
    for key, values, rule in (
        ("learning_rate", search.learning_rate, "> 0"),
        ("epochs", search.epochs, ">= 1"),
    ):
        if len(values) != 2:
            raise UserError(f"{where}: search.{key} must be [low, high] (two values), got {values}")
        lo, hi = values
        if not (lo > 0 if key == "learning_rate" else lo >= 1):
            raise UserError(f"{where}: search.{key}: low must be {rule}, got {_shown(lo)}")
        if hi < lo:
            raise UserError(f"{where}: search.{key} must be [low, high] with low <= high, got {values}")
    ratio = search.poison_ratio
    need("search.poison_ratio", ratio, ratio is None or 0.0 <= ratio <= 1.0, "in [0, 1] or null")
    for method in search.methods or []:
        if method not in registry.METHODS:
            _one_of(where, "search.methods", method, list(registry.METHODS), "a method")
    _no_duplicates(where, "search.methods", search.methods or [])
    if search.methods == []:
        raise UserError(f"{where}: search.methods is empty; list methods, or null for every method")
    need(
        "search.sampler_seed",
        search.sampler_seed,
        0 <= search.sampler_seed <= MAX_SEED,
        f"in [0, {MAX_SEED}]",
    )
    need("search.validation_samples", search.validation_samples, search.validation_samples >= 1, ">= 1")


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
