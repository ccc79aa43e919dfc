"""Report from results.json: the paper-style HS/FA tables, judge validation, settings and plots.

Everything is rebuilt from results.json (config.yaml only adds the settings section), so
``booster report DIR`` works on any finished run. A swept setting gets its own table in the paper's
layout (methods by the setting's values) and a plot. FA may be None: not measured (``n/a``) or
waiting for an external judge (``pending``, e.g. AlpacaEval); it is never shown as a number and is
left out of averages and plots.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from booster.config import format_point, format_value, short_names
from booster.stages.common import write_text_atomic

HS, FA = "harmful_score", "finetune_accuracy"
#: marker a pending FA carries in results.json (see booster.evaluation.alpaca_eval).
PENDING = "finetune_accuracy_pending"

Point = tuple[tuple[str, Any], ...]


def _numbers(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def _mean_std(values: list[float | None]) -> tuple[float, float]:
    values = _numbers(values)
    if not values:
        return float("nan"), 0.0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float | None]) -> str:
    values = _numbers(values)
    if not values:
        return "n/a"
    mean, std = _mean_std(values)
    return f"{mean:.1f}" + (f"±{std:.1f}" if len(values) > 1 else "")


def _fa_text(cell: dict[str, list]) -> str:
    """FA of a cell: a number when measured, else why not (``pending`` or ``n/a``)."""
    if _numbers(cell.get(FA, [])):
        return _fmt(cell[FA])
    return "pending" if cell.get(PENDING) else "n/a"


def _field_order() -> dict[str, int]:
    """Dotted key -> position in the config (align fields, then attack fields)."""
    from booster.config import AlignConfig, AttackConfig

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
    for key in (HS, "harmful_score_plus", "refusal_rate", FA, "train_seconds_per_step"):
        if entry.get(key) is not None:
            cell[key].append(entry[key])
    if entry.get(FA) is None and entry.get(PENDING):
        cell[PENDING].append(entry[PENDING])


def aggregate(results: list[dict]) -> dict[tuple[str, Point, str, float | None], dict[str, list]]:
    """(method, swept values, stage, ratio) -> metric -> values over seeds."""
    keys = swept_keys(results)
    table: dict[tuple[str, Point, str, float | None], dict[str, list]] = defaultdict(
        lambda: defaultdict(list)
    )
    for r in results:
        _add(table[(r["method"], _point(r, keys), r["stage"], r["poison_ratio"])], r)
    return table


def _rows(results: list[dict]) -> list[tuple[str, Point]]:
    keys = swept_keys(results)
    return list(dict.fromkeys((r["method"], _point(r, keys)) for r in results))


def _ratios(results: list[dict]) -> list[float]:
    return sorted({r["poison_ratio"] for r in results if r["stage"] == "attacked"})


def _average(cells: list[dict[str, list]]) -> str:
    """Mean over columns of the column means (no ±: the columns are different settings, not
    repeats); a column without a measured FA is left out of the FA average."""
    hs = _numbers([_mean_std(c.get(HS, []))[0] for c in cells])
    fa = _numbers([_mean_std(c.get(FA, []))[0] for c in cells])
    hs_text = f"{statistics.fmean(hs):.1f}" if hs else "n/a"
    if fa:
        fa_text = f"{statistics.fmean(fa):.1f}"
    else:
        fa_text = "pending" if any(c.get(PENDING) for c in cells) else "n/a"
    return f"{hs_text} / {fa_text}"


def results_table(results: list[dict]) -> str:
    """Methods (and swept values) as rows; before the attack, then one HS / FA column per poison
    ratio (means over seeds), then their average."""
    names = short_names(swept_keys(results))
    ratios = _ratios(results)
    table = aggregate(results)
    header = ["method", "aligned HS / FA"] + [f"p={p:g} HS / FA" for p in ratios] + ["p avg HS / FA"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, point in _rows(results):
        row = [_label(method, point, names)]
        for stage, ratio in [("aligned", None)] + [("attacked", p) for p in ratios]:
            cell = table.get((method, point, stage, ratio), {})
            row.append(f"{_fmt(cell.get(HS, []))} / {_fa_text(cell)}")
        attacked = [table.get((method, point, "attacked", p), {}) for p in ratios]
        row.append(_average(attacked) if ratios else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# -- one table per swept setting -------------------------------------------------------------------


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
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, cells in grid.rows.items():
        row = [label] + [f"{_fmt(c.get(HS, []))} / {_fa_text(c)}" for c in cells] + [_average(cells)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _plot_file(variable: str) -> str:
    return f"sweep-{variable.replace('.', '-')}.png"


def _plot_line(ax: Any, xs: list, values: list[list[float]], label: str, linestyle: str = "-") -> bool:
    """One line of means ± std over seeds at ``xs``; pending or missing values get no point.

    Returns whether anything was drawn.
    """
    points = [(x, *_mean_std(v)) for x, v in zip(xs, values, strict=True)]
    points = [p for p in points if not math.isnan(p[1])]
    if not points:
        return False
    ax.errorbar(
        [p[0] for p in points],
        [p[1] for p in points],
        yerr=[p[2] for p in points],
        marker="o",
        capsize=3,
        linestyle=linestyle,
        label=label,
    )
    return True


def plot_sweep(grid: SweepGrid, path: Path) -> None:
    """HS and FA (means over seeds, ± std) against the swept setting, one line per table row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in grid.values)
    xs = list(grid.values) if numeric else list(range(len(grid.values)))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    for ax, (metric, label) in zip(
        axes, ((HS, "harmful score (%)"), (FA, "fine-tune accuracy (%)")), strict=True
    ):
        drawn = False
        for row, cells in grid.rows.items():
            constant = any(row == m or row.startswith(f"{m} (") for m in grid.constant)
            values = [c.get(metric, []) for c in cells]
            # dashed: a method that does not read the setting
            drawn |= _plot_line(ax, xs, values, row, linestyle="--" if constant else "-")
        if not drawn:
            pending = any(c.get(PENDING) for cells in grid.rows.values() for c in cells)
            ax.text(
                0.5, 0.5, "FA pending" if pending else "not measured", ha="center", transform=ax.transAxes
            )
        positive = numeric and all(v > 0 for v in xs)
        if positive and max(xs) / min(xs) >= 100:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(xs, [format_value(v) for v in grid.values], rotation=20)
        ax.set_xlabel(grid.variable)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
    ratios = ", ".join(f"{p:g}" for p in grid.ratios)
    fig.suptitle(f"after the attack (p = {ratios}) against {grid.variable}")
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


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
            f"HS / FA after the attack (p = {ratios}); mean ± std over seeds; *average*: over the columns.",
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
        lines += [f"![{variable}]({_plot_file(variable)})", ""]
    return lines


# -- the rest of the report ------------------------------------------------------------------------


def detail_table(results: list[dict]) -> str:
    """Every evaluated model: HS, HS+, refusal rate, FA and training cost."""
    keys = [
        ("method", "method"),
        ("stage", "stage"),
        ("seed", "seed"),
        ("poison_ratio", "p"),
        ("harmful_score", "HS"),
        ("harmful_score_plus", "HS+"),
        ("refusal_rate", "refusal %"),
        ("degenerate_rate", "degenerate %"),
        ("finetune_accuracy", "FA"),
        ("train_steps", "steps"),
        ("train_seconds_per_step", "s/step"),
        ("eval_seconds", "eval s"),
    ]
    swept = swept_keys(results)
    if swept:
        keys.insert(4, ("sweep", "swept"))
    names = short_names(swept)
    lines = ["| " + " | ".join(k[1] for k in keys) + " |", "|" + "---|" * len(keys)]
    for r in results:
        cells = []
        for key, _ in keys:
            v = r.get(key)
            if key == "sweep":
                cells.append(format_point(v, names) if v else "-")
            elif key == FA and v is None and r.get(PENDING):
                cells.append("pending")
            else:
                cells.append("-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_against_ratio(results: list[dict], metric: str, label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = aggregate(results)
    names = short_names(swept_keys(results))
    ratios = _ratios(results)
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    drawn = False
    for method, point in _rows(results):
        values = [table.get((method, point, "attacked", p), {}).get(metric, []) for p in ratios]
        drawn |= _plot_line(ax, ratios, values, _label(method, point, names))
    if not drawn:
        pending = any(r.get(PENDING) for r in results)
        ax.text(0.5, 0.5, "pending" if pending else "not measured", ha="center", transform=ax.transAxes)
    ax.set_xlabel("poison ratio p (harmful fraction of the fine-tuning data)")
    ax.set_ylabel(label)
    ax.set_title(f"{label} after the attack")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def judge_validation(root: Path, judge: str, judge_model: str | None) -> dict[str, Any] | None:
    """The judge's accuracy on held-out human labels, computed once per run folder."""
    path = root / f"judge-{judge}.json"
    if path.exists():
        return json.loads(path.read_text())
    try:
        from booster.evaluation.judges import judging_on, shared_judge
        from booster.evaluation.validate import validate_judge
        from booster.models import evaluation_device

        options = {"model": judge_model} if judge_model else {}
        with judging_on(shared_judge(judge, **options), evaluation_device()) as built:  # the run's judge
            report = validate_judge(built)
    except Exception as err:  # validation needs the PyRIT labels; a report without it still helps
        report = {"error": f"{type(err).__name__}: {err}"}
    path.write_text(json.dumps(report, indent=2) + "\n")
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
    swept = swept_keys(results)
    if swept:
        values = {k: _ordered([r["sweep"][k] for r in results if k in (r.get("sweep") or {})]) for k in swept}
        lines.append(
            "- swept: "
            + "; ".join(f"`{k}` in [{', '.join(format_value(v) for v in vs)}]" for k, vs in values.items())
        )
    return lines


def write_report(root: Path, config: Any | None = None) -> Path:
    """Rebuild report.md and the plots from results.json (and the resolved config: a ``RunConfig``
    or ``Sweep``, else the run's config.yaml when there is one)."""
    from booster.config import Sweep, sweep_from_dict

    root = Path(root)
    results = json.loads((root / "results.json").read_text())
    if config is None:
        config_path = root / "config.yaml"
        if config_path.exists():
            config = sweep_from_dict(yaml.safe_load(config_path.read_text()), str(config_path))
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
    if has_attack:
        plot_against_ratio(results, HS, "harmful score (%)", root / "harmful_score.png")
        plot_against_ratio(results, FA, "fine-tune accuracy (%)", root / "finetune_accuracy.png")
    methods = list(dict.fromkeys(r["method"] for r in results))
    seeds = sorted({r["seed"] for r in results})
    model = f"Model `{data['model']['name']}`; " if data else ""
    lines = [
        "# booster-llm report",
        "",
        f"{model}methods {', '.join(methods)}; seeds {seeds}.",
        "",
        "## Harmful score (HS, lower is better) / fine-tune accuracy (FA, higher is better)",
        "",
        "Percentages; mean ± std over seeds. *aligned*: before the user's fine-tuning; *p=…*: after it. "
        "FA *pending*: waiting for an external judge (see the stage's evaluation file).",
        "",
        results_table(results),
        "",
    ]
    sweeps = sweep_sections(results, root)
    if sweeps:
        lines += ["## Sweeps", "", "One table per swept setting: methods by the setting's values.", ""]
        lines += sweeps
    lines += [
        "## Every evaluated model",
        "",
        "HS+ also counts degenerate answers (empty, very short or a word repeated more than 3 times).",
        "",
        detail_table(results),
        "",
        f"## Judge: `{judge or 'unknown'}`",
        "",
    ]
    if validation and "error" not in validation:
        lines += ["Validation on held-out human-labelled responses:", "", "| metric | value |", "|---|---|"]
        lines += [
            f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in validation.items()
        ]
    else:
        lines.append(f"No validation available ({(validation or {}).get('error', 'unknown')}).")
    lines += ["", "## Settings", ""]
    if data:
        lines += _settings(data, results)
        lines += [
            "",
            "Full resolved settings: `config.yaml`. Generations (may contain harmful text): "
            "`*/generations-*.jsonl` in the stage folders.",
        ]
    else:
        lines.append("No config.yaml in this folder: the settings are unknown.")
    if has_attack:
        lines += ["", "![harmful score](harmful_score.png) ![fine-tune accuracy](finetune_accuracy.png)"]
    path = root / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
