"""The report's plots (matplotlib, no display needed): HS and FA against the poison ratio (or as
bars before and after a single attack), the harmful-loss probe during the attack, and one plot per
swept setting. A broken or pending value is never drawn as a number.
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
    _any_broken,
    _label,
    _ratios,
    _rows,
    aggregate,
    cell_stat,
    safe_name,
    swept_keys,
)
from booster.report.tables import SweepGrid, _probe_curve, _probe_groups


def plot_probe(results: list[dict], path: Path) -> bool:
    """Mean held-out harmful loss against the attack's step, one curve per method and p (a band:
    ± std over seeds). Returns whether there was anything to plot."""
    groups = {k: [c for e in v if (c := _probe_curve(e))] for k, v in _probe_groups(results).items()}
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        return False
    plt = _pyplot()
    names = short_names(swept_keys(results))
    styles = _styles([_label(m, pt, names) for m, pt, _, _ in groups])
    ratios = sorted({k[3] for k in groups})
    dashes = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(8.5, 4.2), dpi=120, layout="constrained")
    all_steps = sorted({step for curves in groups.values() for curve in curves for step, _ in curve})
    offsets = _offsets(all_steps, len(styles), log=False)  # one shift per method, shared by its ratios
    for (method, point, _, ratio), curves in groups.items():
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
        ax.plot(
            shifted,
            means,
            color=color,
            marker=marker,
            markersize=4,
            linestyle=dashes[ratios.index(ratio) % len(dashes)],
            label=f"{label} p={ratio:g}" + (f" ({len(curves)} seeds)" if len(curves) > 1 else ""),
        )
        if len(curves) > 1:
            ax.fill_between(
                shifted, [m - s for m, s in stats], [m + s for m, s in stats], color=color, alpha=0.15
            )
    ax.set_xlabel("attack step (0: before the attack)")
    ax.set_ylabel("mean loss on held-out harmful pairs")
    ax.set_title("harmful-loss probe during the attack\n(a defense limits the drop)", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(fig, [ax])
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
]


_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


def _styles(labels: list[str]) -> dict[str, tuple[str, str]]:
    """A colour and a marker per line, distinct for the first 100 (marker shifts every 10 colours)."""
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
) -> bool:
    """One line of a metric at ``xs`` with error bars (± std over seeds, or one model's Wilson
    interval), shifted sideways by ``offset``; pending, missing or broken values get no point.

    Returns whether anything was drawn.
    """
    points = [(x, s) for x, c in zip(xs, cells, strict=True) if (s := cell_stat(c, metric))]
    color, marker = style
    for x, cell in zip(xs, cells, strict=True):
        if cell.get(BROKEN) and cell_stat(cell, metric) is None:  # say why the point is missing
            x = _shift(x, offset, log)
            ax.update_datalim([(x, 0.0)])  # keep the note on the axis even when nothing else is drawn
            ax.autoscale_view()
            ax.text(x, 2, "broken", color=color, rotation=90, ha="center", fontsize=7, in_layout=False)
    if not points:
        return False
    ax.errorbar(
        [_shift(x, offset, log) for x, _ in points],
        [s.value for _, s in points],
        yerr=[[s.value - s.lo for _, s in points], [s.hi - s.value for _, s in points]],
        color=color,
        marker=marker,
        markersize=6,
        capsize=3,
        linestyle=linestyle,
        label=label,
        clip_on=False,
    )
    return True


def _percent_axis(ax: Any, label: str, grid: str = "both") -> None:
    """Percentages always on 0-100: a 2.5-point difference must look like one, not fill the plot."""
    ax.set_ylim(0, 100)
    ax.set_ylabel(label)
    ax.grid(alpha=0.3, axis=grid)


def plot_sweep(grid: SweepGrid, path: Path) -> None:
    """HS and FA (± std over seeds, or Wilson intervals) against the swept setting, one line per row."""
    plt = _pyplot()
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in grid.values)
    xs = list(grid.values) if numeric else list(range(len(grid.values)))
    # a log axis once the values span a factor of 5 (learning rates, λ), ticks at the values
    log = numeric and all(v > 0 for v in xs) and max(xs) / min(xs) >= 5
    styles = _styles(list(grid.rows))
    offsets = _offsets([float(x) for x in xs], len(grid.rows), log)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), dpi=120, layout="constrained")
    for ax, (metric, label) in zip(
        axes, ((HS, "harmful score (%)"), (FA, "fine-tune accuracy (%)")), strict=True
    ):
        drawn = False
        for i, (row, cells) in enumerate(grid.rows.items()):
            constant = any(row == m or row.startswith(f"{m} (") for m in grid.constant)
            # dashed: a method that does not read the setting
            drawn |= _plot_line(
                ax, xs, cells, metric, row, styles[row], offsets[i], log, "--" if constant else "-"
            )
        if not drawn:
            pending = any(c.get(PENDING) for cells in grid.rows.values() for c in cells)
            broken = any(c.get(BROKEN) for cells in grid.rows.values() for c in cells)
            text = "FA pending" if pending else "all broken" if broken else "not measured"
            ax.text(0.5, 0.5, text, ha="center", transform=ax.transAxes)
        if log:
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(xs, [format_value(v) for v in grid.values], rotation=0 if numeric else 20)
        ax.set_xlabel(grid.variable)
        _percent_axis(ax, label)
    _legend(fig, axes)
    ratios = ", ".join(f"{p:g}" for p in grid.ratios)
    fig.suptitle(f"after the attack (p = {ratios}) against {grid.variable}; error bars: ± std or 95% CI")
    _save(fig, path)


def _legend(fig: Any, axes: Any) -> None:
    """One legend for the figure, outside the axes on the right, so that it never hides a line."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside right center", fontsize=7)


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


def _plot_bars(ax: Any, results: list[dict], metric: str, ratio: float | None) -> bool:
    """Grouped bars: per method, before the attack and after it, with their error bars and values."""
    table = aggregate(results)
    names = short_names(swept_keys(results))
    rows = _rows(results)
    width = 0.38
    stages = [("aligned", None, "before the attack (aligned)", _BEFORE)]
    if ratio is not None:
        stages.append(("attacked", ratio, f"after the attack (p={ratio:g})", _AFTER))
    drawn = False
    for j, (stage, p, legend, color) in enumerate(stages):
        shift = (j - (len(stages) - 1) / 2) * width
        labelled = False
        for i, (method, point) in enumerate(rows):
            cell = table.get((method, point, stage, p), {})
            stat, x = cell_stat(cell, metric), i + shift
            if stat is None:
                ax.text(x, 2, _bar_gap_text(cell, metric), rotation=90, ha="center", va="bottom", fontsize=8)
                continue
            ax.bar(x, stat.value, width, color=color, edgecolor="black", linewidth=0.5,
                   label=None if labelled else legend)  # fmt: skip
            labelled = drawn = True
            ax.errorbar(x, stat.value, yerr=[[stat.value - stat.lo], [stat.hi - stat.value]],
                        fmt="none", ecolor="black", capsize=3, linewidth=1)  # fmt: skip
            y = stat.hi + 1.5 if stat.hi < 90 else max(stat.value - 8, 1)
            ax.text(x, y, f"{stat.value:.1f}", ha="center", va="bottom", fontsize=7)
    labels = [_label(m, pt, names) for m, pt in rows]
    ax.set_xticks(range(len(rows)), labels, rotation=20 if max(map(len, labels)) > 8 else 0, ha="right")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    return drawn


def plot_against_ratio(results: list[dict], metric: str, label: str, path: Path) -> None:
    """One poison ratio: grouped bars per method, before and after the attack. Several: a line per
    method over p. Error bars: ± std over seeds, or one model's 95% Wilson interval."""
    plt = _pyplot()
    ratios = _ratios(results)
    rows = _rows(results)
    if len(ratios) <= 1:
        fig, ax = plt.subplots(figsize=(max(5.5, 0.9 * len(rows) + 2.5), 4.2), dpi=120, layout="constrained")
        drawn = _plot_bars(ax, results, metric, ratios[0] if ratios else None)
        where = f"p={ratios[0]:g}" if ratios else "no attack"
        title = f"{label}, before and after the attack ({where})"
    else:
        table = aggregate(results)
        names = short_names(swept_keys(results))
        labels = [_label(m, pt, names) for m, pt in rows]
        styles = _styles(labels)
        offsets = _offsets(ratios, len(rows), log=False)
        fig, ax = plt.subplots(figsize=(8, 4.2), dpi=120, layout="constrained")
        drawn = False
        for i, ((method, point), text) in enumerate(zip(rows, labels, strict=True)):
            cells = [table.get((method, point, "attacked", p), {}) for p in ratios]
            drawn |= _plot_line(ax, ratios, cells, metric, text, styles[text], offsets[i])
        ax.set_xticks(ratios, [f"{p:g}" for p in ratios])
        ax.set_xlabel("poison ratio p (harmful fraction of the fine-tuning data)")
        title = f"{label} after the attack"
    if not drawn:
        pending = metric == FA and any(r.get(PENDING) for r in results)
        text = "pending" if pending else "all broken" if _any_broken(results) else "not measured"
        ax.text(0.5, 0.5, text, ha="center", transform=ax.transAxes)
    _percent_axis(ax, label, "y" if len(ratios) <= 1 else "both")
    ax.set_title(f"{title}\nerror bars: ± std over seeds, or 95% Wilson interval (one seed)", fontsize=9)
    if drawn and len(ratios) <= 1:
        ax.legend(fontsize=7)
    elif drawn:
        _legend(fig, [ax])
    _save(fig, path)


#: bar colours: before the attack (aligned) light, after it strong.
_BEFORE, _AFTER = "#9ecae1", "#e6550d"
