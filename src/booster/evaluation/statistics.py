"""The uncertainty of a score: Wilson intervals, paired bootstrap differences, mean ± std over seeds.

An HS measured on 80 prompts moves by ±10 points from the prompt sample alone, so every number in a
report comes with its interval: a Wilson interval for one evaluated model (a proportion of
``n`` answers), the spread over seeds when several seeds ran, and a paired bootstrap for the
difference between two methods judged on the same prompts (pairing removes the prompts'
shared difficulty, so a real difference shows with far fewer prompts than two separate intervals).
Pure functions, no I/O.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np

#: the two-sided 95% normal quantile (``scipy.stats.norm.ppf(0.975)``).
Z95 = 1.959963984540054
#: bootstrap resamples: 2000 keeps the Monte Carlo error of a 95% bound well under a point of HS.
RESAMPLES = 2000


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (as fractions in [0, 1]).

    Unlike the normal (Wald) interval it stays inside [0, 1] and does not collapse to a point at
    0/n or n/n, where safety scores often sit. ``(nan, nan)`` when ``n`` is 0.
    """
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} outside 0..n={n}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # clamp the rounding error at the ends (0/n gives exactly 0, n/n exactly 1 in exact arithmetic)
    return max(0.0, centre - half), min(1.0, centre + half)


def wilson_percent(rate: float | None, n: int | None) -> list[float] | None:
    """The Wilson interval, in percent, of a rate given in percent of ``n`` answers.

    The count is recovered by rounding ``rate * n / 100`` (rates are stored as percentages of whole
    answers). None when the rate or ``n`` is missing, NaN or zero.
    """
    if rate is None or n is None or n <= 0 or math.isnan(rate):
        return None
    count = min(n, max(0, round(rate * n / 100.0)))
    lo, hi = wilson_interval(count, n)
    return [round(100.0 * lo, 4), round(100.0 * hi, 4)]


def paired_bootstrap_diff(
    a: Sequence | np.ndarray,
    b: Sequence | np.ndarray,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """``mean(a) - mean(b)`` and its percentile bootstrap interval, resampling paired rows.

    ``a`` and ``b`` hold per-prompt scores of two models on the same prompts, row ``i`` being
    prompt ``i``: shape ``(prompts,)``, or ``(prompts, seeds)`` to pool several seeds (a resample
    draws whole prompts, so a prompt's seeds stay together: they share the prompt's difficulty).
    The RNG is seeded, so a report is reproducible. Identical inputs give ``(0, 0, 0)``.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired scores need the same shape, got {x.shape} and {y.shape}")
    if x.shape[0] == 0:
        return float("nan"), float("nan"), float("nan")
    diff = (x - y).reshape(x.shape[0], -1).mean(axis=1)  # per prompt, over its seeds
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(diff), size=(resamples, len(diff)))
    return float(diff.mean()), *_percentile_interval(diff[rows].mean(axis=1), confidence)


def crossed_bootstrap_diff(
    a: Sequence | np.ndarray,
    b: Sequence | np.ndarray,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """``mean(a) - mean(b)`` over prompts x seeds, with an interval that also covers the seeds.

    :func:`paired_bootstrap_diff` pools seeds but resamples prompts only, so it answers "would these
    trained models differ on other prompts?". Whether the *methods* differ also depends on the
    training seed, and every seed is judged on the same prompts (a crossed design): each resample
    here draws prompts and seeds with replacement, independently, and averages the differences of
    the drawn prompt-seed cells. With a handful of seeds the seed draw is coarse (three seeds allow
    ten multisets), so read the interval with the per-seed differences beside it.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"crossed scores need the same (prompts, seeds) shape, got {x.shape} and {y.shape}")
    prompts, seeds = x.shape
    if prompts == 0 or seeds == 0:
        return float("nan"), float("nan"), float("nan")
    diff = x - y
    rng = np.random.default_rng(seed)
    # a resample's mean is sum_ij (row count_i / P) diff_ij (column count_j / S)
    rows = rng.integers(0, prompts, size=(resamples, prompts))
    cols = rng.integers(0, seeds, size=(resamples, seeds))
    row_weights = np.stack([np.bincount(r, minlength=prompts) for r in rows]) / prompts
    col_weights = np.stack([np.bincount(c, minlength=seeds) for c in cols]) / seeds
    means = np.einsum("rp,ps,rs->r", row_weights, diff, col_weights)
    return float(diff.mean()), *_percentile_interval(means, confidence)


def _percentile_interval(means: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` interval of bootstrap resample means (percentile method)."""
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return float(lo), float(hi)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1``); the std is 0 for one value, NaNs are left out.

    ``(nan, 0)`` when nothing is left.
    """
    numbers = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not numbers:
        return float("nan"), 0.0
    return statistics.fmean(numbers), (statistics.stdev(numbers) if len(numbers) > 1 else 0.0)
