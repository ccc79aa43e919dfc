"""What a config will run: the grid of cells (seed x method x the swept values the method reads), and
each stage's size (samples read, optimizer steps, forward/backward passes), counted without loading
a model. The pipeline runs this plan, the dry run prints and prices it, the progress bar weighs it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from booster.config import AlignConfig, AttackConfig, RunConfig, Sweep, format_point
from booster.data.mixing import safety_count
from booster.data.sources import count_examples
from booster.methods.registry import alignment_method, get_method
from booster.stages.align import align_settings
from booster.stages.attack import attack_settings


@dataclass
class Cell:
    """One run of the grid: a seed, a method and the concrete config at its swept values."""

    seed: int
    method: str
    config: RunConfig
    #: the swept settings this method's stages read (dotted key -> value), as results.json records them.
    sweep: dict[str, Any]

    def tag(self, names: dict[str, str] | None = None) -> str:
        """``booster seed 0`` or ``booster seed 0 lamb=5``, for log lines."""
        point = f" {format_point(self.sweep, names)}" if self.sweep else ""
        return f"{self.method} seed {self.seed}{point}"


def reads(config: RunConfig, method: str, key: str) -> bool:
    """Whether ``method``'s stages depend on the setting ``key`` (``align.lamb``): exactly when the
    stage fingerprints include it, so the grid never repeats a cell that would reuse the same stages."""
    section, name = key.split(".", 1)
    if key == "align.init_adapter":  # read unless the method has its own start (a null value drops the key)
        return get_method(alignment_method(method)).init_from is None
    if section == "align":
        return name in align_settings(config, method)[1]
    if section == "repair":  # only a post-fine-tuning defense reads it, and only after an attack
        return get_method(method).repair is not None and bool(config.attack.poison_ratios)
    if not config.attack.poison_ratios:  # no attack: only the task (of the aligned model's FA) counts
        return name == "task_data"
    return name in attack_settings(config, 0.0, method)


def cells(config: RunConfig | Sweep, methods: list[str] | None = None) -> list[Cell]:
    """The grid in run order: seeds, then methods, then the product of the swept values the method
    reads (field order, the last varying fastest, so cells sharing an alignment run back to back)."""
    sweep = as_sweep(config)
    base = sweep.base
    grid = []
    for seed in base.seeds:
        for method in methods or base.methods:
            keys = [key for key in sweep.variables if reads(base, method, key)]
            for values in itertools.product(*(sweep.variables[key] for key in keys)):
                point = dict(zip(keys, values, strict=True))
                grid.append(Cell(seed, method, sweep.at(point), point))
    return grid


def as_sweep(config: RunConfig | Sweep) -> Sweep:
    return config if isinstance(config, Sweep) else Sweep(config)


def planned_steps(section: AlignConfig | AttackConfig, samples: int | None) -> int | None:
    """Optimizer steps of a stage as transformers' Trainer counts them (one process); None when the
    sample count is unknown ("all" of a hub dataset)."""
    if section.max_steps > 0:
        return section.max_steps
    if samples is None:
        return None
    batches = math.ceil(samples / section.batch_size)
    return math.ceil(section.epochs * max(math.ceil(batches / section.gradient_accumulation_steps), 1))


def attack_samples(config: RunConfig, method: str) -> int:
    """Rows an attack of ``method`` trains on: the user's n, plus the provider's refusal pairs for a
    safety-mixing defense (``data/mixing.py``: round(safety_mix_ratio x n))."""
    n = config.attack.samples
    if get_method(method).mixes_safety_data:
        return n + safety_count(n, config.attack.safety_mix_ratio)
    return n


@dataclass(frozen=True)
class Rows:
    """How many examples a data spec holds for a role, counted where that needs no network."""

    count: int | None
    #: why the count is unknown: a hub dataset, or what failed (None when it is known).
    why: str | None = None
    #: the data is on the hub: only the network could count it.
    on_hub: bool = False


def count_rows(spec: str, role: str) -> Rows:
    """The rows ``spec`` gives for ``role`` (what "all" samples loads). A plan never fails on a count:
    a hub dataset or a count that fails is unknown, and says why."""
    try:
        count = count_examples(spec, role)
    except Exception as err:  # noqa: BLE001 -- any failure (the data's own error) leaves the size unknown
        return Rows(None, (str(err).splitlines() or [type(err).__name__])[0])
    if count is None:
        return Rows(None, "a hub dataset: counting it needs the network", on_hub=True)
    return Rows(count)


def used_samples(limit: int | None, rows: Rows) -> int | None:
    """The samples a stage reads: the limit, or the rows the data holds when fewer or "all"."""
    if rows.count is None:
        return limit
    return rows.count if limit is None else min(limit, rows.count)


def repair_batches(config: RunConfig) -> int | None:
    """Forward batches a repair runs over its re-alignment set (None: the set's size is unknown)."""
    repair = config.repair
    samples = used_samples(repair.harmful_samples, count_rows(repair.harmful_data, "harmful"))
    return None if samples is None else math.ceil(samples / repair.batch_size)


def cell_weights(cells: list[Any]) -> list[tuple[int, int]]:
    """(alignment, one attack) forward/backward passes of each cell: planned steps x accumulation x
    the method's passes per step (methods/registry.py ``align_passes``; an attack is one pass per
    micro-batch, a repair after it a third of a pass per forward batch). "All samples" are the rows
    the data holds where they can be counted without the network (as the dry run counts them); a
    stage whose size stays unknown weighs as much as the mean known stage of its kind."""
    aligns: list[int | None] = []
    attacks: list[int | None] = []
    for cell in cells:
        align, attack = cell.config.align, cell.config.attack
        samples = used_samples(align.alignment_samples, count_rows(align.alignment_data, "alignment"))
        steps = planned_steps(align, samples)
        passes = get_method(cell.method).align_passes * align.gradient_accumulation_steps
        aligns.append(None if steps is None else steps * passes)
        steps = planned_steps(attack, attack_samples(cell.config, cell.method))
        weight = None if steps is None else steps * attack.gradient_accumulation_steps
        if weight is not None and get_method(cell.method).repair is not None:
            batches = repair_batches(cell.config)
            weight = None if batches is None else weight + math.ceil(batches / 3)
        attacks.append(weight)

    def filled(values: list[int | None]) -> list[int]:
        known = [v for v in values if v is not None]
        mean = math.ceil(sum(known) / len(known)) if known else 1
        return [mean if v is None else max(v, 1) for v in values]

    return list(zip(filled(aligns), filled(attacks), strict=True))
