"""Report from results.json: the paper-style HS/FA table, judge validation, settings and plots."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from booster.stages.common import write_text_atomic


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), 0.0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean, std = _mean_std(values)
    return f"{mean:.1f}" + (f"±{std:.1f}" if len(values) > 1 else "")


def aggregate(results: list[dict]) -> dict[tuple[str, str, float | None], dict[str, list[float]]]:
    """(method, stage, ratio) -> metric -> values over seeds."""
    table: dict[tuple[str, str, float | None], dict[str, list[float]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for r in results:
        cell = table[(r["method"], r["stage"], r["poison_ratio"])]
        for key in ("harmful_score", "harmful_score_plus", "refusal_rate", "finetune_accuracy"):
            if r.get(key) is not None:
                cell[key].append(r[key])
        if r.get("train_seconds_per_step") is not None:
            cell["train_seconds_per_step"].append(r["train_seconds_per_step"])
    return table


def results_table(results: list[dict]) -> str:
    """Methods as rows; before the attack, then one HS / FA column per poison ratio (means over seeds)."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    ratios = sorted({r["poison_ratio"] for r in results if r["stage"] == "attacked"})
    table = aggregate(results)
    header = ["method", "aligned HS / FA"] + [f"p={p:g} HS / FA" for p in ratios] + ["p avg HS / FA"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in methods:
        row = [m]
        for stage, ratio in [("aligned", None)] + [("attacked", p) for p in ratios]:
            cell = table.get((m, stage, ratio), {})
            row.append(f"{_fmt(cell.get('harmful_score', []))} / {_fmt(cell.get('finetune_accuracy', []))}")
        hs = [_mean_std(table.get((m, "attacked", p), {}).get("harmful_score", []))[0] for p in ratios]
        fa = [_mean_std(table.get((m, "attacked", p), {}).get("finetune_accuracy", []))[0] for p in ratios]
        row.append(f"{_fmt(hs)} / {_fmt(fa)}" if ratios else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


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
    lines = ["| " + " | ".join(k[1] for k in keys) + " |", "|" + "---|" * len(keys)]
    for r in results:
        cells = []
        for key, _ in keys:
            v = r.get(key)
            cells.append("-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_against_ratio(results: list[dict], metric: str, label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = aggregate(results)
    methods = list(dict.fromkeys(r["method"] for r in results))
    ratios = sorted({r["poison_ratio"] for r in results if r["stage"] == "attacked"})
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for m in methods:
        stats = [_mean_std(table.get((m, "attacked", p), {}).get(metric, [])) for p in ratios]
        ax.errorbar(ratios, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, label=m)
    ax.set_xlabel("poison ratio p (harmful fraction of the fine-tuning data)")
    ax.set_ylabel(label)
    ax.set_title(f"{label} after the attack")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def judge_validation(root: Path, judge: str, judge_model: str | None) -> dict[str, Any] | None:
    """The judge's accuracy on held-out human labels, computed once per run folder."""
    path = root / f"judge-{judge}.json"
    if path.exists():
        return json.loads(path.read_text())
    try:
        from booster.evaluation.judges import get_judge
        from booster.evaluation.validate import validate_judge

        options = {"model": judge_model} if judge_model else {}
        report = validate_judge(get_judge(judge, **options))
    except Exception as err:  # validation needs the PyRIT labels; a report without it still helps
        report = {"error": f"{type(err).__name__}: {err}"}
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def write_report(root: Path, config: Any | None = None) -> Path:
    """Rebuild report.md and the plots from results.json (and the resolved config)."""
    from booster.config import RunConfig, config_from_dict

    root = Path(root)
    results = json.loads((root / "results.json").read_text())
    if config is None:
        config_path = root / "config.yaml"
        config = (
            config_from_dict(yaml.safe_load(config_path.read_text())) if config_path.exists() else RunConfig()
        )
    else:
        write_text_atomic(root / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    validation = judge_validation(root, config.evaluate.judge, config.evaluate.judge_model)
    has_attack = any(r["stage"] == "attacked" for r in results)
    if has_attack:
        plot_against_ratio(results, "harmful_score", "harmful score (%)", root / "harmful_score.png")
        plot_against_ratio(
            results, "finetune_accuracy", "fine-tune accuracy (%)", root / "finetune_accuracy.png"
        )
    a, t, e = config.align, config.attack, config.evaluate
    lines = [
        "# booster-llm report",
        "",
        f"Model `{config.model.name}`; methods {', '.join(config.methods)}; seeds {config.seeds}.",
        "",
        "## Harmful score (HS, lower is better) / fine-tune accuracy (FA, higher is better)",
        "",
        "Percentages; mean ± std over seeds. *aligned*: before the user's fine-tuning; *p=…*: after it.",
        "",
        results_table(results),
        "",
        "## Every evaluated model",
        "",
        "HS+ also counts degenerate answers (empty, very short or a word repeated more than 3 times).",
        "",
        detail_table(results),
        "",
        f"## Judge: `{e.judge}`",
        "",
    ]
    if validation and "error" not in validation:
        lines += ["Validation on held-out human-labelled responses:", "", "| metric | value |", "|---|---|"]
        lines += [
            f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in validation.items()
        ]
    else:
        lines.append(f"No validation available ({(validation or {}).get('error', 'unknown')}).")
    lines += [
        "",
        "## Settings",
        "",
        f"- align: data `{a.alignment_data}` (+ harmful `{a.harmful_data}`), lr {a.learning_rate}, "
        f"batch {a.batch_size}, epochs {a.epochs}, max_steps {a.max_steps}, lamb {a.lamb}, alpha {a.alpha}",
        f"- LoRA: {config.model.lora}",
        f"- attack: task `{t.task_data}`, poison `{t.poison_data}`, n={t.samples}, p in {t.poison_ratios}, "
        f"mode {t.mode}, lr {t.learning_rate}, batch {t.batch_size}, epochs {t.epochs}, max_steps {t.max_steps}",
        f"- evaluate: prompts `{e.harmful_prompts}` (n={e.harmful_samples}), task samples {e.task_samples}, "
        f"max_new_tokens {e.max_new_tokens}",
        "",
        "Full resolved settings: `config.yaml`. Generations (may contain harmful text): "
        "`*/generations-*.jsonl` in the stage folders.",
    ]
    if has_attack:
        lines += ["", "![harmful score](harmful_score.png) ![fine-tune accuracy](finetune_accuracy.png)"]
    path = root / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
