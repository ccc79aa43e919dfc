"""RepNoise's loss is the reference formula, its terms pull the right way, and the trainer minimises it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from booster.methods.losses import count_scored_tokens, token_loss_sum
from booster.methods.repnoise import (
    RepNoiseConfig,
    RepNoiseTrainer,
    harmful_terms,
    mmd,
    repnoise_objective,
    repnoise_penalty,
)
from booster.training import default_collator
from tests.helpers import HARMFUL, REFUSALS, tokenized
from tests.test_booster_step import full_precision_rmsnorm, make_model, trainable

__all__ = ["full_precision_rmsnorm"]  # the float64-exact RMSNorm fixture (autouse) applies here too


def reference_mmd(x, y):
    """The reference MMD written out: explicit pairwise differences, 5 bandwidths, factor 2."""
    total = torch.cat([x, y])
    n = total.shape[0]
    d2 = ((total[None, :, :] - total[:, None, :]) ** 2).sum(2)
    base = d2.detach().sum() / (n * n - n) / 2 ** (5 // 2)  # the reference detaches the bandwidth
    k = sum(torch.exp(-d2 / (base * 2**i)) for i in range(5))
    b = x.shape[0]
    return torch.mean(k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b])


def test_mmd_is_the_reference_kernel_mmd():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 30, generator=gen, dtype=torch.float64) * 2 + 1
    y = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    assert float(mmd(x, y)) == pytest.approx(float(reference_mmd(x, y)), rel=1e-10)
    assert float(mmd(x, x)) == pytest.approx(0.0, abs=1e-12)
    assert float(mmd(x, y)) > 0.05


def reference_terms(model, batch, seed):
    """MMD-to-noise and the layer-wise harmful loss by hand, from transformers' own outputs.

    Hidden states: each layer's mlp output (hooks), masked to answer tokens; noise
    drawn layer by layer from ``seed``. Harmful loss: the model's logits and, per hidden state
    that transformers returns, lm_head(norm(h)) (its last one is already normalised: that read-out
    is the logits themselves), each a mean CE over answer tokens.
    """
    layers = model.get_base_model().model.layers
    mlp_out = []
    handles = [layer.mlp.register_forward_hook(lambda m, a, o: mlp_out.append(o)) for layer in layers]
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
    )
    for h in handles:
        h.remove()
    mask = batch["labels"].ne(-100)[..., None].double()
    gen = torch.Generator().manual_seed(seed)
    noise_mmd = 0.0
    for hidden in mlp_out:
        noise = torch.randn(hidden.shape, generator=gen, dtype=hidden.dtype) * mask
        noise_mmd = noise_mmd + reference_mmd((hidden * mask).flatten(1), noise.flatten(1))
    noise_mmd = noise_mmd / len(mlp_out)

    targets = batch["labels"][:, 1:]
    scored = targets.ne(-100)

    def ce(logits):
        return F.cross_entropy(logits[:, :-1][scored], targets[scored])

    base = model.get_base_model()
    final = ce(out.logits)
    lens = [ce(base.lm_head(base.model.norm(h))) for h in out.hidden_states[:-1]] + [final]
    harmful = (final + sum(lens)) / len(out.hidden_states)
    return noise_mmd, harmful, final


def test_harmful_terms_and_loss_equal_the_formula_by_hand(tiny_tokenizer):
    model = make_model(tiny_tokenizer, lora=True)
    batch = default_collator(tiny_tokenizer)(tokenized(HARMFUL, tiny_tokenizer))
    want_mmd, want_harmful, want_final = reference_terms(model, batch, seed=3)
    terms = harmful_terms(model, batch, generator=torch.Generator().manual_seed(3))
    assert float(terms.noise_mmd.detach()) == pytest.approx(float(want_mmd.detach()), rel=1e-9)
    assert float(terms.harmful_loss.detach()) == pytest.approx(float(want_harmful.detach()), rel=1e-9)
    assert float(terms.harmful_loss_final) == pytest.approx(float(want_final.detach()), rel=1e-9)
    retain = torch.tensor(1.25, dtype=torch.float64)
    alpha, beta = 0.1, 0.001
    with torch.no_grad():
        by_hand = 1.25 + beta * float(want_mmd) - alpha * float(torch.log(want_harmful + 1))
        loss = repnoise_objective(retain, terms.noise_mmd, terms.harmful_loss, alpha=alpha, beta=beta)
    assert float(loss) == pytest.approx(by_hand, rel=1e-12)


def step_along(params, loss, size=1e-3):
    """One normalised gradient-descent step on ``loss``."""
    grads = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.sub_(size * g / norm)


@pytest.mark.parametrize("alpha,beta", [(0.0, 1.0), (1.0, 0.0), (0.1, 0.001)])
def test_a_descent_step_lowers_mmd_to_noise_and_raises_the_harmful_loss(tiny_tokenizer, alpha, beta):
    model = make_model(tiny_tokenizer, lora=True)
    params = trainable(model)
    batch = default_collator(tiny_tokenizer)(tokenized(HARMFUL, tiny_tokenizer))

    def terms():  # the same noise every time, so only the weights change
        return harmful_terms(model, batch, generator=torch.Generator().manual_seed(0))

    before = terms()
    step_along(params, repnoise_penalty(before.noise_mmd, before.harmful_loss, alpha, beta))
    with torch.no_grad():
        after = terms()
    if beta > 0 and alpha == 0:
        assert after.noise_mmd < before.noise_mmd
    if alpha > 0 and beta == 0:
        assert after.harmful_loss > before.harmful_loss
        assert after.harmful_loss_final > before.harmful_loss_final
    if alpha > 0 and beta > 0:  # the reference weights: the ascent term dominates the step
        assert after.harmful_loss > before.harmful_loss


def test_trainer_step_minimises_the_repnoise_objective(tiny_tokenizer, tmp_path):
    """One SGD(lr=1) step of the trainer is minus the gradient of retain + beta MMD - alpha log(h + 1)."""
    align, harm = tokenized(REFUSALS, tiny_tokenizer), tokenized(HARMFUL, tiny_tokenizer)
    alpha, beta, seed = 0.1, 0.5, 7
    # The trainer draws its harmful batch like BoosterTrainer (shuffled, seed) and its noise from seed.
    order = list(DistributedSampler(harm, num_replicas=1, rank=0, shuffle=True, seed=seed))
    reference = make_model(tiny_tokenizer, lora=True)
    params = trainable(reference)
    collate = default_collator(tiny_tokenizer)
    noise_mmd, harmful, _ = reference_terms(reference, collate([harm[i] for i in order]), seed=seed)
    align_batch = collate(align)
    retain = token_loss_sum(reference, align_batch) / count_scored_tokens(align_batch["labels"])
    objective = retain + beta * noise_mmd - alpha * torch.log(harmful + 1)
    expected = torch.autograd.grad(objective, params, retain_graph=True)

    model = make_model(tiny_tokenizer, lora=True)
    args = RepNoiseConfig(
        output_dir=str(tmp_path),
        optim="sgd",
        learning_rate=1.0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        max_steps=1,
        per_device_train_batch_size=4,
        repnoise_alpha=alpha,
        repnoise_beta=beta,
        seed=seed,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = RepNoiseTrainer(
        model=model, args=args, train_dataset=align, harmful_dataset=harm, processing_class=tiny_tokenizer
    )
    before = [p.detach().clone() for p in trainable(model)]
    trainer.train()
    for p, b, g in zip(trainable(model), before, expected, strict=True):
        torch.testing.assert_close(p.detach() - b, -g, rtol=1e-9, atol=1e-11)
    # The harmful terms are a visible part of the update, not lost in the tolerance.
    g_retain = torch.autograd.grad(retain, params)
    part = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(expected, g_retain, strict=True)))
    assert part > 1e-3 * torch.sqrt(sum((a**2).sum() for a in expected))
    logged = next(e for e in trainer.state.log_history if "loss" in e)
    assert logged["repnoise_harmful_loss"] == pytest.approx(float(harmful.detach()), rel=1e-6)
    assert logged["repnoise_mmd"] == pytest.approx(float(noise_mmd.detach()), rel=1e-6)
