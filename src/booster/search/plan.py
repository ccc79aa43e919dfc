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

from booster import cost
from booster.config import RunConfig
from booster.methods.registry import get_method
from booster.plan import count_rows, planned_steps, used_samples
from booster.search.study import (
    JOURNAL,
    SEARCH_DIR,
    finished_trials,
    fixed_config,
    mean_epochs,
    open_study,
    search_methods,
    search_ratio,
    study_dir,
    trial_config,
)
from booster.search.validation import check_sizes, offline, validation_set
from booster.stages.align import align_dir
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
    names = [name.split()[0] for name, _, _ in cost.GPUS]
    return ", ".join(
        f"{name} {'< 0.01' if h < 0.01 else f'{h:.3g}'}"
        for name, h in zip(names, cost.gpu_hours(flops), strict=True)
    )


def plan_lines(config: RunConfig, where: str) -> list[str]:
    """The search's plan and cost, one line each (no network: a hub dataset's size stays unknown)."""
    check_sizes(config)
    search, root = config.search, Path(config.output_dir)
    # the studies' folders are named by the validation prompts: read them where that needs no network
    sha = validation_set(config, root / SEARCH_DIR)[0].sha256 if offline(config) else None
    ratio = search_ratio(config)
    size = cost.model_size(config.model)
    per_token = None if size is None else cost.flops_per_token(size)
    low, high = search.epochs
    middle = trial_config(config, search.learning_rate[0], mean_epochs(config))
    top = trial_config(config, search.learning_rate[0], high)
    bottom = trial_config(config, search.learning_rate[0], low)
    fixed = fixed_config(config)
    attack = config.attack
    validation = (
        search.validation_prompts or f"the last of {config.evaluate.harmful_prompts}, after the test prompts"
    )
    lines = [
        f"{where}: valid; attack search at p={ratio:g} against {len(search_methods(config))} method(s) x "
        f"{len(config.seeds)} seed(s), {search.trials} trials each: learning rate in "
        f"[{search.learning_rate[0]:g}, {search.learning_rate[1]:g}] (log), epochs in [{low}, {high}], "
        f"TPE seed {search.sampler_seed} ({search.startup_trials} random first)",
        f"validation: {search.validation_samples} prompts ({validation}); test: "
        f"{config.evaluate.harmful_samples} prompts ({config.evaluate.harmful_prompts}); judge {config.evaluate.judge}",
        f"a trial trains {planned_steps(bottom.attack, attack.samples)} to {planned_steps(top.attack, attack.samples)} "
        f"steps ({low} to {high} epochs of {attack.samples} samples at batch {attack.batch_size}); the fixed attack "
        f"{planned_steps(fixed.attack, attack.samples)}",
    ]
    header = (
        "study".ljust(24)
        + "alignment".ljust(24)
        + "done   to run   tokens    FLOPs      GPU-hours (trials at mid-range epochs)"
    )
    lines.append(header)
    totals = {"tokens": 0, "passes": 0, "top": 0}
    for seed in config.seeds:
        for method in search_methods(config):
            aligned = read_done(align_dir(config, method, seed, root)) is not None
            rows = count_rows(config.align.alignment_data, "alignment")
            align_steps = planned_steps(config.align, used_samples(config.align.alignment_samples, rows))
            passes = get_method(method).align_passes
            align_tokens = 0
            if not aligned:
                align = config.align
                align_tokens = (
                    cost.training_tokens(
                        align_steps, align.batch_size, align.gradient_accumulation_steps, align.max_length
                    )
                    or 0
                )
            done = 0
            if sha is not None:
                folder = study_dir(config, method, seed, root, sha)
                if (folder / JOURNAL).is_file():
                    done = len(finished_trials(open_study(folder, config)))
            left = max(search.trials - done, 0)
            attacks = left * _tokens(middle) + _tokens(fixed)
            tokens, weighted = align_tokens + attacks, align_tokens * passes + attacks
            totals["tokens"] += tokens
            totals["passes"] += weighted
            totals["top"] += align_tokens * passes + left * _tokens(top) + _tokens(fixed)
            flops = None if per_token is None else weighted * per_token
            align_text = (
                "done"
                if aligned
                else f"{'?' if align_steps is None else align_steps} steps x {passes} passes"
            )
            lines.append(
                f"{method} seed {seed}".ljust(24)
                + align_text.ljust(24)
                + f"{done:<6} {left:<7} {cost.format_count(tokens):<9} {cost.format_flops(flops):<10} {_hours(flops)}"
            )
    flops = None if per_token is None else totals["passes"] * per_token
    flops_top = None if per_token is None else totals["top"] * per_token
    total_tokens = totals["tokens"]
    model = (
        "parameters unknown offline" if size is None else f"{cost.format_count(size.parameters)} parameters"
    )
    lines += [
        f"total ({config.model.name}, {model}): {cost.format_count(total_tokens)} tokens, "
        f"{cost.format_flops(flops)} FLOPs, GPU-hours {_hours(flops)}; every trial at {high} epochs: "
        f"{cost.format_flops(flops_top)} FLOPs, GPU-hours {_hours(flops_top)}",
        "(tokens: sequences read x max_length, an upper bound; FLOPs and hours as in `booster run --dry-run`; "
        "evaluations not counted: one on the validation prompts per trial, two on the test prompts per study)",
    ]
    return lines
