"""The report's Markdown tables: HS / FA by method and poison ratio, the paired comparisons, the
harmful-loss probe, one table per swept setting in the paper's layout, and every evaluated model.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import defaultdict
from typing import Any

from booster import markdown
from booster.config import (
    format_point,
    format_value,
    short_names,
)
from booster.evaluation.statistics import mean_std
from booster.report.cells import (
    BASELINE,
    BROKEN,
    FA,
    HS,
    HS_PLUS,
    PENDING,
    REFUSAL,
    Key,
    _add,
    _groups,
    _is_number,
    _label,
    _numbers,
    _point,
    _point_order,
    _ratios,
    _rows,
    aggregate,
    cell_stat,
    entry_interval,
    is_broken,
    swept_keys,
)
from booster.searches import test_hs_text


def _metric_text(cell: dict[str, list], metric: str) -> str:
    stat = cell_stat(cell, metric)
    if stat is not None:
        return stat.text
    return "pending" if metric == FA and cell.get(PENDING) else "n/a"


def _pair_text(cell: dict[str, list]) -> str:
    """``HS / FA`` of a cell; **broken** when every model in it is, ``(+k broken)`` when some are."""
    broken = len(cell.get(BROKEN, []))
    if broken and not _numbers(cell.get(HS, [])):
        return "**broken**"
    text = f"{_metric_text(cell, HS)} / {_metric_text(cell, FA)}"
    return text + (f" (+{broken} **broken**)" if broken else "")


def _average(cells: list[dict[str, list]]) -> str:
    """Mean over columns of the column means (no ±: the columns are different settings, not
    repeats); a column without a measured FA is left out of the FA average, a broken model of both."""
    hs = _numbers([s.value for c in cells if (s := cell_stat(c, HS))])
    fa = _numbers([s.value for c in cells if (s := cell_stat(c, FA))])
    broken = any(c.get(BROKEN) for c in cells)
    if not hs and broken:
        return "**broken**"
    hs_text = f"{statistics.fmean(hs):.1f}" if hs else "n/a"
    if fa:
        fa_text = f"{statistics.fmean(fa):.1f}"
    else:
        fa_text = "pending" if any(c.get(PENDING) for c in cells) else "n/a"
    return f"{hs_text} / {fa_text}"


def results_table(results: list[dict]) -> str:
    """Methods (and swept values) as rows; before the attack, then one HS / FA column per poison
    ratio (mean ± std over seeds, or one model's value and Wilson interval), then their average."""
    names = short_names(swept_keys(results))
    ratios = _ratios(results)
    table = aggregate(results)
    header = ["method", "aligned HS / FA"] + [f"p={p:g} HS / FA" for p in ratios] + ["p avg HS / FA"]
    lines = markdown.head(header)
    for method, point in _rows(results):
        row = [_label(method, point, names)]
        for stage, ratio in [("aligned", None)] + [("attacked", p) for p in ratios]:
            row.append(_pair_text(table.get((method, point, stage, ratio), {})))
        attacked = [table.get((method, point, "attacked", p), {}) for p in ratios]
        row.append(_average(attacked) if ratios else "n/a")
        lines.append(markdown.row(row))
    return "\n".join(lines)


def comparison_table(
    results: list[dict], comparisons: dict[Key, Any], baseline: str = BASELINE, metric: str = "ΔHS"
) -> str:
    names = short_names(swept_keys(results))
    ratios = _ratios(results)
    columns = [("aligned", None)] + [("attacked", p) for p in ratios]
    header = ["method", f"aligned {metric} [95% CI]"] + [f"p={p:g} {metric} [95% CI]" for p in ratios]
    lines = markdown.head(header)
    for method, point in _rows(results):
        if method == baseline:
            continue
        row = [_label(method, point, names)]
        for stage, ratio in columns:
            found = comparisons.get((method, point, stage, ratio))
            row.append("**broken**" if found == BROKEN else found.text if found else "n/a")
        lines.append(markdown.row(row))
    return "\n".join(lines)


def _seed_cells(found: Any) -> list[str]:
    """Per-seed differences and the seeds-and-prompts interval of one comparison (or n/a)."""
    if found == BROKEN:
        return ["**broken**", "**broken**"]
    if not found or found.crossed is None:
        return ["n/a", "n/a"]
    return [", ".join(f"{d:+.1f}" for d in found.per_seed), found.crossed_text]


def across_seeds_table(
    results: list[dict], comparisons: dict[Key, Any], costs: dict[Key, Any], baseline: str = BASELINE
) -> str:
    """Each comparison pooled over two seeds or more, seed by seed and with the interval that
    resamples seeds as well as prompts; empty when no comparison has two seeds."""
    names = short_names(swept_keys(results))
    columns = [("aligned", None)] + [("attacked", p) for p in _ratios(results)]
    header = ["method", "stage", "ΔHS per seed", "ΔHS [95% CI, seeds x prompts]", "ΔFA per seed",
              "ΔFA [95% CI, seeds x prompts]"]  # fmt: skip
    lines = markdown.head(header)
    for method, point in _rows(results):
        if method == baseline:
            continue
        for stage, ratio in columns:
            key = (method, point, stage, ratio)
            hs, fa = comparisons.get(key), costs.get(key)
            if not any(getattr(c, "crossed", None) for c in (hs, fa)):
                continue
            where = "aligned" if stage == "aligned" else f"p={ratio:g}"
            lines.append(
                markdown.row([_label(method, point, names), where, *_seed_cells(hs), *_seed_cells(fa)])
            )
    return "\n".join(lines) if len(lines) > 2 else ""


def _seeds_text(level: Any) -> str:
    return str(level.seeds) if level.seeds == level.of else f"{level.seeds} of {level.of}"


def _worst_text(searches: list[dict[str, Any]], method: str, ratio: float | None) -> str:
    """The tuned attacker's worst case on the test prompts against ``method`` at ``ratio`` (its seed
    named), ``-`` when no search attacked that cell."""
    found = [
        f"{test_hs_text(s['best']['test']) if s.get('best') else 'every trial broken'} (seed {s['seed']})"
        for s in searches
        if s.get("method") == method and s.get("poison_ratio") == ratio
    ]
    return "; ".join(found) or "-"


def stack_table(
    results: list[dict],
    levels: dict[str, dict[Key, Any]],
    comparisons: dict[Key, Any],
    costs: dict[Key, Any],
    searches: list[dict[str, Any]],
    baseline: str = BASELINE,
) -> str:
    """One row per method and poison ratio after the user's fine-tuning: HS, refusals and FA pooled
    over the seeds with their seeds-and-prompts intervals (``levels``: "harmful", "refusal",
    "correct" -> :func:`booster.report.statistics.crossed_levels`), the differences to ``baseline``
    the same way, the probe, and (when ``booster search`` ran) the tuned attacker's worst case."""
    names = short_names(swept_keys(results))
    groups = _groups(results)
    header = ["method", "p", "seeds", "HS [95% CI]", "refusals [95% CI]", "FA [95% CI]",
              f"ΔHS vs {baseline}", f"ΔFA vs {baseline}", "probe start → end (drop)"]  # fmt: skip
    if searches:
        header.append("tuned attacker: worst HS")
    lines = markdown.head(header)
    for method, point in _rows(results):
        for ratio in _ratios(results):
            key = (method, point, "attacked", ratio)
            hs = levels.get("harmful", {}).get(key)
            if hs is None:
                continue
            cells = [_label(method, point, names), f"{ratio:g}", _seeds_text(hs), hs.text]
            for kind in ("refusal", "correct"):
                level = levels.get(kind, {}).get(key)
                cells.append(level.text if level else "n/a")
            for found in (comparisons.get(key), costs.get(key)):
                if method == baseline:
                    cells.append("-")
                elif found == BROKEN:
                    cells.append("**broken**")
                else:
                    cells.append((found.crossed_text or found.text) if found else "n/a")
            cells.append(_probe_text(groups.get(key, [])))
            if searches:
                cells.append(_worst_text(searches, method, ratio))
            lines.append(markdown.row(cells))
    return "\n".join(lines) if len(lines) > 2 else ""


PROBE_KEYS = ("probe_loss_start", "probe_loss_end", "probe_loss_drop")


def _probe_curve(entry: dict) -> list[tuple[float, float]]:
    """The entry's ``probe_curve`` as (step, loss) pairs; malformed points are left out."""
    curve = entry.get("probe_curve")
    if not isinstance(curve, list):
        return []
    points = []
    for point in curve:
        if isinstance(point, list | tuple) and len(point) == 2 and all(_is_number(v) for v in point):
            points.append((float(point[0]), float(point[1])))
    return points


def _probe_groups(results: list[dict]) -> dict[Key, list[dict]]:
    """Attacked models that logged the harmful-loss probe (broken models are left out). A repaired
    model's probe is its attack's, logged before the repair: it is shown once, under the method
    that ran the same attack, and under the repaired method only where that one is absent."""
    unrepaired = {_attack_key(e) for e in results if e.get("stage") == "attacked" and not e.get("repair")}
    groups: dict[Key, list[dict]] = {}
    for key, entries in _groups(results).items():
        found = [
            e
            for e in entries
            if e["stage"] == "attacked"
            and not is_broken(e)
            and (_probe_curve(e) or any(_is_number(e.get(k)) for k in PROBE_KEYS))
            and not (e.get("repair") and _attack_key(e) in unrepaired)
        ]
        if found:
            groups[key] = found
    return groups


def _attack_key(entry: dict) -> tuple:
    """What identifies one attack's probe: the seed, the ratio and the logged values."""
    return (
        entry.get("seed"),
        entry.get("poison_ratio"),
        tuple(_probe_curve(entry)),
        tuple(entry.get(k) for k in PROBE_KEYS),
    )


def _probe_text(entries: list[dict]) -> str:
    def value(key: str) -> str:
        values = _numbers([e.get(key) for e in entries])
        if not values:
            return "n/a"
        mean, std = mean_std(values)
        return f"{mean:.3f}" + (f"±{std:.3f}" if len(values) > 1 else "")

    return f"{value('probe_loss_start')} → {value('probe_loss_end')} ({value('probe_loss_drop')})"


def probe_table(results: list[dict]) -> str:
    names = short_names(swept_keys(results))
    lines = ["| method | p | probe loss start → end (drop) |", "|---|---|---|"]
    for (method, point, _, ratio), entries in _probe_groups(results).items():
        lines.append(f"| {_label(method, point, names)} | {ratio:g} | {_probe_text(entries)} |")
    return "\n".join(lines)


#: an aligned model's probe, before any attack (stages/probe.py).
ALIGNED_PROBE_KEYS = ("probe_loss", "probe_grad_norm")


def _mean_text(entries: list[dict], key: str, digits: str = ".3f") -> str:
    values = _numbers([e.get(key) for e in entries])
    if not values:
        return "n/a"
    mean, std = mean_std(values)
    return f"{mean:{digits}}" + (f"±{std:{digits}}" if len(values) > 1 else "")


def aligned_probe_table(results: list[dict]) -> str | None:
    """Each aligned model's HS beside its probe (loss and gradient norm before any attack); None
    when no aligned entry has the probe."""
    table = aggregate(results)
    names = short_names(swept_keys(results))
    lines = [
        "| method | aligned HS | probe loss | probe grad norm |",
        "|---|---|---|---|",
    ]
    for (method, point, stage, ratio), entries in _groups(results).items():
        if stage != "aligned" or not any(_is_number(e.get("probe_loss")) for e in entries):
            continue
        hs = _metric_text(table.get((method, point, stage, ratio), {}), HS)
        loss, norm = _mean_text(entries, "probe_loss"), _mean_text(entries, "probe_grad_norm", ".3g")
        lines.append(f"| {_label(method, point, names)} | {hs} | {loss} | {norm} |")
    return "\n".join(lines) if len(lines) > 2 else None


@dataclasses.dataclass
class SweepGrid:
    """HS / FA after the attack for one swept setting: rows by columns (the setting's values)."""

    variable: str
    values: list[Any]
    #: row label -> one cell (metric -> values over seeds) per column.
    rows: dict[str, list[dict[str, list]]]
    #: methods that do not read the setting: their rows repeat one model in every column.
    constant: list[str]
    ratios: list[float]


def _ordered(values: list[Any]) -> list[Any]:
    """Numbers ascending (the paper's layout); anything else in the order the run used."""
    distinct = list(dict.fromkeys(values))
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in distinct):
        return sorted(distinct)
    return distinct


def sweep_grid(results: list[dict], variable: str) -> SweepGrid:
    """Rows are methods; a row splits by poison ratio and by the other swept settings only where
    those take several values, so no cell averages over anything but seeds."""
    keys = swept_keys(results)
    names = short_names(keys)
    attacked = [r for r in results if r["stage"] == "attacked"]
    ratios = _ratios(results)
    values = _ordered([r["sweep"][variable] for r in attacked if variable in (r.get("sweep") or {})])
    several = [
        k for k in keys if len(_ordered([r["sweep"][k] for r in attacked if k in (r.get("sweep") or {})])) > 1
    ]
    rows: dict[str, list[dict[str, list]]] = {}
    constant: list[str] = []
    methods = list(dict.fromkeys(r["method"] for r in attacked))
    order = _point_order([_point(r, several, skip=variable) for r in attacked])
    attacked.sort(
        key=lambda r: (
            methods.index(r["method"]),
            order(_point(r, several, skip=variable)),
            r["poison_ratio"],
        )
    )
    for r in attacked:
        point = _point(r, several, skip=variable)
        if len(ratios) > 1:
            point += (("p", r["poison_ratio"]),)
        label = _label(r["method"], point, names)
        cells = rows.setdefault(label, [defaultdict(list) for _ in values])
        sweep = r.get("sweep") or {}
        if variable in sweep:
            _add(cells[values.index(sweep[variable])], r)
        else:  # the method does not read the setting: its one model stands in every column
            if r["method"] not in constant:
                constant.append(r["method"])
            for cell in cells:
                _add(cell, r)
    return SweepGrid(variable, values, rows, constant, ratios)


def sweep_table(grid: SweepGrid) -> str:
    name = grid.variable.split(".", 1)[-1]
    header = ["method"] + [f"{name}={format_value(v)}" for v in grid.values] + ["average"]
    lines = markdown.head(header)
    for label, cells in grid.rows.items():
        row = [label] + [_pair_text(c) for c in cells] + [_average(cells)]
        lines.append(markdown.row(row))
    return "\n".join(lines)


def _detail_cell(entry: dict, key: str) -> str:
    value = entry.get(key)
    if key in (HS, FA) and is_broken(entry):
        return "**broken**"
    if key == FA and value is None and entry.get(PENDING):
        return "pending"
    if value is None:
        return "-"
    if key in (HS, HS_PLUS, REFUSAL) and _is_number(value):
        ci = entry_interval(entry, key)
        return f"{value:.2f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def detail_table(results: list[dict]) -> str:
    """Every evaluated model: HS, HS+, refusal rate (with their Wilson intervals), FA and cost."""
    keys = [
        ("method", "method"),
        ("stage", "stage"),
        ("seed", "seed"),
        ("poison_ratio", "p"),
        (HS, "HS [95% CI]"),
        (HS_PLUS, "HS+ [95% CI]"),
        (REFUSAL, "refusal % [95% CI]"),
        ("degenerate_rate", "degenerate %"),
        (FA, "FA"),
        ("train_steps", "steps"),
        ("train_seconds_per_step", "s/step"),
        ("eval_seconds", "eval s"),
    ]
    swept = swept_keys(results)
    if swept:
        keys.insert(4, ("sweep", "swept"))
    names = short_names(swept)
    lines = markdown.head([k[1] for k in keys])
    for r in results:
        cells = []
        for key, _ in keys:
            v = r.get(key)
            cells.append((format_point(v, names) if v else "-") if key == "sweep" else _detail_cell(r, key))
        lines.append(markdown.row(cells))
    return "\n".join(lines)
