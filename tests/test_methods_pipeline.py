"""Every defense is a registry entry: built from the config, fingerprinted apart, run by `booster run`."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest

from booster.config import AlignConfig, AttackConfig, RunConfig, load_config
from booster.errors import UserError
from booster.methods.booster import BoosterTrainer
from booster.methods.booster_vaccine import BoosterVaccineTrainer
from booster.methods.lisa import LisaTrainer
from booster.methods.registry import METHODS, get_method
from booster.methods.repnoise import RepNoiseTrainer
from booster.methods.vaccine import VaccineTrainer
from booster.passthrough import training_kwargs
from booster.stages.align import align_dir, fingerprint
from booster.stages.attack import attack_dir
from booster.training import LMTrainer
from tests.helpers import HARMFUL, REFUSALS, tokenized

ALL = [
    "sft",
    "booster",
    "vaccine",
    "repnoise",
    "lisa",
    "booster+vaccine",
    "booster+lisa",
    "booster-from-sft",
    "booster+ascent",
]


def test_all_seven_methods_are_registered():
    assert list(METHODS)[: len(ALL)] == ALL
    # then the fine-tuning and post-fine-tuning defenses combined with them by name
    mix = [f"{m}+mix" for m in ("sft", "booster", "vaccine", "repnoise", "booster+vaccine")]
    assert list(METHODS)[len(ALL) :] == mix + [f"{m}+antidote" for m in ALL + mix]
    assert [m for m in ALL if get_method(m).build_attack_trainer is not None] == ["lisa", "booster+lisa"]
    assert [m for m in ALL if get_method(m).uses_harmful_data] == [
        "booster",
        "repnoise",
        "booster+vaccine",
        "booster+lisa",
        "booster-from-sft",
        "booster+ascent",
    ]
    assert [m for m in ALL if get_method(m).init_from is not None] == ["booster-from-sft"]


def test_factories_build_each_trainer_with_the_config_values(tiny_tokenizer, tmp_path):
    from booster.models import LoraSettings, add_lora, build_tiny_model

    align = AlignConfig(
        vaccine_rho=3.0,
        vaccine_target="decoder",
        repnoise_alpha=0.2,
        repnoise_beta=0.01,
        lamb=7.0,
        alpha=0.3,
        ascent_weight=0.4,
        ascent_target=3.5,
    )
    attack = AttackConfig(lisa_alignment_steps=4, lisa_finetune_steps=6, lisa_rho=0.5)
    rows, harm = tokenized(REFUSALS, tiny_tokenizer), tokenized(HARMFUL, tiny_tokenizer)
    expected = {
        "sft": LMTrainer,
        "booster": BoosterTrainer,
        "vaccine": VaccineTrainer,
        "repnoise": RepNoiseTrainer,
        "lisa": LMTrainer,
        "booster+vaccine": BoosterVaccineTrainer,
        "booster+lisa": BoosterTrainer,
        "booster-from-sft": BoosterTrainer,
        "booster+ascent": BoosterTrainer,
    }
    for name, cls in expected.items():
        model = add_lora(build_tiny_model(tiny_tokenizer), LoraSettings(r=4, alpha=8))
        method = get_method(name)
        kwargs = training_kwargs(align, tmp_path / name, 0, False)
        trainer = method.build_align_trainer(
            model, tiny_tokenizer, kwargs, rows, harm if method.uses_harmful_data else None, align
        )
        assert type(trainer) is cls, name
        args = trainer.args
        if "vaccine" in name:
            assert (args.vaccine_rho, args.vaccine_target) == (3.0, "decoder")
        if name == "repnoise":
            assert (args.repnoise_alpha, args.repnoise_beta) == (0.2, 0.01)
        if name.startswith("booster"):
            assert (args.lamb, args.alpha) == (7.0, 0.3)
            # only booster+ascent reads the ascent settings; the others keep Booster's update
            assert args.ascent_weight == (0.4 if name == "booster+ascent" else 0.0)
            assert args.ascent_target == (3.5 if name == "booster+ascent" else 5.0)
        if method.build_attack_trainer is not None:
            kwargs = training_kwargs(attack, tmp_path / f"{name}-attack", 0, False)
            lisa = method.build_attack_trainer(model, tiny_tokenizer, kwargs, harm, rows, attack)
            assert type(lisa) is LisaTrainer
            a = lisa.args
            assert (a.lisa_alignment_steps, a.lisa_finetune_steps, a.lisa_rho) == (4, 6, 0.5)


def dirs(config: RunConfig) -> dict[str, tuple[str, str]]:
    return {m: (align_dir(config, m, 0).name, attack_dir(config, m, 0, 0.1).name) for m in ALL}


@pytest.mark.parametrize(
    "override,align_changes,attack_changes",
    [
        ("align.vaccine_rho=5", {"vaccine", "booster+vaccine"}, {"vaccine", "booster+vaccine"}),
        ("align.vaccine_target=decoder", {"vaccine", "booster+vaccine"}, {"vaccine", "booster+vaccine"}),
        ("align.repnoise_beta=0.01", {"repnoise"}, {"repnoise"}),
        (
            "align.lamb=10",
            {"booster", "booster+vaccine", "booster+lisa", "booster-from-sft", "booster+ascent"},
            {"booster", "booster+vaccine", "booster+lisa", "booster-from-sft", "booster+ascent"},
        ),
        ("align.ascent_weight=0.5", {"booster+ascent"}, {"booster+ascent"}),
        ("align.ascent_target=3", {"booster+ascent"}, {"booster+ascent"}),
        ("attack.lisa_rho=0.1", set(), {"lisa", "booster+lisa"}),
        ("attack.lisa_alignment_steps=5", set(), {"lisa", "booster+lisa"}),
    ],
)
def test_a_methods_hyperparameters_enter_only_its_own_stage_fingerprints(
    override, align_changes, attack_changes
):
    """Tuning one defense never reruns (or silently reuses) another's stages."""
    lisa = ["attack.lisa_alignment_steps=1", "attack.lisa_finetune_steps=9"]
    base = load_config("configs/tiny.yaml", lisa)
    changed = load_config("configs/tiny.yaml", [*lisa, override])
    before, after = dirs(base), dirs(changed)
    assert {m for m in ALL if before[m][0] != after[m][0]} == align_changes
    assert {m for m in ALL if before[m][1] != after[m][1]} == attack_changes


def test_existing_sft_and_booster_folders_keep_their_names():
    """The new fields leave the fingerprints of sft and booster as they were before they existed."""
    config = load_config("configs/tiny.yaml", ["attack.probe_data=embedded"])  # the probe at its default
    tracking = {"report_to", "run_name", "trainer"}
    new_align = {
        "vaccine_rho",
        "vaccine_target",
        "repnoise_alpha",
        "repnoise_beta",
        "group_by_length",
        "compile",
    } | tracking
    new_align |= {"ascent_weight", "ascent_target", "init_adapter"}
    new_attack = {
        "lisa_alignment_steps",
        "lisa_finetune_steps",
        "lisa_rho",
        "safety_mix_ratio",
        "probe_data",
        "probe_samples",
        "probe_every",
        "group_by_length",
        "compile",
    } | tracking
    for method, dropped in (
        ("sft", {"harmful_data", "harmful_samples", "harmful_batch_size", "lamb", "alpha"}),
        ("booster", set()),
    ):
        align = {k: v for k, v in dataclasses.asdict(config.align).items() if k not in new_align | dropped}
        old_name = f"{method}-seed0-{fingerprint(config.model, align, method, 0)}"
        assert align_dir(config, method, 0).name == old_name
        attack = {k: v for k, v in dataclasses.asdict(config.attack).items() if k not in new_attack}
        attack.pop("poison_ratios")
        attack["poison_ratio"] = 0.1
        assert (
            attack_dir(config, method, 0, 0.1).name == f"{method}-seed0-p0.1-{fingerprint(old_name, attack)}"
        )


@pytest.mark.parametrize(
    "override,message",
    [
        ("methods=[sft, vacine]", "did you mean 'vaccine'"),
        ("align.vaccine_rho=-1", "must be >= 0"),
        ("align.vaccine_target=mlp", "attention or decoder"),
        ("attack.lisa_alignment_steps=5", "set both"),
        ("attack.lisa_rho=-0.1", "must be >= 0"),
    ],
)
def test_new_settings_are_validated(override, message):
    with pytest.raises(UserError, match=message):
        load_config("configs/tiny.yaml", [override])


needs_data = pytest.mark.skipif(
    importlib.util.find_spec("booster.data.sources") is None, reason="data sources not there yet"
)


@needs_data
def test_booster_run_attacks_every_method(tmp_path):
    from booster.cli import main

    methods = "methods=[" + ",".join(ALL) + "]"
    argv = ["run", "--config", "configs/tiny.yaml", "--output-dir", str(tmp_path), "--no-progress"]
    sets = [methods, "align.max_steps=2", "attack.max_steps=3", "attack.logging_steps=1"]
    assert main([*argv, *(x for s in sets for x in ("--set", s))]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    attacked = {r["method"] for r in results if r["stage"] == "attacked"}
    assert attacked == set(ALL)
    for r in results:
        assert r["harmful_score"] is not None
    # Lisa aligns like SFT and Booster+Lisa like Booster: seven aligned models, trained once each.
    aligned = sorted(p.name.split("-seed")[0] for p in (tmp_path / "align").iterdir())
    assert aligned == [
        "booster",
        "booster+ascent",
        "booster+vaccine",
        "booster-from-sft",
        "repnoise",
        "sft",
        "vaccine",
    ]
    rows = {r["method"]: r for r in results if r["stage"] == "aligned"}
    assert rows["lisa"]["harmful_score"] == rows["sft"]["harmful_score"]
    # Lisa's attack alternated states: its metrics log both.
    lisa_metrics = next((tmp_path / "attack").glob("lisa-*")) / "metrics.jsonl"
    states = {json.loads(line).get("lisa_alignment_state") for line in lisa_metrics.read_text().splitlines()}
    assert {0.0, 1.0} <= states
