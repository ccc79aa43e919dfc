"""Vaccine perturbs the layer outputs by a norm-rho step along their gradient, and only during the step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from booster.methods.booster_vaccine import BoosterVaccineConfig, BoosterVaccineTrainer
from booster.methods.losses import token_loss_sum
from booster.methods.vaccine import (
    VaccineConfig,
    VaccineTrainer,
    hidden_gradients,
    perturbation_modules,
    perturbed,
    scale_to_norm,
    vaccine_gradients,
)
from booster.training import default_collator
from tests.helpers import HARMFUL, REFUSALS, tokenized
from tests.test_booster_step import full_precision_rmsnorm, make_model, reference_update, trainable

__all__ = ["full_precision_rmsnorm"]  # the float64-exact RMSNorm fixture (autouse) applies here too


def layers_of(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(base.model.layers)


def modules_of(model, target):
    return [layer.self_attn if target == "attention" else layer for layer in layers_of(model)]


def hidden_of(output):
    return output[0] if isinstance(output, tuple) else output


def add_to_output(eps):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + eps, *output[1:])
        return output + eps

    return hook


def all_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def reference_vaccine_grad(model, rows, rho, target):
    """An independent, plain Vaccine gradient: rows one by one (no padding), full logits.

    Pass 1 keeps every hooked module's output of every row, takes d loss / d output, scales all of
    them by one norm to rho; pass 2 adds each row's perturbation to its outputs and returns grad_w.
    """
    modules, params = modules_of(model, target), trainable(model)

    def row_loss_sum(row):
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor(row["labels"])[1:]
        logits = model(input_ids=ids).logits[0, :-1]
        scored = labels.ne(-100)
        return F.cross_entropy(logits[scored], labels[scored], reduction="sum"), int(scored.sum())

    outputs, total, count = [], 0.0, 0
    for row in rows:
        store = []
        handles = [m.register_forward_hook(lambda m, a, o, s=store: s.append(hidden_of(o))) for m in modules]
        loss, n = row_loss_sum(row)
        for h in handles:
            h.remove()
        outputs.append(store)
        total, count = total + loss, count + n
    flat = [o for store in outputs for o in store]
    grads = torch.autograd.grad(total / count, flat)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    eps = [g * rho / (norm + 1e-7) for g in grads]
    total = 0.0
    for r, row in enumerate(rows):
        row_eps = eps[r * len(modules) : (r + 1) * len(modules)]
        handles = [m.register_forward_hook(add_to_output(e)) for m, e in zip(modules, row_eps, strict=True)]
        loss, _ = row_loss_sum(row)
        for h in handles:
            h.remove()
        total = total + loss
    return list(torch.autograd.grad(total / count, params)), eps


def batch_of(rows, tokenizer):
    return default_collator(tokenizer)(rows)


@pytest.mark.parametrize("target", ["attention", "decoder"])
def test_perturbation_has_norm_rho_lands_on_the_outputs_and_is_gone_after(tiny_tokenizer, target):
    model = make_model(tiny_tokenizer, lora=True)
    batch = batch_of(tokenized(REFUSALS, tiny_tokenizer), tiny_tokenizer)
    n_tokens = int(batch["labels"][:, 1:].ne(-100).sum())
    modules = perturbation_modules(model, target)
    assert modules == modules_of(model, target)
    hooks_before = all_hooks(model)
    with torch.no_grad():
        clean_logits = model(**batch).logits

    loss, grads = hidden_gradients(modules, lambda: token_loss_sum(model, batch) / n_tokens)
    assert all_hooks(model) == hooks_before
    # Pass 1 is d loss / d output, scaled by one norm over all layers: equal to the independent
    # row-by-row computation, and zero on padding (so padding does not change the norm).
    rows = tokenized(REFUSALS, tiny_tokenizer)
    eps = scale_to_norm(grads, rho=2.0)
    _, expected = reference_vaccine_grad(model, rows, 2.0, target)
    for r, row in enumerate(rows):
        length = len(row["input_ids"])
        for i, e in enumerate(eps):
            torch.testing.assert_close(
                e[r, :length], expected[r * len(modules) + i][0], rtol=1e-9, atol=1e-12
            )
            assert torch.count_nonzero(e[r, length:]) == 0
    norm = torch.sqrt(sum((e**2).sum() for e in eps))
    assert float(norm) == pytest.approx(2.0, rel=1e-6)

    # In the second pass each hooked output is its unperturbed value plus its perturbation.
    raw, seen = [], []
    before = [
        m.register_forward_hook(lambda m, a, o: raw.append(hidden_of(o).detach().clone())) for m in modules
    ]
    with perturbed(modules, eps):
        after = [m.register_forward_hook(lambda m, a, o: seen.append(hidden_of(o).detach())) for m in modules]
        with torch.no_grad():
            perturbed_logits = model(**batch).logits
        for h in after:
            h.remove()
    for h in before:
        h.remove()
    assert len(seen) == len(modules)
    for r, s, e in zip(raw, seen, eps, strict=True):
        torch.testing.assert_close(s - r, e, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(perturbed_logits, clean_logits)
    # And nothing of it is left: no hook, and the forward is the unhooked one, bit for bit.
    assert all_hooks(model) == hooks_before
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, clean_logits)
    assert float(loss) > 0


def test_hooks_are_removed_when_the_forward_fails(tiny_tokenizer):
    model = make_model(tiny_tokenizer, lora=True)
    modules = perturbation_modules(model, "attention")
    hooks_before = all_hooks(model)
    with pytest.raises(RuntimeError), perturbed(modules, [torch.zeros(1)] * len(modules)):
        raise RuntimeError("boom")
    assert all_hooks(model) == hooks_before


@pytest.mark.parametrize("target", ["attention", "decoder"])
def test_vaccine_gradients_equal_independent_implementation(tiny_tokenizer, target):
    model = make_model(tiny_tokenizer, lora=True)
    rows = tokenized(REFUSALS, tiny_tokenizer)
    batch = batch_of(rows, tiny_tokenizer)
    n_tokens = int(batch["labels"][:, 1:].ne(-100).sum())
    params = trainable(model)
    terms = vaccine_gradients(
        params, perturbation_modules(model, target), lambda: token_loss_sum(model, batch) / n_tokens, rho=2.0
    )
    expected, _ = reference_vaccine_grad(model, rows, 2.0, target)
    for got, want in zip(terms.grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    plain = torch.autograd.grad(token_loss_sum(model, batch) / n_tokens, params)
    difference = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(terms.grads, plain, strict=True)))
    assert difference > 1e-3 * torch.sqrt(sum((b**2).sum() for b in plain))  # the perturbation matters
    assert terms.loss_perturbed > terms.loss  # a step along the gradient raises the loss


def step_args(tmp_path, config_cls, batch, accumulation, **extra):
    return config_cls(
        output_dir=str(tmp_path),
        optim="sgd",
        learning_rate=1.0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        max_steps=1,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        **extra,
    )


def one_step(trainer, model):
    params = trainable(model)
    before = [p.detach().clone() for p in params]
    trainer.train()
    return [p.detach() - b for p, b in zip(params, before, strict=True)]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("batch,accumulation", [(4, 1), (2, 2)])
def test_trainer_step_equals_independent_implementation(tiny_tokenizer, tmp_path, lora, batch, accumulation):
    rows = tokenized(REFUSALS, tiny_tokenizer)
    expected, _ = reference_vaccine_grad(make_model(tiny_tokenizer, lora), rows, 2.0, "attention")
    model = make_model(tiny_tokenizer, lora)
    hooks_before = all_hooks(model)
    args = step_args(tmp_path, VaccineConfig, batch, accumulation, vaccine_rho=2.0)
    trainer = VaccineTrainer(model=model, args=args, train_dataset=rows, processing_class=tiny_tokenizer)
    update = one_step(trainer, model)
    for got, want in zip(update, expected, strict=True):
        torch.testing.assert_close(got, -want, rtol=1e-9, atol=1e-11)
    logged = next(e for e in trainer.state.log_history if "loss" in e)
    assert logged["vaccine_hidden_grad_norm"] > 0 and logged["loss"] > logged["loss_unperturbed"]
    # The perturbation is gone after the step: no hooks, and the forward equals a fresh copy's.
    assert all_hooks(model) == hooks_before
    fresh = make_model(tiny_tokenizer, lora)
    fresh.load_state_dict(model.state_dict())
    batch_ = batch_of(rows, tiny_tokenizer)
    with torch.no_grad():
        assert torch.equal(model(**batch_).logits, fresh(**batch_).logits)


def test_rho_zero_is_plain_sft(tiny_tokenizer, tmp_path):
    rows = tokenized(REFUSALS, tiny_tokenizer)
    plain = make_model(tiny_tokenizer, True)
    _, g_f = reference_update(plain, rows, tokenized(HARMFUL, tiny_tokenizer), 0.0, 0.1)
    model = make_model(tiny_tokenizer, True)
    args = step_args(tmp_path, VaccineConfig, 4, 1, vaccine_rho=0.0)
    trainer = VaccineTrainer(model=model, args=args, train_dataset=rows, processing_class=tiny_tokenizer)
    for got, want in zip(one_step(trainer, model), g_f, strict=True):
        torch.testing.assert_close(got, -want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("batch,accumulation", [(4, 1), (2, 2)])
def test_booster_vaccine_is_booster_correction_plus_vaccine_gradient(
    tiny_tokenizer, tmp_path, batch, accumulation
):
    """g = Vaccine's alignment gradient + lamb * (g_h - g_h'), the harmful passes unperturbed."""
    align, harm = tokenized(REFUSALS, tiny_tokenizer), tokenized(HARMFUL, tiny_tokenizer)
    lamb, alpha, rho = 5.0, 0.5, 2.0
    booster_update, g_f = reference_update(make_model(tiny_tokenizer, True), align, harm, lamb, alpha)
    g_vaccine, _ = reference_vaccine_grad(make_model(tiny_tokenizer, True), align, rho, "attention")
    # reference_update returns -(g_f + correction): swap its alignment gradient for Vaccine's.
    expected = [u + f - v for u, f, v in zip(booster_update, g_f, g_vaccine, strict=True)]
    model = make_model(tiny_tokenizer, True)
    args = step_args(
        tmp_path,
        BoosterVaccineConfig,
        batch,
        accumulation,
        lamb=lamb,
        alpha=alpha,
        harmful_batch_size=batch,
        vaccine_rho=rho,
    )
    trainer = BoosterVaccineTrainer(
        model=model, args=args, train_dataset=align, harmful_dataset=harm, processing_class=tiny_tokenizer
    )
    update = one_step(trainer, model)
    for got, want in zip(update, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    # Both parts are visible: it is neither plain Booster nor plain Vaccine.
    size = torch.sqrt(sum((e**2).sum() for e in expected))
    assert (
        torch.sqrt(sum(((u - e) ** 2).sum() for u, e in zip(booster_update, expected, strict=True)))
        > 1e-4 * size
    )
    assert (
        torch.sqrt(sum(((v + e) ** 2).sum() for v, e in zip(g_vaccine, expected, strict=True))) > 1e-4 * size
    )
    logged = next(e for e in trainer.state.log_history if "loss" in e)
    assert "harmful_loss_reduction" in logged and "vaccine_hidden_grad_norm" in logged
