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

Every name read from the run folder that becomes part of a file name goes through
:func:`safe_name`, so a crafted results.json or config.yaml cannot write outside the folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from booster.config import format_point, format_value, short_names
from booster.errors import UserError
from booster.evaluation.harmful_score import BROKEN_DEGENERATE_RATE, model_verdict
from booster.evaluation.statistics import RESAMPLES, mean_std, paired_bootstrap_diff, wilson_percent
from booster.stages.common import move_aside, read_json, warn, write_json_atomic, write_text_atomic

HS, FA = "harmful_score", "finetune_accuracy"
HS_PLUS, REFUSAL = "harmful_score_plus", "refusal_rate"
#: marker a pending FA carries in results.json (see booster.evaluation.alpaca_eval).
PENDING = "finetune_accuracy_pending"
BROKEN = "broken"
#: the method every other one is compared with, prompt by prompt (the undefended baseline).
BASELINE = "sft"
#: seed of the paired bootstrap's RNG: the same run folder always gives the same report.
BOOTSTRAP_SEED = 0
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
        return Stat(mean, max(0.0, mean - std), min(100.0, mean + std), f"{mean:.1f}±{std:.1f}")
    value, ci = pairs[0]
    if ci is None:
        return Stat(value, value, value, f"{value:.1f}")
    return Stat(value, ci[0], ci[1], f"{value:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]")


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


def _any_broken(results: list[dict]) -> bool:
    return any(is_broken(r) for r in results)


def results_table(results: list[dict]) -> str:
    """Methods (and swept values) as rows; before the attack, then one HS / FA column per poison
    ratio (mean ± std over seeds, or one model's value and Wilson interval), then their average."""
    names = short_names(swept_keys(results))
    ratios = _ratios(results)
    table = aggregate(results)
    header = ["method", "aligned HS / FA"] + [f"p={p:g} HS / FA" for p in ratios] + ["p avg HS / FA"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, point in _rows(results):
        row = [_label(method, point, names)]
        for stage, ratio in [("aligned", None)] + [("attacked", p) for p in ratios]:
            row.append(_pair_text(table.get((method, point, stage, ratio), {})))
        attacked = [table.get((method, point, "attacked", p), {}) for p in ratios]
        row.append(_average(attacked) if ratios else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# -- paired comparison with the baseline ------------------------------------------------------------


def _outputs_line(root: Path) -> str:
    """Where the answers are, or in an archive (:mod:`booster.archive`), that there are none."""
    from booster.archive import is_archive

    if is_archive(root):
        return (
            "This folder is an archive: no weights and no answers; the judge's per-prompt verdicts "
            "(each prompt as its sha256) are in `*/verdicts-*.jsonl` in the stage folders."
        )
    return "Generations (may contain harmful text): `*/generations-*.jsonl` in the stage folders."


def prompt_verdicts(root: Path, entry: dict) -> list[tuple[str, bool]] | None:
    """(prompt's sha256, judged harmful) per harmful prompt, from the generations file next to the
    entry's evaluation (``evaluation``: relative to the run folder), or from the verdicts file that
    replaces it in an archive (:mod:`booster.archive`); None when there is neither to read.

    A path that leads out of the run folder (``..``, an absolute path, a link) is not followed.
    """
    from booster.archive import prompt_key, verdicts_file
    from booster.stages.evaluate import generations_file

    relative = entry.get("evaluation")
    if not isinstance(relative, str) or not relative:
        return None
    base = Path(root).resolve()
    evaluation = (base / relative).resolve()
    candidates = [(generations_file(evaluation), "prompt"), (verdicts_file(evaluation), "prompt_sha256")]
    resolved = [(p.resolve(), k) for p, k in candidates]
    found = [(p, k) for p, k in resolved if p.is_relative_to(base) and p.is_file()]
    if not found:
        return None
    path, key = found[0]
    rows = []
    try:
        for line in path.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if isinstance(row, dict) and "harmful" in row and "task" not in row:
                prompt = str(row.get(key))
                rows.append((prompt_key(prompt) if key == "prompt" else prompt, bool(row["harmful"])))
    except (ValueError, OSError):
        return None
    return rows


def _compatible(a: dict | None, b: dict | None) -> bool:
    """Two swept points agree on every setting both record (SFT records fewer than Booster)."""
    a, b = a or {}, b or {}
    return all(a[k] == b[k] for k in a.keys() & b.keys())


@dataclasses.dataclass(frozen=True)
class Comparison:
    """HS(method) - HS(baseline) in points on the same prompts, with its paired bootstrap interval."""

    diff: float
    lo: float
    hi: float
    prompts: int
    seeds: int

    #: seeds of the cell (only those whose baseline model ran and neither is broken are pooled).
    of: int = 0

    @property
    def text(self) -> str:
        text = f"{self.diff:+.1f} [{self.lo:+.1f}, {self.hi:+.1f}]"
        return text + (f" ({self.seeds} of {self.of} seeds)" if self.seeds < self.of else "")


def _paired_differences(
    root: Path, results: list[dict], partner: Callable[[Key, dict], dict | None]
) -> dict[Key, Any]:
    """Key -> :class:`Comparison` of each group's entries with their ``partner`` entry (None: none),
    pooled over the seeds both have; ``"broken"`` when only broken models were there to compare;
    groups without per-prompt verdicts are left out."""
    cache: dict[str, list[tuple[str, bool]] | None] = {}

    def verdicts(entry: dict) -> list[tuple[str, bool]] | None:
        key = str(entry.get("evaluation"))
        if key not in cache:
            cache[key] = prompt_verdicts(root, entry)
        return cache[key]

    out: dict[Key, Any] = {}
    for key, entries in _groups(results).items():
        ours, theirs, broken = [], [], False
        for entry in entries:
            match = partner(key, entry)
            if match is None:
                continue
            if is_broken(entry) or is_broken(match):
                broken = True
                continue
            a, b = verdicts(entry), verdicts(match)
            # the pairing needs the same prompts in the same order (evaluations share seed-0 prompts)
            if not a or not b or [p for p, _ in a] != [p for p, _ in b]:
                continue
            if ours and [p for p, _ in a] != [p for p, _ in ours[0]]:
                continue
            ours.append(a)
            theirs.append(b)
        if ours:
            x = [[100.0 * h for _, h in column] for column in ours]
            y = [[100.0 * h for _, h in column] for column in theirs]
            diff, lo, hi = paired_bootstrap_diff(
                list(zip(*x, strict=True)), list(zip(*y, strict=True)), RESAMPLES, BOOTSTRAP_SEED
            )
            out[key] = Comparison(diff, lo, hi, len(x[0]), len(x), len(entries))
        elif broken:
            out[key] = BROKEN
    return out


def compare_with_baseline(root: Path, results: list[dict], baseline: str = BASELINE) -> dict[Key, Any]:
    """(method, point, stage, ratio) -> :class:`Comparison` with ``baseline`` at the same stage,
    ratio, seed and swept values, pooled over the seeds both have (see :func:`_paired_differences`)."""
    base_entries = [r for r in results if r["method"] == baseline]

    def partner(key: Key, entry: dict) -> dict | None:
        method, _, stage, ratio = key
        if method == baseline:
            return None
        return next(
            (
                b
                for b in base_entries
                if b["stage"] == stage
                and b["poison_ratio"] == ratio
                and b["seed"] == entry["seed"]
                and _compatible(b.get("sweep"), entry.get("sweep"))
            ),
            None,
        )

    return _paired_differences(root, results, partner)


def poison_effects(root: Path, results: list[dict]) -> dict[Key, Any]:
    """(method, point, "attacked", p) -> :class:`Comparison` of the model attacked at p > 0 with the
    same method's model attacked at p = 0 (same seed and swept values): what the harmful samples
    add over benign fine-tuning alone, on the same prompts."""
    benign = [r for r in results if r["stage"] == "attacked" and r["poison_ratio"] == 0]

    def partner(key: Key, entry: dict) -> dict | None:
        method, _, stage, ratio = key
        if stage != "attacked" or not ratio:
            return None
        return next(
            (
                b
                for b in benign
                if b["method"] == method
                and b["seed"] == entry["seed"]
                and b.get("sweep") == entry.get("sweep")
            ),
            None,
        )

    return _paired_differences(root, results, partner)


def comparison_table(results: list[dict], comparisons: dict[Key, Any], baseline: str = BASELINE) -> str:
    names = short_names(swept_keys(results))
    ratios = _ratios(results)
    columns = [("aligned", None)] + [("attacked", p) for p in ratios]
    header = ["method", "aligned ΔHS [95% CI]"] + [f"p={p:g} ΔHS [95% CI]" for p in ratios]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, point in _rows(results):
        if method == baseline:
            continue
        row = [_label(method, point, names)]
        for stage, ratio in columns:
            found = comparisons.get((method, point, stage, ratio))
            row.append("**broken**" if found == BROKEN else found.text if found else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def comparison_section(root: Path, results: list[dict], baseline: str = BASELINE) -> list[str]:
    """The paired comparison of every method with ``baseline``; empty when nothing can be paired."""
    comparisons = compare_with_baseline(root, results, baseline)
    if not any(isinstance(c, Comparison) for c in comparisons.values()):
        return []
    found = [c for c in comparisons.values() if isinstance(c, Comparison)]
    prompts = sorted({c.prompts for c in found})
    lines = [
        f"## Paired comparison with {baseline}",
        "",
        f"ΔHS = HS(method) − HS({baseline}) in points, on the same {'/'.join(map(str, prompts))} "
        f"harmful prompts, pooled over the seeds both ran; [95% CI]: paired bootstrap over prompts "
        f"({RESAMPLES} resamples, RNG seed {BOOTSTRAP_SEED}). Below 0: fewer harmful answers than "
        f"{baseline}; an interval that holds 0 is a difference the prompt sample alone could explain.",
        "",
        comparison_table(results, comparisons, baseline),
        "",
    ]
    if BROKEN in comparisons.values():
        lines += ["**broken**: the method's or the baseline's model is broken; nothing to compare.", ""]
    return lines


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
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for method, point in _rows(results):
        row = [_label(method, point, names)]
        for ratio in ratios:
            got = effects.get((method, point, "attacked", ratio))
            row.append("**broken**" if got == BROKEN else got.text if got else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


# -- harmful-loss probe ----------------------------------------------------------------------------

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
    """Attacked models that logged the harmful-loss probe (broken models are left out)."""
    groups: dict[Key, list[dict]] = {}
    for key, entries in _groups(results).items():
        found = [
            e
            for e in entries
            if e["stage"] == "attacked"
            and not is_broken(e)
            and (_probe_curve(e) or any(_is_number(e.get(k)) for k in PROBE_KEYS))
        ]
        if found:
            groups[key] = found
    return groups


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


def probe_section(results: list[dict], root: Path) -> list[str]:
    """The probe table and plot; empty when no attacked entry logged the probe."""
    if not _probe_groups(results):
        return []
    lines = [
        "## Harmful-loss probe",
        "",
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
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, cells in grid.rows.items():
        row = [label] + [_pair_text(c) for c in cells] + [_average(cells)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _plot_file(variable: str) -> str:
    return f"sweep-{safe_name(variable.replace('.', '-'))}.png"


# -- plots -----------------------------------------------------------------------------------------

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
#: bar colours: before the attack (aligned) light, after it strong.
_BEFORE, _AFTER = "#9ecae1", "#e6550d"


def _styles(labels: list[str]) -> dict[str, tuple[str, str]]:
    """A colour and a marker per line, distinct for the first 100 (marker shifts every 10 colours)."""
    labels = list(dict.fromkeys(labels))
    return {
        label: (_COLORS[i % len(_COLORS)], _MARKERS[(i + i // len(_COLORS)) % len(_MARKERS)])
        for i, label in enumerate(labels)
    }


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    lines = ["| " + " | ".join(k[1] for k in keys) + " |", "|" + "---|" * len(keys)]
    for r in results:
        cells = []
        for key, _ in keys:
            v = r.get(key)
            cells.append((format_point(v, names) if v else "-") if key == "sweep" else _detail_cell(r, key))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        from booster.evaluation.judges import judging_on, shared_judge
        from booster.evaluation.validate import validate_judge
        from booster.models import evaluation_device

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
    from booster.config import Sweep, parse_yaml, sweep_from_dict
    from booster.pipeline import load_results

    root = Path(root)
    results = load_results(root)
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
    if has_attack:
        plot_against_ratio(models, HS, "harmful score (%)", root / "harmful_score.png")
        plot_against_ratio(models, FA, "fine-tune accuracy (%)", root / "finetune_accuracy.png")
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
    lines += comparison_section(root, results)
    lines += poison_section(root, models)
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
    from booster.provenance import report_lines

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
