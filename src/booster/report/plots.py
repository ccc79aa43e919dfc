"""The report's plots (matplotlib, no display needed): HS and FA against the poison ratio (or as
bars before and after a single attack), HS against FA (harm against utility, with the tuned
attacker's worst case), the harmful-loss probe during the attack, and one plot per swept setting. A broken or pending value is never drawn as a number.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from booster.config import (
    format_value,
    short_names,
)
from booster.evaluation.statistics import mean_std
from booster.report.cells import (
    BROKEN,
    FA,
    HS,
    PENDING,
    Stat,
    _any_broken,
    _label,
    _ratios,
    _rows,
    aggregate,
    cell_stat,
    is_broken,
    safe_name,
    swept_keys,
)
from booster.report.tables import SweepGrid, _probe_curve, _probe_groups


def plot_probe(results: list[dict], path: Path) -> bool:
    """Mean held-out harmful loss against the attack's step, a panel per poison ratio on one y scale,
    one curve per method (a band: ± std over seeds) and one legend entry per method, so that a study
    of many stacks stays readable. Returns whether there was anything to plot."""
    groups = {k: [c for e in v if (c := _probe_curve(e))] for k, v in _probe_groups(results).items()}
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        return False
    plt = _pyplot()
    names = short_names(swept_keys(results))
    styles = _styles([_label(m, pt, names) for m, pt, _, _ in groups])
    ratios = sorted({k[3] for k in groups})
    fig, axes = plt.subplots(
        1, len(ratios), figsize=(4.2 * len(ratios) + 3.2, 4.2), dpi=120, layout="constrained",
        sharey=True, squeeze=False,
    )  # fmt: skip
    all_steps = sorted({step for curves in groups.values() for curve in curves for step, _ in curve})
    offsets = _offsets(all_steps, len(styles), log=False)  # one shift per method, shared by its ratios
    seeds: dict[str, set[int]] = defaultdict(set)  # per method, over its panels
    for (method, point, _, _), curves in groups.items():
        seeds[_label(method, point, names)].add(len(curves))
    notes = {
        label: "" if counts == {1} else f" ({_seed_range(counts)} seeds)" for label, counts in seeds.items()
    }
    for (method, point, _, ratio), curves in groups.items():
        ax = axes[0][ratios.index(ratio)]
        label = _label(method, point, names)
        shift = offsets[list(styles).index(label)]
        color, marker = styles[label]
        by_step: dict[float, list[float]] = defaultdict(list)
        for curve in curves:
            for step, loss in curve:
                by_step[step].append(loss)
        steps = sorted(by_step)
        stats = [mean_std(by_step[s]) for s in steps]
        means = [m for m, _ in stats]
        shifted = [step + shift for step in steps]
        ax.plot(shifted, means, color=color, marker=marker, markersize=4, label=f"{label}{notes[label]}")
        if len(curves) > 1:
            ax.fill_between(
                shifted, [m - s for m, s in stats], [m + s for m, s in stats], color=color, alpha=0.15
            )
    for i, (ax, ratio) in enumerate(zip(axes[0], ratios, strict=True)):
        ax.set_xlabel("attack step (0: before the attack)")
        ax.set_title(f"p={ratio:g}", fontsize=9)
        ax.grid(alpha=0.3)
        if not i:
            ax.set_ylabel("mean loss on held-out harmful pairs")
    fig.suptitle("harmful-loss probe during the attack (a defense limits the drop)", fontsize=10)
    _legend(fig, axes[0])
    _save(fig, path)
    return True


def _plot_file(variable: str) -> str:
    return f"sweep-{safe_name(variable.replace('.', '-'))}.png"


_COLORS = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    # a second ten, each far in hue or lightness from the first (a study compares 11+ stacks)
    "#000000",
    "#00008b",
    "#b8860b",
    "#ff00ff",
    "#556b2f",
    "#8b0000",
    "#00ced1",
    "#9acd32",
    "#4b0082",
    "#ff1493",
]


_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


def _styles(labels: list[str]) -> dict[str, tuple[str, str]]:
    """A colour and a marker per line: 20 colours, then the marker shifts, distinct for the first 200."""
    labels = list(dict.fromkeys(labels))
    return {
        label: (_COLORS[i % len(_COLORS)], _MARKERS[(i + i // len(_COLORS)) % len(_MARKERS)])
        for i, label in enumerate(labels)
    }


def _pyplot() -> Any:
    import matplotlib  # heavy: only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only plotting needs it

    return plt


def _offsets(xs: list[float], lines: int, log: bool) -> list[float]:
    """How far to shift each line sideways so that equal values do not hide each other: a small
    fraction of the axis, capped so that lines never cross into the next x position."""
    if lines <= 1 or not xs:
        return [0.0] * max(lines, 1)
    pos = [math.log10(x) for x in xs] if log else list(xs)
    span = (max(pos) - min(pos)) or 1.0
    gaps = [b - a for a, b in zip(sorted(pos), sorted(pos)[1:], strict=False) if b > a]
    step = min(0.012 * span, 0.5 * min(gaps, default=span) / lines)
    return [(i - (lines - 1) / 2) * step for i in range(lines)]


def _shift(x: float, offset: float, log: bool) -> float:
    return x * 10**offset if log else x + offset


def _seed_range(counts: set[int]) -> str:
    """Seed counts for a legend: "3", or "2-3" where a series' points pool different numbers."""
    return f"{min(counts)}" if len(counts) == 1 else f"{min(counts)}-{max(counts)}"


def interval_note(stats: list[Stat], single_mark: str = "hollow") -> str:
    """What a series' error bars are, for its legend entry: ± std over its seeds, the 95% interval of
    a bootstrap over seeds and prompts (``Stat.pooled``), one seed's 95% Wilson interval, or a mix
    (one-seed points then drawn ``single_mark``), so that a plot never leaves the reader to guess."""
    single = [s for s in stats if s.seeds == 1]
    parts = []
    for pooled, text in ((False, "± std over {} seeds"), (True, "95% CI over {} seeds and prompts")):
        multi = {s.seeds for s in stats if s.seeds > 1 and s.pooled == pooled}
        if multi:
            parts.append(text.format(_seed_range(multi)))
    if single:
        text = "95% Wilson, 1 seed" if any(s.interval for s in single) else "1 seed, no interval"
        parts.append(f"{single_mark}: {text}" if parts else text)
    return "; ".join(parts)


#: a cell's crossed levels (metric -> :class:`booster.report.statistics.Level`), set by a plot given them
_LEVELS = "levels"


def _with_levels(cell: dict[str, Any], key: tuple, levels: dict[str, dict[tuple, Any]]) -> dict[str, Any]:
    """``cell`` carrying its crossed levels of each metric in ``levels`` (metric -> key -> level)."""
    found = {metric: by_key[key] for metric, by_key in levels.items() if by_key.get(key) is not None}
    return {**cell, _LEVELS: found} if found else cell


def _drawn_stat(cell: dict[str, Any], metric: str) -> Stat | None:
    """What a plot draws for a cell: :func:`cell_stat`'s value, its ± std over several seeds replaced
    by the cell's crossed level (value and 95% interval over seeds and prompts, the stack table's)
    where the level pools every seed of the cell."""
    stat = cell_stat(cell, metric)
    level = cell.get(_LEVELS, {}).get(metric)
    if stat is None or stat.seeds < 2 or level is None or level.seeds != stat.seeds:
        return stat
    return Stat(level.value, level.lo, level.hi, level.text, stat.seeds, pooled=True)


def _point_stats(cell: dict[str, Any]) -> tuple[Stat | None, Stat | None]:
    """A cell's HS and FA for the frontier: both drawn from their crossed levels or neither, so that
    the two axes' bars always mean the same thing."""
    hs, fa = _drawn_stat(cell, HS), _drawn_stat(cell, FA)
    if hs is not None and fa is not None and (hs.pooled, hs.seeds) != (fa.pooled, fa.seeds):
        return cell_stat(cell, HS), cell_stat(cell, FA)
    return hs, fa


def _plot_line(
    ax: Any,
    xs: list,
    cells: list[dict[str, list]],
    metric: str,
    label: str,
    style: tuple[str, str],
    offset: float = 0.0,
    log: bool = False,
    linestyle: str = "-",
) -> list[Stat]:
    """One line of a metric at ``xs`` with error bars (over seeds, :func:`_drawn_stat`: filled
    markers; one model's Wilson interval: hollow), shifted sideways by ``offset``, its legend entry saying which
    bars it has; pending, missing or broken values get no point.

    Returns the values drawn.
    """
    points = [(x, s) for x, c in zip(xs, cells, strict=True) if (s := _drawn_stat(c, metric))]
    color, marker = style
    for x, cell in zip(xs, cells, strict=True):
        if cell.get(BROKEN) and _drawn_stat(cell, metric) is None:  # say why the point is missing
            x = _shift(x, offset, log)
            ax.update_datalim([(x, 0.0)])  # keep the note on the axis even when nothing else is drawn
            ax.autoscale_view()
            ax.text(x, 0.5, "broken", color=color, rotation=90, ha="center", fontsize=7, in_layout=False)
    if not points:
        return []
    stats = [s for _, s in points]
    shifted = [_shift(x, offset, log) for x, _ in points]
    single = [s.seeds == 1 for s in stats]
    ax.errorbar(
        shifted,
        [s.value for s in stats],
        yerr=[[s.value - s.lo for s in stats], [s.hi - s.value for s in stats]],
        color=color,
        marker=marker,
        markersize=6,
        markerfacecolor="white" if all(single) else color,
        capsize=3,
        linestyle=linestyle,
        label=f"{label} [{interval_note(stats)}]",
        clip_on=False,
    )
    if any(single) and not all(single):  # a mixed line: its one-seed points hollow
        ax.plot(
            [x for x, one in zip(shifted, single, strict=True) if one],
            [s.value for s, one in zip(stats, single, strict=True) if one],
            linestyle="none",
            marker=marker,
            markersize=6,
            color=color,
            markerfacecolor="white",
            clip_on=False,
            zorder=3,
        )
    return stats


#: tops the y axis of a percentage may take: the first round mark above the data.
_TOPS = (10.0, 20.0, 25.0, 40.0, 50.0, 60.0, 80.0, 100.0)


def axis_top(stats: list[Stat]) -> float:
    """The top of a percentage axis: the first round mark at or above the highest error bar (and 5%
    room for its cap), never under 10, so that HS of 3-16% fills the plot but a 2-point wobble does
    not; 100 when nothing is drawn."""
    if not stats:
        return 100.0
    highest = max(s.hi for s in stats) * 1.05
    return next((top for top in _TOPS if highest <= top), 100.0)


def _percent_axis(ax: Any, label: str, stats: list[Stat], grid: str = "both") -> None:
    """A percentage from 0 to the top the data needs, the scale said in the axis label."""
    top = axis_top(stats)
    ax.set_ylim(0, top)
    ax.set_ylabel(label if top >= 100 else f"{label}; axis 0-{top:g}, not 0-100")
    ax.grid(alpha=0.3, axis=grid)


def _draw_bars(
    ax: Any,
    series: list[tuple[str, list[float], list[dict[str, list]], dict[str, Any]]],
    metric: str,
    width: float,
) -> list[Stat]:
    """Bars of several series side by side, each with its error bars and no number over them (the
    tables give the numbers); a series that mixes seed counts hatches its one-seed bars, and its
    legend entry says which bars are which. A missing value says why where its bar would be."""
    drawn: list[Stat] = []
    for label, xs, cells, look in series:
        stats = [_drawn_stat(c, metric) for c in cells]
        present = [s for s in stats if s is not None]
        mixed = len({s.seeds == 1 for s in present}) > 1
        labelled = False
        for x, cell, stat in zip(xs, cells, stats, strict=True):
            if stat is None:
                ax.text(
                    x, 0.5, _bar_gap_text(cell, metric), rotation=90, ha="center", va="bottom", fontsize=7
                )
                continue
            note = interval_note(present, "hatched")
            ax.bar(x, stat.value, width, edgecolor="black", linewidth=0.5,
                   hatch="///" if mixed and stat.seeds == 1 else None,
                   label=None if labelled else f"{label} [{note}]", **look)  # fmt: skip
            labelled = True
            ax.errorbar(x, stat.value, yerr=[[stat.value - stat.lo], [stat.hi - stat.value]],
                        fmt="none", ecolor="black", capsize=3, linewidth=1)  # fmt: skip
        drawn += present
    return drawn


def plot_sweep(grid: SweepGrid, path: Path) -> None:
    """HS and FA (± std over seeds, or Wilson intervals) against the swept setting: one line per
    row over a numeric setting, grouped bars per value of a categorical one (``attack.mode``), where
    a line between categories would suggest an order that is not there."""
    plt = _pyplot()
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in grid.values)
    xs = list(grid.values) if numeric else list(range(len(grid.values)))
    # a log axis once the values span a factor of 5 (learning rates, λ), ticks at the values
    log = numeric and all(v > 0 for v in xs) and max(xs) / min(xs) >= 5
    styles = _styles(list(grid.rows))
    offsets = _offsets([float(x) for x in xs], len(grid.rows), log)
    width = min(0.8 / max(len(grid.rows), 1), 0.38)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), dpi=120, layout="constrained")
    for ax, (metric, label) in zip(
        axes, ((HS, "harmful score (%)"), (FA, "fine-tune accuracy (%)")), strict=True
    ):
        drawn: list[Stat] = []
        if numeric:
            for i, (row, cells) in enumerate(grid.rows.items()):
                # dashed: a method that does not read the setting
                dashed = "--" if _constant(grid, row) else "-"
                drawn += _plot_line(ax, xs, cells, metric, row, styles[row], offsets[i], log, dashed)
        else:
            series = [
                (row, [x + (i - (len(grid.rows) - 1) / 2) * width for x in xs], cells,
                 {"color": styles[row][0], "linestyle": "--" if _constant(grid, row) else "-"})
                for i, (row, cells) in enumerate(grid.rows.items())
            ]  # fmt: skip
            drawn = _draw_bars(ax, series, metric, width)
            ax.set_xlim(-0.5, len(xs) - 0.5)
        if not drawn:
            pending = any(c.get(PENDING) for cells in grid.rows.values() for c in cells)
            broken = any(c.get(BROKEN) for cells in grid.rows.values() for c in cells)
            text = "FA pending" if pending else "all broken" if broken else "not measured"
            ax.text(0.5, 0.5, text, ha="center", transform=ax.transAxes)
        if log:
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(xs, [format_value(v) for v in grid.values], rotation=0)
        ax.set_xlabel(grid.variable)
        _percent_axis(ax, label, drawn, "both" if numeric else "y")
    _legend(fig, axes)
    ratios = ", ".join(f"{p:g}" for p in grid.ratios)
    fig.suptitle(f"after the attack (p = {ratios}) against {grid.variable}")
    _save(fig, path)


def _constant(grid: SweepGrid, row: str) -> bool:
    """Whether a row is a method that does not read the swept setting."""
    return any(row == m or row.startswith(f"{m} (") for m in grid.constant)


def _legend(fig: Any, axes: Any, loc: str = "outside right center") -> None:
    """One legend for the figure, outside the axes (on the right), so that it never hides a line."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc=loc, fontsize=7)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt  # heavy: only plotting needs it

    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _bar_gap_text(cell: dict[str, list], metric: str) -> str:
    if cell.get(BROKEN):
        return "broken"
    return "pending" if metric == FA and cell.get(PENDING) else "n/a"


def _plot_bars(
    ax: Any, results: list[dict], metric: str, ratio: float | None, levels: dict[str, dict[tuple, Any]]
) -> list[Stat]:
    """Grouped bars: per method, before the attack and after it, with their error bars."""
    table = aggregate(results)
    names = short_names(swept_keys(results))
    rows = _rows(results)
    width = 0.38
    stages = [("aligned", None, "before the attack (aligned)", _BEFORE)]
    if ratio is not None:
        stages.append(("attacked", ratio, f"after the attack (p={ratio:g})", _AFTER))
    series = []
    for j, (stage, p, legend, color) in enumerate(stages):
        shift = (j - (len(stages) - 1) / 2) * width
        keys = [(method, point, stage, p) for method, point in rows]
        cells = [_with_levels(table.get(key, {}), key, levels) for key in keys]
        series.append((legend, [i + shift for i in range(len(rows))], cells, {"color": color}))
    drawn = _draw_bars(ax, series, metric, width)
    labels = [_label(m, pt, names) for m, pt in rows]
    ax.set_xticks(range(len(rows)), labels, rotation=20 if max(map(len, labels)) > 8 else 0, ha="right")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    return drawn


def plot_against_ratio(
    results: list[dict],
    metric: str,
    label: str,
    path: Path,
    levels: dict[str, dict[tuple, Any]] | None = None,
) -> None:
    """One poison ratio: grouped bars per method, before and after the attack. Several: a line per
    method over p. Error bars: the 95% interval over seeds and prompts where ``levels`` (metric ->
    :func:`booster.report.statistics.crossed_levels`) pools a cell's seeds, else ± std over seeds,
    or one model's 95% Wilson interval, each series' legend entry saying which; the y axis as high
    as the data needs."""
    levels = levels or {}
    plt = _pyplot()
    ratios = _ratios(results)
    rows = _rows(results)
    if len(ratios) <= 1:
        fig, ax = plt.subplots(figsize=(max(5.5, 0.9 * len(rows) + 2.5), 4.2), dpi=120, layout="constrained")
        drawn = _plot_bars(ax, results, metric, ratios[0] if ratios else None, levels)
        where = f"p={ratios[0]:g}" if ratios else "no attack"
        title = f"{label}, before and after the attack ({where})"
    else:
        table = aggregate(results)
        names = short_names(swept_keys(results))
        labels = [_label(m, pt, names) for m, pt in rows]
        styles = _styles(labels)
        offsets = _offsets(ratios, len(rows), log=False)
        fig, ax = plt.subplots(figsize=(8, 4.2), dpi=120, layout="constrained")
        drawn = []
        for i, ((method, point), text) in enumerate(zip(rows, labels, strict=True)):
            keys = [(method, point, "attacked", p) for p in ratios]
            cells = [_with_levels(table.get(key, {}), key, levels) for key in keys]
            drawn += _plot_line(ax, ratios, cells, metric, text, styles[text], offsets[i])
        ax.set_xticks(ratios, [f"{p:g}" for p in ratios])
        ax.set_xlabel("poison ratio p (harmful fraction of the fine-tuning data)")
        title = f"{label} after the attack"
    if not drawn:
        pending = metric == FA and any(r.get(PENDING) for r in results)
        text = "pending" if pending else "all broken" if _any_broken(results) else "not measured"
        ax.text(0.5, 0.5, text, ha="center", transform=ax.transAxes)
    _percent_axis(ax, label, drawn, "y" if len(ratios) <= 1 else "both")
    ax.set_title(title, fontsize=9)
    if drawn:  # outside the axes: the bars reach the top of an axis scaled to them
        _legend(fig, [ax], "outside lower center" if len(ratios) <= 1 else "outside right center")
    _save(fig, path)


#: bar colours: before the attack (aligned) light, after it strong.
_BEFORE, _AFTER = "#9ecae1", "#e6550d"


def _test_stat(test: dict[str, Any] | None, metric: str) -> Stat | None:
    """One model's HS or FA from a search's test evaluation, with its 95% interval (None when the
    model is broken or the value missing)."""
    if not test or is_broken(test):
        return None
    return cell_stat({metric: [test.get(metric)], f"{metric}_ci": [test.get(f"{metric}_ci")]}, metric)


def _errorbar_2d(ax: Any, fa: Stat, hs: Stat, color: str, marker: str, label: str, size: float = 6) -> None:
    ax.errorbar(
        fa.value, hs.value,
        xerr=[[fa.value - fa.lo], [fa.hi - fa.value]], yerr=[[hs.value - hs.lo], [hs.hi - hs.value]],
        color=color, marker=marker, markersize=size, markerfacecolor="white" if hs.seeds == 1 else color,
        capsize=3, linestyle="none", label=label, clip_on=False, zorder=3,
    )  # fmt: skip


def plot_frontier(
    results: list[dict],
    searches: list[dict[str, Any]],
    path: Path,
    levels: dict[str, dict[tuple, Any]] | None = None,
) -> bool:
    """Harm against utility after the attack: HS over FA, one point per method (and swept values)
    with its error bars both ways, a panel per poison ratio; where ``booster search`` tuned the
    attack, its worst case is a star of the method's colour, an arrow leading to it from the fixed
    attack's point on the same seed (a small ring). ``levels`` (HS and FA -> :func:`booster.report.statistics.crossed_levels`) turns
    a several-seed bar into the stack table's 95% interval over seeds and prompts; without it, or
    for a cell it lacks, the bar is ± std. Returns whether anything was drawn (nothing is written
    otherwise)."""
    levels = levels or {}
    table = aggregate(results)
    names = short_names(swept_keys(results))
    rows = _rows(results)
    styles = _styles([_label(m, pt, names) for m, pt in rows] + [str(s.get("method")) for s in searches])
    panels = []
    for ratio in _ratios(results):
        points = []
        for method, point in rows:
            key = (method, point, "attacked", ratio)
            hs, fa = _point_stats(_with_levels(table.get(key, {}), key, levels))
            if hs is not None and fa is not None:
                points.append((_label(method, point, names), fa, hs))
        tuned = []
        for search in searches:
            best = search.get("best") or {}
            worst = (_test_stat(best.get("test"), FA), _test_stat(best.get("test"), HS))
            if search.get("poison_ratio") == ratio and None not in worst:
                fixed = search["fixed"]["test"]
                tuned.append((search, *worst, _test_stat(fixed, FA), _test_stat(fixed, HS)))
        if points or tuned:
            panels.append((ratio, points, tuned))
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.6 * len(panels) + 3.2, 4.4), dpi=120, layout="constrained", squeeze=False
    )
    # one legend entry per method: its note covers its points in every panel (seed counts may differ)
    stats: dict[str, list[Stat]] = {}
    for _, points, _ in panels:
        for label, fa, hs in points:
            stats.setdefault(label, []).extend([hs, fa])
    every_hs = [hs for _, points, tuned in panels for hs in [p[2] for p in points] + [t[2] for t in tuned]]
    every_fa = [fa for _, points, tuned in panels for fa in [p[1] for p in points] + [t[1] for t in tuned]]
    for i, (ax, (ratio, points, tuned)) in enumerate(zip(axes[0], panels, strict=True)):
        for label, fa, hs in points:
            color, marker = styles[label]
            _errorbar_2d(ax, fa, hs, color, marker, f"{label} [{interval_note(stats[label])}]")
        for search, fa, hs, fixed_fa, fixed_hs in tuned:
            color, _ = styles[str(search["method"])]
            best = search["best"]
            label = (
                f"{search['method']} seed {search['seed']}: tuned attack, worst of {search['search']['trials']} "
                f"trials (lr {best['learning_rate']:.2g}, {best['epochs']} epochs) [95% Wilson]"
            )
            _errorbar_2d(ax, fa, hs, color, "*", label, size=12)
            if fixed_fa is not None and fixed_hs is not None:
                # the arrow starts at the searched seed's own fixed attack (a small ring), which sits
                # apart from the method's point where that point pools several seeds
                ax.plot(fixed_fa.value, fixed_hs.value, marker="o", markersize=4, color=color,
                        markerfacecolor="white", linestyle="none", zorder=3, clip_on=False)  # fmt: skip
                ax.annotate(
                    "", xy=(fa.value, hs.value), xytext=(fixed_fa.value, fixed_hs.value),
                    arrowprops={"arrowstyle": "-|>", "color": color, "alpha": 0.8, "linewidth": 1.2,
                                "shrinkA": 5, "shrinkB": 9},
                )  # fmt: skip
        # the same scale in every panel, so that the ratios compare at a glance
        _percent_axis(ax, "harmful score after the attack (%)", every_hs)
        if i:
            ax.set_ylabel("")
        ax.set_xlim(0, axis_top(every_fa))
        ax.set_xlabel("fine-tune accuracy after the attack (%)")
        ax.set_title(f"p={ratio:g}: lower right is better", fontsize=9)
    _legend(fig, axes[0])
    fig.suptitle("harm against utility after the user's fine-tuning", fontsize=10)
    _save(fig, path)
    return True
