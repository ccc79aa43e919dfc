"""Lisa switches state on schedule, trains on the right data in each, and pulls toward the other state."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import TrainerCallback

from booster.methods.lisa import (
    ALIGNMENT,
    FINETUNE,
    LisaConfig,
    LisaSchedule,
    LisaTrainer,
    proximal_enabled,
    proximal_gradient,
    proximal_penalty,
    resolve_schedule,
)
from booster.training import STATE_FILE
from tests.helpers import HARMFUL, REFUSALS, tokenized
from tests.test_booster_step import full_precision_rmsnorm, make_model, mean_token_ce, trainable

__all__ = ["full_precision_rmsnorm"]  # the float64-exact RMSNorm fixture (autouse) applies here too


def test_schedule_follows_the_reference_and_scales_to_short_runs():
    assert resolve_schedule(None, None, 2000) == LisaSchedule(100, 900)  # the reference run: 2 cycles
    assert resolve_schedule(None, None, 10_000) == LisaSchedule(100, 900)
    assert resolve_schedule(None, None, 60) == LisaSchedule(3, 27)  # same 1:9 ratio, still 2 cycles
    assert resolve_schedule(None, None, 50) == LisaSchedule(2, 23)  # A A F x23 A A F x23, as the reference
    assert resolve_schedule(None, None, 4) == LisaSchedule(1, 1)  # at least one step each
    assert resolve_schedule(None, None, 1) == LisaSchedule(1, 1)
    assert resolve_schedule(5, 7, 60) == LisaSchedule(5, 7)  # given counts are kept
    with pytest.raises(ValueError):
        resolve_schedule(5, None, 60)
    with pytest.raises(ValueError):
        LisaSchedule(0, 0)
    schedule = LisaSchedule(3, 27)
    phases = [schedule.phase(t) for t in range(62)]
    assert phases[:3] == [ALIGNMENT] * 3 and phases[3:30] == [FINETUNE] * 27
    assert phases[30:33] == [ALIGNMENT] * 3 and phases[33:60] == [FINETUNE] * 27
    assert [t for t in range(62) if schedule.is_switch(t)] == [3, 30, 33, 60]
    assert [schedule.alignment_steps_before(t) for t in (0, 2, 3, 30, 31, 61)] == [0, 2, 3, 3, 4, 7]
    assert not proximal_enabled(200, 2000) and proximal_enabled(201, 2000)  # after the first 10%


def test_proximal_gradient_is_rho_times_drift_and_points_to_the_other_state():
    gen = torch.Generator().manual_seed(0)
    w = [torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    other = [torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    rho = 0.01
    grads = proximal_gradient(w, other, rho)
    for g, p, o in zip(grads, w, other, strict=True):
        torch.testing.assert_close(g, rho * (p.detach() - o), rtol=0, atol=0)
    penalty = 0.5 * rho * sum(((p - o) ** 2).sum() for p, o in zip(w, other, strict=True))
    for g, auto in zip(grads, torch.autograd.grad(penalty, w), strict=True):
        torch.testing.assert_close(g, auto, rtol=1e-12, atol=1e-15)
    assert proximal_penalty(w, other, rho) == pytest.approx(float(penalty.detach()), rel=1e-12)
    # A descent step moves toward the other state's weights; a step of 1/rho lands on them.
    distance = sum(float(((p.detach() - o) ** 2).sum()) for p, o in zip(w, other, strict=True))
    moved = [p.detach() - 10.0 * g for p, g in zip(w, grads, strict=True)]
    assert sum(float(((m - o) ** 2).sum()) for m, o in zip(moved, other, strict=True)) < distance
    for p, g, o in zip(w, grads, other, strict=True):
        torch.testing.assert_close(p.detach() - g / rho, o, rtol=1e-12, atol=1e-12)


class Recorder(TrainerCallback):
    """Weights at the start of every optimizer step, and the anchors the trainer holds then."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.weights: dict[int, list[torch.Tensor]] = {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.weights[state.global_step] = [p.detach().clone() for p in self.trainer.trainable()]


class RecordingLisa(LisaTrainer):
    """Remembers which rows each optimizer step trained on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: dict[int, list[list[int]]] = {}
        self.anchor_log: dict[int, dict[str, list[torch.Tensor]]] = {}

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step
        rows = [
            ids[mask.bool()].tolist()
            for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
        ]
        self.seen.setdefault(step, []).extend(rows)
        self.anchor_log[step] = {k: [t.clone() for t in v] for k, v in self.anchors.items()}
        return super().training_step(model, inputs, num_items_in_batch)


def lisa_args(tmp_path, steps, **extra):
    base = dict(
        output_dir=str(tmp_path),
        optim="sgd",
        learning_rate=0.5,
        weight_decay=0.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        max_steps=steps,
        per_device_train_batch_size=2,
        lisa_alignment_steps=2,
        lisa_finetune_steps=2,
        lisa_rho=0.7,
        lisa_proximal_start=0.0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        seed=3,
    )
    base.update(extra)
    return LisaConfig(**base)


def test_trainer_alternates_states_and_adds_the_proximal_pull(tiny_tokenizer, tmp_path):
    user, alignment = tokenized(HARMFUL, tiny_tokenizer), tokenized(REFUSALS, tiny_tokenizer)
    model = make_model(tiny_tokenizer, lora=True)
    trainer = RecordingLisa(
        model=model,
        args=lisa_args(tmp_path, 6),
        train_dataset=user,
        alignment_dataset=alignment,
        processing_class=tiny_tokenizer,
    )
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    recorder.weights[6] = [p.detach().clone() for p in trainer.trainable()]

    # The data of each step: alignment rows on steps 0-1 and 4-5, the user's rows on 2-3.
    align_rows = [r["input_ids"] for r in alignment]
    user_rows = [r["input_ids"] for r in user]
    for step, phase in enumerate([ALIGNMENT, ALIGNMENT, FINETUNE, FINETUNE, ALIGNMENT, ALIGNMENT]):
        pool = align_rows if phase == ALIGNMENT else user_rows
        assert all(row in pool for row in trainer.seen[step]), (step, phase)
    # At each switch the state that ended leaves its weights as its anchor.
    anchors = trainer.anchor_log
    for a, b in zip(anchors[2][ALIGNMENT], recorder.weights[2], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(anchors[4][FINETUNE], recorder.weights[4], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(anchors[1][FINETUNE], recorder.weights[0], strict=True):
        assert torch.equal(a, b)  # before the first switch both anchors are the aligned weights

    # Every update is -lr * (grad of the state's loss + rho * (w - w_other)), checked at each step.
    params = trainable(model)
    pulls = []
    for step in range(6):
        phase = ALIGNMENT if step in (0, 1, 4, 5) else FINETUNE
        other = FINETUNE if phase == ALIGNMENT else ALIGNMENT
        with torch.no_grad():
            for p, w in zip(params, recorder.weights[step], strict=True):
                p.copy_(w)
        source = alignment if phase == ALIGNMENT else user
        rows = [next(r for r in source if r["input_ids"] == ids) for ids in trainer.seen[step]]
        g = torch.autograd.grad(mean_token_ce(model, rows), params)
        pull = [0.7 * (w - a) for w, a in zip(recorder.weights[step], anchors[step][other], strict=True)]
        pulls.append(float(sum((x**2).sum() for x in pull)))
        for w0, w1, gd, pr in zip(recorder.weights[step], recorder.weights[step + 1], g, pull, strict=True):
            torch.testing.assert_close(w1 - w0, -0.5 * (gd + pr), rtol=1e-9, atol=1e-12)
    # The pull is zero on the first step of a state (w_other = where we are) and not zero after.
    assert pulls[2] == 0 and pulls[4] == 0 and pulls[3] > 0 and pulls[5] > 0
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["lisa_alignment_state"] for e in logged] == [1, 1, 0, 0, 1, 1]
    assert "lisa_proximal" in logged[-1]


def test_proximal_off_before_start_and_with_rho_zero(tiny_tokenizer, tmp_path):
    user, alignment = tokenized(HARMFUL, tiny_tokenizer), tokenized(REFUSALS, tiny_tokenizer)
    for name, extra in (("late", {"lisa_proximal_start": 0.9}), ("zero", {"lisa_rho": 0.0})):
        trainer = LisaTrainer(
            model=make_model(tiny_tokenizer, lora=True),
            args=lisa_args(tmp_path / name, 4, **extra),
            train_dataset=user,
            alignment_dataset=alignment,
            processing_class=tiny_tokenizer,
        )
        trainer.train()
        assert not any("lisa_proximal" in e for e in trainer.state.log_history)


def test_resume_restores_anchors_and_the_alignment_stream(tiny_tokenizer, tmp_path):
    """An interrupted run resumed from its checkpoint ends with the weights of an uninterrupted one."""
    user, alignment = tokenized(HARMFUL, tiny_tokenizer), tokenized(REFUSALS, tiny_tokenizer)

    def run(out, resume=None):
        trainer = LisaTrainer(
            model=make_model(tiny_tokenizer, lora=True),
            args=lisa_args(
                out, 6, optim="adamw_torch", learning_rate=0.05, save_strategy="steps", save_steps=3
            ),
            train_dataset=user,
            alignment_dataset=alignment,
            processing_class=tiny_tokenizer,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight")
    assert (tmp_path / "straight" / "checkpoint-3" / STATE_FILE).exists()
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", resumed_dir / "checkpoint-3")
    resumed = run(resumed_dir, resume=str(resumed_dir / "checkpoint-3"))
    assert resumed.state.global_step == 6
    for a, b in zip(straight.trainable(), resumed.trainable(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # Without the saved anchors the resumed run would pull toward the wrong weights.
    state = resumed_dir / "checkpoint-3" / STATE_FILE
    with safe_open(state, framework="pt") as fh:
        metadata = fh.metadata()
    save_file({}, state, metadata=metadata)
    shutil.rmtree(resumed_dir / "checkpoint-6", ignore_errors=True)
    broken = run(resumed_dir, resume=str(resumed_dir / "checkpoint-3"))
    difference = max(
        float((a - b).detach().abs().max())
        for a, b in zip(straight.trainable(), broken.trainable(), strict=True)
    )
    assert difference > 1e-6
