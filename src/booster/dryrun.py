"""``booster run --dry-run``: the grid a config would run, what it would cost, and proof that it runs.

The plan lists every cell with an estimate of its forward/backward passes (alignment steps times the
method's passes per step, plus attack steps) and of the samples it reads ("all" is the rows the data
holds, counted where that needs no network), then its GPU cost (tokens, FLOPs, peak memory,
GPU-hours; :mod:`booster.cost`). A stage or evaluation several cells share (their folders are the
same) counts once, in the first cell that runs it. Then what of the grid the output folder already
holds, and the wall time of the rest at the speeds its finished stages measured. Then the same grid (seeds,
methods, sweep lists, method hyperparameters, modes and flags as written) runs end to end at tiny
sizes, on the tiny model and the tiny local data of a source checkout (``configs/data/tiny``), into
``{output_dir}/dry-run``: a config that names hub models and datasets which cannot be downloaded
here still proves that it parses and that every stage of every cell runs. Only sizes (samples,
steps, batch, lengths, new tokens) shrink; a swept size keeps its values apart (the i-th smallest
becomes the tiny size + i), so the grid keeps its shape. The data, the model and the judge are the
tiny ones; a swept data setting therefore collapses to one value, and the plan says so.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from booster import cost
from booster.config import (
    AlignConfig,
    AttackConfig,
    RunConfig,
    Sweep,
    config_from_dict,
    format_point,
    settings_dict,
    short_names,
    sweep_from_dict,
)
from booster.cost import ModelSize, training_tokens
from booster.data.mixing import safety_count
from booster.data.sources import task_name
from booster.errors import UserError
from booster.methods.registry import METHODS, alignment_method, get_method, init_adapter
from booster.models import DTYPES
from booster.pipeline import BROKEN_MARK, run_pipeline
from booster.plan import (
    Cell,
    Rows,
    attack_samples,
    cells,
    count_rows,
    planned_steps,
    repair_batches,
    used_samples,
)
from booster.preflight import preflight
from booster.stages.align import align_dir
from booster.stages.attack import attack_dir
from booster.stages.evaluate import evaluation_file
from booster.stages.repair import final_dir, repair_dir
from booster.storage import CHECKPOINTS, STAGE_KINDS, checkpoint_step, read_done, read_json, stage_time
from booster.tasks import DEFAULT_MAX_NEW_TOKENS, default_max_new_tokens

#: where the dry run's output goes, under the config's output_dir.
DRY_RUN_DIR = "dry-run"


def _keep_none(size: int) -> Callable[[Any], Any]:
    return lambda v: None if v is None else size


#: section -> field -> its tiny size given the real value.
SIZES: dict[str, dict[str, Callable[[Any], Any]]] = {
    "align": {
        "alignment_samples": lambda v: 8,
        "harmful_samples": lambda v: 8,
        "max_length": lambda v: 64,
        "max_steps": lambda v: 2,
        "batch_size": lambda v: 2,
        "harmful_batch_size": _keep_none(2),
        "gradient_accumulation_steps": lambda v: min(v, 2),  # keeps accumulation on where it is on
        "logging_steps": lambda v: 1,
        "save_steps": lambda v: 0,
    },
    "attack": {
        "samples": lambda v: 4,
        "max_length": lambda v: 128,  # the tiny tokenizer spends many tokens on the template
        "max_steps": lambda v: 2,
        "batch_size": lambda v: 2,
        "gradient_accumulation_steps": lambda v: min(v, 2),
        "logging_steps": lambda v: 1,
        "save_steps": lambda v: 0,
        "probe_samples": lambda v: 2,
        "probe_every": _keep_none(1),
        "lisa_alignment_steps": _keep_none(1),
        "lisa_finetune_steps": _keep_none(1),
    },
    "repair": {
        "harmful_samples": lambda v: 4,
        "max_length": lambda v: 64,
        "batch_size": lambda v: 2,
    },
    "evaluate": {
        "harmful_samples": lambda v: 2,
        "task_samples": lambda v: min(v, 2),  # 0 (no FA) stays 0
        "max_new_tokens": lambda v: 4,
        "task_max_new_tokens": _keep_none(4),
        "batch_size": lambda v: 4,
    },
}

#: data settings -> the tiny file or folder (under the tiny data folder) that replaces them.
TINY_DATA = {
    "align.alignment_data": "alignment.jsonl",
    "align.harmful_data": "harmful.jsonl",
    "attack.task_data": "sentiment",
    "attack.poison_data": "poison.jsonl",
    "attack.probe_data": "probe.jsonl",
    "repair.harmful_data": "harmful.jsonl",
    "evaluate.harmful_prompts": "harmful_prompts.jsonl",
}


def tiny_data_dir() -> Path:
    """``configs/data/tiny`` of the source checkout this package runs from (or of the working folder)."""
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        folder = base / "configs" / "data" / "tiny"
        if folder.is_dir():
            return folder
    raise UserError(
        "--dry-run needs the tiny data of a source checkout (configs/data/tiny); run it from the repository"
    )


def _shrink(values: list[Any], size: Callable[[Any], Any]) -> list[Any]:
    """Tiny sizes for a swept size, kept apart and in order: the i-th smallest number becomes the
    tiny size of the smallest + i (None, e.g. "all samples", stays None)."""
    numbers = sorted({v for v in values if v is not None})
    if not numbers:
        return list(values)
    start = size(numbers[0])
    return [None if v is None else start + numbers.index(v) for v in values]


def tiny_sweep(sweep: Sweep) -> tuple[Sweep, list[str]]:
    """The sweep at tiny sizes on the tiny model and data, and notes on what changed beyond sizes."""
    data = sweep.to_dict()
    notes = [f"model `{data['model']['name']}` -> tiny (LoRA settings kept)"]
    data["model"].update(name="tiny", revision=None, trust_remote_code=False)
    for section, sizes in SIZES.items():
        for name, size in sizes.items():
            value = data[section][name]
            data[section][name] = _shrink(value, size) if isinstance(value, list) else size(value)
    folder = tiny_data_dir()
    for key, file in TINY_DATA.items():
        section, name = key.split(".")
        value = data[section][name]
        if value is None:  # a data set the config turns off (e.g. no probe) stays off
            continue
        if isinstance(value, list):
            notes.append(f"`{key}` swept over {len(value)} values -> one tiny data set")
        data[section][name] = str(folder / file)
    notes.append(f"data -> {folder}")
    start = data["align"].get("init_adapter")
    if (
        isinstance(start, str) and start not in METHODS
    ):  # an adapter of the real model cannot load on the tiny one
        notes.append(f"align.init_adapter `{start}` -> none (the tiny model cannot load that adapter)")
        data["align"]["init_adapter"] = None
    evaluate = data["evaluate"]
    if evaluate["task_data"] is not None:
        notes.append(f"evaluate.task_data `{evaluate['task_data']}` -> the tiny task's test split")
    if evaluate["judge"] != "keyword":
        notes.append(f"judge `{evaluate['judge']}` -> keyword")
    evaluate.update(task_data=None, judge="keyword", judge_model=None)
    for section in ("align", "attack"):  # a dry run is not an experiment to track
        if data[section].get("report_to"):
            notes.append(f"{section}.report_to {data[section]['report_to']} -> none")
            data[section]["report_to"] = []
    data["output_dir"] = str(Path(sweep.base.output_dir) / DRY_RUN_DIR)
    return sweep_from_dict(data, f"{sweep.where} (dry run)"), notes


@dataclass(frozen=True)
class Stage:
    """A training stage or an evaluation of the grid, counted once however many cells share it."""

    #: "align", "attack", "repair" or "evaluation".
    kind: str
    #: how its speed is measured and shown: "align booster", "attack", "attack lisa", "repair",
    #: "evaluation".
    label: str
    #: the stage folder, or the evaluation file.
    path: Path
    #: optimizer steps of a training stage, forward batches of a repair (None: unknown); 1 for an
    #: evaluation.
    steps: int | None
    #: the settings that set its speed (see :func:`timing_key`): only stages that agree on them are
    #: timed by each other's measurements.
    timing: tuple[tuple[str, str], ...]


#: the settings of a section that set how long a step takes (the learning rate, data, ... do not).
TIMING_FIELDS = {
    "align": ("batch_size", "harmful_batch_size", "gradient_accumulation_steps", "max_length"),
    "attack": ("batch_size", "gradient_accumulation_steps", "max_length"),
    "repair": ("batch_size", "max_length"),
}
TIMING_COMMON = ("bf16", "compile", "gradient_checkpointing", "group_by_length", "optim", "trainer")


def timing_key(config: RunConfig, kind: str) -> tuple[tuple[str, str], ...]:
    """What the speed of an ``align``, ``attack`` or ``repair`` stage depends on: the model and the
    section's shapes (a stage's ``config.yaml`` read back gives the same key as the config that
    wrote it); a repair trains nothing, so only its batch shape counts."""
    section = getattr(config, kind)
    fields = TIMING_FIELDS[kind] + (TIMING_COMMON if kind != "repair" else ())
    return (("model", _text(settings_dict(config.model))), *((f, _text(getattr(section, f))) for f in fields))


def evaluation_key(config: RunConfig, name: str) -> tuple[tuple[str, str], ...]:
    """What the time of an evaluation depends on: its file name (the fingerprint of the evaluation
    settings and the task) and the model."""
    return (("evaluation", name), ("model", _text(settings_dict(config.model))))


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def stage_label(kind: str, method: str) -> str:
    """``align <method>`` (methods align at their own speed); ``attack``, except for a method that
    trains the attack itself (Lisa: ``attack lisa``); ``repair``."""

    if kind in ("align", "repair"):
        return f"align {method}" if kind == "align" else "repair"
    try:
        own = get_method(method).build_attack_trainer is not None
    except KeyError:  # a method this version does not know (a stage an older version wrote)
        own = True
    return f"attack {method}" if own else "attack"


@dataclass
class Estimate:
    """What one cell costs: the stages and evaluations it runs first (those of an earlier cell are
    reused, not counted again), and the samples its alignment reads."""

    cell: Cell
    align_steps: int | None
    align_passes: int
    attack_steps: int | None
    #: forward batches of each repair after an attack (0: the method repairs nothing; None: unknown).
    repair_batches: int | None
    #: samples the alignment reads (None: unknown) and the rows its data holds.
    align_samples: int | None
    align_rows: Rows
    #: the same for Booster's harmful set (None when the method does not read it).
    harmful_samples: int | None
    harmful_rows: Rows | None
    #: training stages this cell runs first: its alignment, then its attacks.
    stages: list[Stage]
    #: evaluations this cell runs first.
    evaluations: list[Stage]

    @property
    def shared(self) -> bool:
        """The alignment is an earlier cell's (the cells differ only in attack settings)."""
        return not any(s.kind == "align" for s in self.stages)

    @property
    def attacks(self) -> int:
        """Attacks this cell runs first (``attack.mode: reference`` may resolve to an earlier cell's)."""
        return sum(1 for s in self.stages if s.kind == "attack")

    @property
    def repairs(self) -> int:
        """Repairs this cell runs first."""
        return sum(1 for s in self.stages if s.kind == "repair")

    @property
    def passes(self) -> int | None:
        """Forward/backward passes over one batch (accumulation micro-batches count each)."""
        config = self.cell.config
        align = 0 if self.shared else _times(self.align_steps, self.align_passes)
        align = _times(align, config.align.gradient_accumulation_steps)
        attack = _times(self.attack_steps, self.attacks) if self.attacks else 0
        attack = _times(attack, config.attack.gradient_accumulation_steps)
        return None if align is None or attack is None else align + attack


def _times(a: int | None, b: int) -> int | None:
    return None if a is None else a * b


def estimate(sweep: Sweep, root: str | Path | None = None) -> list[Estimate]:
    """The plan of the grid: per cell, its steps and the stages (folders under ``root``, default the
    output folder) and evaluations no earlier cell runs. "All" samples are the rows the data holds,
    counted where that needs no network."""

    root = Path(root or sweep.base.output_dir)
    counted: dict[tuple[str, str], Rows] = {}

    def rows(spec: str, role: str) -> Rows:
        if (spec, role) not in counted:
            counted[spec, role] = count_rows(spec, role)
        return counted[spec, role]

    seen: set[Path] = set()
    plan = []
    for cell in cells(sweep):
        config, method = cell.config, cell.method
        aligner = alignment_method(method)
        align_rows = rows(config.align.alignment_data, "alignment")
        align_samples = used_samples(config.align.alignment_samples, align_rows)
        harmful_rows = harmful_samples = None
        if get_method(aligner).uses_harmful_data:
            harmful_rows = rows(config.align.harmful_data, "harmful")
            harmful_samples = used_samples(config.align.harmful_samples, harmful_rows)
        align_steps = planned_steps(config.align, align_samples)
        attack_steps = planned_steps(config.attack, attack_samples(config, method))
        batches = repair_batches(config) if get_method(method).repair is not None else 0
        stages, evaluations = _new_stages(cell, root, align_steps, attack_steps, batches, seen)
        passes = get_method(method).align_passes
        start = init_adapter(method, config.align.init_adapter)
        if start in METHODS and any(s.path == align_dir(config, start, cell.seed, root) for s in stages):
            passes += get_method(start).align_passes  # the alignment it starts from runs first, same steps
        plan.append(
            Estimate(
                cell,
                align_steps,
                passes,
                attack_steps,
                batches,
                align_samples,
                align_rows,
                harmful_samples,
                harmful_rows,
                stages,
                evaluations,
            )
        )
    return plan


def _new_stages(
    cell: Cell,
    root: Path,
    align_steps: int | None,
    attack_steps: int | None,
    repair_batches: int | None,
    seen: set[Path],
) -> tuple[list[Stage], list[Stage]]:
    """The stages and evaluations of ``cell`` that are not in ``seen`` (an earlier cell's), added to
    it. A shared stage's evaluation may still be new: the aligned model is scored on each cell's
    task. A repairing method's attacked model is evaluated only after its repair."""

    config, method, seed = cell.config, cell.method, cell.seed
    start = init_adapter(method, config.align.init_adapter)
    starts = [start] if start in METHODS else []  # the alignment it starts from runs first
    trained = [
        Stage(
            "align",
            stage_label("align", alignment_method(s)),
            align_dir(config, s, seed, root),
            align_steps,
            timing_key(config, "align"),
        )
        for s in [*starts, method]
    ]
    for ratio in config.attack.poison_ratios:
        folder = attack_dir(config, method, seed, ratio, root)
        trained.append(
            Stage("attack", stage_label("attack", method), folder, attack_steps, timing_key(config, "attack"))
        )
        if get_method(method).repair is not None:
            folder = repair_dir(config, method, seed, ratio, root)
            trained.append(Stage("repair", "repair", folder, repair_batches, timing_key(config, "repair")))
    evaluated = [align_dir(config, method, seed, root)]
    evaluated += [final_dir(config, method, seed, ratio, root) for ratio in config.attack.poison_ratios]
    stages, evaluations = [], []
    for stage in trained:
        if stage.path not in seen:
            seen.add(stage.path)
            stages.append(stage)
    for folder in evaluated:
        path = evaluation_file(config, folder, config.attack.task_data)
        if path not in seen:
            seen.add(path)
            evaluations.append(Stage("evaluation", "evaluation", path, 1, evaluation_key(config, path.name)))
    return stages, evaluations


def _n(value: int | None) -> str:
    return "all" if value is None else f"{value:,}"


def _steps(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _samples(limit: int | None, used: int | None) -> str:
    """``5,000``; ``613 (all)`` when "all" was counted; ``613 (of 5,000)`` when the data holds fewer."""
    if used is None or used == limit:
        return _n(limit)
    return f"{used:,} (all)" if limit is None else f"{used:,} (of {limit:,})"


def _count_notes(plan: list[Estimate]) -> list[str]:
    """One line per data set whose size a plan needed and could not count."""
    notes: dict[str, None] = {}
    for e in plan:
        align = e.cell.config.align
        for key, spec, limit, rows in (
            ("align.alignment_data", align.alignment_data, align.alignment_samples, e.align_rows),
            ("align.harmful_data", align.harmful_data, align.harmful_samples, e.harmful_rows),
        ):
            if rows is None or rows.count is not None:
                continue
            if rows.on_hub and limit is not None:  # the limit is what the stage reads; nothing is missing
                continue
            what = f"rows of {key} `{spec}` unknown ({rows.why})"
            if key == "align.alignment_data" and align.max_steps <= 0:
                what += ": steps unknown" if limit is None else f": steps assume {limit:,} samples"
            notes[f"note: {what}"] = None
    return list(notes)


def plan_lines(sweep: Sweep, plan: list[Estimate]) -> list[str]:
    """One line per cell: seed, method, swept values, poison ratios, passes and samples; the grid's
    total (a stage or evaluation several cells share counts once); data sizes it could not count."""
    names = short_names(sweep.variables)
    header = [
        "seed",
        "method",
        "swept",
        "p",
        "align steps x passes",
        "attack p x steps",
        "fwd/bwd",
        "samples",
    ]
    rows = []
    for e in plan:
        c = e.cell.config
        align = "shared" if e.shared else f"{_steps(e.align_steps)} x {e.align_passes}"
        ratios = c.attack.poison_ratios
        attack = f"{len(ratios)} x {_steps(e.attack_steps)}"
        if ratios and e.attacks == 0:
            attack = "shared"
        elif e.attacks < len(ratios):
            attack += f" ({len(ratios) - e.attacks} shared)"
        samples = f"align {_samples(c.align.alignment_samples, e.align_samples)}"
        if e.harmful_rows is not None:
            samples += f" + harmful {_samples(c.align.harmful_samples, e.harmful_samples)}"
        samples += f", attack n={c.attack.samples:,}" if ratios else ""
        if ratios and get_method(e.cell.method).mixes_safety_data:
            samples += f" + {safety_count(c.attack.samples, c.attack.safety_mix_ratio):,} safety"
        if e.repairs:
            samples += (
                f", repair {e.repairs} x {_steps(e.repair_batches)} forward batches of {c.repair.batch_size}"
            )
        samples += f", eval {len(e.evaluations)} x ({c.evaluate.harmful_samples:,} prompts + {c.evaluate.task_samples:,})"
        rows.append(
            [
                str(e.cell.seed),
                e.cell.method,
                format_point(e.cell.sweep, names) or "-",
                ",".join(f"{p:g}" for p in ratios) or "-",
                align,
                attack,
                "?" if e.passes is None else f"{e.passes:,}",
                samples,
            ]
        )
    lines = _table(header, rows)
    known = [e.passes for e in plan if e.passes is not None]
    base = sweep.base
    total = f"{sum(known):,}" + (" (+ cells of unknown size)" if len(known) < len(plan) else "")
    alignments = sum(1 for e in plan if not e.shared)
    attacks = sum(e.attacks for e in plan)
    repairs = sum(e.repairs for e in plan)
    evaluations = sum(len(e.evaluations) for e in plan)
    repaired = f"{repairs} repairs, " if repairs else ""
    lines.append(
        f"total: {len(plan)} cells, {alignments} alignments, {attacks} attacks, {repaired}{total} forward/backward "
        f"passes (one batch each: align batch {base.align.batch_size}, attack batch {base.attack.batch_size}), "
        f"{evaluations} evaluations; a stage several cells share counts once"
    )
    return lines + _count_notes(plan)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]


def cost_lines(sweep: Sweep, plan: list[Estimate], size: ModelSize | None) -> list[str]:
    """Per cell and for the grid: tokens, FLOPs, peak GPU memory and GPU-hours on the cards of
    ``cost.GPUS`` (the rules are in :mod:`booster.cost`). A cell counts only the stages it runs first."""

    def stage_tokens(section: AlignConfig | AttackConfig, steps: int | None) -> int | None:
        return training_tokens(
            steps, section.batch_size, section.gradient_accumulation_steps, section.max_length
        )

    names = short_names(sweep.variables)
    gpus = [gpu.name for gpu in cost.GPUS]
    header = ["seed", "method", "swept", "tokens", "FLOPs", "peak memory", *(f"{g} h" for g in gpus)]
    rows = []
    totals: dict[str, Any] = {"tokens": 0, "flops": 0.0, "peak": 0}
    evaluations = [0.0] * len(gpus)  # the grid's evaluation hours per card
    for e in plan:
        c = e.cell.config
        align = 0 if e.shared else stage_tokens(c.align, e.align_steps)
        attack = _times(stage_tokens(c.attack, e.attack_steps), e.attacks) if e.attacks else 0
        repair = 0  # a repair's forward passes over its re-alignment set
        if e.repairs:
            batches = _times(e.repair_batches, e.repairs)
            repair = None if batches is None else batches * c.repair.batch_size * c.repair.max_length
        known = align is not None and attack is not None and repair is not None
        tokens = align + attack + repair if known else None
        flops = peak = None
        if size is not None and tokens is not None:
            assert align is not None and attack is not None and repair is not None
            flops = (align * e.align_passes + attack) * cost.flops_per_token(size)
            flops += repair * cost.forward_flops_per_token(size)
        if size is not None:  # memory depends on the batch, not on how many steps
            peaks = []
            if not e.shared:
                booster = "lamb" in get_method(alignment_method(e.cell.method)).params  # Booster's trainer
                batch = max(c.align.batch_size, c.align.harmful_batch_size or 0)
                peaks.append(
                    cost.stage_memory(
                        size, batch, c.align.max_length, c.align.bf16, c.align.gradient_checkpointing, booster
                    )
                )
            if e.attacks:
                a = c.attack
                peaks.append(
                    cost.stage_memory(
                        size, a.batch_size, a.max_length, a.bf16, a.gradient_checkpointing, False
                    )
                )
            peak = max(peaks, default=0)  # 0: the cell trains nothing an earlier cell does not
        for key, value in (("tokens", tokens), ("flops", flops), ("peak", peak)):
            if totals[key] is not None:
                totals[key] = None if value is None else (max if key == "peak" else sum)((totals[key], value))
        judging = [0.0] * len(gpus)
        if size is not None and e.evaluations:
            one = cost.evaluation_hours(size, evaluation_size(c))
            judging = [len(e.evaluations) * h for h in one]
            evaluations = [a + b for a, b in zip(evaluations, judging, strict=True)]
        rows.append(
            [
                str(e.cell.seed),
                e.cell.method,
                format_point(e.cell.sweep, names) or "-",
                cost.format_count(tokens),
                cost.format_flops(flops),
                "-" if peak == 0 else cost.format_gib(peak),
                *_hours(flops, peak, judging),
            ]
        )
    table = _table(header, rows)
    if size is None:
        model = "parameters unknown (its config is not readable offline), so FLOPs, memory and hours are too"
    else:
        lora = (
            ""
            if size.lora_parameters is None
            else f", {cost.format_count(size.lora_parameters)} trained by LoRA"
        )
        model = f"{cost.format_count(size.parameters)} parameters{lora}"
    train = _hours(totals["flops"], totals["peak"])
    both = _hours(totals["flops"], totals["peak"], evaluations)
    hours = ", ".join(
        f"{g} {t} + {_hour(h)} = {b}" for g, t, h, b in zip(gpus, train, evaluations, both, strict=True)
    )
    base = sweep.base
    judge = (
        f"the {base.evaluate.judge} judge" if base.evaluate.judge in cost.JUDGE_PARAMETERS else "no GPU judge"
    )
    return [
        f"cost on one GPU, model {base.model.name}: {model}",
        *table,
        f"grid: {cost.format_count(totals['tokens'])} tokens, {cost.format_flops(totals['flops'])} FLOPs, "
        f"GPU-hours (training + {sum(len(e.evaluations) for e in plan)} evaluations = all) {hours}; "
        f"peak memory {cost.format_gib(totals['peak'])}",
        "(tokens: sequences read x max_length, an upper bound; FLOPs per token and pass: 4 x parameters with "
        "LoRA (the backward pass runs through the frozen weights) + 6 x LoRA parameters, 6 x parameters "
        "without, times the method's passes; a repair's forward pass 2 x parameters; hours: training and evaluation, at published peak bf16 FLOP/s x "
        f"{cost.UTILISATION:.0%} utilisation, generation's decoding at the card's memory bandwidth x "
        f"{cost.BANDWIDTH_UTILISATION:.0%}, every answer to its token limit, prompts up to attack.max_length "
        f"tokens, {judge}; memory: weights + trainable state + activations at the batch size of the "
        "training, see src/booster/cost.py; * more than the card's memory)",
    ]


def evaluation_size(config: RunConfig) -> cost.EvaluationSize:
    """What one evaluation of a cell generates and judges: the harmful prompts, then the task's test
    split at its token limit (``task_max_new_tokens``, else the task's own)."""
    ev = config.evaluate
    answers = [(ev.harmful_samples, ev.max_new_tokens)]
    spec = ev.task_data or config.attack.task_data
    if spec and ev.task_samples > 0:
        try:
            new = ev.task_max_new_tokens or default_max_new_tokens(task_name(spec))
        except UserError:  # a task that cannot be told offline: the default limit
            new = ev.task_max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        answers.append((ev.task_samples, new))
    bf16 = config.align.bf16 or config.attack.bf16 or config.model.dtype == "bfloat16"
    return cost.EvaluationSize(
        answers=tuple(answers),
        batch=ev.batch_size,
        prompt_tokens=config.attack.max_length,
        weight_bytes=2 if bf16 else DTYPES[config.model.dtype].itemsize,
        judged=ev.harmful_samples,
        judge_parameters=cost.JUDGE_PARAMETERS.get(ev.judge, 0),
    )


# -- what is done, and how long the rest takes at the measured speeds -------------------------------


@dataclass
class Speed:
    """Measured times of finished stages (or evaluations) of one kind: a stage takes its steps x the
    mean seconds per step, plus the mean seconds around training (loading, tokenizing, saving); an
    evaluation counts as one step with nothing around it."""

    #: stages (or evaluations) measured.
    count: int = 0
    #: optimizer steps they trained (an evaluation counts as one).
    steps: int = 0
    #: seconds spent in those steps.
    train_seconds: float = 0.0
    #: seconds spent around them.
    other_seconds: float = 0.0

    def add(self, steps: int, train_seconds: float, other_seconds: float) -> None:
        self.count += 1
        self.steps += steps
        self.train_seconds += train_seconds
        self.other_seconds += other_seconds

    @property
    def per_step(self) -> float:
        return self.train_seconds / self.steps

    @property
    def overhead(self) -> float:
        return self.other_seconds / self.count


def measured_speeds(root: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], Speed]:
    """The speeds of the finished stages and evaluations under ``root`` (any grid's), by label and
    timing key: what this machine measured (done.json ``seconds``, ``steps``; an evaluation file's
    ``eval_seconds``). Files are only read: a damaged stage is the run's to set aside."""

    speeds: dict[tuple[str, tuple[tuple[str, str], ...]], Speed] = {}
    for kind in STAGE_KINDS:
        folders = sorted((root / kind).iterdir()) if (root / kind).is_dir() else []
        for folder in folders:
            if not folder.is_dir() or ".damaged-" in folder.name:
                continue
            done = read_done(folder)
            config = _stage_config(folder) if done is not None else None
            if done is None or config is None:
                continue
            measured = stage_time(done)
            if measured is not None and isinstance(done.get("method"), str):
                key = (stage_label(kind, done["method"]), timing_key(config, kind))
                speeds.setdefault(key, Speed()).add(*measured)
            for file in sorted(folder.glob("eval-*.json")):
                seconds = (read_json(file) or {}).get("eval_seconds")
                if isinstance(seconds, int | float) and seconds > 0:
                    key = ("evaluation", evaluation_key(config, file.name))
                    speeds.setdefault(key, Speed()).add(1, seconds, 0.0)
    return speeds


def _stage_config(folder: Path) -> RunConfig | None:
    """The config a stage folder was written with (None: missing, or not readable by this version)."""
    try:
        data = yaml.safe_load((folder / "config.yaml").read_text())
        return config_from_dict(data, str(folder / "config.yaml")) if isinstance(data, dict) else None
    except (OSError, yaml.YAMLError, UserError, TypeError, ValueError):
        return None


@dataclass
class Group:
    """The stages of the grid that one measurement times: a label at one timing key."""

    label: str
    timing: tuple[tuple[str, str], ...]
    speed: Speed | None
    done: int = 0
    todo: int = 0
    #: steps left to train (None: some stage's size is unknown).
    steps: int | None = 0
    #: stages to run that resume from a checkpoint.
    resumed: int = 0

    @property
    def seconds(self) -> float | None:
        """Wall time of the stages to run at the measured speed (None: unmeasured or unknown size)."""
        if self.speed is None or self.steps is None:
            return None
        return self.steps * self.speed.per_step + self.todo * self.speed.overhead


def progress(plan: list[Estimate], root: Path) -> list[Group]:
    """The grid's distinct stages and evaluations under ``root`` by label and timing key: how many
    are done (``booster run`` reuses them), how many steps are left, and their measured speed."""
    from transformers.trainer_utils import (
        get_last_checkpoint,  # heavy: loaded only where it is used, so light commands stay fast
    )

    speeds = measured_speeds(root)
    groups: dict[tuple[str, tuple[tuple[str, str], ...]], Group] = {}
    for stage in [s for e in plan for s in e.stages] + [s for e in plan for s in e.evaluations]:
        key = (stage.label, stage.timing)
        group = groups.setdefault(key, Group(stage.label, stage.timing, speeds.get(key)))
        if stage.kind == "evaluation":
            done = isinstance(read_json(stage.path), dict)
        else:
            done = read_done(stage.path) is not None
        if done:
            group.done += 1
            continue
        group.todo += 1
        left = stage.steps
        checkpoints = stage.path / CHECKPOINTS
        if stage.kind != "evaluation" and checkpoints.is_dir() and left is not None:
            step = checkpoint_step(get_last_checkpoint(str(checkpoints)))
            group.resumed += step > 0
            left = max(left - step, 0)
        group.steps = None if left is None or group.steps is None else group.steps + left
    order = {"align": 0, "attack": 1, "repair": 2, "evaluation": 3}
    return sorted(groups.values(), key=lambda g: order[g.label.split()[0]])


def _seconds(value: float) -> str:
    """A measured time: 14.2, 0.0312."""
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def duration(seconds: float) -> str:
    """A planned time, rounded to what a plan can promise: 45 s, 12 min, 3.5 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _variant(group: Group, groups: list[Group]) -> str:
    """The timing settings that tell a group from the grid's other groups of its label ("" if none)."""
    others = [g.timing for g in groups if g.label == group.label and g.timing != group.timing]
    differ = [(n, v) for i, (n, v) in enumerate(group.timing) if any(o[i][1] != v for o in others)]
    return "".join(f" {Path(v).stem}" if n == "evaluation" else f" {n}={v}" for n, v in differ)


def _count(n: int, noun: str) -> str:
    """``1 stage``, ``3 stages``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def progress_lines(plan: list[Estimate], root: Path) -> list[str]:
    """What of the grid is already done under ``root`` (reused by the run), the speeds this machine
    measured there, and the wall time of the rest at those speeds."""
    groups = progress(plan, root)
    if not any(g.done or g.speed for g in groups):
        todo = [sum(g.todo for g in groups if (g.label == "evaluation") == e) for e in (False, True)]
        return [
            f"progress in {root}: nothing done yet, and no finished stages there to time the grid by; "
            f"to run: {_count(todo[0], 'stage')} and {_count(todo[1], 'evaluation')}"
        ]
    header = ["stage", "measured here", "done", "to run", "steps to run", "time to run"]
    rows = []
    for g in groups:
        s = g.speed
        if s is None:
            measured = "unmeasured"
        elif g.label == "evaluation":
            measured = f"{_seconds(s.per_step)} s each ({_count(s.count, 'evaluation')})"
        else:
            measured = (
                f"{_seconds(s.per_step)} s/step + {_seconds(s.overhead)} s ({_count(s.count, 'stage')})"
            )
        steps = "-" if g.label == "evaluation" else ("?" if g.steps is None else f"{g.steps:,}")
        if g.todo == 0:
            time_left = "-"
        elif g.seconds is None:
            time_left = "unmeasured" if s is None else "unknown size"
        else:
            time_left = duration(g.seconds)
        todo = f"{g.todo}" + (f" ({g.resumed} resume)" if g.resumed else "")
        rows.append([g.label + _variant(g, groups), measured, str(g.done), todo, steps, time_left])
    stages = [g for g in groups if g.label != "evaluation"]
    evaluations = [g for g in groups if g.label == "evaluation"]
    done = sum(g.done for g in stages), sum(g.done for g in evaluations)
    todo = sum(g.todo for g in stages), sum(g.todo for g in evaluations)
    summary = (
        f"{_count(len(plan), 'cell')}: {done[0]} of {_count(done[0] + todo[0], 'stage')} and {done[1]} of "
        f"{_count(done[1] + todo[1], 'evaluation')} done (reused); "
    )
    pending = [g for g in groups if g.todo]
    if not pending:
        summary += "nothing left to run"
    else:
        summary += f"to run: {_count(todo[0], 'stage')} and {_count(todo[1], 'evaluation')}"
        timed = [g.seconds for g in pending if g.seconds is not None]
        untimed = [g for g in pending if g.seconds is None]
        if timed:
            summary += f", about {duration(sum(timed))} at the measured speeds"
        if untimed:
            what = ", ".join(dict.fromkeys(g.label for g in untimed))
            summary += f"{' +' if timed else ';'} {sum(g.todo for g in untimed)} not timed ({what})"
    return [
        f"progress in {root} (speeds measured there, from finished stages of the same model and shapes):",
        *_table(header, rows),
        summary,
    ]


def _hour(hours: float) -> str:
    return "< 0.01" if hours < 0.01 else f"{hours:.3g}"


def _hours(flops: float | None, peak: int | None, evaluation: list[float] | None = None) -> list[str]:
    """Per card: the training's hours (plus ``evaluation``'s), ``*`` where the peak does not fit."""
    if flops is None:
        return ["unknown"] * len(cost.GPUS)
    out = []
    extra = evaluation or [0.0] * len(cost.GPUS)
    for hours, more, gpu in zip(cost.gpu_hours(flops), extra, cost.GPUS, strict=True):
        over = peak is not None and peak > gpu.memory_gib * 2**30
        out.append(f"{_hour(hours + more)}{'*' if over else ''}")
    return out


#: what a BROKEN model of the dry run means: nothing about the real run.
BROKEN_EXPECTED = (
    "BROKEN is expected here: the tiny stand-in model is random and answers with noise, so its "
    "answers count as degenerate; the dry run checks that every stage runs, not what the models score"
)


def dry_run(sweep: Sweep, progress: bool = False, out: TextIO | None = None) -> Path:
    """Print the grid and its cost, then run it at tiny sizes; returns the dry run's results.json.

    The Trainer's own log lines are left out (only the stage lines show), and torch runs on one
    thread: the tiny model's matrices gain nothing from more, and on a busy machine waiting for
    the other threads made a tiny run ~5x slower.
    """
    import torch  # heavy: loaded only where it is used, so light commands stay fast

    out = out or sys.stdout

    def log(line: str) -> None:
        print(line, file=out, flush=True)

    preflight(sweep, "run", local=False)  # what does not depend on this machine (see preflight)
    base = sweep.base
    grid = " x ".join(
        [f"seeds {base.seeds}", f"{len(base.methods)} methods"]
        + [f"{len(v)} {k.split('.', 1)[-1]}" for k, v in sweep.variables.items()]
    )
    plan = estimate(sweep)
    log(
        f"{sweep.where}: valid; {len(plan)} cells ({grid}; a method skips the swept settings it does not read)"
    )
    for line in plan_lines(sweep, plan):
        log(f"  {line}")
    for line in cost_lines(sweep, plan, cost.model_size(base.model)):
        log(f"  {line}")
    for line in progress_lines(plan, Path(base.output_dir)):
        log(f"  {line}")
    tiny, notes = tiny_sweep(sweep)
    log(f"dry run at tiny sizes into {tiny.base.output_dir}: " + "; ".join(notes))
    started = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    explained = False

    def stage_line(line: str) -> None:
        nonlocal explained
        log(f"  {line}")
        if BROKEN_MARK in line and not explained:  # said once: every tiny model is
            log(f"  ({BROKEN_EXPECTED})")
            explained = True

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            path = run_pipeline(tiny, progress=progress, log=stage_line)
    finally:
        torch.set_num_threads(threads)
    log(
        f"dry run passed in {time.time() - started:.0f}s: {len(plan)} cells ran end to end; see {path.parent}"
    )
    return path
