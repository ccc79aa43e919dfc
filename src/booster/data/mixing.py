"""The attack's training data: n samples of a benign task with a share of harmful pairs (docs/method.md §2),
and the provider's refusal pairs a safety-mixing defense adds to them (§5)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from booster.data.records import Example
from booster.errors import UserError


def _first(pool: Sequence[Example], k: int, order_seed: str) -> list[Example]:
    """The first ``k`` rows of ``pool`` in the order ``order_seed`` permutes it into: the same
    permutation for every ``k``, so a larger ``k`` only adds rows to a smaller one's."""
    order = list(range(len(pool)))
    random.Random(order_seed).shuffle(order)
    return [pool[i] for i in order[:k]]


def poison_count(n: int, ratio: float) -> int:
    """Harmful samples among ``n`` at poison ratio ``ratio``: ratio * n rounded half up."""
    return math.floor(ratio * n + 0.5)


def mix_poison(
    task: Sequence[Example], poison: Sequence[Example], n: int, ratio: float, seed: int
) -> list[Example]:
    """``n`` samples: ``poison_count(n, ratio)`` harmful pairs from ``poison``, the rest from ``task``.

    Each pool is permuted once per seed and the first samples are taken, so a lower ratio's poison
    is a subset of a higher ratio's (a ratio sweep changes only what it should). The mix is then
    shuffled, so harmful samples are spread through training. Private ``random.Random``
    instances keep this independent of any global random state.
    """
    if not 0.0 <= ratio <= 1.0 or math.isnan(ratio):
        raise UserError(f"poison ratio {ratio} is outside [0, 1]; use e.g. 0.1 for 10% harmful samples")
    if n < 0:
        raise UserError(f"attack sample count {n} is negative; use a positive number such as 1000")
    n_poison = poison_count(n, ratio)
    n_benign = n - n_poison
    if n_poison > len(poison):
        raise UserError(
            f"poison ratio {ratio} of {n} samples needs {n_poison} harmful pairs but the poison pool has "
            f"{len(poison)}; lower the ratio or the sample count, or use a larger poison set"
        )
    if n_benign > len(task):
        raise UserError(
            f"{n} samples at poison ratio {ratio} need {n_benign} task examples but the task data has "
            f"{len(task)}; lower the sample count or use a larger task set"
        )
    mixed = _first(poison, n_poison, f"poison:{seed}") + _first(task, n_benign, f"task:{seed}")
    random.Random(f"mix:{seed}").shuffle(mixed)
    return mixed


def safety_count(n: int, ratio: float) -> int:
    """Safety rows the provider adds to ``n`` user samples at ``attack.safety_mix_ratio``:
    ratio * n rounded half up, counted on the user's samples (who keep all of theirs)."""
    return math.floor(ratio * n + 0.5)


def mix_safety(user: Sequence[Example], safety: Sequence[Example], ratio: float, seed: int) -> list[Example]:
    """The user's samples plus ``safety_count(len(user), ratio)`` refusal pairs from ``safety``.

    The provider's safety data is added, not swapped in: the user's n samples (and so the poison
    ratio p of them) stay as they are, and the fine-tuning reads n + k rows, k / (n + k) of them
    refusals. The safety pool is permuted once per seed and its first rows are taken (a higher
    ratio adds rows to a lower one's), then the whole mix is shuffled.
    """
    if not ratio >= 0.0 or math.isinf(ratio):
        raise UserError(f"attack.safety_mix_ratio {ratio} must be a number >= 0, e.g. 0.1")
    k = safety_count(len(user), ratio)
    if k > len(safety):
        raise UserError(
            f"attack.safety_mix_ratio {ratio} of {len(user)} samples needs {k} safety (refusal) pairs but "
            f"align.alignment_data has {len(safety)}; lower the ratio or use more alignment data"
        )
    mixed = list(user) + _first(safety, k, f"safety:{seed}")
    random.Random(f"safety-mix:{seed}").shuffle(mixed)
    return mixed
