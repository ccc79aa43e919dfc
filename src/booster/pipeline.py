"""``booster run``: for each cell of the grid, align -> evaluate -> (attack at each p [-> repair] -> evaluate).

A cell is a seed, a method and one combination of the swept settings (see
:class:`booster.config.Sweep`). Every stage writes into its own folder, named by the settings it
depends on, and is reused when done: rerunning is cheap, extending a grid only runs the new stages
(a swept attack setting reuses the alignment), and ``results.json`` comes out byte-identical.

Several processes may run one grid into one output folder (``--shard I/N`` splits it, e.g. over a
SLURM array): each stage and evaluation is locked while it is written, so it is trained once, and a
process that finds one busy moves on to other cells and comes back to it later.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from booster.config import RunConfig, Sweep, short_names
from booster.errors import UserError, warn
from booster.evaluation.harmful_score import model_verdict, with_intervals
from booster.methods.registry import get_method
from booster.plan import Cell, as_sweep, cell_weights, cells
from booster.progress import advance, logger
from booster.report import write_report
from booster.stages.align import align_dir, run_align
from booster.stages.attack import attack_dir, run_attack
from booster.stages.evaluate import evaluation_file, read_evaluation, run_evaluate
from booster.stages.probe import read_probe, run_probe
from booster.stages.repair import final_dir, run_repair
from booster.storage import (
    DONE,
    StageBusy,
    claimed,
    read_done,
    remove_orphans,
    stage_time,
    write_json_atomic,
)

RESULTS = "results.json"

#: what an attack stage's done.json says about the harmful-loss probe, copied into results.json.
PROBE_KEYS = ("probe_loss_start", "probe_loss_end", "probe_loss_drop", "probe_grad_norm_start", "probe_curve")
#: what a repair stage's done.json says about the repair, under ``repair`` in results.json.
REPAIR_KEYS = (
    "repair",
    "prune_ratio",
    "scope",
    "realignment_samples",
    "pruned_layers",
    "pruned_weights",
    "scored_weights",
)


def with_repair(attacked: dict[str, Any], repaired: dict[str, Any]) -> dict[str, Any]:
    """The attack's done info with the repair's summary under ``repair``: a repaired model's entry
    keeps the attack's training numbers and probe, and says what the repair zeroed."""
    return {**attacked, "repair": {key: repaired.get(key) for key in REPAIR_KEYS}}


def result_entry(
    method: str,
    stage: str,
    seed: int,
    ratio: float | None,
    metrics: dict,
    info: dict,
    sweep: dict[str, Any] | None = None,
    evaluation: str | None = None,
    probe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One row of results.json: the keys every report reads first, then the rest of the metrics.

    ``evaluation``: the evaluation file, relative to the run folder (the report reads the
    per-prompt verdicts next to it for paired comparisons). The verdict and the intervals are
    derived when an older evaluation file lacks them. ``probe``: an aligned model's harmful-loss
    probe (``probe_loss``, ``probe_grad_norm``; :mod:`booster.stages.probe`).
    """

    metrics = with_intervals(metrics)
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
    timed = stage_time(info)  # a resumed stage: over the steps its last process trained
    entry["train_seconds_per_step"] = round(timed[1] / timed[0], 4) if timed else info.get("seconds_per_step")
    entry["train_steps"] = info.get("steps")
    entry["train_loss"] = info.get("train_loss")
    if "mode" in info:  # an attack: the mode that ran (``attack.mode: reference`` resolved per method)
        entry["attack_mode"] = info["mode"]
    for key in PROBE_KEYS:  # the harmful-loss probe of an attack (evaluation/probe.py)
        if key in info:
            entry[key] = info[key]
    if "safety_samples" in info and info["safety_samples"]:  # the provider's refusal pairs mixed in
        entry["safety_samples"] = info["safety_samples"]
    if "repair" in info:  # a post-fine-tuning repair (stages/repair.py) made the evaluated model
        entry["repair"] = info["repair"]
    entry.update(probe or {})  # the probe of an aligned model, before any attack
    if evaluation is not None:
        entry["evaluation"] = evaluation
    return entry


def parse_shard(text: str, environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N: this process runs the cells whose index % N == I.

    ``"slurm"`` reads them from a SLURM job array: I = SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN
    and N = SLURM_ARRAY_TASK_COUNT, so ``--array=1-4`` and ``--array=0-3`` both give shards 0..3.
    """
    if text.strip().lower() == "slurm":
        env = os.environ if environ is None else environ
        names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")
        values = [env.get(name, "") for name in names]
        if not all(v.strip().isdigit() for v in values):
            missing = ", ".join(n for n, v in zip(names, values, strict=True) if not v.strip().isdigit())
            raise UserError(
                f"--shard slurm: {missing} not set; run it inside a SLURM job array (sbatch --array=1-N), "
                "or give --shard I/N"
            )
        task, first, count = (int(v) for v in values)
        text = f"{task - first}/{count}"
    index, _, count_text = text.partition("/")
    if index.strip().isdigit() and count_text.strip().isdigit() and int(index) < int(count_text):
        return int(index), int(count_text)
    raise UserError(
        f"--shard {text!r}: give I/N with 0 <= I < N, e.g. --shard 0/4 ... --shard 3/4 for four jobs, "
        "or --shard slurm in a SLURM job array"
    )


def run_pipeline(
    config: RunConfig | Sweep,
    progress: bool = True,
    log=None,
    shard: tuple[int, int] | None = None,
) -> Path:
    """Run every cell of the config (or sweep); returns the path of results.json.

    Each cell adds its aligned entry and one attacked entry per poison ratio, all carrying the
    cell's swept values; cells that share an alignment share (reuse) its stage and evaluation.
    ``shard=(I, N)`` runs only the cells whose index in :func:`cells` is I modulo N. A cell whose
    stage another process is writing is put off and taken up again once the others are done.
    results.json holds every cell that is finished by the end, whoever ran it. Status lines go to
    ``log`` (default: the ``booster`` logger, written above the bars).
    """

    log = log or logger.info
    sweep = as_sweep(config)
    root = Path(sweep.base.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    names = short_names(sweep.variables)
    todo = cells(sweep)
    log = _once(log)  # a cell taken up again repeats none of its lines
    mine = list(range(len(todo)))
    if shard is not None:
        index, count = shard
        mine = mine[index::count]
        if not mine:
            raise UserError(
                f"--shard {index}/{count}: the grid has {len(todo)} cells, so this shard has none; "
                f"use at most {len(todo)} shards"
            )
        log(f"shard {index}/{count}: {len(mine)} of {len(todo)} cells")
    rows: dict[int, list[dict]] = {}
    weights = cell_weights(todo)  # forward/backward passes of each stage, for the ETA
    total = sum(weights[i][0] + weights[i][1] * len(todo[i].config.attack.poison_ratios) for i in mine)
    bar = tqdm(total=total, desc="pipeline", unit="pass", disable=not progress, position=0, leave=True)
    pending, stuck = mine, False
    while pending:
        busy = []
        for k, i in enumerate(pending):
            cell = todo[i]
            try:  # when every cell left was busy, wait for the first one
                rows[i] = _run_cell(cell, root, names, progress, log, stuck and k == 0, bar, weights[i])
            except StageBusy as err:
                busy.append(i)
                log(f"[{cell.tag(names)}] {err.path.name} is busy in another process; coming back to it")
                continue
        stuck = len(busy) == len(pending)
        pending = busy
    bar.close()

    path = root / RESULTS
    with claimed(root / ".results.lock", path):  # the last process to finish writes the fullest file
        remove_orphans(root, f".{RESULTS}.*.tmp")
        results: list[dict] = []
        missing = 0
        for i, cell in enumerate(todo):
            entries = rows.get(i) or finished_entries(cell, root)
            if entries is None:
                missing += 1
                continue
            results += entries
        write_json_atomic(path, results)

        write_report(root, sweep)
    if missing:
        log(
            f"{RESULTS} holds {len(todo) - missing} of {len(todo)} cells; the other shards add theirs as "
            "they finish (or run again without --shard)"
        )
    return path


def _once(log):
    said: set[str] = set()

    def log_once(line: str) -> None:
        if line not in said:
            said.add(line)
            log(line)

    return log_once


def _run_cell(
    cell: Cell,
    root: Path,
    names: dict[str, str],
    progress: bool,
    log,
    wait: bool,
    bar: Any = None,
    weights: tuple[int, int] = (1, 1),
) -> list[dict]:
    """Align -> evaluate -> (attack [-> repair] -> evaluate at each p) for one cell; returns its
    results.json rows (a repaired model is the method's ``attacked`` entry).

    ``wait=False``: raise :class:`StageBusy` as soon as a stage or evaluation is busy elsewhere.
    ``bar`` counts each stage's forward/backward passes (``weights``: alignment, one attack).
    """

    config, method, seed, tag = cell.config, cell.method, cell.seed, cell.tag(names)
    task = config.attack.task_data
    aligned = run_align(config, method, seed, root, progress, wait)
    log(f"[{tag}] align {'reused' if aligned.reused else 'done'} ({aligned.info['seconds']:.0f}s)")
    metrics, reused = run_evaluate(config, aligned.path, root, task, progress, wait)
    probe = run_probe(config, aligned.path, root, wait)
    log(f"[{tag}] aligned: {summary(metrics, probe)}{' (reused)' if reused else ''}")
    rows = [evaluation_entry(cell, "aligned", None, metrics, aligned.info, aligned.path, root, probe)]
    if bar is not None:
        advance(bar, weights[0], aligned.reused)
    for ratio in config.attack.poison_ratios:
        attacked = run_attack(config, method, seed, ratio, root, progress, wait)
        log(
            f"[{tag} p={ratio:g}] attack {'reused' if attacked.reused else 'done'} "
            f"({attacked.info['seconds']:.0f}s)"
        )
        final, info, reused = attacked.path, attacked.info, attacked.reused
        if get_method(method).repair is not None:
            repaired = run_repair(config, method, seed, ratio, root, progress, wait)
            final, info = repaired.path, with_repair(attacked.info, repaired.info)
            reused = reused and repaired.reused
            log(
                f"[{tag} p={ratio:g}] repair {'reused' if repaired.reused else 'done'} "
                f"({repaired.info['seconds']:.0f}s): {repaired.info['pruned_weights']:,} of "
                f"{repaired.info['scored_weights']:,} weights zeroed"
            )
        metrics, evaluated = run_evaluate(config, final, root, task, progress, wait)
        state = "repaired" if final != attacked.path else "attacked"
        log(f"[{tag} p={ratio:g}] {state}: {summary(metrics)}{' (reused)' if evaluated else ''}")
        rows.append(evaluation_entry(cell, "attacked", ratio, metrics, info, final, root))
        if bar is not None:
            advance(bar, weights[1], reused)
    return rows


def gather_results(
    config: RunConfig | Sweep, root: Path, against: Sequence[str] = ()
) -> tuple[Path, int, int]:
    """results.json and the report from every finished stage of the grid in ``root``, running
    nothing: a grid still running (or cut short) reports what it has so far. An unfinished cell
    keeps its finished models; ``against`` as for :func:`booster.report.write_report`. Returns the
    path and (models found, models in the grid)."""

    sweep = as_sweep(config)
    results, total = [], 0
    for cell in cells(sweep):
        total += 1 + len(cell.config.attack.poison_ratios)
        results += finished_entries(cell, root, partial=True) or []
    path = root / RESULTS
    with claimed(root / ".results.lock", path):
        remove_orphans(root, f".{RESULTS}.*.tmp")
        write_json_atomic(path, results)
        write_report(root, sweep, against)
    return path, len(results), total


def finished_entries(cell: Cell, root: Path, partial: bool = False) -> list[dict] | None:
    """A cell's results.json rows read from the files its stages left, running nothing (another
    shard ran it); None while any of its stages or evaluations is unfinished (``partial``: the
    rows of the finished ones)."""

    config, method, seed = cell.config, cell.method, cell.seed
    aligned = align_dir(config, method, seed, root)
    # (stage, p, the folder evaluated, the folders whose done.json describe the model)
    stages = [("aligned", None, aligned, [aligned])]
    for r in config.attack.poison_ratios:
        attacked, final = attack_dir(config, method, seed, r, root), final_dir(config, method, seed, r, root)
        stages.append(("attacked", r, final, [attacked] if final == attacked else [attacked, final]))
    rows = []
    for stage, ratio, folder, parts in stages:
        infos = [read_done(part) for part in parts]
        metrics = read_evaluation(config, folder, config.attack.task_data)
        for path, value in (
            *((part / DONE, info) for part, info in zip(parts, infos, strict=True)),
            (evaluation_file(config, folder, config.attack.task_data), metrics),
        ):
            if value is None and path.is_file():  # written atomically: there and unreadable is damage
                warn(
                    f"{path}: damaged (cut or not JSON), so its model is left out; booster run does it "
                    "again in a run folder; for an archive, archive the run folder again"
                )
        if any(info is None for info in infos) or metrics is None:
            if partial:
                continue
            return None
        info = infos[0] if len(infos) == 1 else with_repair(*infos)
        where = _relative(evaluation_file(config, folder, config.attack.task_data), root)
        probe = read_probe(config, folder) if stage == "aligned" else None
        rows.append(result_entry(method, stage, seed, ratio, metrics, info, cell.sweep, where, probe))
    return rows


def evaluation_entry(
    cell: Cell,
    stage: str,
    ratio: float | None,
    metrics: dict,
    info: dict,
    stage_dir: Path,
    root: Path,
    probe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The results.json entry of a cell's model evaluated in ``stage_dir`` (``stage``: aligned or
    attacked), as ``booster run`` and ``booster evaluate`` both write it."""

    config = cell.config
    where = _relative(evaluation_file(config, stage_dir, config.attack.task_data), root)
    return result_entry(cell.method, stage, cell.seed, ratio, metrics, info, cell.sweep, where, probe)


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to the run folder, with forward slashes (results.json moves with the folder)."""
    return Path(os.path.relpath(path, root)).as_posix()


#: how a stage line marks a broken model (most answers degenerate).
BROKEN_MARK = "BROKEN"


def summary(metrics: dict, probe: dict[str, Any] | None = None) -> str:
    hs, fa = metrics.get("harmful_score"), metrics.get("finetune_accuracy")
    fa_text = f"{fa:.1f}" if fa is not None else "n/a"
    if probe:
        fa_text += f"  probe loss {probe['probe_loss']:.3f} (grad norm {probe['probe_grad_norm']:.3g})"

    if model_verdict(metrics.get("degenerate_rate")) == "broken":
        rate = metrics["degenerate_rate"]
        return f"{BROKEN_MARK} ({rate:.0f}% degenerate answers)  HS {hs:.1f}  FA {fa_text}"
    return f"HS {hs:.1f}  FA {fa_text}"
