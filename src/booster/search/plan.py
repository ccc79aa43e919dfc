"""``booster search --dry-run``: what a search will train and what that costs, without a model or data.

Per aligned model (method, seed): its alignment (counted only when its stage is not finished in the
output folder; ``booster run`` shares it), the fixed attack, and the trials still to run (a study's
journal says how many are finished). A trial's length is drawn from the epochs range, so its cost
is given at the middle of the range and, as an upper bound, at its top. Tokens, FLOPs and GPU-hours
follow :mod:`booster.cost`; the evaluations (one on the validation prompts per trial, two on the
test prompts per study) are listed, not priced, as in ``booster run --dry-run``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from booster import cost
from booster.config import RunConfig
from booster.dryrun import duration, measured_speeds, stage_label, timing_key
from booster.methods.registry import get_method
from booster.plan import count_rows, planned_steps, used_samples
from booster.search.study import (
    finished_in,
    fixed_config,
    mean_epochs,
    search_methods,
    search_ratio,
    study_dir,
    trial_config,
)
from booster.search.validation import check_sizes, offline, validation_set
from booster.searches import SEARCH_DIR
from booster.stages.align import align_dir
from booster.stages.attack import attack_dir
from booster.storage import read_done


def _tokens(config: RunConfig) -> int:
    attack = config.attack
    steps = planned_steps(attack, attack.samples) or 0
    return (
        cost.training_tokens(steps, attack.batch_size, attack.gradient_accumulation_steps, attack.max_length)
        or 0
    )


def _hours(flops: float | None) -> str:
    if flops is None:
        return "unknown"
    names = [gpu.name.split()[0] for gpu in cost.GPUS]
    hours = cost.gpu_hours(flops)
    return ", ".join(f"{n} {'< 0.01' if h < 0.01 else f'{h:.3g}'}" for n, h in zip(names, hours, strict=True))


def plan_lines(config: RunConfig, where: str) -> list[str]:
    """The search's plan and cost, one line each (no network: a hub dataset's size stays unknown).
    Reads the output folder (finished stages, the studies' journals), never writes it."""
    check_sizes(config)
    search, root, attack, align = config.search, Path(config.output_dir), config.attack, config.align
    # the studies' folders are named by the validation prompts: read them where that needs no network
    sha = validation_set(config, root / SEARCH_DIR)[0].sha256 if offline(config) else None
    ratio = search_ratio(config)
    size = cost.model_size(config.model)
    per_token = None if size is None else cost.flops_per_token(size)
    low, high = search.epochs
    middle, top = (trial_config(config, search.learning_rate[0], e) for e in (mean_epochs(config), high))
    bottom, fixed = trial_config(config, search.learning_rate[0], low), fixed_config(config)
    validation = (
        search.validation_prompts or f"the last of {config.evaluate.harmful_prompts}, after the test prompts"
    )
    lines = [
        f"{where}: valid; attack search at p={ratio:g} against {len(search_methods(config))} method(s) x "
        f"{len(config.seeds)} seed(s), {search.trials} trials each: learning rate in "
        f"[{search.learning_rate[0]:g}, {search.learning_rate[1]:g}] (log), epochs in [{low}, {high}], "
        f"TPE seed {search.sampler_seed} ({search.startup_trials} random first)",
        f"validation: {search.validation_samples} prompts ({validation}); test: {config.evaluate.harmful_samples} "
        f"prompts ({config.evaluate.harmful_prompts}); judge {config.evaluate.judge}",
        f"a trial trains {planned_steps(bottom.attack, attack.samples)} to {planned_steps(top.attack, attack.samples)} "
        f"steps ({low} to {high} epochs of {attack.samples} samples at batch {attack.batch_size}); the fixed "
        f"attack {planned_steps(fixed.attack, attack.samples)}",
    ]
    header = ["study", "alignment", "trials done", "to run", "tokens", "FLOPs", "GPU-hours", "time here"]
    rows = []
    speeds = measured_speeds(root)
    totals: dict[str, Any] = {"tokens": 0, "passes": 0, "top": 0, "seconds": 0.0}
    for seed in config.seeds:
        for method in search_methods(config):
            aligned = read_done(align_dir(config, method, seed, root)) is not None
            align_steps = planned_steps(
                align, used_samples(align.alignment_samples, count_rows(align.alignment_data, "alignment"))
            )
            passes = get_method(method).align_passes
            align_tokens = 0
            if not aligned:
                tokens = cost.training_tokens(
                    align_steps, align.batch_size, align.gradient_accumulation_steps, align.max_length
                )
                align_tokens = tokens or 0
            done = 0 if sha is None else finished_in(study_dir(config, method, seed, root, sha))
            left = max(search.trials - done, 0)
            fixed_done = read_done(attack_dir(fixed, method, seed, ratio, root)) is not None
            fixed_tokens = 0 if fixed_done else _tokens(fixed)
            attacks = left * _tokens(middle) + fixed_tokens
            weighted = align_tokens * passes + attacks
            totals["tokens"] += align_tokens + attacks
            totals["passes"] += weighted
            totals["top"] += align_tokens * passes + left * _tokens(top) + fixed_tokens
            flops = None if per_token is None else weighted * per_token
            # wall time at the speeds that finished stages of the same shapes measured in the output folder
            attack_speed = speeds.get((stage_label("attack", method), timing_key(config, "attack")))
            align_speed = speeds.get((stage_label("align", method), timing_key(config, "align")))
            seconds: float | None = None
            if attack_speed is not None and (aligned or align_speed is not None):
                stages = [(planned_steps(middle.attack, attack.samples) or 0, attack_speed)] * left
                if not fixed_done:
                    stages.append((planned_steps(fixed.attack, attack.samples) or 0, attack_speed))
                if not aligned and align_speed is not None:
                    stages.append((align_steps or 0, align_speed))
                seconds = sum(steps * speed.per_step + speed.overhead for steps, speed in stages)
            if totals["seconds"] is not None:
                totals["seconds"] = None if seconds is None else totals["seconds"] + seconds
            rows.append(
                [
                    f"{method} seed {seed}",
                    "done"
                    if aligned
                    else f"{'?' if align_steps is None else align_steps} steps x {passes} passes",
                    "?" if sha is None else str(done),
                    f"{left} trials" + ("" if fixed_done else " + fixed"),
                    cost.format_count(align_tokens + attacks),
                    cost.format_flops(flops),
                    _hours(flops),
                    "unmeasured" if seconds is None else duration(seconds),
                ]
            )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    flops = None if per_token is None else totals["passes"] * per_token
    flops_top = None if per_token is None else totals["top"] * per_token
    model = (
        "parameters unknown offline" if size is None else f"{cost.format_count(size.parameters)} parameters"
    )
    measured = (
        "not measured here (no finished stage of the same shapes in the output folder)"
        if totals["seconds"] is None
        else f"about {duration(totals['seconds'])} of training at the speeds measured in {root}"
    )
    lines += [
        f"total ({config.model.name}, {model}): {cost.format_count(totals['tokens'])} tokens, "
        f"{cost.format_flops(flops)} FLOPs, GPU-hours {_hours(flops)}; every trial at {high} epochs: "
        f"{cost.format_flops(flops_top)} FLOPs, GPU-hours {_hours(flops_top)}",
        f"time: {measured}",
        "(tokens: sequences read x max_length, an upper bound; FLOPs and hours as in `booster run --dry-run`; "
        "evaluations not counted: one on the validation prompts per trial, two on the test prompts per study)",
    ]
    return lines
