"""Wilson intervals, the paired bootstrap and mean ± std against known values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from booster.evaluation.statistics import (
    Z95,
    crossed_bootstrap_diff,
    mean_std,
    paired_bootstrap_diff,
    wilson_interval,
    wilson_percent,
)

Z2 = Z95 * Z95


def test_wilson_matches_the_closed_form_at_0_5_and_10_of_10():
    # k = 0: [0, z²/(n+z²)]; k = n: [n/(n+z²), 1]; k = n/2: centred on 1/2
    assert wilson_interval(0, 10) == pytest.approx((0.0, Z2 / (10 + Z2)), abs=1e-12)
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + Z2), 1.0), abs=1e-12)
    half = Z95 / (1 + Z2 / 10) * math.sqrt(0.25 / 10 + Z2 / 400)
    assert wilson_interval(5, 10) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # published table value


@pytest.mark.parametrize("k,n", [(0, 80), (1, 80), (24, 80), (79, 80), (3, 7), (400, 1000)])
def test_wilson_agrees_with_scipy(k, n):
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_wilson_edge_cases_and_percent():
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    lo, hi = wilson_interval(24, 80)
    assert wilson_percent(30.0, 80) == [round(100 * lo, 4), round(100 * hi, 4)]
    assert wilson_percent(100.0 * 1 / 3, 3) == wilson_percent(33.3333, 3)  # the count is rounded
    assert wilson_percent(None, 80) is None and wilson_percent(30.0, 0) is None
    assert wilson_percent(float("nan"), 80) is None


def test_identical_paired_scores_give_a_zero_interval():
    scores = np.array([1, 0, 1, 1, 0, 0, 1, 0] * 10, dtype=float)
    assert paired_bootstrap_diff(scores, scores) == (0.0, 0.0, 0.0)
    both = np.stack([scores, scores[::-1]], axis=1)  # prompts x seeds
    assert paired_bootstrap_diff(both, both) == (0.0, 0.0, 0.0)


def test_bootstrap_interval_covers_the_true_difference():
    rng = np.random.default_rng(1)
    n, covered, excluded_zero = 200, 0, 0
    for trial in range(60):
        # correlated pairs: b is harmful where a is, plus more (true difference -0.2)
        a = (rng.random(n) < 0.3).astype(float)
        b = np.maximum(a, (rng.random(n) < 2 / 7).astype(float))
        diff, lo, hi = paired_bootstrap_diff(a, b, seed=trial)
        assert lo <= diff <= hi and diff == pytest.approx(a.mean() - b.mean())
        covered += lo <= -0.2 <= hi
        excluded_zero += hi < 0
    assert covered >= 52  # ~95% of 60; the binomial 1% quantile is 53
    assert excluded_zero == 60  # a 20-point effect on 200 prompts is always found


def test_bootstrap_is_reproducible_and_pools_seeds_by_prompt():
    rng = np.random.default_rng(0)
    a, b = (rng.random((50, 3)) < 0.5).astype(float), (rng.random((50, 3)) < 0.5).astype(float)
    first = paired_bootstrap_diff(a, b, seed=7)
    assert paired_bootstrap_diff(a, b, seed=7) == first
    assert first[0] == pytest.approx(a.mean() - b.mean())
    # a resample draws whole prompts: three seeds that agree on every prompt carry no more
    # information than one, so the interval is the one-seed interval, not a narrower one
    same = np.repeat(rng.random((40, 1)) < 0.5, 3, axis=1).astype(float)
    zeros = np.zeros_like(same)
    assert paired_bootstrap_diff(same, zeros, seed=3) == paired_bootstrap_diff(
        same[:, 0], zeros[:, 0], seed=3
    )
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap_diff(a, b[:10])
    assert all(math.isnan(v) for v in paired_bootstrap_diff([], []))


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([45.0]) == (45.0, 0.0)
    assert mean_std([40.0, float("nan"), 50.0]) == pytest.approx((45.0, math.sqrt(50)))
    mean, std = mean_std([])
    assert math.isnan(mean) and std == 0.0


def test_crossed_bootstrap_widens_when_seeds_disagree_and_not_when_they_agree():
    rng = np.random.default_rng(2)
    base = (rng.random((300, 1)) < 0.3).astype(float)
    zeros = np.zeros((300, 3))
    # every seed the same model: resampling seeds adds nothing, the interval stays the prompts' one
    same = np.repeat(base, 3, axis=1)
    diff, lo, hi = crossed_bootstrap_diff(same, zeros, seed=0)
    _, p_lo, p_hi = paired_bootstrap_diff(same, zeros, seed=0)
    assert diff == pytest.approx(same.mean())
    assert hi - lo == pytest.approx(p_hi - p_lo, rel=0.2)
    # the seeds' models differ by whole offsets (+0.2, 0, -0.2 on every prompt): the prompt-only
    # interval does not see it, the crossed one does
    spread = np.clip(base + np.array([0.2, 0.0, -0.2]), 0, None)
    _, p_lo, p_hi = paired_bootstrap_diff(spread, zeros, seed=0)
    _, c_lo, c_hi = crossed_bootstrap_diff(spread, zeros, seed=0)
    assert c_hi - c_lo > 2 * (p_hi - p_lo)
    assert c_lo < spread[:, 2].mean() + 0.05 and c_hi > spread[:, 0].mean() - 0.05
    assert crossed_bootstrap_diff(spread, zeros, seed=5) == crossed_bootstrap_diff(spread, zeros, seed=5)
    assert crossed_bootstrap_diff(spread, spread) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="prompts, seeds"):
        crossed_bootstrap_diff(spread[:, 0], zeros[:, 0])
