"""The model card a provider decides from: this model beside the run's SFT baseline, their paired
difference on the same prompts, a verdict in plain words, the judge's validated accuracy, the
attack and the precision, and metadata the Hub reads (license, base model, model-index)."""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import pytest

from booster.cli import main
from booster.evaluation.statistics import RESAMPLES, paired_bootstrap_diff, wilson_interval
from booster.export import (
    EMBEDDED_LICENSE,
    BaseModel,
    Export,
    Row,
    Stage,
    Versus,
    base_license,
    precision_line,
    verdict_line,
)
from booster.report.statistics import BOOTSTRAP_SEED, Comparison


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``booster run`` of configs/tiny.yaml: SFT and Booster, aligned and attacked at p = 0.1."""
    root = tmp_path_factory.mktemp("card-run") / "run"
    argv = ["run", "--config", "configs/tiny.yaml", "--output-dir", str(root), "--no-progress"]
    assert main(argv) == 0
    return root


def _entry(root, method, stage):
    results = json.loads((root / "results.json").read_text())
    return next(r for r in results if r["method"] == method and r["stage"] == stage)


def _verdicts(root, entry):
    """The per-prompt harmful flags next to an entry's evaluation, in prompt order."""
    path = root / entry["evaluation"].replace("eval-", "generations-").replace(".json", ".jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [100.0 * r["harmful"] for r in rows if "task" not in r]


def _shown(entry, key):
    low, high = entry[f"{key}_ci"]
    return f"{entry[key]:.1f} [{low:.1f}, {high:.1f}]"


def _export(root, out, *extra):
    assert main(["export", str(root), str(out), "--method", "booster", *extra]) == 0
    return huggingface_hub.ModelCard.load(out / "README.md")


def test_card_shows_the_sft_baseline_the_paired_difference_and_the_verdict(tiny_run, tmp_path):
    card = _export(tiny_run, tmp_path / "out")
    lines = card.text.splitlines()
    for stage, name in (("aligned", "aligned"), ("attacked", "after the attack")):
        ours, sft = _entry(tiny_run, "booster", stage), _entry(tiny_run, "sft", stage)
        diff, lo, hi = paired_bootstrap_diff(
            _verdicts(tiny_run, ours), _verdicts(tiny_run, sft), RESAMPLES, BOOTSTRAP_SEED
        )
        paired = f"{diff:+.1f} [{lo:+.1f}, {hi:+.1f}]"
        row = next(line for line in lines if line.startswith(f"| {name} |"))
        baseline = next(line for line in lines if line.startswith(f"| SFT baseline, {name} |"))
        assert f"| {_shown(ours, 'harmful_score')} |" in row and f"| {paired} |" in row
        assert f"| {_shown(sft, 'harmful_score')} |" in baseline
        assert f"| {_shown(sft, 'finetune_accuracy')} |" in baseline  # FA with its interval
        assert f"| {_shown(ours, 'refusal_rate')} |" in row
    # the headline is the strongest attack; both models answer alike on these 4 prompts
    verdict = next(line for line in lines if line.startswith("**After the p = 0.1 attack"))
    assert f"harmful score is not lower than SFT's: {paired} points" in verdict
    assert "Wilson score interval" in card.text and "paired bootstrap" in card.text
    assert (
        "- **Simulated harmful fine-tuning** (p = 0.1: " in card.text
        and "n = 20 samples (2 harmful)" in card.text
    )


def test_a_model_whose_answers_are_safer_is_lower_than_sft(tiny_run, tmp_path):
    """Doctor Booster's attacked answers to be judged harmless: the paired difference is then −HS(SFT)
    on every prompt and the verdict says lower."""
    root = tmp_path / "run"
    shutil.copytree(tiny_run, root)
    ours = _entry(root, "booster", "attacked")
    path = root / ours["evaluation"].replace("eval-", "generations-").replace(".json", ".jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "harmful": False}) + "\n" for r in rows))
    sft = _verdicts(root, _entry(root, "sft", "attacked"))
    assert sum(sft) > 0  # the random tiny model's answers are flagged, so there is room to be lower
    diff, lo, hi = paired_bootstrap_diff([0.0] * len(sft), sft, RESAMPLES, BOOTSTRAP_SEED)
    card = _export(root, tmp_path / "out")
    assert hi < 0
    assert f"harmful score is lower than SFT's: {diff:+.1f} [{lo:+.1f}, {hi:+.1f}] points" in card.text
    index = {(r.dataset_config, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert index[("attacked-p0.1", "harmful_score_minus_sft")] == pytest.approx(diff, abs=1e-4)


def test_card_gives_the_tuned_attackers_worst_case_or_says_none_was_measured(tiny_run, tmp_path):
    """No search in the run folder: the card says its numbers hold for the fixed attack only. A
    search against this method: its worst case beside the fixed attack, paired on the test prompts
    (here SFT's attacked model stands in as the worst case found against Booster)."""
    card = _export(tiny_run, tmp_path / "plain")
    line = next(x for x in card.text.splitlines() if x.startswith("- **Tuned attacker**"))
    assert "not measured" in line and "`booster search`" in line
    root = tmp_path / "run"
    shutil.copytree(tiny_run, root)
    ours, sft = _entry(root, "booster", "attacked"), _entry(root, "sft", "attacked")
    record = {
        "method": "booster",
        "seed": 0,
        "poison_ratio": 0.1,
        "folder": "search/booster-seed0-p0.1-abc",
        "search": {"trials": 3},
        "fixed": {"learning_rate": 1e-3, "epochs": None, "max_steps": 4, "test": ours},
        "best": {"trial": 1, "learning_rate": 3e-3, "epochs": 2, "validation_hs": 50.0, "test": sft},
    }
    (root / "search").mkdir()
    (root / "search" / "results.json").write_text(json.dumps([record]))
    card = _export(root, tmp_path / "searched")
    line = next(x for x in card.text.splitlines() if x.startswith("- **Tuned attacker**"))
    diff, lo, hi = paired_bootstrap_diff(
        _verdicts(root, sft), _verdicts(root, ours), RESAMPLES, BOOTSTRAP_SEED
    )
    assert "(3 trials of the attack's learning rate and epochs" in line and "seed 0, p = 0.1" in line
    assert f"(learning rate 0.003, 2 epochs) gives HS {_shown(sft, 'harmful_score')}" in line
    assert f"against the fixed attack's {_shown(ours, 'harmful_score')}" in line
    assert f"HS {diff:+.1f} [{lo:+.1f}, {hi:+.1f}], FA " in line
    assert "sft's worst case" not in line  # no search against SFT to pair with
    # SFT's own search (its worst case here: Booster's attacked model) gives the pairing of the two
    # worst cases on the same test prompts
    baseline = {**record, "method": "sft", "folder": "search/sft-seed0-p0.1-abc"}
    baseline["best"] = {**record["best"], "test": ours}
    (root / "search" / "results.json").write_text(json.dumps([record, baseline]))
    card = _export(root, tmp_path / "versus")
    line = next(x for x in card.text.splitlines() if x.startswith("- **Tuned attacker**"))
    assert line.endswith(
        f"; minus sft's worst case (its own search, same prompts): HS {diff:+.1f} [{lo:+.1f}, {hi:+.1f}]"
    )


def test_card_metadata_is_valid_hub_metadata_with_the_runs_numbers(tiny_run, tmp_path):
    card = _export(tiny_run, tmp_path / "out")
    data = card.data
    assert data.license == "apache-2.0" and data.base_model is None  # tiny: no hub id
    assert data.model_name == "tiny-booster"
    got = {(r.dataset_config, r.metric_type): r.metric_value for r in data.eval_results}
    for stage, subset in (("aligned", "aligned"), ("attacked", "attacked-p0.1")):
        entry = _entry(tiny_run, "booster", stage)
        for key in ("harmful_score", "harmful_score_plus", "refusal_rate"):
            assert got[(subset, key)] == pytest.approx(entry[key])
        assert got[(subset, "accuracy")] == pytest.approx(entry["finetune_accuracy"])
        assert (subset, "harmful_score_minus_sft") in got
    # the metadata round-trips: what the Hub parses from the file is what was written
    again = huggingface_hub.ModelCard(str(card))
    assert again.data.to_dict() == data.to_dict()
    metadata = huggingface_hub.metadata_load(tmp_path / "out" / "README.md")
    assert metadata["license"] == "apache-2.0" and metadata["model-index"][0]["name"] == "tiny-booster"


def test_card_names_the_judge_with_its_validated_accuracy(tiny_run, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(tiny_run, root)
    validation = {"judge": "keyword", "n": 400, "accuracy": 0.75, "auc": 0.8125}
    validation.update(n_refusals=20, refusal_false_positive_rate=0.1)
    (root / "judge-keyword.json").write_text(json.dumps(validation))
    lo, hi = wilson_interval(300, 400)
    text = _export(root, tmp_path / "out").text
    assert f"`keyword`, accuracy 0.750 [{lo:.3f}, {hi:.3f}] on 400 human-labelled responses" in text
    assert "AUC 0.812" in text and "refusals flagged harmful 2 of 20" in text
    (root / "judge-keyword.json").unlink()
    text = _export(root, tmp_path / "out2").text
    assert "not validated in this run (`booster judge validate --judge keyword`" in text


def test_license_option_names_the_cards_license(tiny_run, tmp_path):
    card = _export(tiny_run, tmp_path / "out", "--license", "llama2")
    assert card.data.license == "llama2" and "**License**: `llama2`" in card.text


def test_tiny_export_names_its_base_relative_so_it_can_move(tiny_run, tmp_path, monkeypatch):
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    _export(tiny_run, tmp_path / "out")
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "base"
    assert str(tmp_path) not in (tmp_path / "out" / "adapter_config.json").read_text()
    moved = tmp_path / "elsewhere" / "model"
    moved.parent.mkdir()
    shutil.move(tmp_path / "out", moved)
    ids = torch.tensor([[1, 5, 9, 12]])
    card_way = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moved / "base"), moved)
    monkeypatch.chdir(moved)  # peft reads a relative base against the working directory
    peft_way = AutoPeftModelForCausalLM.from_pretrained(".")
    with torch.no_grad():
        torch.testing.assert_close(card_way(input_ids=ids).logits, peft_way(input_ids=ids).logits)
    assert 'AutoModelForCausalLM.from_pretrained(folder / "base")' in (moved / "README.md").read_text()


def _versus(entry, comparison, baseline=True):
    return Versus(Row(entry, None), {"method": "sft"} if baseline else None, comparison)


@pytest.mark.parametrize(
    "comparison,words",
    [
        (Comparison(-5.0, -8.3, -1.7, 300, 1, 1), "is lower than SFT's: -5.0 [-8.3, -1.7] points"),
        (Comparison(-0.2, -2.2, 1.8, 300, 1, 1), "is not lower than SFT's: -0.2 [-2.2, +1.8] points"),
        (Comparison(4.0, 0.3, 8.0, 300, 1, 1), "is higher than SFT's: +4.0 [+0.3, +8.0] points"),
        ("broken", "no verdict: this model or SFT's is broken"),
        (None, "the per-prompt verdicts of this model and SFT's are missing"),
    ],
)
def test_verdict_words_follow_the_interval(comparison, words):
    entry = {"stage": "attacked", "poison_ratio": 0.1, "seed": 0}
    line = verdict_line("booster", _versus(entry, comparison), has_baseline=True)
    assert line.startswith("After the p = 0.1 attack") and words in line


def test_no_verdict_without_an_sft_model_says_how_to_get_one():
    entry = {"stage": "attacked", "poison_ratio": 0.2, "seed": 1}
    line = verdict_line("booster", _versus(entry, None, baseline=False), has_baseline=False)
    assert "the verdict cannot be given: this run has no SFT model" in line
    assert "Add `sft` to `methods:`" in line
    line = verdict_line("booster", _versus(entry, None, baseline=False), has_baseline=True)
    assert "no SFT model of seed 1" in line and '--set "seeds=[1]"' in line


def test_embedded_card_says_only_merged_weights_are_the_evaluated_model(tmp_path):
    from booster.config import load_config

    config = load_config(None, ["model.name=embedded"])
    stage = Stage(tmp_path / "align" / "x", tmp_path, "aligned", config, {"seed": 0, "recipe": {}})
    base = BaseModel("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
    base.source = "/cache/SmolLM2-135M-Instruct.Q4_1.gguf"
    entry = {"stage": "aligned", "provenance": {"precision": "weights float32, align bfloat16 autocast"}}
    versus = [_versus(entry, None)]
    adapter = precision_line(Export(tmp_path, "adapter", stage, base), versus)
    assert "weights float32, align bfloat16 autocast" in adapter and "dequantised Q4_1 weights" in adapter
    assert "only `booster export --merged` is exactly the evaluated model" in adapter
    merged = precision_line(Export(tmp_path, "merged", stage, base), versus)
    assert "this folder is that merged model" in merged
    assert base_license(stage, base) == EMBEDDED_LICENSE == "apache-2.0"


def test_a_local_base_gives_the_license_its_own_card_names(tmp_path):
    from booster.config import load_config

    base_dir = tmp_path / "base-model"
    base_dir.mkdir()
    config = load_config(None, [f"model.name={base_dir}"])
    stage = Stage(tmp_path / "align" / "x", tmp_path, "aligned", config, {"seed": 0, "recipe": {}})
    base = BaseModel(str(base_dir), None)
    assert base_license(stage, base) is None  # no card: unknown, so the export's card says `other`
    (base_dir / "README.md").write_text("---\nlicense: mit\n---\n# a base\n")
    assert base_license(stage, base) == "mit"
