"""What ``booster search`` leaves in a run folder for the rest of the tools to read: the folder and
file names, the summary of every study (the worst case found beside the fixed attack) as a table,
and its reader. The search itself (:mod:`booster.search`) writes them; the report and the archive,
which sit below it, read them from here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from booster.errors import warn
from booster.markdown import head, row

#: the folder of a run folder that ``booster search`` writes into.
SEARCH_DIR = "search"
#: each study's table of trials (``.json`` and ``.md``) and its plot, in the study's folder.
HISTORY = "history"
PLOT = "search.png"
#: each study's Optuna journal (trial settings, scores and evaluation paths; no text), in its folder.
JOURNAL = "journal.log"
#: the summary of every study, in ``SEARCH_DIR``.
SUMMARY = "report.md"
SUMMARY_JSON = "results.json"


def pct(value: Any) -> str:
    return "-" if not isinstance(value, int | float) or math.isnan(value) else f"{value:.1f}"


def with_ci(value: Any, ci: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(isinstance(c, int | float) for c in ci):
        return f"{value:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]"
    return f"{value:.1f}"


def broken_text(record: dict[str, Any]) -> str:
    """A broken model's cell: its degenerate rate, in place of a harmful score it does not have."""
    return f"BROKEN ({pct(record.get('degenerate_rate'))}% degenerate)"


def test_hs_text(test: dict[str, Any] | None) -> str:
    if not test:
        return "-"
    if test.get("verdict") == "broken":
        return broken_text(test)
    return with_ci(test.get("harmful_score"), test.get("harmful_score_ci"))


def summary_table(
    results: list[dict[str, Any]],
    links_from: str = "",
    gaps: dict[str, tuple[str, str]] | None = None,
    versus: tuple[str, dict[str, str]] | None = None,
) -> list[str]:
    """Per aligned model, the fixed attack and the worst case found, on the test prompts, as Markdown
    table lines; each study's links are relative to ``links_from`` (a folder under the run folder).
    ``gaps`` (study folder -> worst minus fixed in HS and FA, paired on the same prompts, as text;
    :func:`booster.report.statistics.search_gaps`) adds those two columns; ``versus`` (the baseline
    and study folder -> worst minus the baseline's worst, :func:`booster.report.statistics.
    worst_against_baseline`) one more, when any study has a baseline to pair with."""
    columns = ["method", "seed", "p", "trials", "fixed attack: test HS", "worst case: test HS"]
    if gaps is not None:
        columns += ["worst − fixed: ΔHS (paired)", "worst − fixed: ΔFA (paired)"]
    if versus is not None and not versus[1]:
        versus = None
    if versus is not None:
        columns.append(f"worst − {versus[0]}'s worst: ΔHS (paired)")
    lines = head([*columns, "worst case: lr, epochs", "validation HS", "history"])
    for r in results:
        best = r["best"]
        setting = "-" if best is None else f"{best['learning_rate']:.3g}, {best['epochs']}"
        valid = "-" if best is None else f"{best['validation_hs']:.1f}"
        worst = "every trial broken" if best is None else test_hs_text(best["test"])
        relative = Path(r["folder"]).relative_to(links_from).as_posix() if links_from else r["folder"]
        links = f"[table]({relative}/{HISTORY}.md), [plot]({relative}/{PLOT})"
        cells = [r["method"], str(r["seed"]), f"{r['poison_ratio']:g}", str(r["search"]["trials"])]
        cells += [test_hs_text(r["fixed"]["test"]), worst]
        if gaps is not None:
            cells += list(gaps.get(r["folder"], ("-", "-")))
        if versus is not None:
            cells.append(versus[1].get(r["folder"], "-"))
        lines.append(row([*cells, setting, valid, links]))
    return lines


#: the note over :func:`shared_settings_table`, for every report that shows it.
SHARED_SETTINGS_NOTE = (
    "The same attack settings tried against several aligned models of one seed and poison ratio (a "
    "shared sampler seed makes the studies' first trials the same): validation HS on the same "
    'validation prompts, side by side, [95% Wilson]; "-": not tried against that model. Unlike the '
    "worst cases, which each study finds at settings of its own, these rows compare the defenses "
    "under one attack."
)


def shared_settings_table(results: list[dict[str, Any]]) -> list[str]:
    """Each (learning rate, epochs) that studies of the same seed and poison ratio both tried, one
    row with every study's validation HS, as Markdown table lines; empty when no setting was tried
    twice."""
    groups: dict[tuple, dict[tuple, dict[str, dict]]] = {}
    for r in results:
        settings = groups.setdefault((r["seed"], r["poison_ratio"]), {})
        for trial in r.get("trials") or []:
            if isinstance(trial.get("learning_rate"), int | float) and isinstance(trial.get("epochs"), int):
                key = (round(float(trial["learning_rate"]), 12), trial["epochs"])
                settings.setdefault(key, {}).setdefault(r["method"], trial)
    shared = [
        (seed, ratio, key, tried)
        for (seed, ratio), settings in groups.items()
        for key, tried in sorted(settings.items())
        if len(tried) > 1
    ]
    if not shared:
        return []
    methods = list(dict.fromkeys(m for *_, tried in shared for m in tried))
    lines = head(["seed", "p", "lr", "epochs", *[f"{m}: validation HS" for m in methods]])
    for seed, ratio, (lr, epochs), tried in shared:
        cells = [str(seed), f"{ratio:g}", f"{lr:.3g}", str(epochs)]
        for method in methods:
            trial = tried.get(method)
            if trial is None:
                cells.append("-")
            elif trial.get("broken"):
                cells.append(broken_text(trial))
            else:
                cells.append(with_ci(trial.get("validation_hs"), trial.get("validation_hs_ci")))
        lines.append(row(cells))
    return lines


def merge_summary(kept: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``kept`` with each study of ``new`` in place of the record of the same study folder and the
    other new studies after them: a search of one method keeps the summary of another's, an
    archive the studies of every run archived into it."""
    fresh = {r["folder"]: r for r in new}
    merged = [fresh.pop(r["folder"], r) for r in kept]
    return merged + [r for r in new if r["folder"] in fresh]


def read_summary(root: Path) -> list[dict[str, Any]]:
    """The searches run into ``root`` (``search/results.json``), each as ``write_summary`` wrote it;
    empty when there are none. A file that does not read as one is skipped with a warning: the
    report it feeds is still worth writing."""
    path = Path(root) / SEARCH_DIR / SUMMARY_JSON
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, list) or not all(_is_study(r) for r in data):
            raise ValueError("not a list of searches")
    except (OSError, ValueError) as err:
        warn(
            f"{path}: unreadable ({err}); the report leaves the tuned attacker out. Run `booster search` again to rewrite it"
        )
        return []
    return data


def _is_study(record: Any) -> bool:
    keys = ("method", "seed", "poison_ratio", "folder", "search", "fixed", "best")
    return isinstance(record, dict) and all(k in record for k in keys)
