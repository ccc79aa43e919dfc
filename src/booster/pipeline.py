"""``booster run``: for each seed x method, align -> evaluate -> (attack at each p -> evaluate).

Every stage writes into its own folder and is reused when done, so rerunning a command is cheap,
extending a grid only runs the new cells, and ``results.json`` comes out byte-identical.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from booster.config import RunConfig
from booster.stages.common import write_json_atomic


def result_entry(
    method: str, stage: str, seed: int, ratio: float | None, metrics: dict, info: dict
) -> dict[str, Any]:
    """One row of results.json: the keys every report reads first, then the rest of the metrics."""
    entry = {
        "method": method,
        "stage": stage,
        "seed": seed,
        "poison_ratio": ratio,
        "harmful_score": metrics.get("harmful_score"),
        "finetune_accuracy": metrics.get("finetune_accuracy"),
    }
    entry.update({k: v for k, v in metrics.items() if k not in entry})
    entry["train_seconds"] = info.get("seconds")
    entry["train_seconds_per_step"] = info.get("seconds_per_step")
    entry["train_steps"] = info.get("steps")
    entry["train_loss"] = info.get("train_loss")
    return entry


def cells(config: RunConfig) -> list[tuple[int, str]]:
    return [(seed, method) for seed in config.seeds for method in config.methods]


def run_pipeline(config: RunConfig, progress: bool = True, log=print) -> Path:
    """Run every cell of the config; returns the path of results.json."""
    from booster.stages.align import run_align
    from booster.stages.attack import run_attack
    from booster.stages.evaluate import run_evaluate

    root = Path(config.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    todo = cells(config)
    total = len(todo) * (1 + len(config.attack.poison_ratios))
    bar = tqdm(total=total, desc="pipeline", unit="model", disable=not progress, position=0, leave=True)
    for seed, method in todo:
        aligned = run_align(config, method, seed, root, progress)
        log(
            f"[{method} seed {seed}] align {'reused' if aligned.reused else 'done'} ({aligned.info['seconds']:.0f}s)"
        )
        metrics, reused = run_evaluate(config, aligned.path, root, config.attack.task_data, progress)
        log(f"[{method} seed {seed}] aligned: {summary(metrics)}{' (reused)' if reused else ''}")
        results.append(result_entry(method, "aligned", seed, None, metrics, aligned.info))
        bar.update()
        for ratio in config.attack.poison_ratios:
            attacked = run_attack(config, method, seed, ratio, root, progress)
            log(
                f"[{method} seed {seed} p={ratio:g}] attack {'reused' if attacked.reused else 'done'} "
                f"({attacked.info['seconds']:.0f}s)"
            )
            metrics, reused = run_evaluate(config, attacked.path, root, config.attack.task_data, progress)
            log(
                f"[{method} seed {seed} p={ratio:g}] attacked: {summary(metrics)}{' (reused)' if reused else ''}"
            )
            results.append(result_entry(method, "attacked", seed, ratio, metrics, attacked.info))
            bar.update()
    bar.close()
    path = root / "results.json"
    write_json_atomic(path, results)
    from booster.report import write_report

    write_report(root, config)
    return path


def summary(metrics: dict) -> str:
    hs, fa = metrics.get("harmful_score"), metrics.get("finetune_accuracy")
    fa_text = f"{fa:.1f}" if fa is not None else "n/a"
    return f"HS {hs:.1f}  FA {fa_text}"


def load_results(root: Path) -> list[dict]:
    return json.loads((Path(root) / "results.json").read_text())
