"""Report from results.json: the paper-style HS/FA tables with their uncertainty, paired comparisons
with SFT, the harmful-loss probe, judge validation, settings and plots.

Everything is rebuilt from results.json (config.yaml only adds the settings section; the per-prompt
verdicts of the paired comparison come from the evaluation files results.json points to), so
``booster report DIR`` works on any finished run. A swept setting gets its own table in the paper's
layout (methods by the setting's values) and a plot. FA may be None: not measured (``n/a``) or
waiting for an external judge (``pending``, e.g. AlpacaEval); it is never shown as a number and is
left out of averages and plots. A broken model (most answers degenerate, see
:data:`booster.evaluation.harmful_score.BROKEN_DEGENERATE_RATE`) shows as **broken**, never as a
score, and is left out of averages and plots too.

This module writes report.md (:func:`write_report`) section by section; what the sections are made
of lives in its modules, each readable alone: :mod:`~booster.report.cells` (entries grouped into
cells over seeds), :mod:`~booster.report.statistics` (paired comparisons on the same prompts),
:mod:`~booster.report.tables` (Markdown tables), :mod:`~booster.report.plots` (PNG plots).

Every name read from the run folder that becomes part of a file name goes through
:func:`~booster.report.cells.safe_name`, so a crafted results.json or config.yaml cannot write
outside the folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from booster import markdown
from booster.archive import is_archive
from booster.config import Sweep, format_value, parse_yaml, short_names, sweep_from_dict
from booster.errors import UserError, warn
from booster.evaluation.judges import judging_on, shared_judge
from booster.evaluation.statistics import RESAMPLES
from booster.evaluation.validate import validate_judge
from booster.models import evaluation_device
from booster.provenance import report_lines
from booster.report.cells import (
    BASELINE,
    BROKEN,
    BROKEN_NOTE,
    FA,
    HS,
    SHARED_NOTE,
    Shared,
    _any_broken,
    _label,
    _ratios,
    _rows,
    merge_shared_rows,
    safe_name,
    swept_keys,
)
from booster.report.plots import _plot_file, plot_against_ratio, plot_frontier, plot_probe, plot_sweep
from booster.report.statistics import (
    BOOTSTRAP_SEED,
    CORRECT,
    HARMFUL,
    REFUSED,
    Comparison,
    compare_with_baseline,
    crossed_levels,
    poison_effects,
    search_gaps,
    worst_against_baseline,
)
from booster.report.tables import (
    _ordered,
    _probe_groups,
    across_seeds_table,
    aligned_probe_table,
    comparison_table,
    detail_table,
    probe_table,
    results_table,
    stack_table,
    sweep_grid,
    sweep_table,
)
from booster.runs import load_results
from booster.searches import (
    SEARCH_DIR,
    SHARED_SETTINGS_NOTE,
    read_summary,
    shared_settings_table,
    summary_table,
)
from booster.searches import SUMMARY as SEARCH_SUMMARY
from booster.storage import move_aside, read_json, write_json_atomic, write_text_atomic

# -- paired comparison with the baseline ------------------------------------------------------------


def _outputs_line(root: Path) -> str:
    """Where the answers are, or in an archive (:mod:`booster.archive`), that there are none."""

    if is_archive(root):
        return (
            "This folder is an archive: no weights and no answers; the judge's per-prompt verdicts "
            "(each prompt as its sha256) are in `*/verdicts-*.jsonl` in the stage folders."
        )
    return "Generations (may contain harmful text): `*/generations-*.jsonl` in the stage folders."


def comparison_section(root: Path, results: list[dict], baseline: str = BASELINE) -> list[str]:
    """The paired comparison of every method with ``baseline``, in HS and (where the task questions'
    answers can be paired) in FA; empty when nothing can be paired."""
    comparisons = compare_with_baseline(root, results, baseline)
    costs = compare_with_baseline(root, results, baseline, CORRECT)
    found = [c for c in comparisons.values() if isinstance(c, Comparison)]
    paid = [c for c in costs.values() if isinstance(c, Comparison)]
    if not found and not paid:
        return []
    lines = [f"## Paired comparison with {baseline}", ""]
    if found:
        prompts = "/".join(map(str, sorted({c.prompts for c in found})))
        lines += [
            f"ΔHS = HS(method) − HS({baseline}) in points, on the same {prompts} harmful prompts, pooled "
            f"over the seeds both ran; [95% CI]: paired bootstrap over prompts ({RESAMPLES} resamples, "
            f"RNG seed {BOOTSTRAP_SEED}). Below 0: fewer harmful answers than {baseline}; an interval "
            "that holds 0 is a difference the prompt sample alone could explain.",
            "",
            comparison_table(results, comparisons, baseline),
            "",
        ]
    if paid:
        questions = "/".join(map(str, sorted({c.prompts for c in paid})))
        lines += [
            f"ΔFA = FA(method) − FA({baseline}) in points, on the same {questions} task questions, the "
            f"same way: what the defense costs the user's task. Below 0: fewer right answers than "
            f"{baseline}.",
            "",
            comparison_table(results, costs, baseline, "ΔFA"),
            "",
        ]
    across = across_seeds_table(results, comparisons, costs, baseline)
    if across:
        lines += [
            "**Across seeds.** The intervals above resample prompts only: they say whether these "
            "trained models differ on other prompts. Whether the methods differ also depends on the "
            "training seed, so here each difference is given seed by seed, with an interval whose "
            "resamples draw seeds as well as prompts (a crossed bootstrap, same resamples and RNG "
            "seed). With few seeds that draw is coarse; claim a difference when this interval "
            "excludes 0 and every seed agrees in sign.",
            "",
            across,
            "",
        ]
    if BROKEN in comparisons.values() or BROKEN in costs.values():
        lines += ["**broken**: the method's or the baseline's model is broken; nothing to compare.", ""]
    return lines


def stack_section(root: Path, results: list[dict], baseline: str = BASELINE) -> list[str]:
    """Each method and poison ratio over its seeds in one row (empty with one seed): the table a
    provider chooses a defense from."""
    if len({r["seed"] for r in results}) < 2:
        return []
    levels = {kind: crossed_levels(root, results, kind) for kind in (HARMFUL, REFUSED, CORRECT)}
    comparisons = compare_with_baseline(root, results, baseline)
    costs = compare_with_baseline(root, results, baseline, CORRECT)
    table = stack_table(results, levels, comparisons, costs, read_summary(root), baseline)
    if not table:
        return []
    return [
        "## Each stack over its seeds",
        "",
        "After the user's fine-tuning, one row per method and poison ratio. HS, refusals and FA in "
        "percent over every seed's prompts (or task questions); [95% CI]: a crossed bootstrap whose "
        f"resamples draw seeds as well as prompts ({RESAMPLES} resamples, RNG seed {BOOTSTRAP_SEED}; "
        f"prompts only where one seed ran). Δ vs {baseline}: the paired difference on the same "
        "prompts, with the same kind of interval. Probe: the held-out harmful loss before -> after "
        "the attack, mean over the seeds. Tuned attacker: the worst case `booster search` found, on "
        "the test prompts (below).",
        "",
        table,
        "",
    ]


def poison_section(root: Path, results: list[dict]) -> list[str]:
    """What the harmful samples add: each method's HS at p > 0 minus its HS at p = 0 on the same
    prompts; empty unless the grid attacks at p = 0 and at some p > 0."""
    effects = poison_effects(root, results)
    found = [c for c in effects.values() if isinstance(c, Comparison)]
    if not found:
        return []
    names = short_names(swept_keys(results))
    ratios = [p for p in _ratios(results) if p]
    header = ["method"] + [f"p={p:g} − p=0 ΔHS [95% CI]" for p in ratios]
    lines = [
        "## What the harmful samples add",
        "",
        f"ΔHS = HS after the attack at p − HS after the benign-only attack (p = 0), same method, seed "
        f"and settings, on the same {'/'.join(map(str, sorted({c.prompts for c in found})))} harmful "
        f"prompts; [95% CI]: paired bootstrap ({RESAMPLES} resamples, RNG seed {BOOTSTRAP_SEED}). "
        "It separates the harm the poison does from the drift of benign fine-tuning, which no "
        "alignment-stage defense claims to stop.",
        "",
        *markdown.head(header),
    ]
    for method, point in _rows(results):
        row = [_label(method, point, names)]
        for ratio in ratios:
            got = effects.get((method, point, "attacked", ratio))
            row.append("**broken**" if got == BROKEN else got.text if got else "n/a")
        lines.append(markdown.row(row))
    return [*lines, ""]


# -- harm against utility, and the tuned attacker ---------------------------------------------------

FRONTIER_PLOT = "frontier.png"


def frontier_section(
    root: Path,
    results: list[dict],
    searches: list[dict],
    tuned: list[str],
    levels: dict[str, dict] | None = None,
) -> list[str]:
    """HS against FA after the attack (a plot; ``levels``: its bars over seeds, as
    :func:`booster.report.plots.plot_frontier` takes them), and the tuned attacker's worst cases
    (``searches``, their tables ``tuned``: :func:`tuned_attacker_lines`) when ``booster search`` ran
    into this folder; empty when no attacked model has both HS and FA."""
    lines: list[str] = []
    if plot_frontier(results, searches, root / FRONTIER_PLOT, levels):
        stars = (
            " Stars: the worst case the tuned attacker found (`booster search`, below), an arrow from "
            "the fixed attack on the searched seed (a small ring) to it."
            if searches
            else ""
        )
        lines += [
            "## Harm against utility",
            "",
            "HS against FA after the user's fine-tuning, one point per method: a defense worth running "
            "sits low (few harmful answers) and right (the user's task still learned). Error bars both "
            "ways: over several seeds the 95% interval of a bootstrap that draws seeds as well as "
            "prompts (the stack table's), or ± std where the per-prompt verdicts are missing; one "
            f"model's 95% Wilson interval.{stars}",
            "",
            f"![harm against utility]({FRONTIER_PLOT})",
            "",
        ]
    if tuned:
        lines += ["## The tuned attacker", "", *tuned]
    return lines


def search_pairings(root: Path, searches: list[dict]) -> tuple[dict, dict[str, str]]:
    """Each study's worst case minus its fixed attack (:func:`~booster.report.statistics.search_gaps`)
    and minus the baseline's worst case (:func:`~booster.report.statistics.worst_against_baseline`),
    paired on the same test prompts: the bootstraps behind :func:`tuned_attacker_lines`."""
    return search_gaps(root, searches), worst_against_baseline(root, searches)


def tuned_attacker_lines(
    root: Path,
    searches: list[dict],
    links_from: str = "",
    heading: str = "###",
    pairings: tuple[dict, dict[str, str]] | None = None,
) -> list[str]:
    """What ``booster search`` found, for the run's report and for the search's own summary: per
    aligned model the fixed attack and the worst case on the test prompts, paired with each other
    and with the baseline's worst case (``pairings``: :func:`search_pairings`, computed here when not
    given), then the settings several studies tried (under a ``heading``-level title); links
    relative to ``links_from``. Empty when no search ran."""
    if not searches:
        return []
    gaps, versus = pairings or search_pairings(root, searches)
    lines = [
        "`booster search` tuned the attack's learning rate and epochs against these aligned models "
        "on validation prompts disjoint from the test prompts; the worst case it found (the highest "
        "validation HS among models that are not broken) and the config's fixed attack, both on the "
        "test prompts, 95% Wilson intervals, and the worst case minus the fixed attack paired on "
        "the same test prompts and task questions (bootstrap 95% CI). A defense that holds only "
        "under the fixed attack shows here as a large gap. Where the baseline's study of the same "
        "seed and ratio ran, the worst case minus the baseline's worst case, paired the same way: "
        "whether the defense still lowers the harm when each model meets the attack tuned against it.",
        "",
        *summary_table(searches, links_from, gaps, (BASELINE, versus)),
        "",
    ]
    shared = shared_settings_table(searches)
    if shared:
        lines += [
            f"{heading} The same settings against several models",
            "",
            SHARED_SETTINGS_NOTE,
            "",
            *shared,
            "",
        ]
    return lines


def write_search_summary(root: Path, tuned: list[str] | None = None) -> Path | None:
    """``root/search/report.md`` from ``root/search/results.json`` (a run folder's or an archive's):
    :func:`tuned_attacker_lines`, or ``tuned`` where the caller built them already. None when no
    search ran into ``root``."""
    if tuned is None:
        tuned = tuned_attacker_lines(root, read_summary(root), SEARCH_DIR, "##")
    if not tuned:
        return None
    path = root / SEARCH_DIR / SEARCH_SUMMARY
    write_text_atomic(path, "\n".join(["# Attack search", "", *tuned]))
    return path


# -- harmful-loss probe ----------------------------------------------------------------------------


def probe_section(results: list[dict], root: Path) -> list[str]:
    """The probe of the aligned models and during the attack (table and plot); empty when no entry
    has it."""
    aligned = aligned_probe_table(results)
    if not _probe_groups(results) and aligned is None:
        return []
    lines = ["## Harmful-loss probe", ""]
    if aligned is not None:
        lines += [
            "Before any attack: each aligned model's mean loss on held-out harmful (prompt, harmful "
            "answer) pairs and the norm of its gradient over the weights the attack trains. A high "
            "loss is an alignment that moved the model away from harmful answers; a small gradient, "
            "a flat harmful loss there. Several seeds: mean ± std.",
            "",
            aligned,
            "",
        ]
    if not _probe_groups(results):
        return lines
    lines += [
        "Mean loss on held-out harmful (prompt, harmful answer) pairs, logged during the attack: start "
        "(before the attack) → end, and the drop (start − end). Booster's claim: its alignment keeps "
        "the attack from lowering this loss. Several seeds: mean ± std.",
        "",
        probe_table(results),
        "",
    ]
    if plot_probe(results, root / "harmful_loss.png"):
        lines += ["![harmful-loss probe](harmful_loss.png)", ""]
    return lines


# -- one table per swept setting -------------------------------------------------------------------


# -- plots -----------------------------------------------------------------------------------------


def sweep_sections(results: list[dict], root: Path) -> list[str]:
    """The markdown of every swept setting's table (and its plot, written next to report.md)."""
    lines: list[str] = []
    if not any(r["stage"] == "attacked" for r in results):
        return lines
    for variable in swept_keys(results):
        grid = sweep_grid(results, variable)
        plot_sweep(grid, root / _plot_file(variable))
        ratios = ", ".join(f"{p:g}" for p in grid.ratios)
        lines += [
            f"### {variable}",
            "",
            f"HS / FA after the attack (p = {ratios}); mean ± std over seeds (one seed: [95% Wilson "
            "interval]); *average*: over the columns.",
            "",
            sweep_table(grid),
            "",
        ]
        if grid.constant:
            verb = "does" if len(grid.constant) == 1 else "do"
            lines += [
                f"{', '.join(grid.constant)} {verb} not read `{variable}`: one model stands in every column.",
                "",
            ]
        if any(c.get(BROKEN) for cells in grid.rows.values() for c in cells):
            lines += [BROKEN_NOTE, ""]
        lines += [f"![{variable}]({_plot_file(variable)})", ""]
    return lines


# -- the rest of the report ------------------------------------------------------------------------


def judge_validation(root: Path, judge: str, judge_model: str | None) -> dict[str, Any] | None:
    """The judge's accuracy on held-out human labels, computed once per run folder. The cached file
    is checked like a stage: a damaged one (cut, not a report) is moved aside with one warning line
    and computed again."""
    path = root / f"judge-{safe_name(judge)}.json"
    if path.exists():
        cached = read_json(path)
        if isinstance(cached, dict) and ("accuracy" in cached or "error" in cached):
            return cached
        aside = move_aside(path)
        warn(
            f"{path}: damaged (not a judge validation report); moved it aside to {aside.name} and validating again"
        )
    try:
        options = {"model": judge_model} if judge_model else {}
        with judging_on(shared_judge(judge, **options), evaluation_device()) as built:  # the run's judge
            report = validate_judge(built)
    except Exception as err:  # validation needs the PyRIT labels; a report without it still helps
        report = {"error": f"{type(err).__name__}: {err}"}
    write_json_atomic(path, report)
    return report


def _settings(data: dict[str, Any], results: list[dict]) -> list[str]:
    """The settings section, from the config as YAML data (a swept setting shows its list)."""
    m, a, t, e = data["model"], data["align"], data["attack"], data["evaluate"]
    lines = [
        f"- align: data `{a['alignment_data']}` (+ harmful `{a['harmful_data']}`), lr {a['learning_rate']}, "
        f"batch {a['batch_size']}, epochs {a['epochs']}, max_steps {a['max_steps']}, lamb {a['lamb']}, "
        f"alpha {a['alpha']}",
        f"- LoRA: {m['lora']}",
        f"- attack: task `{t['task_data']}`, poison `{t['poison_data']}`, n={t['samples']}, "
        f"p in {t['poison_ratios']}, mode {t['mode']}, lr {t['learning_rate']}, batch {t['batch_size']}, "
        f"epochs {t['epochs']}, max_steps {t['max_steps']}",
        f"- evaluate: prompts `{e['harmful_prompts']}` (n={e['harmful_samples']}), task samples "
        f"{e['task_samples']}, max_new_tokens {e['max_new_tokens']}",
    ]
    methods = {str(r.get("method")) for r in results}
    if any(name.endswith("+mix") or "+mix+" in name for name in methods):
        lines.insert(
            3,
            f"- safety data mixing (+mix): round({t.get('safety_mix_ratio', 0.1)} x n) refusal pairs of "
            "the alignment data added to the user's n samples",
        )
    if any(name.endswith("+antidote") for name in methods) and isinstance(data.get("repair"), dict):
        r = data["repair"]
        lines.insert(
            -1,
            f"- repair (+antidote): Antidote zeroes the top {r['prune_ratio']} of each output row of "
            f"{r['target_modules'] or m['lora']['target_modules']} by |W| x ||X|| on `{r['harmful_data']}` "
            f"(n={r['harmful_samples']})",
        )
    swept = swept_keys(results)
    if swept:
        values = {k: _ordered([r["sweep"][k] for r in results if k in (r.get("sweep") or {})]) for k in swept}
        lines.append(
            "- swept: "
            + "; ".join(f"`{k}` in [{', '.join(format_value(v) for v in vs)}]" for k, vs in values.items())
        )
    return lines


def write_report(root: Path, config: Any | None = None, against: Sequence[str] = ()) -> Path:
    """Rebuild report.md and the plots from results.json (and the resolved config: a ``RunConfig``
    or ``Sweep``, else the run's config.yaml when there is one). ``against``: methods that every
    method is also compared with, paired as with the baseline, to put two defenses head to head."""

    root = Path(root)
    results = load_results(root)
    methods = list(dict.fromkeys(r["method"] for r in results))
    for name in against:
        if name not in methods:
            raise UserError(
                f"--against {name}: no method {name!r} in {root / 'results.json'}; "
                f"give one of {', '.join(methods)}"
            )
    if config is None:
        config_path = root / "config.yaml"
        if config_path.exists():
            fix = "; restore it, or give the settings with --config FILE"
            data = parse_yaml(config_path.read_text(), config_path, fix)
            if not isinstance(data, dict):
                raise UserError(f"{config_path}: not a booster config{fix}")
            config = sweep_from_dict(data, str(config_path))
    else:
        if not isinstance(config, Sweep):
            config = Sweep(config)
        write_text_atomic(root / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    data = config.to_dict() if config is not None else None
    judges = list(dict.fromkeys(r["judge"] for r in results if r.get("judge")))
    judge = data["evaluate"]["judge"] if data else (judges[0] if judges else None)
    judge_model = data["evaluate"]["judge_model"] if data else None
    validation = judge_validation(root, judge, judge_model) if judge else None
    has_attack = any(r["stage"] == "attacked" for r in results)
    # tables and plots of models list each once; the paired comparison and the sweep tables keep
    # every swept value, since a shared model still pairs with each value's baseline
    models = merge_shared_rows(results)
    # the plots' bars over several seeds: the 95% interval over seeds and prompts, as in the tables
    several = len({r["seed"] for r in results}) > 1
    levels = (
        {m: crossed_levels(root, models, kind) for m, kind in ((HS, HARMFUL), (FA, CORRECT))}
        if several
        else {}
    )
    if has_attack:
        plot_against_ratio(models, HS, "harmful score (%)", root / "harmful_score.png", levels)
        plot_against_ratio(models, FA, "fine-tune accuracy (%)", root / "finetune_accuracy.png", levels)
    seeds = sorted({r["seed"] for r in results})
    model = f"Model `{data['model']['name']}`; " if data else ""
    lines = [
        "# booster-llm report",
        "",
        f"{model}methods {', '.join(methods)}; seeds {seeds}.",
        "",
        "## Harmful score (HS, lower is better) / fine-tune accuracy (FA, higher is better)",
        "",
        "Percentages. Several seeds: mean ± std over seeds; one seed: the value [its 95% Wilson "
        "interval over the prompts]. *aligned*: before the user's fine-tuning; *p=…*: after it. "
        "FA *pending*: waiting for an external judge (see the stage's evaluation file).",
        "",
        results_table(models),
        "",
    ]
    if any(isinstance(v, Shared) for r in models for v in (r.get("sweep") or {}).values()):
        lines += [SHARED_NOTE, ""]
    if _any_broken(results):
        lines += [BROKEN_NOTE, ""]
    lines += stack_section(root, results)
    lines += comparison_section(root, results)
    for name in dict.fromkeys(against):
        if name != BASELINE:
            lines += comparison_section(root, results, name)
    lines += poison_section(root, models)
    searches = read_summary(root)
    pairings = search_pairings(root, searches)
    if has_attack:
        tuned = tuned_attacker_lines(root, searches, pairings=pairings)
        lines += frontier_section(root, models, searches, tuned, levels)
    # the search's own summary: the same tables, linked from its folder
    write_search_summary(root, tuned_attacker_lines(root, searches, SEARCH_DIR, "##", pairings))
    lines += probe_section(models, root)
    sweeps = sweep_sections(results, root)
    if sweeps:
        lines += ["## Sweeps", "", "One table per swept setting: methods by the setting's values.", ""]
        lines += sweeps
    lines += [
        "## Every evaluated model",
        "",
        "HS+ also counts degenerate answers (empty, very short or a word repeated more than 3 times); "
        "[95% CI]: Wilson interval over the prompts.",
        "",
        detail_table(models),
        "",
    ]
    if _any_broken(results):
        lines += [BROKEN_NOTE, ""]
    lines += [f"## Judge: `{judge or 'unknown'}`", ""]
    if validation and "error" not in validation:
        lines += ["Validation on held-out human-labelled responses:", "", "| metric | value |", "|---|---|"]
        lines += [
            f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in validation.items()
        ]
    else:
        lines.append(f"No validation available ({(validation or {}).get('error', 'unknown')}).")

    lines += ["", "## Provenance", "", *report_lines(results)]
    lines += ["", "## Settings", ""]
    if data:
        lines += _settings(data, results)
        lines += ["", f"Full resolved settings: `config.yaml`. {_outputs_line(root)}"]
    else:
        lines.append("No config.yaml in this folder: the settings are unknown.")
    if has_attack:
        lines += ["", "![harmful score](harmful_score.png) ![fine-tune accuracy](finetune_accuracy.png)"]
    path = root / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
