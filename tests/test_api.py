"""``booster.evaluate`` and ``booster.attack`` on a model in memory: the README snippet as written,
the same numbers as ``booster evaluate`` on the same model, and one-line mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import booster
from booster.cli import main
from booster.config import load_config
from booster.errors import UserError
from booster.evaluation.statistics import wilson_percent
from booster.models import build_tiny_model, build_tiny_tokenizer, load_for_evaluation
from booster.stages.align import align_dir
from booster.storage import read_done
from tests.test_python_api import README, readme_snippet

REPO = Path(__file__).resolve().parents[1]


def attack_snippet() -> str:
    section = README.read_text().split("### Attack and measure from Python", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_attack_snippet_runs_after_the_alignment_snippet(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_snippet(), str(README), "exec"), namespace)
    model = namespace["model"]
    aligned_weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    monkeypatch.chdir(REPO)  # the snippet names configs/tiny.yaml from the repository root
    exec(compile(attack_snippet(), str(README), "exec"), namespace)
    aligned, attacked = namespace["aligned"], namespace["attacked"]
    for entry in (aligned, attacked):
        assert entry["n"] == 4 and entry["judge"] == "keyword" and entry["verdict"] in ("ok", "broken")
        for key in ("harmful_score", "harmful_score_plus", "refusal_rate"):
            assert entry[f"{key}_ci"] == wilson_percent(entry[key], entry["n"])
        assert entry["task"] == "sentiment" and entry["task_samples"] == 10
        assert entry["finetune_accuracy_ci"] == wilson_percent(entry["finetune_accuracy"], 10)
    assert attacked["stage"] == "attacked" and attacked["poison_ratio"] == 0.1
    assert attacked["attack_mode"] == "single_lora" and attacked["train_steps"] == 4
    assert attacked["samples"] == 20 and attacked["harmful_samples"] == 2
    assert "probe_loss_start" in attacked and len(attacked["probe_curve"]) >= 2
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert trained.keys() == aligned_weights.keys()
    assert any(not (trained[k] == aligned_weights[k]).all() for k in trained)  # trained in place
    assert f"HS {aligned['harmful_score']:.1f}" in capsys.readouterr().out


def test_evaluate_gives_the_numbers_booster_evaluate_wrote(tmp_path):
    root = tmp_path / "run"
    common = ["--config", "configs/tiny.yaml", "--output-dir", str(root), "--no-progress", "--method", "sft"]
    assert main(["align", *common]) == 0
    assert main(["evaluate", *common]) == 0
    [entry] = json.loads((root / "results.json").read_text())
    config = load_config("configs/tiny.yaml", [f"output_dir={root}"])
    done = read_done(align_dir(config, "sft", 0))
    model, tokenizer = load_for_evaluation(config.model, done["recipe"], root, seed=0)
    answers = tmp_path / "answers.jsonl"
    got = booster.evaluate(model, tokenizer, "configs/tiny.yaml", generations=answers)
    keys = ["harmful_score", "harmful_score_ci", "harmful_score_plus", "refusal_rate", "degenerate_rate"]
    keys += ["n", "verdict", "finetune_accuracy", "finetune_accuracy_ci", "task", "judge"]
    assert {k: got[k] for k in keys} == {k: entry[k] for k in keys}
    stage_answers = next(align_dir(config, "sft", 0).glob("generations-*.jsonl")).read_text()
    assert answers.read_text() == stage_answers  # the same answers, kept where asked


def test_attack_adds_a_fresh_adapter_to_a_plain_model_and_overrides_apply():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    entry = booster.attack(
        model,
        tokenizer,
        "configs/tiny.yaml",
        overrides=["attack.poison_ratios=[0.3]", "attack.max_steps=2"],
        evaluate_after=False,
    )
    assert entry["attack_mode"] == "double_lora" and entry["train_steps"] == 2
    assert entry["poison_ratio"] == 0.3 and entry["harmful_samples"] == 6
    assert any("lora_" in name for name, _ in model.named_parameters())  # peft wrapped it in place


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"overrides": ["attack.poison_ratios=[0.1,0.2]"]}, "pass poison_ratio= to choose one"),
        ({"poison_ratio": 1.5}, "poison_ratio=1.5: a fraction between 0 and 1"),
        ({"method": "nope"}, "method='nope': unknown method"),
        ({"overrides": ["attack.learning_rat=1"]}, "learning_rate"),
    ],
)
def test_attack_mistakes_are_one_line(kwargs, needle):
    tokenizer = build_tiny_tokenizer()
    with pytest.raises(UserError) as err:
        booster.attack(build_tiny_model(tokenizer), tokenizer, "configs/tiny.yaml", **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_frozen_adapter_is_refused_with_the_fix():
    from peft import LoraConfig, get_peft_model

    tokenizer = build_tiny_tokenizer()
    model = get_peft_model(build_tiny_model(tokenizer), LoraConfig(r=4, target_modules=["q_proj"]))
    for param in model.parameters():
        param.requires_grad_(False)
    with pytest.raises(UserError, match="is_trainable=True"):
        booster.attack(model, tokenizer, "configs/tiny.yaml")
