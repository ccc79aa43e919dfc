"""The harmful-loss probe: what it measures, that it leaves training unchanged, and that its curve
reaches done.json and results.json."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest
import torch
from transformers import TrainingArguments

from booster.config import load_config
from booster.evaluation.probe import HarmfulLossProbe, harmful_loss, probe_interval, probe_summary
from booster.pipeline import run_pipeline
from booster.training import LMTrainer, default_collator
from tests.helpers import HARMFUL, REFUSALS, tokenized
from tests.test_booster_step import full_precision_rmsnorm, make_model, mean_token_ce, trainable

__all__ = ["full_precision_rmsnorm"]


def test_loss_and_gradient_norm_are_the_mean_token_loss_and_its_gradient(tiny_tokenizer):
    model = make_model(tiny_tokenizer, lora=True)
    rows = tokenized(HARMFUL, tiny_tokenizer)
    collate = default_collator(tiny_tokenizer)
    batches = [collate(rows[:3]), collate(rows[3:])]  # uneven batches: one mean over all tokens
    loss, norm = harmful_loss(model, batches, contextlib.nullcontext, with_grad=True)
    expected = mean_token_ce(model, rows)
    grads = torch.autograd.grad(expected, trainable(model))
    assert loss == pytest.approx(float(expected), rel=1e-9)
    assert norm == pytest.approx(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))), rel=1e-6)
    assert model.training  # the mode is restored
    assert harmful_loss(model, batches, contextlib.nullcontext)[1] is None


def test_interval_defaults_to_a_few_points():
    assert probe_interval(125, None) == 31  # steps 0, 31, 62, 93, 124 and 125
    assert probe_interval(3, None) == 1
    assert probe_interval(125, 25) == 25


def _train(tokenizer, out, probe: bool, resume: str | None = None):
    args = TrainingArguments(
        output_dir=str(out),
        optim="adamw_torch",
        learning_rate=0.05,
        max_steps=6,
        per_device_train_batch_size=2,
        save_strategy="steps",
        save_steps=3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = LMTrainer(
        model=make_model(tokenizer, lora=True),
        args=args,
        train_dataset=tokenized(HARMFUL, tokenizer),
        processing_class=tokenizer,
    )
    if probe:
        trainer.add_callback(HarmfulLossProbe(trainer, tokenized(REFUSALS, tokenizer), 2, every=2))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_probe_logs_a_curve_and_leaves_training_unchanged(tiny_tokenizer, tmp_path):
    plain = _train(tiny_tokenizer, tmp_path / "plain", probe=False)
    probed = _train(tiny_tokenizer, tmp_path / "probed", probe=True)
    for a, b in zip(trainable(plain.model), trainable(probed.model), strict=True):
        assert torch.equal(a, b)
    summary = probe_summary(probed.state.log_history)
    assert [step for step, _ in summary["probe_curve"]] == [0, 2, 4, 6]
    assert summary["probe_grad_norm_start"] > 0
    assert summary["probe_loss_drop"] == pytest.approx(
        summary["probe_loss_start"] - summary["probe_loss_end"], abs=1e-6
    )
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "probed" / "checkpoint-3", resumed_dir / "checkpoint-3")
    resumed = _train(tiny_tokenizer, resumed_dir, probe=True, resume=str(resumed_dir / "checkpoint-3"))
    assert probe_summary(resumed.state.log_history) == summary  # the curve survives a resume


def test_attack_stage_records_the_probe_in_done_and_results(tmp_path):
    config = load_config(
        "configs/tiny.yaml", [f"output_dir={tmp_path}", "methods=[sft]", "attack.probe_every=2"]
    )
    results = json.loads(run_pipeline(config, progress=False, log=lambda *_: None).read_text())
    attacked = [e for e in results if e["stage"] == "attacked"]
    assert attacked and all(len(e["probe_curve"]) == 3 for e in attacked)  # steps 0, 2, 4
    assert all(
        e["probe_loss_drop"] == pytest.approx(e["probe_loss_start"] - e["probe_loss_end"], abs=1e-6)
        for e in attacked
    )
    aligned = [e for e in results if e["stage"] == "aligned"]
    assert all("probe_curve" not in e for e in aligned)
    off = load_config(
        "configs/tiny.yaml", [f"output_dir={tmp_path / 'off'}", "methods=[sft]", "attack.probe_data=null"]
    )
    results = json.loads(run_pipeline(off, progress=False, log=lambda *_: None).read_text())
    assert all("probe_curve" not in e for e in results)


def test_a_stage_reused_from_a_run_without_the_probe_says_so(tmp_path, capsys):
    """A stage trained before the probe existed hashes like one with the probe at its default
    (a later-added field at its default is not fingerprinted): its reuse says the probe is missing."""
    config = load_config(
        "configs/tiny.yaml", [f"output_dir={tmp_path}", "methods=[sft]", "attack.poison_ratios=[0.1]"]
    )
    run_pipeline(config, progress=False, log=lambda *_: None)
    stage = next((tmp_path / "attack").iterdir())
    done = json.loads((stage / "done.json").read_text())
    (stage / "done.json").write_text(
        json.dumps({k: v for k, v in done.items() if not k.startswith("probe_")})
    )
    capsys.readouterr()
    results = run_pipeline(config, progress=False, log=lambda *_: None)
    assert f"{stage}: trained without the harmful-loss probe" in capsys.readouterr().err
    assert all("probe_curve" not in e for e in json.loads(results.read_text()))


def _probe_trainer(tokenizer, out, bf16: bool = False) -> LMTrainer:
    args = TrainingArguments(
        output_dir=str(out), max_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, bf16=bf16
    )
    model = make_model(tokenizer, lora=True, dtype=torch.float32)
    return LMTrainer(
        model=model, args=args, train_dataset=tokenized(HARMFUL, tokenizer), processing_class=tokenizer
    )


def _padding(batches) -> int:
    return sum(int(b["attention_mask"].numel() - b["attention_mask"].sum()) for b in batches)


def test_grouped_probe_batches_pad_less_and_measure_the_same_loss(tiny_tokenizer, tmp_path):
    trainer = _probe_trainer(tiny_tokenizer, tmp_path)
    rows = tokenized(REFUSALS + HARMFUL, tiny_tokenizer, max_length=256)
    by_length = sorted(rows, key=lambda r: len(r["input_ids"]))
    rows = [r for pair in zip(by_length[:4], by_length[:3:-1], strict=True) for r in pair]  # short, long, ...
    plain = HarmfulLossProbe(trainer, rows, 2, every=1)
    grouped = HarmfulLossProbe(trainer, rows, 2, every=1, group_by_length=True)
    assert _padding(grouped.cpu_batches) < _padding(plain.cpu_batches)
    model = trainer.model
    loss, _ = harmful_loss(model, plain.cpu_batches, contextlib.nullcontext)
    grouped_loss, _ = harmful_loss(model, grouped.cpu_batches, contextlib.nullcontext)
    assert grouped_loss == pytest.approx(loss, rel=1e-6)


def test_probe_runs_under_the_stages_bf16_autocast(tiny_tokenizer, tmp_path):
    outputs: dict[bool, list[torch.dtype]] = {}
    for bf16 in (False, True):
        trainer = _probe_trainer(tiny_tokenizer, tmp_path / str(bf16), bf16=bf16)
        probe = HarmfulLossProbe(trainer, tokenized(REFUSALS, tiny_tokenizer), 2, every=1)
        linear = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Linear))
        seen = outputs[bf16] = []
        handle = linear.register_forward_hook(lambda module, inputs, out, seen=seen: seen.append(out.dtype))
        probe._measure(0, with_grad=False)
        handle.remove()
        assert "probe_loss" in trainer.state.log_history[-1]
    assert outputs[True] and set(outputs[True]) == {torch.bfloat16}
    assert outputs[False] and set(outputs[False]) == {torch.float32}
