"""What the report is made of: results.json entries grouped into cells (method x swept values x
stage x poison ratio), their values over seeds, broken models marked, and the metrics' names.

A cell's value is the mean ± std over seeds, or one seed's value with its 95% Wilson interval; a
broken model (most answers degenerate) counts apart and never as a score. A method that trains the
very same models under two swept values is one row (:func:`merge_shared_rows`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from booster.config import (
    AlignConfig,
    AttackConfig,
    format_point,
    format_value,
    short_names,
)
from booster.evaluation.harmful_score import BROKEN_DEGENERATE_RATE, model_verdict
from booster.evaluation.statistics import mean_std, wilson_percent

HS, FA = "harmful_score", "finetune_accuracy"


HS_PLUS, REFUSAL = "harmful_score_plus", "refusal_rate"


#: marker a pending FA carries in results.json (see booster.evaluation.alpaca_eval).
PENDING = "finetune_accuracy_pending"


BROKEN = "broken"


#: the method every other one is compared with, prompt by prompt (the undefended baseline).
BASELINE = "sft"


#: rates whose interval a cell keeps next to its values (``<metric>_ci``).
INTERVAL_METRICS = (HS, HS_PLUS, REFUSAL, FA)


BROKEN_NOTE = (
    f"**broken**: more than {BROKEN_DEGENERATE_RATE:g}% of the answers to the harmful prompts are "
    "degenerate (empty, a word or two, or looping): the model is broken, not safe. Broken models are "
    "left out of the averages and the plots; *+k broken*: k of the seeds in the cell are."
)


Point = tuple[tuple[str, Any], ...]


def safe_name(name: Any) -> str:
    """``name`` as a safe part of a file name: letters, digits and ``._+=-`` are kept, anything
    else (``/`` and ``\\`` included) becomes ``_``, leading dots are dropped and the length capped,
    so a judge, method or setting name from a run folder never leads a path out of the folder."""
    text = re.sub(r"[^A-Za-z0-9._+=-]", "_", str(name)).lstrip(".")
    return text[:100] or "_"


SHARED_NOTE = (
    "*a or b*: one model stands for both values of the setting, because the method trains the same "
    "models under each (`attack.mode: reference` attacks Booster's aligned adapter in place, as "
    "`single_lora` does); the paired comparison and the sweep tables still list each value."
)


def is_broken(entry: dict) -> bool:
    """Whether a results.json entry (or an evaluation's metrics) is a broken model; entries from
    before the ``verdict`` key existed are judged by their degenerate rate."""
    verdict = entry.get("verdict")
    if verdict is None:
        verdict = model_verdict(entry.get("degenerate_rate"))
    return verdict == BROKEN


def broken_models(results: list[dict]) -> list[str]:
    """``booster seed 0 lamb=5 p=0.1`` for every broken model, each once (cells of a sweep that
    share an alignment repeat its entry)."""
    names = short_names(swept_keys(results))
    found = []
    for r in results:
        if is_broken(r):
            point = f" {format_point(r['sweep'], names)}" if r.get("sweep") else ""
            stage = "aligned" if r["stage"] == "aligned" else f"p={r['poison_ratio']:g}"
            found.append(f"{r['method']} seed {r['seed']}{point} {stage}")
    return list(dict.fromkeys(found))


def broken_message(models: list[str]) -> str:
    """The one line the CLI prints (and exits non-zero with) when some evaluated model is broken."""
    return (
        f"broken models (more than {BROKEN_DEGENERATE_RATE:g}% degenerate answers to the harmful "
        f"prompts; reported as **broken**, not as scores): {'; '.join(models)}"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _numbers(values: list[float | None]) -> list[float]:
    return [v for v in values if _is_number(v)]


def _mean_std(values: list[float | None]) -> tuple[float, float]:
    return mean_std(_numbers(values))


def _fmt(values: list[float | None]) -> str:
    values = _numbers(values)
    if not values:
        return "n/a"
    mean, std = _mean_std(values)
    return f"{mean:.1f}" + (f"±{std:.1f}" if len(values) > 1 else "")


def entry_interval(entry: dict, metric: str) -> list[float] | None:
    """The 95% interval of one model's rate, in percent: ``<metric>_ci`` from results.json, else
    the Wilson interval from the rate and ``n`` (``task_samples`` for FA); None without a count."""
    ci = entry.get(f"{metric}_ci")
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(_is_number(v) for v in ci):
        return [float(ci[0]), float(ci[1])]
    value = entry.get(metric)
    n = entry.get("task_samples" if metric == FA else "n")
    if not (_is_number(value) and isinstance(n, int)):
        return None
    return wilson_percent(value, n)


@dataclasses.dataclass(frozen=True)
class Stat:
    """A cell's number with its uncertainty: mean ± std over seeds, or one model's Wilson interval."""

    value: float
    lo: float
    hi: float
    text: str
    #: how many seeds the value stands for: above 1 the bar is ± std, at 1 a Wilson interval
    #: (or no bar when results.json lacks ``n``, see ``interval``).
    seeds: int = 1
    interval: bool = True
    #: above 1 seed: the bar is the 95% interval of a bootstrap over seeds and prompts (the stack
    #: table's), not ± std.
    pooled: bool = False


def cell_stat(cell: dict[str, list], metric: str) -> Stat | None:
    """Several seeds: mean ± std (the spread a new seed would show); one seed: its value and Wilson
    interval (the prompt sample's uncertainty), or the bare value when results.json lacks ``n``.
    For percentages (HS, FA, ...) only."""
    values = cell.get(metric, [])
    intervals = cell.get(f"{metric}_ci", [None] * len(values))
    pairs = [(v, ci) for v, ci in zip(values, intervals, strict=True) if _is_number(v)]
    if not pairs:
        return None
    if len(pairs) > 1:
        mean, std = mean_std([v for v, _ in pairs])
        # a percentage: the bar of ± std stops at 0 and 100
        return Stat(mean, max(0.0, mean - std), min(100.0, mean + std), f"{mean:.1f}±{std:.1f}", len(pairs))
    value, ci = pairs[0]
    if ci is None:
        return Stat(value, value, value, f"{value:.1f}", interval=False)
    return Stat(value, ci[0], ci[1], f"{value:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]")


def _field_order() -> dict[str, int]:
    """Dotted key -> position in the config (align fields, then attack fields)."""

    keys = [f"align.{f.name}" for f in dataclasses.fields(AlignConfig)]
    keys += [f"attack.{f.name}" for f in dataclasses.fields(AttackConfig)]
    return {k: i for i, k in enumerate(keys)}


def swept_keys(results: list[dict]) -> list[str]:
    """The swept settings recorded in results.json, in config order."""
    order = _field_order()
    found = {k for r in results for k in (r.get("sweep") or {})}
    return sorted(found, key=lambda k: (order.get(k, len(order)), k))


def _point(entry: dict, keys: list[str], skip: str | None = None) -> Point:
    sweep = entry.get("sweep") or {}
    return tuple((k, sweep[k]) for k in keys if k in sweep and k != skip)


def _label(method: str, point: Point, names: dict[str, str]) -> str:
    return f"{method} ({format_point(dict(point), names)})" if point else method


def _add(cell: dict[str, list], entry: dict) -> None:
    """Add one model to a cell: its numbers with their intervals, or only a mark when it is broken."""
    if is_broken(entry):
        cell[BROKEN].append(entry.get("degenerate_rate"))
        return
    for key in (HS, HS_PLUS, REFUSAL, FA, "train_seconds_per_step"):
        if entry.get(key) is not None:
            cell[key].append(entry[key])
            cell[f"{key}_ci"].append(entry_interval(entry, key) if key in INTERVAL_METRICS else None)
    if entry.get(FA) is None and entry.get(PENDING):
        cell[PENDING].append(entry[PENDING])


Key = tuple[str, Point, str, "float | None"]


def _point_order(points: list[Point]) -> Callable[[Point], tuple]:
    """Sort key of swept values, per key: numbers ascending, anything else in the order the run used."""
    seen: dict[str, list[Any]] = defaultdict(list)
    for point in points:
        for k, v in point:
            if v not in seen[k]:
                seen[k].append(v)

    def key(point: Point) -> tuple:
        return tuple(
            (k, (0, v) if isinstance(v, int | float) and not isinstance(v, bool) else (1, seen[k].index(v)))
            for k, v in point
        )

    return key


def _in_order(pairs: list[tuple[str, Point]]) -> list[tuple[str, Point]]:
    """(method, swept values) pairs: methods in the order the run used, each one's points ascending
    (so tables, legends and bars read 1e-4, 2e-4, 5e-4 whatever order the config listed)."""
    methods = list(dict.fromkeys(m for m, _ in pairs))
    order = _point_order([p for _, p in pairs])
    return sorted(dict.fromkeys(pairs), key=lambda mp: (methods.index(mp[0]), order(mp[1])))


def _groups(results: list[dict]) -> dict[Key, list[dict]]:
    """(method, swept values, stage, ratio) -> its entries (one per seed), rows in `_in_order`."""
    keys = swept_keys(results)
    groups: dict[Key, list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["method"], _point(r, keys), r["stage"], r["poison_ratio"])].append(r)
    rank = {pair: i for i, pair in enumerate(_in_order([(m, pt) for m, pt, _, _ in groups]))}
    return dict(sorted(groups.items(), key=lambda kv: rank[(kv[0][0], kv[0][1])]))


def aggregate(results: list[dict]) -> dict[Key, dict[str, list]]:
    """(method, swept values, stage, ratio) -> metric -> values over seeds."""
    table: dict[Key, dict[str, list]] = {}
    for key, entries in _groups(results).items():
        cell: dict[str, list] = defaultdict(list)
        for entry in entries:
            _add(cell, entry)
        table[key] = cell
    return table


class Shared(tuple):
    """Values of one swept setting under which a method trained the very same models (it resolves
    them alike: ``attack.mode: reference`` attacks Booster as ``single_lora`` does)."""

    def __str__(self) -> str:
        return " or ".join(format_value(v) for v in self)


def merge_shared_rows(results: list[dict]) -> list[dict]:
    """``results`` with the rows of a method that are the same models under several swept values
    (every stage, seed and ratio evaluated from the same files) listed once, their differing
    values joined as a :class:`Shared`; tables of models list each model once. Rows that share only
    some models (SFT's aligned model under two attack modes) stay apart."""
    keys = swept_keys(results)
    rows: dict[tuple[str, Point], list[dict]] = defaultdict(list)
    for r in results:
        rows[(r["method"], _point(r, keys))].append(r)
    same: dict[Any, list[tuple[str, Point]]] = defaultdict(list)
    for (method, point), entries in rows.items():
        models = frozenset((e["stage"], e["seed"], e["poison_ratio"], e.get("evaluation")) for e in entries)
        unknown = any(e.get("evaluation") is None for e in entries)
        same[(method, point) if unknown else (method, models)].append((method, point))
    kept: dict[tuple[str, Point], dict[str, Any]] = {}  # first row of each group -> its sweep
    for group in same.values():
        points = [dict(point) for _, point in group]
        sweep: dict[str, Any] = {}
        for k in points[0]:
            values = list(dict.fromkeys(p.get(k) for p in points))
            sweep[k] = values[0] if len(values) == 1 else Shared(values)
        kept[group[0]] = sweep
    return [{**r, "sweep": kept[row]} for r in results if (row := (r["method"], _point(r, keys))) in kept]


def _rows(results: list[dict]) -> list[tuple[str, Point]]:
    keys = swept_keys(results)
    return _in_order([(r["method"], _point(r, keys)) for r in results])


def _ratios(results: list[dict]) -> list[float]:
    return sorted({r["poison_ratio"] for r in results if r["stage"] == "attacked"})


def _any_broken(results: list[dict]) -> bool:
    return any(is_broken(r) for r in results)
