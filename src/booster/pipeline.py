"""``booster run``: for each cell of the grid, align -> evaluate -> (attack at each p -> evaluate).

A cell is a seed, a method and one combination of the swept settings (see
:class:`booster.config.Sweep`). Every stage writes into its own folder, named by the settings it
depends on, and is reused when done: rerunning is cheap, extending a grid only runs the new stages
(a swept attack setting reuses the alignment), and ``results.json`` comes out byte-identical.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from booster.config import RunConfig, Sweep, format_point, short_names
from booster.stages.common import write_json_atomic

#: what an attack stage's done.json says about the harmful-loss probe, copied into results.json.
PROBE_KEYS = ("probe_loss_start", "probe_loss_end", "probe_loss_drop", "probe_grad_norm_start", "probe_curve")


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
    from booster.stages.align import align_settings
    from booster.stages.attack import attack_settings

    section, name = key.split(".", 1)
    if section == "align":
        return name in align_settings(config, method)[1]
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


def result_entry(
    method: str,
    stage: str,
    seed: int,
    ratio: float | None,
    metrics: dict,
    info: dict,
    sweep: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One row of results.json: the keys every report reads first, then the rest of the metrics."""
    entry = {
        "method": method,
        "stage": stage,
        "seed": seed,
        "poison_ratio": ratio,
        "sweep": dict(sweep or {}),
        "harmful_score": metrics.get("harmful_score"),
        "finetune_accuracy": metrics.get("finetune_accuracy"),
    }
    entry.update({k: v for k, v in metrics.items() if k not in entry})
    entry["train_seconds"] = info.get("seconds")
    entry["train_seconds_per_step"] = info.get("seconds_per_step")
    entry["train_steps"] = info.get("steps")
    entry["train_loss"] = info.get("train_loss")
    if "mode" in info:  # an attack: the mode that ran (``attack.mode: reference`` resolved per method)
        entry["attack_mode"] = info["mode"]
    for key in PROBE_KEYS:  # the harmful-loss probe of an attack (evaluation/probe.py)
        if key in info:
            entry[key] = info[key]
    return entry


def run_pipeline(config: RunConfig | Sweep, progress: bool = True, log=print) -> Path:
    """Run every cell of the config (or sweep); returns the path of results.json.

    Each cell adds its aligned entry and one attacked entry per poison ratio, all carrying the
    cell's swept values; cells that share an alignment share (reuse) its stage and evaluation.
    """
    from booster.stages.align import run_align
    from booster.stages.attack import run_attack
    from booster.stages.evaluate import run_evaluate

    sweep = as_sweep(config)
    root = Path(sweep.base.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    names = short_names(sweep.variables)
    results: list[dict] = []
    todo = cells(sweep)
    total = len(todo) * (1 + len(sweep.base.attack.poison_ratios))
    bar = tqdm(total=total, desc="pipeline", unit="model", disable=not progress, position=0, leave=True)
    for cell in todo:
        config, method, seed, tag = cell.config, cell.method, cell.seed, cell.tag(names)
        aligned = run_align(config, method, seed, root, progress)
        log(f"[{tag}] align {'reused' if aligned.reused else 'done'} ({aligned.info['seconds']:.0f}s)")
        metrics, reused = run_evaluate(config, aligned.path, root, config.attack.task_data, progress)
        log(f"[{tag}] aligned: {summary(metrics)}{' (reused)' if reused else ''}")
        results.append(result_entry(method, "aligned", seed, None, metrics, aligned.info, cell.sweep))
        bar.update()
        for ratio in config.attack.poison_ratios:
            attacked = run_attack(config, method, seed, ratio, root, progress)
            log(
                f"[{tag} p={ratio:g}] attack {'reused' if attacked.reused else 'done'} "
                f"({attacked.info['seconds']:.0f}s)"
            )
            metrics, reused = run_evaluate(config, attacked.path, root, config.attack.task_data, progress)
            log(f"[{tag} p={ratio:g}] attacked: {summary(metrics)}{' (reused)' if reused else ''}")
            results.append(result_entry(method, "attacked", seed, ratio, metrics, attacked.info, cell.sweep))
            bar.update()
    bar.close()
    path = root / "results.json"
    write_json_atomic(path, results)
    from booster.report import write_report

    write_report(root, sweep)
    return path


def summary(metrics: dict) -> str:
    hs, fa = metrics.get("harmful_score"), metrics.get("finetune_accuracy")
    fa_text = f"{fa:.1f}" if fa is not None else "n/a"
    return f"HS {hs:.1f}  FA {fa_text}"


def load_results(root: Path) -> list[dict]:
    return json.loads((Path(root) / "results.json").read_text())
