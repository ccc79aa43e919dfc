"""Human-labelled PyRIT responses: the one deterministic train / held-out split, and judge validation.

The ``pyrit`` package ships human labels for assistant responses (docs/method.md §4): harm ratings
(``harm/*.csv``, raters' Likert 1-5 scaled to 0..1), objective-achieved labels (``objective/*.csv``)
and refusal labels (``refusal_scorer/refusal*.csv``). The fitted judges (``embedded-lm``,
``embedded``) train on one side of a split of these rows and :func:`validate_judge` measures any
judge on the other side, so the same split function serves both and a validated row has never been
seen in training. Every figure comes with its 95% interval, and :func:`paired_difference` compares
two judges on the same answers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from booster.data.scorer_evals import HARM_THRESHOLD, read_scorer_csv
from booster.errors import UserError
from booster.evaluation.statistics import RESAMPLES, wilson_interval

PYRIT_PACKAGE = "pyrit"
SCORER_EVALS = Path("datasets") / "scorer_evals"
HARM_FOLDERS = ("harm", "objective")
REFUSAL_GLOB = "refusal_scorer/refusal*.csv"
#: share of row groups held out from judge training and used for validation.
HELD_OUT_FRACTION = 0.3


@dataclass(frozen=True)
class LabelledRow:
    """One human-labelled (objective, response) pair.

    ``label`` means "harmful" for ``kind == "harm"`` and "refusal" for ``kind == "refusal"``.
    """

    objective: str
    response: str
    label: bool
    kind: str
    #: the file(s) under scorer_evals the row came from.
    source: str
    #: rows sharing a group sit on the same side of the split.
    group: str = ""


def scorer_evals_dir() -> Path:
    """The ``scorer_evals`` folder of the installed ``pyrit`` package, found without importing it."""
    spec = importlib.util.find_spec(PYRIT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "judge training and validation need the PyRIT human labels: pip install --no-deps pyrit==1.1.0"
        )
    return Path(next(iter(spec.submodule_search_locations))) / SCORER_EVALS


def _human_score(row: dict[str, str]) -> float:
    """Mean over the raters' columns (``human_score``, ``human_score_1``, ...)."""
    scores = [float(v) for k, v in row.items() if k.startswith("human_score") and v and v.strip()]
    if not scores:
        raise ValueError("row has no human score")
    return sum(scores) / len(scores)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def harm_rows(root: Path | None = None) -> list[LabelledRow]:
    """Harm and objective-achieved labels, one row per distinct response.

    A harm file row is harmful when its mean rating is >= ``HARM_THRESHOLD``; an objective file row
    when the response achieved the (harmful) objective. Several responses are labelled in both kinds
    of file; they are merged, harmful if any source says so: both labels answer "did this help with
    harm", and a judge that misses harm is the costlier mistake for a harmful score.
    """
    root = root or scorer_evals_dir()
    merged: dict[str, dict[str, Any]] = {}
    for folder in HARM_FOLDERS:
        for path in sorted((root / folder).glob("*.csv")):
            for row in read_scorer_csv(path):
                response = row.get("assistant_response", "").strip()
                objective = row.get("objective", "").strip()
                if not response:
                    continue
                # objective files hold 0/1 (objective achieved), so one threshold serves both kinds
                harmful = _human_score(row) >= HARM_THRESHOLD
                entry = merged.setdefault(
                    _norm(response), {"row": (objective, response), "labels": [], "src": set()}
                )
                entry["labels"].append(harmful)
                entry["src"].add(f"{folder}/{path.name}")
    return [
        LabelledRow(
            objective=e["row"][0],
            response=e["row"][1],
            label=any(e["labels"]),
            kind="harm",
            source=",".join(sorted(e["src"])),
        )
        for e in merged.values()
    ]


def refusal_rows(root: Path | None = None) -> list[LabelledRow]:
    """Refusal labels (1 = the response does not fulfil the objective), one row per distinct response."""
    root = root or scorer_evals_dir()
    merged: dict[str, LabelledRow] = {}
    for path in sorted(root.glob(REFUSAL_GLOB)):
        for row in read_scorer_csv(path):
            response = row.get("assistant_response", "").strip()
            if response:
                merged.setdefault(
                    _norm(response),
                    LabelledRow(
                        objective=row.get("objective", "").strip(),
                        response=response,
                        label=_human_score(row) >= 0.5,
                        kind="refusal",
                        source=f"refusal_scorer/{path.name}",
                    ),
                )
    return list(merged.values())


def assign_groups(rows: Sequence[LabelledRow]) -> list[LabelledRow]:
    """Group rows that share an objective or a response (union-find), so neither leaks across the split."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    for r in rows:
        union("o:" + _norm(r.objective), "r:" + _norm(r.response))
    return [
        LabelledRow(r.objective, r.response, r.label, r.kind, r.source, group=find("o:" + _norm(r.objective)))
        for r in rows
    ]


def is_held_out(group: str, fraction: float = HELD_OUT_FRACTION) -> bool:
    """Deterministic by group name (a hash, not a seeded shuffle): adding rows never moves old ones."""
    digest = hashlib.sha256(group.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@lru_cache(maxsize=2)
def _labelled(root: Path | None) -> tuple[LabelledRow, ...]:
    return tuple(assign_groups([*harm_rows(root), *refusal_rows(root)]))


def labelled_rows(split: str = "all", root: Path | None = None) -> list[LabelledRow]:
    """All human-labelled rows, or the ``train`` / ``test`` side of the split."""
    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be all, train or test, not {split!r}")
    rows = _labelled(root)
    if split == "all":
        return list(rows)
    return [r for r in rows if is_held_out(r.group) == (split == "test")]


def fingerprint(rows: Iterable[LabelledRow]) -> str:
    """A short hash of the rows' content and labels: the key of a judge fitted on them."""
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{r.kind}\0{r.label}\0{r.objective}\0{r.response}\0".encode())
    return h.hexdigest()[:16]


def auc_of(labels: Any, scores: Any, axis: int = -1) -> Any:
    """ROC AUC by the rank-sum formula (ties count half), along ``axis`` so that a bootstrap can
    pass all its resamples at once; NaN where one class is missing."""
    from scipy.stats import rankdata  # heavy: loaded only where it is used, so light commands stay fast

    y = np.asarray(labels, dtype=bool)
    ranks = rankdata(np.asarray(scores, dtype=float), axis=axis)
    positives = y.sum(axis=axis)
    negatives = y.shape[axis] - positives
    with np.errstate(divide="ignore", invalid="ignore"):
        return ((ranks * y).sum(axis=axis) - positives * (positives + 1) / 2) / (positives * negatives)


def _auc(labels: Sequence[bool], scores: Sequence[float]) -> float:
    """ROC AUC (ties count half); NaN when one class is missing."""
    if len(set(labels)) < 2:
        return float("nan")
    return float(auc_of(list(labels), list(scores)))


def _bootstrap(data: tuple[Any, ...], statistic: Any) -> list[float]:
    """A 95% BCa bootstrap interval of ``statistic`` over rows resampled together (seeded: the same
    interval every time), or NaNs when there are fewer than two rows of a class. Where BCa is
    undefined (every resample gives the same value, as for a constant score) the percentile
    interval of the same resamples stands in."""
    from scipy.stats import bootstrap  # heavy: loaded only where it is used, so light commands stay fast

    labels = np.asarray(data[0], dtype=bool)
    if labels.sum() < 2 or (~labels).sum() < 2:
        return [float("nan"), float("nan")]
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns where BCa is undefined; handled below
        result = bootstrap(
            data,
            statistic,
            paired=True,
            vectorized=True,
            n_resamples=RESAMPLES,
            confidence_level=0.95,
            method="BCa",
            random_state=0,
        )
    low, high = result.confidence_interval
    if np.isnan(low) or np.isnan(high):
        low, high = np.nanpercentile(result.bootstrap_distribution, [2.5, 97.5])
    return [round(float(low), 4), round(float(high), 4)]


def auc_interval(labels: Sequence[bool], scores: Sequence[float]) -> list[float]:
    """95% BCa bootstrap interval of the AUC (answers resampled with their labels)."""
    return _bootstrap((np.asarray(labels), np.asarray(scores, dtype=float)), auc_of)


def _wilson(successes: int, n: int) -> list[float]:
    low, high = wilson_interval(successes, n)
    return [round(low, 4), round(high, 4)]


@dataclass(frozen=True)
class HeldOut:
    """The held-out rows judges are validated on: harm / objective rows, then human-labelled
    refusals; ``max_answer_words`` cuts every answer to its first words (labels are kept)."""

    harm: list[LabelledRow]
    refusals: list[LabelledRow]
    max_answer_words: int | None = None

    @property
    def rows(self) -> list[LabelledRow]:
        return self.harm + self.refusals

    def answers(self) -> list[str]:
        answers = [r.response for r in self.rows]
        if self.max_answer_words is not None:
            answers = [" ".join(a.split()[: self.max_answer_words]) for a in answers]
        return answers


def held_out(root: Path | None = None, max_answer_words: int | None = None) -> HeldOut:
    """The held-out side of the split, as :func:`validate_judge` uses it."""
    test = labelled_rows("test", root)
    return HeldOut(
        harm=[r for r in test if r.kind == "harm"],
        refusals=[r for r in test if r.kind == "refusal" and r.label],
        max_answer_words=max_answer_words,
    )


def judge_held_out(judge: Any, data: HeldOut) -> list[Any]:
    """The judge's verdicts on every held-out row (harm rows first, then refusals)."""
    return judge.judge([r.objective for r in data.rows], data.answers())


def summarise(judge_name: str, data: HeldOut, verdicts: Sequence[Any]) -> dict[str, Any]:
    """The validation report of ``verdicts`` on ``data`` (the keys of :func:`validate_judge`)."""
    harm = data.harm
    hv, rv = verdicts[: len(harm)], verdicts[len(harm) :]
    labels = [r.label for r in harm]
    predicted = [v.harmful for v in hv]
    scores = [v.score for v in hv]
    positives = sum(labels)
    negatives = len(labels) - positives
    correct = sum(p == y for p, y in zip(predicted, labels, strict=True))
    false_pos = sum(p and not y for p, y in zip(predicted, labels, strict=True))
    false_neg = sum(y and not p for p, y in zip(predicted, labels, strict=True))
    refusals_flagged = sum(v.harmful for v in rv)
    report: dict[str, Any] = {"judge": judge_name}
    if data.max_answer_words is not None:
        report["max_answer_words"] = data.max_answer_words
    return {
        **report,
        "n": len(harm),
        "harmful_share": positives / len(harm) if harm else float("nan"),
        "accuracy": correct / len(harm) if harm else float("nan"),
        "accuracy_ci": _wilson(correct, len(harm)),
        "auc": _auc(labels, scores),
        "auc_ci": auc_interval(labels, scores),
        "false_positive_rate": false_pos / negatives if negatives else float("nan"),
        "false_positive_rate_ci": _wilson(false_pos, negatives),
        "false_negative_rate": false_neg / positives if positives else float("nan"),
        "false_negative_rate_ci": _wilson(false_neg, positives),
        "n_refusals": len(rv),
        "refusal_false_positive_rate": refusals_flagged / len(rv) if rv else float("nan"),
        "refusal_false_positive_rate_ci": _wilson(refusals_flagged, len(rv)),
    }


def validate_judge(
    judge: Any, root: Path | None = None, max_answer_words: int | None = None
) -> dict[str, Any]:
    """How well ``judge`` matches held-out human labels that no fitted judge trained on.

    ``accuracy``, ``auc`` (of the judge's harm score), ``false_positive_rate`` (harmless answers
    flagged) and ``false_negative_rate`` (harmful answers missed) are on the held-out harm /
    objective rows; ``refusal_false_positive_rate`` is the share of held-out human-labelled refusals
    the judge calls harmful (a harmful score that counts refusals measures nothing). Each has its
    95% interval beside it (``*_ci``): Wilson for the rates, a BCa bootstrap for the AUC.
    ``max_answer_words`` cuts every answer to its first words, to see the judge on answers as short
    as a small ``max_new_tokens`` makes them (labels are kept).
    """
    data = held_out(root, max_answer_words)
    return summarise(getattr(judge, "name", type(judge).__name__), data, judge_held_out(judge, data))


def paired_difference(data: HeldOut, first: Sequence[Any], second: Sequence[Any]) -> dict[str, Any]:
    """Accuracy and AUC of one judge minus another's on the same held-out answers, with 95% paired
    BCa bootstrap intervals (answers resampled together, so their shared difficulty cancels and a
    real difference shows with fewer answers than two separate intervals need)."""
    n = len(data.harm)
    labels = np.array([r.label for r in data.harm], dtype=bool)
    right_a = (np.array([v.harmful for v in first[:n]], dtype=bool) == labels).astype(float)
    right_b = (np.array([v.harmful for v in second[:n]], dtype=bool) == labels).astype(float)
    score_a = np.array([v.score for v in first[:n]], dtype=float)
    score_b = np.array([v.score for v in second[:n]], dtype=float)

    def accuracy_gap(y: Any, a: Any, b: Any, axis: int = -1) -> Any:
        return a.mean(axis=axis) - b.mean(axis=axis)

    def auc_gap(y: Any, a: Any, b: Any, axis: int = -1) -> Any:
        return auc_of(y, a, axis) - auc_of(y, b, axis)

    return {
        "accuracy_diff": float(right_a.mean() - right_b.mean()) if n else float("nan"),
        "accuracy_diff_ci": _bootstrap((labels, right_a, right_b), accuracy_gap),
        "auc_diff": _auc(list(labels), list(score_a)) - _auc(list(labels), list(score_b)),
        "auc_diff_ci": _bootstrap((labels, score_a, score_b), auc_gap),
    }
