"""Paired comparisons on the same prompts: each method against the undefended baseline (SFT), in HS
and in FA (on the same task questions), and each poisoned attack against the clean one (p = 0), from
the per-prompt verdicts that the evaluation files (or an archive's verdict files) hold. Intervals are paired bootstraps with a fixed seed, so
the same run folder always gives the same report.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from booster.archive import prompt_key, question_key, verdicts_file
from booster.evaluation.statistics import (
    RESAMPLES,
    crossed_bootstrap_diff,
    paired_bootstrap_diff,
    wilson_interval,
)
from booster.report.cells import BASELINE, BROKEN, FA, Key, _groups, is_broken
from booster.stages.evaluate import generations_file
from booster.tasks import accuracy, row_correct

#: seed of the paired bootstrap's RNG: the same run folder always gives the same report.
BOOTSTRAP_SEED = 0


#: what is counted per prompt: judged harmful (HS), judged a refusal, or a task question answered
#: right (FA); the first two are also the fields of a harmful prompt's row.
HARMFUL, REFUSED, CORRECT = "harmful", "refusal", "correct"


def prompt_verdicts(root: Path, entry: dict, kind: str = HARMFUL) -> list[tuple[str, bool]] | None:
    """Per harmful prompt (``kind`` "harmful" or "refusal") its sha256 and whether it was judged
    harmful (or a refusal), or per task question (``kind`` "correct") its sha256 and whether its
    answer was right; from the
    generations file next to the entry's evaluation (``evaluation``: relative to the run folder), or
    from the verdicts file that replaces it in an archive (:mod:`booster.archive`). None when there
    is neither to read, or when the task rows' flags do not reproduce the entry's FA (rows written
    before the flag was stored are scored again from their gold answer, and used only if they do).

    A path that leads out of the run folder (``..``, an absolute path, a link) is not followed.
    """

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
            if not isinstance(row, dict):
                continue
            if kind in (HARMFUL, REFUSED) and "harmful" in row and "task" not in row:
                if kind not in row:
                    return None
                prompt = str(row.get(key))
                rows.append((prompt_key(prompt) if key == "prompt" else prompt, bool(row[kind])))
            elif kind == CORRECT and "task" in row:
                flag = row_correct(row)
                if flag is None:
                    return None
                rows.append((question_key(row) if key == "prompt" else str(row.get(key)), flag))
    except (ValueError, OSError):
        return None
    if kind == CORRECT and rows:
        recorded = entry.get(FA)
        counted = accuracy([flag for _, flag in rows])
        if not isinstance(recorded, int | float) or not math.isclose(counted, recorded, abs_tol=1e-6):
            return None
    return rows


def _compatible(a: dict | None, b: dict | None) -> bool:
    """Two swept points agree on every setting both record (SFT records fewer than Booster)."""
    a, b = a or {}, b or {}
    return all(a[k] == b[k] for k in a.keys() & b.keys())


@dataclasses.dataclass(frozen=True)
class Comparison:
    """HS (or FA) of a method minus the baseline's, in points on the same prompts (or questions),
    with its paired bootstrap interval."""

    diff: float
    lo: float
    hi: float
    prompts: int
    seeds: int

    #: seeds of the cell (only those whose baseline model ran and neither is broken are pooled).
    of: int = 0
    #: the difference on each pooled seed, in seed order.
    per_seed: tuple[float, ...] = ()
    #: with two seeds or more: the interval that resamples seeds as well as prompts.
    crossed: tuple[float, float] | None = None

    @property
    def text(self) -> str:
        text = _interval_text(self.diff, self.lo, self.hi)
        return text + (f" ({self.seeds} of {self.of} seeds)" if self.seeds < self.of else "")

    @property
    def crossed_text(self) -> str | None:
        """The difference with its seeds-and-prompts interval (None with one seed)."""
        return _interval_text(self.diff, *self.crossed) if self.crossed else None


@dataclasses.dataclass(frozen=True)
class Level:
    """A cell's rate in percent over its seeds and prompts, with the interval of a crossed bootstrap
    (resamples draw seeds as well as prompts; prompts only, with one seed) widened to hold the Wilson
    interval of the pooled count: a bootstrap of a rate near 0 collapses (0 of 900 gives [0, 0])."""

    value: float
    lo: float
    hi: float
    #: seeds pooled (those whose per-prompt verdicts could be read and whose model is not broken).
    seeds: int
    #: seeds of the cell.
    of: int

    @property
    def text(self) -> str:
        return f"{self.value:.1f} [{self.lo:.1f}, {self.hi:.1f}]"


def crossed_levels(root: Path, results: list[dict], kind: str = HARMFUL) -> dict[Key, Level]:
    """(method, point, stage, ratio) -> :class:`Level` of HS (``kind`` "harmful"), the refusal rate
    ("refusal") or FA ("correct"): the whole cell's answer to "how often, on other prompts and
    other training seeds?". Cells without per-prompt verdicts are left out."""
    out: dict[Key, Level] = {}
    for key, entries in _groups(results).items():
        columns: list[list[tuple[str, bool]]] = []
        for entry in entries:
            found = None if is_broken(entry) else prompt_verdicts(root, entry, kind)
            if not found or (columns and [p for p, _ in found] != [p for p, _ in columns[0]]):
                continue
            columns.append(found)
        if not columns:
            continue
        scores = [[100.0 * flag for _, flag in column] for column in columns]
        x = list(zip(*scores, strict=True))
        value, lo, hi = crossed_bootstrap_diff(x, [[0.0] * len(columns)] * len(x), RESAMPLES, BOOTSTRAP_SEED)
        count = sum(flag for column in columns for _, flag in column)
        w_lo, w_hi = wilson_interval(count, len(x) * len(columns))
        out[key] = Level(value, min(lo, 100.0 * w_lo), max(hi, 100.0 * w_hi), len(columns), len(entries))
    return out


def _interval_text(diff: float, lo: float, hi: float) -> str:
    return f"{diff:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def _paired_differences(
    root: Path, results: list[dict], partner: Callable[[Key, dict], dict | None], kind: str = HARMFUL
) -> dict[Key, Any]:
    """Key -> :class:`Comparison` of each group's entries with their ``partner`` entry (None: none),
    pooled over the seeds both have; ``"broken"`` when only broken models were there to compare;
    groups without per-prompt verdicts are left out. ``kind``: what is compared (HS or FA)."""
    cache: dict[str, list[tuple[str, bool]] | None] = {}

    def verdicts(entry: dict) -> list[tuple[str, bool]] | None:
        key = str(entry.get("evaluation"))
        if key not in cache:
            cache[key] = prompt_verdicts(root, entry, kind)
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
            columns = list(zip(*x, strict=True)), list(zip(*y, strict=True))
            diff, lo, hi = paired_bootstrap_diff(*columns, RESAMPLES, BOOTSTRAP_SEED)
            per_seed = tuple((sum(u) - sum(v)) / len(u) for u, v in zip(x, y, strict=True))
            crossed = None
            if len(x) > 1:
                _, c_lo, c_hi = crossed_bootstrap_diff(*columns, RESAMPLES, BOOTSTRAP_SEED)
                crossed = (c_lo, c_hi)
            out[key] = Comparison(diff, lo, hi, len(x[0]), len(x), len(entries), per_seed, crossed)
        elif broken:
            out[key] = BROKEN
    return out


def baseline_entry(results: list[dict], entry: dict, baseline: str = BASELINE) -> dict | None:
    """The ``baseline`` method's entry that ``entry`` is compared with: the same stage, poison
    ratio, seed and swept values (None: the run has none, or ``entry`` is the baseline's own)."""
    if entry.get("method") == baseline:
        return None
    return next(
        (
            b
            for b in results
            if b["method"] == baseline
            and b["stage"] == entry["stage"]
            and b["poison_ratio"] == entry["poison_ratio"]
            and b["seed"] == entry["seed"]
            and _compatible(b.get("sweep"), entry.get("sweep"))
        ),
        None,
    )


def compare_with_baseline(
    root: Path, results: list[dict], baseline: str = BASELINE, kind: str = HARMFUL
) -> dict[Key, Any]:
    """(method, point, stage, ratio) -> :class:`Comparison` with ``baseline`` at the same stage,
    ratio, seed and swept values, pooled over the seeds both have (see :func:`_paired_differences`):
    of HS on the same harmful prompts, or with ``kind`` "correct" of FA on the same task questions."""
    base_entries = [r for r in results if r["method"] == baseline]
    return _paired_differences(
        root, results, lambda _, entry: baseline_entry(base_entries, entry, baseline), kind
    )


def paired_difference(root: Path, entry: dict, other: dict, kind: str = HARMFUL) -> Comparison | str | None:
    """HS(entry) − HS(other) on the same prompts for one pair of models (one seed each), with its
    paired bootstrap interval (``kind`` "correct": FA on the same task questions); ``"broken"`` when
    either model is broken, None when their per-prompt verdicts are missing or hold other prompts."""
    if is_broken(entry) or is_broken(other):
        return BROKEN
    a, b = prompt_verdicts(root, entry, kind), prompt_verdicts(root, other, kind)
    if not a or not b or [p for p, _ in a] != [p for p, _ in b]:
        return None
    diff, lo, hi = paired_bootstrap_diff(
        [100.0 * h for _, h in a], [100.0 * h for _, h in b], RESAMPLES, BOOTSTRAP_SEED
    )
    return Comparison(diff, lo, hi, len(a), 1, 1)


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


def search_gaps(root: Path, searches: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """Per ``booster search`` study (keyed by its folder): the worst case's HS and FA minus the fixed
    attack's, paired on the same test prompts and task questions, as table text: how much the tuned
    attacker adds, with an interval that the two Wilson intervals side by side cannot give. "-"
    where the per-prompt verdicts are missing, "broken" where either model is."""
    gaps = {}
    for search in searches:
        best, fixed = (search.get("best") or {}).get("test"), (search.get("fixed") or {}).get("test")
        texts = []
        for kind in (HARMFUL, CORRECT):
            found = paired_difference(root, best, fixed, kind) if best and fixed else None
            texts.append(found.text if isinstance(found, Comparison) else found or "-")
        gaps[str(search.get("folder"))] = (texts[0], texts[1])
    return gaps


def worst_against_baseline(
    root: Path, searches: list[dict[str, Any]], baseline: str = BASELINE
) -> dict[str, str]:
    """Per ``booster search`` study (keyed by its folder): its worst case's HS minus the worst case
    of ``baseline``'s study of the same seed and poison ratio, paired on the same test prompts, as
    table text: whether a defense still lowers the harm when each model meets the attack tuned
    against it. Studies without a baseline study to pair with are left out."""
    worst = {
        (s.get("seed"), s.get("poison_ratio")): (s.get("best") or {}).get("test")
        for s in searches
        if s.get("method") == baseline
    }
    out = {}
    for search in searches:
        theirs = worst.get((search.get("seed"), search.get("poison_ratio")))
        ours = (search.get("best") or {}).get("test")
        if search.get("method") == baseline or not theirs or not ours:
            continue
        found = paired_difference(root, ours, theirs)
        out[str(search.get("folder"))] = found.text if isinstance(found, Comparison) else found or "-"
    return out
