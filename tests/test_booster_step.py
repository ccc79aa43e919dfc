"""Booster's update is the gradient of its surrogate, and the trainer applies exactly that update."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from booster.methods.booster import NORM_EPS, BoosterConfig, BoosterTrainer, booster_correction
from booster.models import LoraSettings, add_lora, build_tiny_model
from tests.helpers import HARMFUL, REFUSALS, tokenized


@pytest.fixture(autouse=True)
def full_precision_rmsnorm(monkeypatch):
    """Llama's RMSNorm computes in float32 whatever the input dtype; keep float64 exact here."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(LlamaRMSNorm, "forward", forward)


def mean_token_ce(model, rows) -> torch.Tensor:
    """Reference loss: each row alone (no padding), full logits, mean over all scored tokens."""
    total, count = 0.0, 0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor(row["labels"])[1:]
        logits = model(input_ids=ids).logits[0, :-1]
        scored = labels.ne(-100)
        total = total + F.cross_entropy(logits[scored], labels[scored], reduction="sum")
        count += int(scored.sum())
    return total / count


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_model(tokenizer, lora: bool, dtype=torch.float64, seed: int = 0):
    model = build_tiny_model(tokenizer, seed=seed, dtype=dtype)
    if lora:
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # LoRA's A is drawn from the global generator
            model = add_lora(model, LoraSettings(r=4, alpha=8))
        # Non-zero B so the adapter's gradient w.r.t. A is not trivially zero.
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.to(dtype)


def grads_of(loss_fn, params):
    return list(torch.autograd.grad(loss_fn(), params))


def surrogate_slope(base, h, params, g_h, lamb, alpha, seed):
    """The slope along a random direction v (returned with it) of F(w) = base(w) - lamb h(w - alpha d),
    d = g_h / (|g_h| + eps) held fixed: float64 central differences of step 1e-5."""
    norm = torch.sqrt(sum((g**2).sum() for g in g_h))
    direction = [g / (norm + NORM_EPS) for g in g_h]

    def surrogate() -> float:
        with torch.no_grad():
            value = base()
            for p, d in zip(params, direction, strict=True):
                p.sub_(alpha * d)
            shifted = h()
            for p, d in zip(params, direction, strict=True):
                p.add_(alpha * d)
        return float(value - lamb * shifted)

    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    eps = 1e-5
    with torch.no_grad():
        for p, d in zip(params, v, strict=True):
            p.add_(eps * d)
    plus = surrogate()
    with torch.no_grad():
        for p, d in zip(params, v, strict=True):
            p.sub_(2 * eps * d)
    minus = surrogate()
    with torch.no_grad():
        for p, d in zip(params, v, strict=True):
            p.add_(eps * d)
    numeric = (plus - minus) / (2 * eps)
    return numeric, v


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_finite_difference_of_surrogate(tiny_tokenizer, lora):
    """g = grad f + lamb (g_h - g_h') matches central differences of F(w) = f + lamb (h(w) - h(w - alpha d))."""
    model = make_model(tiny_tokenizer, lora)
    align, harm = tokenized(REFUSALS, tiny_tokenizer), tokenized(HARMFUL, tiny_tokenizer)
    params = trainable(model)
    lamb, alpha = 5.0, 0.5

    def f():
        return mean_token_ce(model, align)

    def h():
        return mean_token_ce(model, harm)

    g_h = grads_of(h, params)
    terms = booster_correction(params, lambda: (h().detach(), grads_of(h, params)), lamb=lamb, alpha=alpha)
    g_f = grads_of(f, params)
    g = [a + c for a, c in zip(g_f, terms.correction, strict=True)]
    numeric, v = surrogate_slope(lambda: f() + lamb * h(), h, params, g_h, lamb, alpha, seed=2)
    analytic = float(sum((a * b).sum() for a, b in zip(g, v, strict=True)))
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    # The test can tell: dropping the perturbed pass (the reference's ablation) is visibly wrong.
    without_perturbed = float(sum(((a + lamb * gh) * b).sum() for a, gh, b in zip(g_f, g_h, v, strict=True)))
    assert abs(without_perturbed - numeric) > 1e-3 * abs(numeric)
    assert terms.harmful_loss_reduction > 0


def test_weights_restored_bit_exactly_in_low_precision():
    params = [torch.nn.Parameter(torch.randn(1000, dtype=torch.bfloat16) * 3) for _ in range(3)]
    before = [p.detach().clone() for p in params]

    def harmful_grad():
        loss = sum((p.float() ** 3).sum() for p in params)
        return loss.detach(), list(torch.autograd.grad(loss, params))

    booster_correction(params, harmful_grad, lamb=5.0, alpha=0.1)
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b)


def reference_update(model, align, harm, lamb, alpha):
    """An independent, plain implementation of one SGD(lr=1) Booster step: returns -g."""
    params = trainable(model)
    g_f = grads_of(lambda: mean_token_ce(model, align), params)
    g_h = grads_of(lambda: mean_token_ce(model, harm), params)
    norm = torch.sqrt(sum((g**2).sum() for g in g_h))
    originals = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, g_h, strict=True):
            p.sub_(alpha * g / (norm + 1e-7))
    g_hp = grads_of(lambda: mean_token_ce(model, harm), params)
    with torch.no_grad():
        for p, o in zip(params, originals, strict=True):
            p.copy_(o)
    return [-(a + lamb * (b - c)) for a, b, c in zip(g_f, g_h, g_hp, strict=True)], g_f


def run_one_step(
    model, tokenizer, align, harm, tmp_path, batch, accumulation, lamb, alpha, steps=1, log_every=1
):
    """Booster with SGD(lr=1) for ``steps`` steps (one by default); returns the update and the trainer."""
    args = BoosterConfig(
        output_dir=str(tmp_path),
        optim="sgd",
        learning_rate=1.0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        max_steps=steps,
        per_device_train_batch_size=batch,
        harmful_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        lamb=lamb,
        alpha=alpha,
        report_to=[],
        save_strategy="no",
        logging_steps=log_every,
        use_cpu=True,
        disable_tqdm=True,
    )
    params = trainable(model)
    before = [p.detach().clone() for p in params]
    trainer = BoosterTrainer(
        model=model, args=args, train_dataset=align, harmful_dataset=harm, processing_class=tokenizer
    )
    trainer.train()
    return [p.detach() - b for p, b in zip(params, before, strict=True)], trainer


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("batch,accumulation", [(4, 1), (2, 2), (1, 4)])
def test_trainer_step_equals_independent_implementation(tiny_tokenizer, tmp_path, lora, batch, accumulation):
    align, harm = tokenized(REFUSALS, tiny_tokenizer), tokenized(HARMFUL, tiny_tokenizer)
    lamb, alpha = 5.0, 0.5
    expected, g_f = reference_update(make_model(tiny_tokenizer, lora), align, harm, lamb, alpha)
    update, trainer = run_one_step(
        make_model(tiny_tokenizer, lora),
        tiny_tokenizer,
        align,
        harm,
        tmp_path,
        batch,
        accumulation,
        lamb,
        alpha,
    )
    for got, want in zip(update, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    # The Booster term is a real part of the update, not lost in the tolerance.
    booster_part = sum(((e + a) ** 2).sum() for e, a in zip(expected, g_f, strict=True)).sqrt()
    assert booster_part > 1e-4 * sum((e**2).sum() for e in expected).sqrt()
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    for key in ("harmful_loss", "harmful_loss_perturbed", "harmful_loss_reduction", "harmful_grad_norm"):
        assert key in logged
    assert logged["harmful_loss_reduction"] == pytest.approx(
        logged["harmful_loss"] - logged["harmful_loss_perturbed"], abs=1e-5
    )
    # The logged norms are those of the independent implementation's grad f and correction.
    f_norm = float(sum((g**2).sum() for g in g_f).sqrt())
    assert logged["alignment_grad_norm"] == pytest.approx(f_norm, rel=1e-5)
    assert logged["correction_norm"] == pytest.approx(float(booster_part), rel=1e-5)
    assert logged["correction_to_alignment"] == pytest.approx(float(booster_part) / f_norm, rel=1e-5)


def test_logged_norms_come_from_one_step(tiny_tokenizer, tmp_path):
    """Over several steps per log line, the ratio is the quotient of the two norms on that line."""
    align, harm = tokenized(REFUSALS, tiny_tokenizer), tokenized(HARMFUL, tiny_tokenizer)
    model = make_model(tiny_tokenizer, True, dtype=torch.float32)
    _, trainer = run_one_step(
        model, tiny_tokenizer, align, harm, tmp_path, 2, 1, 5.0, 0.5, steps=6, log_every=3
    )
    lines = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(lines) == 2
    for line in lines:
        ratio = line["correction_norm"] / line["alignment_grad_norm"]
        assert line["correction_to_alignment"] == pytest.approx(ratio, rel=1e-4)


def test_accumulation_matches_large_batch(tiny_tokenizer, tmp_path):
    align, harm = tokenized(REFUSALS, tiny_tokenizer), tokenized(HARMFUL, tiny_tokenizer)
    big, _ = run_one_step(
        make_model(tiny_tokenizer, True), tiny_tokenizer, align, harm, tmp_path / "a", 4, 1, 5.0, 0.5
    )
    small, _ = run_one_step(
        make_model(tiny_tokenizer, True), tiny_tokenizer, align, harm, tmp_path / "b", 2, 2, 5.0, 0.5
    )
    for a, b in zip(big, small, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_lamb_zero_is_plain_sft(tiny_tokenizer, tmp_path):
    align, harm = tokenized(REFUSALS, tiny_tokenizer), tokenized(HARMFUL, tiny_tokenizer)
    model = make_model(tiny_tokenizer, True)
    _, g_f = reference_update(make_model(tiny_tokenizer, True), align, harm, 0.0, 0.5)
    update, _ = run_one_step(model, tiny_tokenizer, align, harm, tmp_path, 4, 1, 0.0, 0.5)
    for got, want in zip(update, g_f, strict=True):
        torch.testing.assert_close(got, -want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("active", [True, False], ids=["below-target", "above-target"])
def test_finite_difference_of_surrogate_with_bounded_ascent(tiny_tokenizer, active):
    """booster+ascent: g = grad f + lamb (g_h - g_h') - w 1[h < target] g_h matches central differences
    of F(w) = f + lamb (h(w) - h(w - alpha d)) - w min(h(w), target), d held fixed; above the target
    the term is flat and the update is exactly Booster's."""
    model = make_model(tiny_tokenizer, lora=True)
    align, harm = tokenized(REFUSALS, tiny_tokenizer), tokenized(HARMFUL, tiny_tokenizer)
    params = trainable(model)
    lamb, alpha, weight = 5.0, 0.5, 0.7

    def f():
        return mean_token_ce(model, align)

    def h():
        return mean_token_ce(model, harm)

    h0 = float(h().detach())
    target = h0 + 1.0 if active else h0 - 1.0  # far from h0: the finite differences stay on one side
    g_h = grads_of(h, params)

    def harmful_grad():
        return h().detach(), grads_of(h, params)

    terms = booster_correction(
        params, harmful_grad, lamb=lamb, alpha=alpha, ascent_weight=weight, ascent_target=target
    )
    plain = booster_correction(params, harmful_grad, lamb=lamb, alpha=alpha)
    assert terms.ascent == (weight if active else 0.0)
    g_f = grads_of(f, params)
    g = [a + c for a, c in zip(g_f, terms.correction, strict=True)]

    def base():
        harmful = h()
        return f() + lamb * harmful - weight * torch.clamp(harmful, max=target)

    numeric, v = surrogate_slope(base, h, params, g_h, lamb, alpha, seed=3)
    analytic = float(sum((a * b).sum() for a, b in zip(g, v, strict=True)))
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    booster_only = float(sum(((a + c) * b).sum() for a, c, b in zip(g_f, plain.correction, v, strict=True)))
    if active:  # the ascent term is there and visible at this precision
        ascent = float(sum((weight * gh * b).sum() for gh, b in zip(g_h, v, strict=True)))
        assert booster_only - analytic == pytest.approx(ascent, rel=1e-6)
        assert abs(ascent) > 1e-3 * abs(numeric)
    else:  # flat above the target: bit for bit Booster's correction
        for a, b in zip(terms.correction, plain.correction, strict=True):
            assert torch.equal(a, b)


def test_bounded_ascent_settings_are_checked():
    with pytest.raises(ValueError, match="ascent_weight"):
        BoosterConfig(output_dir="out", ascent_weight=-1.0, report_to="none")
