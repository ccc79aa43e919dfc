"""The version of an embedded dataset enters the fingerprints of the stages that read it, above 1 only."""

from __future__ import annotations

from pathlib import Path

import pytest

from booster.config import load_config, settings_dict
from booster.data import embedded
from booster.data.sources import embedded_versions
from booster.methods.registry import method_settings
from booster.stages.align import align_dir, fingerprint
from booster.stages.attack import attack_dir
from booster.stages.evaluate import evaluation_file
from booster.stages.probe import probe_file
from booster.stages.repair import repair_dir, repair_targets

VERSIONS = ("SAFETY_DATA_VERSION", "SENTIMENT_DATA_VERSION", "MATH_DATA_VERSION", "LEGS_DATA_VERSION")
STAGE = Path("/stage")


def embedded_config(task: str = "embedded:legs"):
    """Every dataset embedded: the safety data for alignment, poison, probe and HS prompts; ``task``."""
    return load_config(None, [f"attack.task_data={task}", "output_dir=/runs"])


def names(config, method: str = "booster") -> dict[str, str | None]:
    """The folder or file name of each stage kind ``config`` runs for ``method`` (seed 0, p = 0.1)."""
    probe = probe_file(config, STAGE)
    return {
        "align": align_dir(config, method, 0).name,
        "attack": attack_dir(config, method, 0, 0.1).name,
        "repair": repair_dir(config, f"{method}+antidote", 0, 0.1).name,
        "evaluation": evaluation_file(config, STAGE, config.attack.task_data).name,
        "probe": None if probe is None else probe.name,
    }


def test_every_embedded_dataset_starts_at_version_1():
    assert [getattr(embedded, name) for name in VERSIONS] == [1, 1, 1, 1]
    assert [embedded.data_version(d) for d in ("safety", "sentiment", "gsm8k", "legs")] == [1, 1, 1, 1]


@pytest.mark.parametrize("task", ["embedded:sentiment", "embedded:math", "embedded:legs"])
def test_stage_names_at_version_1_are_the_ones_without_versions(task):
    """Built here the way the stages hashed their settings before data versions existed, so every
    finished stage keeps its folder and is reused."""
    config = embedded_config(task)
    align = method_settings(settings_dict(config.align), "booster")
    aligned = f"booster-seed0-{fingerprint(config.model, align, 'booster', 0)}"
    attack = method_settings(settings_dict(config.attack), "booster")
    attack.pop("poison_ratios")
    attack.update(mode="single_lora", poison_ratio=0.1)
    attacked = f"booster-seed0-p0.1-{fingerprint(aligned, attack)}"
    repair = {**settings_dict(config.repair), "target_modules": repair_targets(config)}
    probe = {
        "probe_data": "embedded",
        "probe_samples": config.attack.probe_samples,
        "max_length": config.attack.max_length,
        "template": config.model.template,
        "bf16": config.attack.bf16,
    }
    assert names(config) == {
        "align": aligned,
        "attack": attacked,
        "repair": f"booster+antidote-seed0-p0.1-{fingerprint(attacked, 'antidote', repair)}",
        "evaluation": f"eval-{fingerprint(settings_dict(config.evaluate), task)}.json",
        "probe": f"probe-{fingerprint(probe)}.json",
    }


@pytest.mark.parametrize(
    "version,task,changed",
    [
        # a task's data: the attack trains on it, the evaluation scores its test split; the repair
        # builds on the attack, so its name holds the attack's
        ("LEGS_DATA_VERSION", "embedded:legs", {"attack", "repair", "evaluation"}),
        ("LEGS_DATA_VERSION", "embedded:sentiment", set()),
        ("MATH_DATA_VERSION", "embedded:math", {"attack", "repair", "evaluation"}),
        ("MATH_DATA_VERSION", "embedded:legs", set()),
        ("SENTIMENT_DATA_VERSION", "embedded:sentiment", {"attack", "repair", "evaluation"}),
        ("SENTIMENT_DATA_VERSION", "embedded:math", set()),
        # the safety data: every stage reads it (alignment, poison, probe, repair's harmful pairs, HS prompts)
        ("SAFETY_DATA_VERSION", "embedded:legs", {"align", "attack", "repair", "evaluation", "probe"}),
    ],
)
def test_a_bumped_version_renames_the_stages_that_read_the_dataset_and_no_other(
    monkeypatch, version, task, changed
):
    config = embedded_config(task)
    before = names(config)
    monkeypatch.setattr(embedded, version, 2)
    after = names(config)
    assert {kind for kind in before if before[kind] != after[kind]} == changed
    for method in ("sft", "vaccine", "lisa", "sft+mix"):  # every method's stages follow the same rule
        monkeypatch.setattr(embedded, version, 1)
        old = names(config, method)
        monkeypatch.setattr(embedded, version, 2)
        new = names(config, method)
        assert {kind for kind in old if old[kind] != new[kind]} <= changed
        assert (old["attack"] != new["attack"]) == ("attack" in changed)


def test_the_safety_version_reaches_only_stages_that_read_the_safety_data(monkeypatch):
    """SFT's alignment reads the harmful set only through Booster-style methods: a config that takes
    its alignment data from files and only the harmful set from the embedded data keeps SFT's stage."""
    config = load_config(
        "configs/tiny.yaml", ["align.harmful_data=embedded", "attack.probe_data=null", "output_dir=/runs"]
    )
    before = {m: names(config, m) for m in ("sft", "booster")}
    monkeypatch.setattr(embedded, "SAFETY_DATA_VERSION", 3)
    after = {m: names(config, m) for m in ("sft", "booster")}
    assert after["sft"] == before["sft"]
    assert after["booster"]["align"] != before["booster"]["align"]
    assert after["booster"]["evaluation"] == before["booster"]["evaluation"]  # HS prompts from a file


def test_versions_are_read_from_the_spec_as_the_loader_reads_it(monkeypatch):
    monkeypatch.setattr(embedded, "LEGS_DATA_VERSION", 4)
    monkeypatch.setattr(embedded, "SAFETY_DATA_VERSION", 2)
    assert embedded_versions(" Embedded:Legs ", "EMBEDDED", None, "data/tiny/poison.jsonl", "sst2") == {
        "legs": 4,
        "safety": 2,
    }
    assert embedded_versions("embedded:math", "embedded:sentiment", "embedded:nothing") == {}
