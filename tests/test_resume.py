"""Exact resume: a training interrupted at a checkpoint and resumed ends bit for bit where an
uninterrupted one does, for every defense that draws a second dataset (and for plain SFT), and
reports the same training loss and log lines.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import TrainingArguments

from booster.errors import UserError
from booster.methods.booster import BoosterConfig, BoosterTrainer
from booster.methods.booster_vaccine import BoosterVaccineConfig, BoosterVaccineTrainer
from booster.methods.repnoise import RepNoiseConfig, RepNoiseTrainer
from booster.methods.vaccine import VaccineConfig, VaccineTrainer
from booster.training import STATE_FILE, LMTrainer
from tests.helpers import HARMFUL, REFUSALS, tokenized
from tests.test_booster_step import make_model, trainable

STEPS, SAVE_AT = 6, 3


def common(out, grouped: bool = False) -> dict:
    # batch 2 over 4 harmful rows: the harmful stream wraps around (a second, reshuffled pass)
    # inside the run, so resuming must restore the pass and the position in it. ``grouped``:
    # length-grouped batches (the rows differ in length), drawn from the seed and the epoch.
    return dict(
        train_sampling_strategy="group_by_length" if grouped else "random",
        output_dir=str(out),
        optim="adamw_torch",
        learning_rate=0.05,
        max_steps=STEPS,
        per_device_train_batch_size=2,
        lr_scheduler_type="constant",
        save_strategy="steps",
        save_steps=SAVE_AT,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=3,
        disable_tqdm=True,
    )


def build(kind: str, tokenizer, out, grouped: bool = False):
    refusals, harmful = tokenized(REFUSALS, tokenizer), tokenized(HARMFUL, tokenizer)
    model = make_model(tokenizer, lora=True)
    kwargs = dict(model=model, train_dataset=refusals, processing_class=tokenizer)
    settings = common(out, grouped)
    if kind == "sft":
        return LMTrainer(args=TrainingArguments(**settings), **kwargs)
    if kind == "booster":
        args = BoosterConfig(**settings, lamb=5.0, alpha=0.5, harmful_batch_size=2)
        return BoosterTrainer(args=args, harmful_dataset=harmful, **kwargs)
    if kind == "booster+vaccine":
        args = BoosterVaccineConfig(**settings, lamb=5.0, alpha=0.5, harmful_batch_size=2, vaccine_rho=1.0)
        return BoosterVaccineTrainer(args=args, harmful_dataset=harmful, **kwargs)
    if kind == "repnoise":
        args = RepNoiseConfig(**settings, repnoise_alpha=0.5, repnoise_beta=0.5, harmful_batch_size=2)
        return RepNoiseTrainer(args=args, harmful_dataset=harmful, **kwargs)
    if kind == "vaccine":
        return VaccineTrainer(args=VaccineConfig(**settings, vaccine_rho=1.0), **kwargs)
    raise ValueError(kind)


@pytest.mark.parametrize("grouped", [False, True], ids=["random", "grouped"])
@pytest.mark.parametrize("kind", ["sft", "booster", "repnoise", "vaccine", "booster+vaccine"])
def test_resumed_training_equals_uninterrupted(kind, grouped, tiny_tokenizer, tmp_path):
    straight = build(kind, tiny_tokenizer, tmp_path / "straight", grouped)
    straight_out = straight.train()
    checkpoint = tmp_path / "straight" / f"checkpoint-{SAVE_AT}"
    assert (checkpoint / STATE_FILE).exists()

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(checkpoint, resumed_dir / checkpoint.name)
    resumed = build(kind, tiny_tokenizer, resumed_dir, grouped)
    resumed_out = resumed.train(resume_from_checkpoint=str(resumed_dir / checkpoint.name))

    assert resumed.state.global_step == STEPS
    for a, b in zip(trainable(straight.model), trainable(resumed.model), strict=True):
        assert torch.equal(a, b), kind  # bit for bit
    # the whole run's mean loss, not only the steps after the resume
    assert resumed_out.training_loss == pytest.approx(straight_out.training_loss, rel=1e-12)
    logged = {e["step"]: e for e in straight.state.log_history if "loss" in e}
    after = [e for e in resumed.state.log_history if "loss" in e]
    assert [e["step"] for e in after] == list(range(1, STEPS + 1))  # restored, then continued
    for entry in after:
        for key, value in entry.items():
            assert logged[entry["step"]][key] == pytest.approx(value, rel=1e-12), (kind, key)


def test_resume_without_the_trainer_state_is_refused(tiny_tokenizer, tmp_path):
    build("booster", tiny_tokenizer, tmp_path / "straight").train()
    checkpoint = tmp_path / "straight" / f"checkpoint-{SAVE_AT}"
    (checkpoint / STATE_FILE).unlink()
    with pytest.raises(UserError, match="cannot be resumed exactly"):
        build("booster", tiny_tokenizer, tmp_path / "again").train(resume_from_checkpoint=str(checkpoint))


def test_a_plain_checkpoint_without_the_state_file_still_resumes(tiny_tokenizer, tmp_path):
    """SFT keeps nothing beside Trainer's checkpoint but the loss sum: an older checkpoint resumes."""
    straight = build("sft", tiny_tokenizer, tmp_path / "straight")
    straight.train()
    checkpoint = tmp_path / "straight" / f"checkpoint-{SAVE_AT}"
    (checkpoint / STATE_FILE).unlink()
    resumed = build("sft", tiny_tokenizer, tmp_path / "again")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for a, b in zip(trainable(straight.model), trainable(resumed.model), strict=True):
        assert torch.equal(a, b)
