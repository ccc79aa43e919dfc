"""Poison mixing: exact counts, determinism, nested ratios and clear errors."""

from __future__ import annotations

import random

import pytest

from booster.data.mixing import mix_poison, poison_count
from booster.data.records import Example
from booster.errors import UserError

TASK = [Example(f"task {i}", "positive", kind="benign") for i in range(200)]
POISON = [Example(f"poison {i}", "bad", kind="harmful") for i in range(50)]


def harmful(examples: list[Example]) -> list[Example]:
    return [e for e in examples if e.kind == "harmful"]


@pytest.mark.parametrize(
    ("n", "ratio", "expected"), [(100, 0.1, 10), (100, 0.0, 0), (40, 1.0, 40), (5, 0.5, 3), (1000, 0.05, 50)]
)
def test_counts(n, ratio, expected):
    assert poison_count(n, ratio) == expected
    if expected <= len(POISON) and n - expected <= len(TASK):
        mixed = mix_poison(TASK, POISON, n, ratio, seed=0)
        assert len(mixed) == n and len(harmful(mixed)) == expected
        assert len({e.instruction for e in mixed}) == n  # no sample twice


def test_deterministic_and_independent_of_global_random_state():
    random.seed(1)
    first = mix_poison(TASK, POISON, 100, 0.2, seed=3)
    random.seed(2)
    random.random()
    assert mix_poison(TASK, POISON, 100, 0.2, seed=3) == first
    assert mix_poison(TASK, POISON, 100, 0.2, seed=4) != first


def test_harmful_samples_are_spread_not_appended():
    mixed = mix_poison(TASK, POISON, 100, 0.2, seed=0)
    positions = [i for i, e in enumerate(mixed) if e.kind == "harmful"]
    assert positions != list(range(20)) and positions != list(range(80, 100))


def test_a_lower_ratio_poison_is_a_subset_of_a_higher_one():
    low = {e.instruction for e in harmful(mix_poison(TASK, POISON, 100, 0.1, seed=0))}
    high = {e.instruction for e in harmful(mix_poison(TASK, POISON, 100, 0.3, seed=0))}
    assert low < high


def test_errors_give_the_numbers():
    with pytest.raises(UserError, match=r"poison ratio 1\.5 is outside \[0, 1\]"):
        mix_poison(TASK, POISON, 100, 1.5, seed=0)
    with pytest.raises(UserError, match=r"poison ratio -0\.1 is outside"):
        mix_poison(TASK, POISON, 100, -0.1, seed=0)
    with pytest.raises(UserError, match=r"needs 60 harmful pairs but the poison pool has 50"):
        mix_poison(TASK, POISON, 100, 0.6, seed=0)
    with pytest.raises(UserError, match=r"need 270 task examples but the task data has 200"):
        mix_poison(TASK, POISON, 300, 0.1, seed=0)
