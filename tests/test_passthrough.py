"""Tracking and pass-through settings: report_to / run_name, align|attack.trainer -> TrainingArguments,
model.lora.extra -> peft's LoraConfig; checked at load time, outside (or only when set in) the
stage fingerprints."""

from __future__ import annotations

import json

import pytest
from transformers import TrainingArguments

from booster.cli import main
from booster.config import load_config
from booster.passthrough import training_kwargs
from booster.stages.align import align_dir, run_align
from booster.stages.attack import attack_dir

TINY = "configs/tiny.yaml"


@pytest.mark.parametrize(
    "override,needle",
    [
        (
            "align.trainer={adam_beta3: 0.9}",
            "unknown key 'align.trainer.adam_beta3'; did you mean 'align.trainer.adam_beta2'?",
        ),
        (
            "attack.trainer={learning_rate: 0.1}",
            "attack.trainer.learning_rate: booster sets it from attack.learning_rate; set attack.learning_rate instead",
        ),
        ("align.trainer={num_train_epochs: 3}", "set align.epochs instead"),
        ("align.trainer={fp16: true}", "set align.bf16 instead"),
        ("align.trainer={output_dir: x}", "set output_dir (or --output-dir) instead"),
        ("align.trainer={adam_beta2: abc}", "align.trainer.adam_beta2 must be a number, got 'abc'"),
        ("align.trainer={torch_empty_cache_steps: 0}", "align.trainer: transformers refuses these settings"),
        ("align.trainer=[1]", "align.trainer must be a mapping"),
        (
            "model.lora.extra={lora_alpha: 8}",
            "model.lora.extra.lora_alpha: booster sets it; set model.lora.alpha instead",
        ),
        (
            "model.lora.extra={use_rslra: true}",
            "unknown key 'model.lora.extra.use_rslra'; did you mean 'model.lora.extra.use_rslora'?",
        ),
        ("model.lora.extra={layers_pattern: layers}", "model.lora.extra: peft refuses these settings"),
        ("align.report_to=tensorbord", "align.report_to has 'tensorbord'; did you mean 'tensorboard'?"),
        ("align.run_name=[a, b]", "align.run_name must be a string or null"),
    ],
)
def test_pass_through_mistakes_are_one_line(capsys, override, needle):
    assert main(["align", "--config", TINY, "--set", override]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_tracker_that_is_not_installed_names_its_package(capsys):
    from transformers.integrations import integration_utils

    from booster.passthrough import TRACKER_PACKAGES

    missing = [
        (n, p) for n, (check, p) in TRACKER_PACKAGES.items() if not getattr(integration_utils, check)()
    ]
    if not missing:
        pytest.skip("every tracker transformers knows is installed here")
    name, package = missing[0]
    assert main(["attack", "--config", TINY, "--set", f"attack.report_to=[{name}]"]) == 2
    err = capsys.readouterr().err
    assert f"attack.report_to: {name} is not installed; pip install {package}" in err and err.count("\n") == 1


def test_new_settings_keep_the_stage_folders_of_earlier_runs():
    config = load_config(TINY)
    # the folder names runs got before these settings existed
    assert align_dir(config, "booster", 0).name == "booster-seed0-e59d77fd"
    assert attack_dir(config, "booster", 0, 0.1).name == "booster-seed0-p0.1-6a92beaf"
    tracked = load_config(TINY, ["align.report_to=[none]", "align.run_name=exp", "attack.run_name=exp"])
    assert align_dir(tracked, "booster", 0) == align_dir(config, "booster", 0)
    assert attack_dir(tracked, "booster", 0, 0.1) == attack_dir(config, "booster", 0, 0.1)
    # what changes the trained model changes the folder
    for override in ("align.trainer={adam_beta2: 0.95}", "model.lora.extra={use_rslora: true}"):
        changed = load_config(TINY, [override])
        assert align_dir(changed, "booster", 0) != align_dir(config, "booster", 0), override
    attack = load_config(TINY, ["attack.trainer={adam_beta2: 0.95}"])
    assert align_dir(attack, "booster", 0) == align_dir(config, "booster", 0)
    assert attack_dir(attack, "booster", 0, 0.1) != attack_dir(config, "booster", 0, 0.1)


def test_trainer_settings_report_to_and_run_name_reach_training_arguments(tmp_path):
    config = load_config(
        TINY,
        [f"output_dir={tmp_path}", "attack.trainer={adam_beta2: 0.95}", "attack.run_name=exp1"],
    )
    stage = attack_dir(config, "sft", 0, 0.1)
    args = TrainingArguments(**training_kwargs(config.attack, stage / "checkpoints", 0, False))
    assert args.adam_beta2 == 0.95 and args.run_name == f"exp1/attack/{stage.name}" and args.report_to == []
    default = TrainingArguments(**training_kwargs(load_config(TINY).attack, stage / "checkpoints", 0, False))
    assert default.adam_beta2 == 0.999 and default.run_name == f"attack/{stage.name}"


def test_pass_through_settings_train_end_to_end(tmp_path):
    config = load_config(
        TINY,
        [
            f"output_dir={tmp_path}",
            "methods=[sft]",
            "align.max_steps=2",
            "align.trainer={logging_first_step: true}",
            "model.lora.extra={use_rslora: true, init_lora_weights: gaussian}",
        ],
    )
    result = run_align(config, "sft", 0, progress=False)
    logs = [json.loads(line) for line in (result.path / "metrics.jsonl").read_text().splitlines()]
    # logging_steps is 2: only logging_first_step logs step 1
    assert [e["step"] for e in logs if "loss" in e] == [1, 2]
    adapter = json.loads((result.path / "model" / "adapter_config.json").read_text())
    assert adapter["use_rslora"] is True and adapter["init_lora_weights"] == "gaussian"
    assert adapter["r"] == config.model.lora.r and adapter["lora_alpha"] == config.model.lora.alpha


def test_report_to_tensorboard_writes_events_into_the_stage_folder(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (it is in the dev extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    sets = [f"output_dir={tmp_path}", "methods=[sft]", "align.max_steps=2", "align.logging_steps=1"]
    config = load_config(TINY, [*sets, "align.report_to=tensorboard"])
    result = run_align(config, "sft", 0, progress=False)
    assert result.path == align_dir(load_config(TINY, sets), "sft", 0)  # tracking is not in the name
    events = EventAccumulator(str(result.path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/learning_rate"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert not (result.path / "checkpoints").exists()  # the logs survive the stage's clean-up


def test_each_new_evaluation_reaches_the_stages_tensorboard_and_a_reused_one_does_not(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (it is in the dev extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    sets = ["methods=[sft]", "align.report_to=[tensorboard]", "attack.report_to=[tensorboard]"]
    argv = ["run", "--config", TINY, "--output-dir", str(tmp_path), "--no-progress"]
    assert main([*argv, *(x for s in sets for x in ("--set", s))]) in (0, 1)  # 1: a random model is broken
    results = {r["stage"]: r for r in json.loads((tmp_path / "results.json").read_text())}

    def scalars(stage_dir):
        events = EventAccumulator(str(tmp_path / stage_dir / "tensorboard"))
        events.Reload()
        tags = events.Tags()["scalars"]
        return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags if t.startswith("eval/")}

    aligned = scalars(results["aligned"]["provenance"]["stage_dir"])
    keys = ("harmful_score", "harmful_score_plus", "refusal_rate", "degenerate_rate", "finetune_accuracy")
    assert set(aligned) == {f"eval/{k}" for k in keys}
    for key in keys:  # at the alignment's last step, the values results.json has
        assert aligned[f"eval/{key}"] == [(4, pytest.approx(results["aligned"][key]))]
    attacked = scalars(results["attacked"]["provenance"]["stage_dir"])
    probe = ("probe_loss_start", "probe_loss_end", "probe_loss_drop", "probe_grad_norm_start")
    assert {f"eval/{k}" for k in probe} <= set(attacked)
    for key in (*keys, *probe):
        assert attacked[f"eval/{key}"] == [(4, pytest.approx(results["attacked"][key], rel=1e-6))]
    assert main([*argv, *(x for s in sets for x in ("--set", s))]) in (0, 1)  # everything reused
    assert scalars(results["attacked"]["provenance"]["stage_dir"]) == attacked  # logged once


def test_a_tracker_gets_the_evaluation_under_the_stages_run_name_and_a_failing_one_is_a_warning(
    tmp_path, monkeypatch, capsys
):
    from types import SimpleNamespace

    from transformers import TrainerCallback
    from transformers.integrations import integration_utils

    from booster.tracking import log_evaluation

    seen = []

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append((args.run_name, state.global_step, logs))

    class Offline(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            raise ConnectionError("no route to the tracking server\ntraceback lines")

    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "recorder", Recorder)
    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "offline", Offline)
    section = SimpleNamespace(report_to=["offline", "recorder"], run_name="exp1")
    stage = tmp_path / "attack" / "sft-seed0-p0.1-abc"
    metrics = {"harmful_score": 12.5, "refusal_rate": 80.0, "finetune_accuracy": None, "n": 80}
    done = {"steps": 50, "probe_loss_drop": 0.25, "probe_curve": [[0, 3.0]]}
    assert log_evaluation(section, stage, done, metrics) == ["Recorder"]
    assert seen == [
        (
            "exp1/attack/sft-seed0-p0.1-abc",
            50,
            {"eval_harmful_score": 12.5, "eval_refusal_rate": 80.0, "eval_probe_loss_drop": 0.25},
        )
    ]  # a pending FA, the count and the curve are not values to plot
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Offline did not take it: no route to the tracking server" in err
    assert log_evaluation(SimpleNamespace(report_to=[], run_name=None), stage, done, metrics) == []
