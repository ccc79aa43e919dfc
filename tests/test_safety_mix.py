"""Safety data mixing (the ``+mix`` methods): the provider adds round(ratio x n) refusal pairs of its
alignment data to the user's n fine-tuning samples, which it keeps as they are."""

from __future__ import annotations

from collections import Counter

import pytest

from booster.config import load_config
from booster.data.embedded import normalize
from booster.data.mixing import mix_poison, mix_safety, safety_count
from booster.data.sources import load_alignment, load_harmful_prompts, load_poison, load_task
from booster.errors import UserError
from booster.methods.registry import METHODS, alignment_method, attack_method, get_method
from booster.plan import attack_samples
from booster.stages.align import align_dir
from booster.stages.attack import attack_dir

TINY = "configs/tiny.yaml"


@pytest.mark.parametrize(
    "n,ratio,expected",
    [(1000, 0.1, 100), (20, 0.1, 2), (25, 0.1, 3), (15, 0.1, 2), (14, 0.1, 1), (200, 0.0, 0), (10, 1.0, 10)],
)
def test_safety_count_is_the_ratio_of_the_users_samples_rounded_half_up(n, ratio, expected):
    assert safety_count(n, ratio) == expected


@pytest.fixture(scope="module")
def embedded_pools():
    task = load_task("embedded:sentiment", "train", seed=0)
    poison = load_poison("embedded", seed=0)
    safety = load_alignment("embedded", seed=0)
    tests = load_harmful_prompts("embedded", seed=0)
    return task, poison, safety, tests


def test_mixed_rows_are_refusal_pairs_of_the_safety_pool_added_to_the_users_rows(embedded_pools):
    task, poison, safety, tests = embedded_pools
    n, p, ratio = 200, 0.1, 0.1
    user = mix_poison(task, poison, n=n, ratio=p, seed=3)
    mixed = mix_safety(user, safety, ratio, seed=3)

    assert len(mixed) == n + 20  # 0.1 of the user's 200 samples added: 20 of the 220 rows
    added = Counter(mixed) - Counter(user)
    assert sum(added.values()) == 20 and max(added.values()) == 1  # 20 distinct rows
    assert Counter(mixed) - added == Counter(user)  # every user row kept, none twice
    assert sum(1 for e in mixed if e.kind == "harmful") == 20  # p stays the fraction of the user's n
    pool = set(safety)
    for row in added:
        assert row in pool and row.kind == "refusal" and row.output
    # the safety pool is disjoint from the prompts the harmful score is measured on
    test_prompts = {normalize(e.instruction) for e in tests}
    assert not {normalize(e.instruction) for e in added} & test_prompts
    assert mixed[:n] != user  # spread through the fine-tuning, not appended at its end


def test_the_mix_is_seeded_and_a_higher_ratio_adds_to_a_lower_ones(embedded_pools):
    task, poison, safety, _ = embedded_pools
    user = mix_poison(task, poison, n=100, ratio=0.1, seed=0)

    def added(ratio: float, seed: int = 0) -> set:
        return set(mix_safety(user, safety, ratio, seed)) - set(user)

    assert mix_safety(user, safety, 0.1, 0) == mix_safety(user, safety, 0.1, 0)
    assert added(0.05) < added(0.2)
    assert len(added(0.2)) == 20
    assert added(0.2, seed=1) != added(0.2)
    assert Counter(mix_safety(user, safety, 0.0, 0)) == Counter(user)  # ratio 0 adds nothing


def test_a_ratio_the_pool_cannot_fill_is_a_one_line_error(embedded_pools):
    task, poison, _, _ = embedded_pools
    user = mix_poison(task, poison, n=100, ratio=0.1, seed=0)
    small = load_alignment("configs/data/tiny/alignment.jsonl")
    with pytest.raises(UserError, match=r"attack.safety_mix_ratio 0.5 of 100 samples needs 50 .* has 12"):
        mix_safety(user, small, 0.5, seed=0)
    with pytest.raises(UserError, match="safety_mix_ratio"):
        load_config(TINY, ["attack.safety_mix_ratio=-0.1"])


def test_mix_methods_combine_with_every_alignment_method_and_share_its_alignment():
    config = load_config(TINY, ["attack.safety_mix_ratio=0.2"])
    for name in ("sft", "booster", "vaccine", "repnoise", "booster+vaccine"):
        mix = get_method(f"{name}+mix")
        assert mix.mixes_safety_data and alignment_method(mix.name) == name
        assert align_dir(config, mix.name, 0) == align_dir(config, name, 0)
        assert attack_dir(config, mix.name, 0, 0.1) != attack_dir(config, name, 0, 0.1)
        assert attack_method(mix.name) == mix.name
        assert attack_samples(config, mix.name) == 24 and attack_samples(config, name) == 20
    assert "lisa+mix" not in METHODS  # one fine-tuning-stage defense at a time


def test_the_ratio_enters_only_the_mix_methods_attack_folders():
    base, changed = load_config(TINY), load_config(TINY, ["attack.safety_mix_ratio=0.3"])
    for method in METHODS:
        moved = attack_dir(base, method, 0, 0.1) != attack_dir(changed, method, 0, 0.1)
        assert moved == get_method(method).mixes_safety_data, method
