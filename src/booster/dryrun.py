"""``booster run --dry-run``: the grid a config would run, what it would cost, and proof that it runs.

The plan lists every cell with an estimate of its forward/backward passes (alignment steps times the
method's passes per step, plus attack steps) and of the samples it reads, then its GPU cost (tokens,
FLOPs, peak memory, GPU-hours; :mod:`booster.cost`). Then the same grid (seeds,
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
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from booster import cost
from booster.config import AlignConfig, AttackConfig, Sweep, format_point, short_names, sweep_from_dict
from booster.cost import ModelSize, training_tokens
from booster.errors import UserError
from booster.pipeline import Cell, cells, run_pipeline

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


# -- the plan --------------------------------------------------------------------------------------


def planned_steps(section: AlignConfig | AttackConfig, samples: int | None) -> int | None:
    """Optimizer steps of a stage as transformers' Trainer counts them (one process); None when the
    sample count is unknown ("all")."""
    if section.max_steps > 0:
        return section.max_steps
    if samples is None:
        return None
    batches = math.ceil(samples / section.batch_size)
    return math.ceil(section.epochs * max(math.ceil(batches / section.gradient_accumulation_steps), 1))


@dataclass
class Estimate:
    """What one cell costs: its alignment (unless an earlier cell already trained it) and attacks."""

    cell: Cell
    align_steps: int | None
    align_passes: int
    #: the alignment is an earlier cell's (the cells differ only in attack settings).
    shared: bool
    attack_steps: int | None

    @property
    def passes(self) -> int | None:
        """Forward/backward passes over one batch (accumulation micro-batches count each)."""
        config = self.cell.config
        align = 0 if self.shared else _times(self.align_steps, self.align_passes)
        align = _times(align, config.align.gradient_accumulation_steps)
        attack = _times(self.attack_steps, len(config.attack.poison_ratios))
        attack = _times(attack, config.attack.gradient_accumulation_steps)
        return None if align is None or attack is None else align + attack


def _times(a: int | None, b: int) -> int | None:
    return None if a is None else a * b


def estimate(sweep: Sweep) -> list[Estimate]:
    from booster.methods.registry import get_method
    from booster.stages.align import align_dir

    seen: set[Path] = set()
    plan = []
    for cell in cells(sweep):
        config = cell.config
        stage = align_dir(config, cell.method, cell.seed)
        plan.append(
            Estimate(
                cell,
                planned_steps(config.align, config.align.alignment_samples),
                get_method(cell.method).align_passes,
                stage in seen,
                planned_steps(config.attack, config.attack.samples),
            )
        )
        seen.add(stage)
    return plan


def _n(value: int | None) -> str:
    return "all" if value is None else f"{value:,}"


def plan_lines(sweep: Sweep, plan: list[Estimate]) -> list[str]:
    """One line per cell: seed, method, swept values, poison ratios, passes and samples."""
    from booster.methods.registry import get_method

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
        uses_harmful = get_method(e.cell.method).uses_harmful_data
        align = "shared" if e.shared else f"{_n(e.align_steps)} x {e.align_passes}"
        ratios = c.attack.poison_ratios
        samples = f"align {_n(c.align.alignment_samples)}"
        samples += f" + harmful {_n(c.align.harmful_samples)}" if uses_harmful else ""
        samples += f", attack n={c.attack.samples:,}" if ratios else ""
        evaluated = (0 if e.shared else 1) + len(ratios)
        samples += (
            f", eval {evaluated} x ({c.evaluate.harmful_samples:,} prompts + {c.evaluate.task_samples:,})"
        )
        rows.append(
            [
                str(e.cell.seed),
                e.cell.method,
                format_point(e.cell.sweep, names) or "-",
                ",".join(f"{p:g}" for p in ratios) or "-",
                align,
                f"{len(ratios)} x {_n(e.attack_steps)}",
                "?" if e.passes is None else f"{e.passes:,}",
                samples,
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    known = [e.passes for e in plan if e.passes is not None]
    base = sweep.base
    total = f"{sum(known):,}" + (" (+ cells of unknown size)" if len(known) < len(plan) else "")
    alignments = sum(1 for e in plan if not e.shared)
    attacks = sum(len(e.cell.config.attack.poison_ratios) for e in plan)
    lines.append(
        f"total: {len(plan)} cells, {alignments} alignments, {attacks} attacks, {total} forward/backward "
        f"passes (one batch each: align batch {base.align.batch_size}, attack batch {base.attack.batch_size}), "
        f"{alignments + attacks} evaluations"
    )
    return lines


def cost_lines(sweep: Sweep, plan: list[Estimate], size: ModelSize | None) -> list[str]:
    """Per cell and for the grid: tokens, FLOPs, peak GPU memory and GPU-hours on the cards of
    ``cost.GPUS`` (the rules are in :mod:`booster.cost`)."""
    from booster.methods.registry import alignment_method, get_method

    def stage_tokens(section: AlignConfig | AttackConfig, steps: int | None) -> int | None:
        return training_tokens(
            steps, section.batch_size, section.gradient_accumulation_steps, section.max_length
        )

    names = short_names(sweep.variables)
    gpus = [name for name, _, _ in cost.GPUS]
    header = ["seed", "method", "swept", "tokens", "FLOPs", "peak memory", *(f"{g} h" for g in gpus)]
    rows = []
    totals: dict[str, Any] = {"tokens": 0, "flops": 0.0, "peak": 0}
    for e in plan:
        c = e.cell.config
        ratios = len(c.attack.poison_ratios)
        align = 0 if e.shared else stage_tokens(c.align, e.align_steps)
        attack = _times(stage_tokens(c.attack, e.attack_steps), ratios)
        tokens = None if align is None or attack is None else align + attack
        flops = peak = None
        if size is not None and tokens is not None:
            assert align is not None and attack is not None
            flops = (align * e.align_passes + attack) * cost.flops_per_token(size)
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
            if ratios:
                a = c.attack
                peaks.append(
                    cost.stage_memory(
                        size, a.batch_size, a.max_length, a.bf16, a.gradient_checkpointing, False
                    )
                )
            peak = max(peaks, default=0)
        for key, value in (("tokens", tokens), ("flops", flops), ("peak", peak)):
            if totals[key] is not None:
                totals[key] = None if value is None else (max if key == "peak" else sum)((totals[key], value))
        rows.append(
            [
                str(e.cell.seed),
                e.cell.method,
                format_point(e.cell.sweep, names) or "-",
                cost.format_count(tokens),
                cost.format_flops(flops),
                cost.format_gib(peak),
                *_hours(flops, peak),
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    table = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    if size is None:
        model = "parameters unknown (its config is not readable offline), so FLOPs, memory and hours are too"
    else:
        lora = (
            ""
            if size.lora_parameters is None
            else f", {cost.format_count(size.lora_parameters)} trained by LoRA"
        )
        model = f"{cost.format_count(size.parameters)} parameters{lora}"
    hours = ", ".join(f"{g} {h}" for g, h in zip(gpus, _hours(totals["flops"], totals["peak"]), strict=True))
    return [
        f"cost on one GPU, model {sweep.base.model.name}: {model}",
        *table,
        f"grid: {cost.format_count(totals['tokens'])} tokens, {cost.format_flops(totals['flops'])} FLOPs, "
        f"GPU-hours {hours}; peak memory {cost.format_gib(totals['peak'])}",
        "(tokens: sequences read x max_length, an upper bound; FLOPs per token and pass: 4 x parameters with "
        "LoRA (the backward pass runs through the frozen weights) + 6 x LoRA parameters, 6 x parameters "
        "without, times the method's passes; hours: published peak bf16 FLOP/s x "
        f"{cost.UTILISATION:.0%} utilisation; memory: weights + trainable state + activations at the batch "
        "size, see src/booster/cost.py; * more than the card's memory; evaluation not counted)",
    ]


def _hours(flops: float | None, peak: int | None) -> list[str]:
    if flops is None:
        return ["unknown"] * len(cost.GPUS)
    out = []
    for hours, (_, _, memory) in zip(cost.gpu_hours(flops), cost.GPUS, strict=True):
        over = peak is not None and peak > memory * 2**30
        out.append(f"{'< 0.01' if hours < 0.01 else f'{hours:.3g}'}{'*' if over else ''}")
    return out


def dry_run(sweep: Sweep, progress: bool = False, out: TextIO | None = None) -> Path:
    """Print the grid and its cost, then run it at tiny sizes; returns the dry run's results.json.

    The Trainer's own log lines are left out (only the stage lines show), and torch runs on one
    thread: the tiny model's matrices gain nothing from more, and on a busy machine waiting for
    the other threads made a tiny run ~5x slower.
    """
    import torch

    out = out or sys.stdout

    def log(line: str) -> None:
        print(line, file=out, flush=True)

    from booster.preflight import preflight

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
    tiny, notes = tiny_sweep(sweep)
    log(f"dry run at tiny sizes into {tiny.base.output_dir}: " + "; ".join(notes))
    started = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            path = run_pipeline(tiny, progress=progress, log=lambda line: log(f"  {line}"))
    finally:
        torch.set_num_threads(threads)
    log(
        f"dry run passed in {time.time() - started:.0f}s: {len(plan)} cells ran end to end; see {path.parent}"
    )
    return path
